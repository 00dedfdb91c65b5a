"""``python -m fastcache_rt bench|generate ...``: the same as the ``fastcache-rt`` console script."""

import sys

from .cli import main

sys.exit(main())
