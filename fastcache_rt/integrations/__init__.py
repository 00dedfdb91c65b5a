"""fastcache_rt inside other caching libraries: ``fastcache_rt.integrations.cache_dit`` (cache-dit calibrators).
Each integration is imported on its own; importing ``fastcache_rt`` imports none of them."""
