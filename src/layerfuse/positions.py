"""Which positions a fusion changes: all, the real tokens, the first or last real token, given indices or a mask.

"tokens", "first" and "last" read the attention mask of the current forward of the fused model (with
a forward pre-hook on it, whichever the approach); a forward without one treats every position as a
real token. Positions not selected keep their exact values, so with "tokens" padding is never
changed, and "first" and "last" change nothing in a row that is all padding.

>>> import torch
>>> Positions("last").select(torch.zeros(3, 4, 8), torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])).squeeze(-1)
tensor([[False,  True, False, False],
        [False, False, False,  True],
        [False, False, False, False]])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import ArgumentTypeError, ArgumentValueError, InfoShapeError
from .info import check_tensor

PositionsLike = str | Sequence[int] | torch.Tensor
NAMED = ("all", "tokens", "first", "last")


class Positions:
    """Validated positions; `select` gives a (B or 1, T, 1) boolean mask for one forward, or None for all."""

    def __init__(self, positions: PositionsLike = "all") -> None:
        self.value = positions
        self.indices: list[int] | None = None
        self.mask: torch.Tensor | None = None
        self.needs_attention_mask = isinstance(positions, str) and positions in ("tokens", "first", "last")
        """Whether `select` needs the attention mask of the current forward."""
        if isinstance(positions, str):
            if positions not in NAMED:
                raise ArgumentValueError(
                    f"unknown positions {positions!r}: use one of {', '.join(NAMED)}, "
                    "a list of token indices, or a boolean (B, T) mask"
                )
        elif isinstance(positions, torch.Tensor):
            check_tensor(positions, "a positions mask", ArgumentTypeError)
            if positions.dtype != torch.bool or positions.ndim != 2:
                raise ArgumentTypeError(
                    f"a positions tensor must be a boolean (B, T) mask, got {positions.dtype} "
                    f"of shape {tuple(positions.shape)}"
                )
            self.mask = positions.detach().clone()
        elif (
            isinstance(positions, Sequence)
            and positions
            and all(isinstance(i, int) and not isinstance(i, bool) for i in positions)
        ):
            self.indices = list(positions)
        else:
            raise ArgumentTypeError(
                f"positions must be one of {', '.join(NAMED)}, a non-empty list of int token indices, "
                f"or a boolean (B, T) mask, got {positions!r}"
            )

    def to_json(self) -> str | list[int] | None:
        """The positions as JSON (None for a mask tensor, which is saved as a tensor)."""
        return self.indices if self.indices is not None else None if self.mask is not None else self.value

    def select(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The positions of `hidden` (B, T, H) to change, as a (B or 1, T, 1) boolean tensor; None: all."""
        if self.value == "all":
            return None
        batch, length = hidden.shape[:2]
        if self.mask is not None:
            if tuple(self.mask.shape) != (batch, length):
                raise InfoShapeError(
                    f"the positions mask is {tuple(self.mask.shape)} but this forward is ({batch}, {length})"
                )
            if self.mask.device != hidden.device:
                self.mask = self.mask.to(hidden.device)
            return self.mask.unsqueeze(-1)
        if self.indices is not None:
            bad = [i for i in self.indices if not -length <= i < length]
            if bad:
                raise InfoShapeError(f"positions {bad} are out of range for a forward of {length} tokens")
            chosen = torch.zeros(1, length, 1, dtype=torch.bool, device=hidden.device)
            chosen[0, self.indices] = True
            return chosen
        if attention_mask is None:
            if self.value == "tokens":
                return None  # every position a real token: "tokens" is "all"
            real = torch.ones(batch, length, dtype=torch.bool, device=hidden.device)
        else:
            current = _current(attention_mask, batch, length)
            if self.value == "tokens" and _unpadded(current):
                return None  # as above, and the forward spares a torch.where
            real = current.to(device=hidden.device, dtype=torch.bool)
        if self.value == "tokens":
            return real.unsqueeze(-1)
        columns = torch.arange(length, device=hidden.device)
        if self.value == "first":
            index = real.int().argmax(dim=1)
        else:
            index = length - 1 - real.flip(1).int().argmax(dim=1)
        # A row of padding only has no first or last real token: `& real` leaves it unchanged.
        return ((columns[None, :] == index[:, None]) & real).unsqueeze(-1)


def _current(attention_mask: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """The columns of `attention_mask` for this forward's `length` tokens: with a cache, the mask covers past and
    current tokens, and the current ones are the last. Under a trace, sliced always: the graph must hold for a
    longer mask too."""
    shape = attention_mask.shape
    if len(shape) != 2 or shape[0] != batch or shape[1] < length:
        raise InfoShapeError(
            f"positions need a 2-D (B, T) attention mask covering this forward's ({batch}, {length}) "
            f"tokens, got {tuple(shape)}"
        )
    return attention_mask if shape[1] == length and not torch.jit.is_tracing() else attention_mask[:, -length:]


def _unpadded(current: torch.Tensor) -> bool:
    """Whether the `current` columns of a CPU attention mask are all real tokens, as an unpadded batch's are.

    Not asked of a mask on an accelerator (the answer would wait for the device), nor under a trace or
    `torch.compile`, whose graph must hold for padded batches too: there the positions are chosen as usual.
    """
    if not current.is_cpu or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    return bool(current.all())
