"""The adapter interface."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import torch


@dataclass
class StepInputs:
    """What one forward call has after embedding: the image tokens entering the blocks and everything the blocks and
    the output head need."""

    hidden: torch.Tensor  # image tokens entering the first block, (B, N, D)
    encoder: torch.Tensor | None  # text tokens entering the first block (None until ``Adapter.context`` made them)
    temb: torch.Tensor  # conditioning embedding for this step
    timestep: torch.Tensor  # the raw timestep input (used to detect a new generation on the device)
    extra: dict = field(default_factory=dict)  # family-specific (rotary embedding, attention kwargs, controlnet)
    return_dict: bool = True


class Adapter(abc.ABC):
    """One model family. Blocks are numbered in execution order across all of the family's block lists."""

    model_classes: tuple[str, ...] = ()

    @abc.abstractmethod
    def num_blocks(self, model) -> int:
        """How many blocks the forward runs."""

    @abc.abstractmethod
    def embed(self, model, args: dict) -> StepInputs:
        """Everything before the first block, from the forward's bound arguments."""

    @abc.abstractmethod
    def probe(self, model, inp: StepInputs) -> torch.Tensor:
        """TeaCache-style probe: the first block's modulated input."""

    def context(self, model, inp: StepInputs) -> torch.Tensor | None:
        """What only the blocks need (text tokens, rotary tables, ...), made on first use and kept in ``inp``, so a
        skipped step does not pay for it. Returns the text tokens entering the first block."""
        return inp.encoder

    @abc.abstractmethod
    def run_blocks(self, model, inp: StepInputs, hidden, encoder, start: int, stop: int | None):
        """Run blocks [start, stop); ``encoder`` None = not made yet (``context``). Returns (hidden, encoder)."""

    @abc.abstractmethod
    def head(self, model, inp: StepInputs, hidden: torch.Tensor) -> torch.Tensor:
        """Everything after the last block, with the current step's conditioning: the model's output tensor."""

    @abc.abstractmethod
    def wrap(self, inp: StepInputs, output: torch.Tensor):
        """The output tensor in the forward's return type (tuple or output dataclass)."""

    @abc.abstractmethod
    def output_like(self, model, inp: StepInputs) -> tuple[tuple[int, ...], torch.dtype]:
        """(shape, dtype) of the output tensor, without running the model (for the "output" cache site)."""

    def finish(self, model, inp: StepInputs, hidden: torch.Tensor):
        """``head`` then ``wrap``: what the forward returns."""
        return self.wrap(inp, self.head(model, inp, hidden))

    def token_grid(self, model, inp: StepInputs) -> tuple[int, int] | None:
        """(H, W) of the image-token grid when the adapter can tell without reading device data."""
        return None
