"""Context parallelism: the process group a transformer's tokens are sharded over, and the few collectives caching
needs on top of the model's own.

Under diffusers' context parallelism (``transformer.enable_parallelism(config=ContextParallelConfig(...))``) every
rank holds a contiguous shard of the sequence (``EquipartitionSharder``: ``chunk(N, dim=1)[rank]``). What each part
of a policy needs:

- signal gates (TeaCache, SpectralCache, FBCache): their band sums ``(sum |cur - prev|, sum |prev|)`` add up across
  ranks, so one all-reduce of those few floats per step makes every rank decide from the single-process numbers
  (``Shard.sum``); a probe every rank holds whole (a replicated timestep embedding) needs none;
- MagCache's calibration: the sum of the per-token norm ratios and the token count, reduced the same way;
- schedule gates (FORA, TaylorSeer's and FreqCa's intervals, Spectrum, MagCache with ratios): the decision is known
  from the step index alone, identical on every rank, with no communication;
- forecasters: token-wise (Reuse, Taylor, Chebyshev), so each rank forecasts its own tokens and keeps 1/N of the
  cache; FreqCa's low-pass mixes tokens over the whole grid: its DCT runs on the whole grid for 1/N of the channels
  (``Shard.tokens_to_channels`` / ``channels_to_tokens``, one all-to-all each way), which is exact.

The collectives are torch's functional collectives, so ``torch.compile(fullgraph=True)`` traces them into the graph.

Tensor parallelism (``Model.from_pretrained(dir, parallel_config=TensorParallelConfig(tp_degree=N))``) needs none of
this: it shards the weights of the ``Linear`` layers the model's ``_tp_plan`` names, and their row-wise halves
all-reduce their outputs, so every block receives and passes on the whole hidden states, identical on every rank
(plain tensors, not DTensors). Each rank's gate then decides from the same numbers as every other rank and its
forecaster holds the whole hidden states (the single-process cache size). ``tensor_parallel_layout`` reports it.
Eager only for now: compiled, the skipped blocks' all-reduces put the TP process group (a torchbind object) among
the arguments of fastcache_rt's ``torch.cond``, which refuses it. Context and tensor parallelism composed on one
mesh (diffusers' public API refuses it; its pieces compose) is a ``ParallelConfig`` holding both: the tokens' group
is the context-parallel one, and the TP peers of a rank hold the same token shard, so they reduce and decide alike.
"""

from __future__ import annotations

import torch

__all__ = ["Shard", "resolve_group", "tensor_parallel_layout"]


def _funcol():
    import torch.distributed._functional_collectives as funcol

    return funcol


def _wait(t: torch.Tensor) -> torch.Tensor:
    """Eager functional collectives return an ``AsyncCollectiveTensor``; custom ops take the plain tensor."""
    wait = getattr(t, "wait", None)
    return wait() if callable(wait) and not torch.compiler.is_compiling() else t


class Shard:
    """One rank's view of a context-parallel group (``size`` > 1 ranks, this one is ``rank``)."""

    __slots__ = ("group", "rank", "size")

    def __init__(self, group):
        import torch.distributed as dist

        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def __repr__(self) -> str:
        return f"Shard(rank={self.rank}, size={self.size})"

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The elementwise sum over the group (every rank gets the same bits)."""
        return _wait(_funcol().all_reduce(t, "sum", self.group))

    def tokens_to_channels(self, x: torch.Tensor) -> torch.Tensor:
        """(B, n, D) of this rank's tokens -> (B, n * size, D / size): every rank's tokens, in sequence order, for
        this rank's slice of the channels (one all-to-all). ``D`` must be divisible by ``size``."""
        B, n, D = x.shape
        d = D // self.size
        send = x.reshape(B, n, self.size, d).permute(2, 0, 1, 3).contiguous()  # (to rank, B, n, d)
        recv = _wait(_funcol().all_to_all_single(send, None, None, self.group))  # (from rank, B, n, d)
        return recv.reshape(self.size, B, n, d).permute(1, 0, 2, 3).reshape(B, self.size * n, d)

    def channels_to_tokens(self, y: torch.Tensor) -> torch.Tensor:
        """The inverse of ``tokens_to_channels``: (B, n * size, D / size) -> (B, n, D)."""
        B, N, d = y.shape
        n = N // self.size
        send = y.reshape(B, self.size, n, d).permute(1, 0, 2, 3).contiguous()  # (to rank, B, n, d)
        recv = _wait(_funcol().all_to_all_single(send, None, None, self.group))  # (from rank: its channels)
        return recv.reshape(self.size, B, n, d).permute(1, 2, 0, 3).reshape(B, n, self.size * d)

    def gather_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, n, D) -> (B, n * size, D): every rank's tokens in sequence order (one all-gather)."""
        return _wait(_funcol().all_gather_single(x.contiguous(), 1, self.group))

    def own_tokens(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous block of a (B, n * size, D) tensor."""
        return full.chunk(self.size, dim=1)[self.rank]


def resolve_group(model, group=None):
    """The process group the model's tokens are sharded over: ``group`` when given (a ``ProcessGroup`` or a
    ``DeviceMesh``), else the one diffusers' ``enable_parallelism`` set up (its flattened ring x Ulysses mesh, the
    one the sequence is split over); None without context parallelism or on a group of one rank."""
    import torch.distributed as dist

    if group is None:
        cfg = getattr(getattr(model, "_parallel_config", None), "context_parallel_config", None)
        mesh = getattr(cfg, "_flattened_mesh", None)
        if mesh is None:
            return None
        group = mesh
    if isinstance(group, dist.device_mesh.DeviceMesh):
        if group.ndim != 1:
            raise ValueError(f"group: a 1-D DeviceMesh (the context-parallel ranks), got {group.ndim}-D")
        group = group.get_group()
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group: expected a torch.distributed ProcessGroup or DeviceMesh, got {type(group).__name__}")
    return group if dist.get_world_size(group) > 1 else None


def tensor_parallel_layout(model) -> dict | None:
    """``{"rank", "size"}``: this rank's place on the tensor-parallel mesh diffusers set up on ``model``
    (``model._parallel_config.tensor_parallel_config``, a load with ``TensorParallelConfig``; its mesh is 1-D, as
    torch's parallel styles need; on another, ``rank`` is the global rank); None without tensor parallelism or on a
    mesh of one rank. Host work: the mesh's own bookkeeping, no device reads."""
    cfg = getattr(getattr(model, "_parallel_config", None), "tensor_parallel_config", None)
    mesh = getattr(cfg, "_mesh", None)
    if mesh is None or mesh.size() <= 1:
        return None
    return {"rank": mesh.get_local_rank() if mesh.ndim == 1 else mesh.get_rank(), "size": mesh.size()}
