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

from types import TracebackType

import torch
from torch import nn

from .approaches import APPROACHES, Detach
from .errors import UnknownNameError
from .info import Info
from .methods import Method, make_method
from .sites import Site, resolve_layer


class Fusion:
    """An attached fusion: `method` combines `info` into the output at `site`, by `approach`.

    Made by `fuse`. A context manager; `remove()` detaches it and may be called any number of times.
    """

    def __init__(self, site: Site, method: Method, info: Info, approach: str) -> None:
        self.site = site
        self.method = method
        self.info = info
        self.approach = approach
        self._detach: Detach | None = APPROACHES[approach](site.module, self)

    @property
    def layer(self) -> int:
        """The index that `hidden_states` gives the fused tensor."""
        return self.site.layer

    @property
    def active(self) -> bool:
        """Whether the fusion is still attached to the model."""
        return self._detach is not None

    def apply(self, hidden: torch.Tensor) -> torch.Tensor:
        """Combine the info into `hidden` (B, T, H): the one function both approaches call."""
        return self.method(hidden, self.info.for_hidden(hidden))

    def remove(self) -> None:
        """Detach the fusion, leaving the model as it was; calling it again does nothing."""
        detach, self._detach = self._detach, None
        if detach is not None:
            detach()

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
        return (
            f"Fusion(layer={self.layer} ({self.site.name}), method={self.method!r}, "
            f"info={tuple(self.info.source.shape)}, approach={self.approach!r}, {state})"
        )


def fuse(
    model: nn.Module,
    info: torch.Tensor,
    *,
    layer: int,
    method: str | Method = "addition",
    approach: str = "hook",
) -> Fusion:
    """Combine `info` into the output of `layer` in every forward of `model`, until removed.

    `layer=k` is what `output_hidden_states` reports as `hidden_states[k]` (0: embeddings, -1: last
    block). `info` is (H,), (B, H) or (B, T, H). `method` is a registered name ("addition",
    "multiplication", ...) or a `Method`; `approach` is "hook" or "layer". Everything is checked
    before the model is touched.
    """
    if not isinstance(approach, str) or approach not in APPROACHES:
        raise UnknownNameError(
            f"unknown approach {approach!r}: use one of {', '.join(APPROACHES)}"
        )
    site = resolve_layer(model, layer)
    fusion_method = make_method(method)
    fusion_info = Info(info, hidden_size=model.config.hidden_size)
    weight = next(model.parameters(), None)
    if weight is not None:
        fusion_info.to(weight.dtype, weight.device)
    return Fusion(site, fusion_method, fusion_info, approach)
