"""`fuse`: combine info into the output of a layer, by a chosen method and approach, until removed.

>>> import torch
>>> from transformers import BertConfig, BertModel
>>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)).eval()
>>> ids = torch.tensor([[1, 2, 3]])
>>> with fuse(model, torch.ones(32), layer=1, method="add") as fusion:
...     fused = model(ids, output_hidden_states=True).hidden_states[1]
>>> plain = model(ids, output_hidden_states=True).hidden_states[1]
>>> torch.equal(fused, plain + 1)
True
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import nn

from .approaches import APPROACHES, Detach
from .errors import UnknownNameError
from .info import Info
from .methods import Method, make_method
from .positions import AttentionMaskWatch, Positions, PositionsLike
from .sites import Site, resolve_layer


class Fusion:
    """An attached fusion: `method` combines `info` into the output at `site`, by `approach`, at `positions`.

    Made by `fuse` (or `load_fusion`). A context manager; `remove()` detaches it and may be called
    any number of times.
    """

    def __init__(
        self, model: nn.Module, site: Site, method: Method, info: Info, approach: str, positions: Positions
    ) -> None:
        self.model = model
        self.site = site
        self.method = method
        self.info = info
        self.approach = approach
        self.positions = positions
        self._watch = AttentionMaskWatch(model) if positions.needs_attention_mask else None
        try:
            self._detach: Detach | None = APPROACHES[approach](site.module, self)
        except BaseException:
            if self._watch is not None:
                self._watch.remove()
            raise

    @property
    def layer(self) -> int:
        """The index that `hidden_states` gives the fused tensor."""
        return self.site.layer

    @property
    def active(self) -> bool:
        """Whether the fusion is still attached to the model."""
        return self._detach is not None

    def set_info(self, info: torch.Tensor | None) -> None:
        """Replace the info, checked as `fuse` checks it (e.g. a new batch's per-example info)."""
        new = Info(info, layout=self.info.layout, size=self.method.info_dim(self.model.config.hidden_size), prepare=self.method.prepare)
        if self.info.tensor is not None:
            new.to(self.info.tensor.dtype, self.info.tensor.device)
        self.info = new

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the fusion to `directory` (config JSON + safetensors); `load_fusion` reads it back."""
        from .saving import save_fusion

        return save_fusion(self, directory)

    def apply(self, hidden: torch.Tensor) -> torch.Tensor:
        """Combine the info into `hidden` (B, T, H) at the chosen positions: the one function both approaches call."""
        fused = self.method(hidden, self.info.for_hidden(hidden))
        chosen = self.positions.select(hidden, None if self._watch is None else self._watch.mask)
        return fused if chosen is None else torch.where(chosen, fused, hidden)

    def remove(self) -> None:
        """Detach the fusion, leaving the model as it was; calling it again does nothing."""
        detach, self._detach = self._detach, None
        if detach is not None:
            detach()
            if self._watch is not None:
                self._watch.remove()

    def __enter__(self) -> Fusion:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        shape = None if self.info.source is None else tuple(self.info.source.shape)
        return (
            f"Fusion(layer={self.layer} ({self.site.name}), method={self.method!r}, info={shape}, "
            f"positions={self.positions.value!r}, approach={self.approach!r}, {state})"
        )


def fuse(
    model: nn.Module,
    info: torch.Tensor | None = None,
    *,
    layer: int,
    method: str | Method = "addition",
    approach: str = "hook",
    positions: PositionsLike = "all",
    **method_arguments: Any,
) -> Fusion:
    """Combine `info` into the output of `layer` in every forward of `model`, until removed.

    `layer=k` is what `output_hidden_states` reports as `hidden_states[k]` (0: embeddings, -1: last
    block). `method` is a registered name (see `layerfuse.METHODS`), with its arguments as keywords
    (`alpha=0.5`), or a `Method` instance. `info` has the shapes the method takes: for most, (H,),
    (B, H) or (B, T, H). `approach` is "hook" or "layer"; `positions` is "all", "tokens", "first",
    "last", a list of token indices or a boolean (B, T) mask. Everything is checked before the model
    is touched.
    """
    if not isinstance(approach, str) or approach not in APPROACHES:
        raise UnknownNameError(f"unknown approach {approach!r}: use one of {', '.join(APPROACHES)}")
    site = resolve_layer(model, layer)
    hidden_size = model.config.hidden_size
    info_size = info.shape[-1] if isinstance(info, torch.Tensor) and info.ndim else None
    fusion_method = make_method(method, hidden_size=hidden_size, info_size=info_size, **method_arguments)
    fusion_info = Info(
        info,
        layout=fusion_method.info_layout,
        size=fusion_method.info_dim(hidden_size),
        prepare=fusion_method.prepare,
    )
    fusion_positions = Positions(positions)
    weight = next(model.parameters(), None)
    if weight is not None:
        fusion_method.to(device=weight.device, dtype=weight.dtype)
        fusion_info.to(weight.dtype, weight.device)
    return Fusion(model, site, fusion_method, fusion_info, approach, fusion_positions)
