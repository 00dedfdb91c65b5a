"""fastcache_rt.ops: the numeric ops of diffusion caching, each a registered ``torch.library`` op
(``torch.ops.fastcache_rt.<name>``) with a plain-torch reference and fast backends (cpu, triton, cuda)."""

from ._backend import backends
from .band_l1 import band_l1
from .chebyshev import chebyshev_forecast, chebyshev_weights, history_update
from .gate import gate_decide, gate_params, gate_state, gate_step
from .layout import PARAMS_LEN, STATE_LEN
from .taylor import hermite_forecast, taylor_forecast, taylor_update

__all__ = [
    "PARAMS_LEN",
    "STATE_LEN",
    "backends",
    "band_l1",
    "chebyshev_forecast",
    "chebyshev_weights",
    "gate_decide",
    "gate_params",
    "gate_state",
    "gate_step",
    "hermite_forecast",
    "history_update",
    "taylor_forecast",
    "taylor_update",
]
