"""`ForwardWatch`: what a fusion needs to know about the current forward of the model it fuses.

The attention mask the forward was given (for positions such as "tokens"), and how many times the
fused module has run in it (for a block shared by several layers, as in ALBERT). Two hooks on the
model gather it, whichever the approach, and leave with the fusion.

>>> from transformers import BertConfig, BertModel
>>> model = BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8))
>>> watch = ForwardWatch(model, needs_mask=True)
>>> watch.remove()
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from .errors import ArchitectureError


def attention_mask_index(model: nn.Module) -> int:
    """Where `model.forward` takes `attention_mask` among its positional arguments."""
    parameters = list(inspect.signature(model.forward).parameters)
    if "attention_mask" not in parameters:
        raise ArchitectureError(
            f"positions 'tokens', 'first' and 'last' read the attention mask, but "
            f"{type(model).__name__}.forward takes none: give token indices or a boolean mask"
        )
    return parameters.index("attention_mask")


class ForwardWatch:
    """Records, for each forward of `model`, its attention mask and a count of the fused module's calls."""

    def __init__(self, model: nn.Module, *, needs_mask: bool) -> None:
        self.index = attention_mask_index(model) if needs_mask else None
        self.mask: torch.Tensor | None = None
        self.calls = 0
        self._handles = [
            model.register_forward_pre_hook(self._enter, with_kwargs=True, prepend=True),
            model.register_forward_hook(self._exit, always_call=True),
        ]

    def _enter(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.calls = 0
        if self.index is not None:
            self.mask = kwargs.get("attention_mask", args[self.index] if len(args) > self.index else None)

    def _exit(self, *_: Any) -> None:
        self.mask = None

    def remove(self) -> None:
        """Remove the hooks; calling it again does nothing."""
        for handle in self._handles:
            handle.remove()
        self.mask = None
