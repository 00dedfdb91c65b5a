"""The tiny-model contract of ``fastcache_rt.testing.families``: how to build a family's model from a config and
call it."""

from dataclasses import dataclass
from typing import Callable
import torch

@dataclass
class Tiny:
    build: Callable[[], torch.nn.Module]          # the tiny model, eval(), deterministic (torch.manual_seed inside), random weights from a config
    inputs: Callable[[int, int, int], dict]       # (seed, batch, size) -> forward kwargs except `timestep`; size 0 and 1 give two different token grids; include return_dict=False
    timestep: Callable[[float, int], torch.Tensor]  # (t in (0, 1], 1 = pure noise; batch) -> the `timestep` argument in the model's convention
    latent: str = "hidden_states"                 # the forward argument holding the latent the sampler updates
    grid: Callable[[int], tuple] | None = None    # size -> the (frames, height, width) token grid the declaration must report (None if the declaration reports None)
    timestep_arg: str = "timestep"                # the forward's name for the timestep argument


def gen(seed: int) -> torch.Generator:
    """The CPU generator every tiny input is drawn from."""
    return torch.Generator().manual_seed(seed)


def built(cls, **config):
    """A builder of ``cls(**config)``: deterministic random weights (seed 0), eval mode."""
    def build():
        torch.manual_seed(0)
        return cls(**config).eval()

    return build
