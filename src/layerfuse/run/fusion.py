"""The fusion of a run: a `FusionConfig` and its info (or a saved fusion's), checked to suit a run, and attached.

A run embeds in batches of whatever texts bucketing brings together, so the fusion must not depend on
the batch: positions are "all", "tokens", "first" or "last", and info is one vector (or basis) for
every row, or one per corpus row, (N, D) (or (N, K, D)), which the run hands out batch by batch.

>>> import torch
>>> from layerfuse import FusionConfig, load_model
>>> model, _ = load_model()
>>> config, info = run_fusion(FusionConfig(layer=3, arguments={"alpha": 0.5}), torch.ones(384))
>>> with attach(model, config, info) as fusion:
...     fusion.layer, fusion.method
(3, Addition(alpha=0.5))
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import FusionConfig
from ..errors import ArgumentTypeError, ArgumentValueError
from ..fusion import Fusion, fuse
from ..info import LAYOUTS
from ..methods import METHODS
from ..paths import check_readable
from ..positions import NAMED
from ..saving import load_fusion, read_fusion


def run_fusion(
    config: FusionConfig | None, info: torch.Tensor | None, saved: str | os.PathLike[str] | None = None
) -> tuple[FusionConfig | None, torch.Tensor | None]:
    """The config and info a run attaches, after checking that they suit a run; (None, None) for the plain model.

    A `saved` fusion's folder supplies the config and the info that are not given.
    """
    if config is not None and not isinstance(config, FusionConfig):
        raise ArgumentTypeError(f"a run's fusion is a layerfuse.FusionConfig, got {type(config).__name__}")
    if saved is not None:
        if Path(saved).is_dir():
            check_readable(saved, "the saved fusion")
        saved_config, saved_info = read_fusion(saved)
        config = saved_config if config is None else config
        info = saved_info if info is None else info
    if config is None:
        if info is not None:
            raise ArgumentValueError("info goes with a fusion: give its config (a layer) or a saved fusion too")
        return None, None
    where = f"the fusion in {saved}" if saved is not None else "a run's fusion"
    if not isinstance(config.positions, str):
        raise ArgumentValueError(
            f"{where} fuses at token indices or a mask, which depend on how a batch is padded: "
            f"a run fuses at positions {', '.join(NAMED)}"
        )
    layout = LAYOUTS[METHODS[config.method].info_layout]
    if info is None and layout.ranks:
        raise ArgumentValueError(
            f"method {config.method!r} combines info into the layer, and none was given: pass info (--info FILE) "
            "of shape (D,) for every row, or (N, D) with one row per corpus row"
        )
    if info is not None and layout.is_per_token(info.ndim):
        raise ArgumentValueError(
            f"per-token info {tuple(info.shape)} depends on how a batch is padded: "
            "give one info for every row, or one per corpus row"
        )
    return config, info


def row_info(config: FusionConfig | None, info: torch.Tensor | None) -> torch.Tensor | None:
    """The info if it has one row per corpus row, else None."""
    if config is None or info is None or not LAYOUTS[METHODS[config.method].info_layout].is_batched(info.ndim):
        return None
    return info


def attach(
    model: nn.Module, config: FusionConfig, info: torch.Tensor | None, saved: str | os.PathLike[str] | None = None
) -> Fusion:
    """Fuse `config` with `info` into `model`: with the saved fusion's parameters, if there is one."""
    if saved is None:
        return fuse(model, info, config)
    return load_fusion(saved, model, config=config, info=info)


def _digest(*chunks: bytes) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def model_digest(model: nn.Module) -> str:
    """The SHA-256 of a model's weights (names, dtypes, shapes and values): the same model, the same digest."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def file_digest(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def describe(
    config: FusionConfig | None, info: torch.Tensor | None, saved: str | os.PathLike[str] | None = None
) -> dict[str, Any] | None:
    """The fusion as JSON, with digests of the info and of the saved fusion's files: what a resumed run must match."""
    if config is None:
        return None
    digest = None
    if info is not None:
        digest = {"shape": list(info.shape), "dtype": str(info.dtype), "sha256": _digest(_tensor_bytes(info))}
    folder = None
    if saved is not None:
        path = Path(saved)
        files = sorted(file for file in path.iterdir() if file.is_file())
        folder = {"folder": str(path.resolve()), "sha256": _digest(*(file.read_bytes() for file in files))}
    return {"config": config.to_dict(), "info": digest, "saved": folder}
