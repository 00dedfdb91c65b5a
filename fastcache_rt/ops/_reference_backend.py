"""The reference as a backend: always available, on every device."""

from ._reference import (  # noqa: F401  (re-exported as the backend's op functions)
    band_l1,
    chebyshev_forecast,
    chebyshev_weights,
    gate_decide,
    gate_step,
    hermite_forecast,
    history_update,
    taylor_forecast,
    taylor_update,
    taylor_update_error,
)

DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu", "meta")


def available() -> str | None:
    return None
