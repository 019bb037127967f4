"""`SaveGuard`: while fusions are attached to a model, its `save_pretrained` warns that they are not saved.

`model.save_pretrained(folder)` writes the model's own weights only; a fusion is saved beside them
with `fusion.save(folder)` (or by `layerfuse.FusionTrainer`'s checkpoints). The guard is put on the
instance while a fusion is attached, as `watch.py` puts the model's forward, and taken off when the
last one is removed, leaving the model's `__dict__` as it was.

>>> import torch
>>> from transformers import BertConfig, BertModel
>>> from layerfuse import fuse
>>> model = BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8))
>>> with fuse(model, torch.ones(8), layer=1):
...     "save_pretrained" in model.__dict__
True
>>> "save_pretrained" in model.__dict__
False
"""

from __future__ import annotations

import threading
import warnings
from typing import TYPE_CHECKING, Any

from torch import nn

from .stand_ins import StandIn

if TYPE_CHECKING:
    from .fusion import Fusion

_LOCK = threading.Lock()
"""Held while a guard is put on or taken off a model, so that fusions attached and removed from several threads agree."""


class SaveGuard(StandIn):
    """A model's `save_pretrained`, put in its place on the instance: it warns of the fusions it does not save."""

    method = "save_pretrained"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.model_name = type(model).__name__
        self.fusions: list[Fusion] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.fusions:
            self._warn()
        return self.inner(*args, **kwargs)

    def _warn(self) -> None:
        named = "; ".join(f"{fusion.method.method_name} at {fusion.site.name}" for fusion in self.fusions)
        warnings.warn(
            f"{self.model_name}.save_pretrained saves the model's own weights, without the attached fusion(s) "
            f"{named}: save each beside them with fusion.save(folder) and load it back with "
            "layerfuse.load_fusion(folder, model), or remove the fusion(s) before saving",
            UserWarning,
            stacklevel=3,
        )


def guard(fusion: Fusion) -> None:
    """Make `fusion.model.save_pretrained` warn of `fusion` until `unguard`; a model without one is left alone."""
    model = fusion.model
    if not callable(getattr(model, "save_pretrained", None)):
        return
    with _LOCK:
        SaveGuard.on(model).fusions.append(fusion)


def unguard(fusion: Fusion) -> None:
    """Stop warning of `fusion`, restoring the model's `save_pretrained` once no fusion is left; idempotent."""
    model = fusion.model
    with _LOCK:
        current = model.__dict__.get(SaveGuard.key)
        if current is None or fusion not in current.fusions:
            return
        current.fusions.remove(fusion)
        if not current.fusions:
            current.take_off(model)
