"""What a run fuses: a layer, method and info, or a saved fusion; attached to each model that embeds.

A run embeds in batches of whatever texts bucketing brings together, so the fusion must not depend on
the batch: positions are "all", "tokens", "first" or "last", and info is one vector (or basis) for
every row, or one per corpus row, (N, D) (or (N, K, D)), which the run hands out batch by batch.

>>> import torch
>>> from layerfuse import load_model
>>> model, _ = load_model()
>>> spec = FusionSpec(layer=3, method="add", info=torch.ones(384), arguments={"alpha": 0.5})
>>> with spec.attach(model) as fusion:
...     fusion.layer, fusion.method
(3, Addition(alpha=0.5))
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ArgumentValueError
from ..fusion import Fusion, fuse
from ..methods import METHODS, canonical_name
from ..positions import NAMED
from ..saving import load_fusion


def _digest(*chunks: bytes) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class FusionSpec:
    """A fusion to attach: `layer` with `method`, its `arguments`, `info` and `positions`, or the one saved in `saved`.

    `approach` defaults to "hook" (or the saved fusion's); `info` given with `saved` replaces the saved info.
    """

    layer: int | None = None
    method: str = "addition"
    arguments: Mapping[str, Any] = field(default_factory=dict)
    info: torch.Tensor | None = None
    approach: str | None = None
    positions: str = "all"
    saved: str | os.PathLike[str] | None = None

    def __post_init__(self) -> None:
        if (self.layer is None) == (self.saved is None):
            raise ArgumentValueError("give a fusion by its layer (and method, info) or by a saved fusion's folder")
        if self.saved is None:
            if METHODS[canonical_name(self.method)].info_layout != "none" and self.info is None:
                raise ArgumentValueError(
                    f"method {self.method!r} combines info into the layer, and none was given: "
                    "pass info (--info FILE) of shape (D,) for every row, or (N, D) with one row per corpus row"
                )
            if self.positions not in NAMED:
                raise ArgumentValueError(f"a run fuses at positions {', '.join(NAMED)}, not {self.positions!r}")
        elif self.arguments or self.method != "addition" or self.positions != "all":
            raise ArgumentValueError("a saved fusion brings its own method, arguments and positions: give none of them")

    def attach(self, model: nn.Module) -> Fusion:
        """Fuse into `model` and return the attached fusion, after checking that it suits a run."""
        if self.saved is None:
            fusion = fuse(
                model, self.info, layer=self.layer, method=self.method, approach=self.approach or "hook",
                positions=self.positions, **self.arguments,
            )
        else:
            fusion = load_fusion(self.saved, model, approach=self.approach, info=self.info)
        try:
            if not isinstance(fusion.positions.value, str):
                raise ArgumentValueError(
                    f"the fusion in {self.saved} fuses at token indices or a mask, which depend on how a batch "
                    f"is padded: a run takes fusions at positions {', '.join(NAMED)}"
                )
            if fusion.info.seq_len is not None:
                raise ArgumentValueError(
                    f"per-token info {tuple(fusion.info.source.shape)} depends on how a batch is padded: "
                    "give one info for every row, or one per corpus row"
                )
        except ArgumentValueError:
            fusion.remove()
            raise
        return fusion

    def describe(self) -> dict[str, Any]:
        """The spec as JSON, with digests of the info and of the saved fusion's files."""
        info = None
        if self.info is not None:
            data = self.info.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            info = {"shape": list(self.info.shape), "dtype": str(self.info.dtype), "sha256": _digest(data.tobytes())}
        saved = None
        if self.saved is not None:
            folder = Path(self.saved)
            saved = {
                "folder": str(folder.resolve()),
                "sha256": _digest(*(path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file())),
            }
        return json.loads(json.dumps({
            "layer": self.layer, "method": self.method, "arguments": dict(self.arguments), "info": info,
            "approach": self.approach, "positions": self.positions, "saved": saved,
        }))


def fusion_spec(
    *,
    layer: int | None = None,
    saved: str | os.PathLike[str] | None = None,
    method: str | None = None,
    arguments: Mapping[str, Any] | None = None,
    info: torch.Tensor | None = None,
    approach: str | None = None,
    positions: str | None = None,
) -> FusionSpec | None:
    """The `FusionSpec` that options name, or None (the plain model) when they name no fusion at all.

    >>> fusion_spec() is None
    True
    >>> fusion_spec(method="scale", arguments={"alpha": 2.0})
    Traceback (most recent call last):
    ...
    layerfuse.errors.ArgumentValueError: fusion options (method, arguments) need --layer or --fusion
    """
    options = {
        "method": method, "arguments": arguments or None, "info": info, "approach": approach, "positions": positions
    }
    given = [name for name, value in options.items() if value is not None]
    if layer is None and saved is None:
        if given:
            raise ArgumentValueError(
                f"fusion options ({', '.join(given)}) need --layer or --fusion"
            )
        return None
    return FusionSpec(
        layer=layer, saved=saved, method=method or "addition", arguments=arguments or {}, info=info,
        approach=approach, positions=positions or "all",
    )
