"""What is combined: check info once, then cast, prepare and shape it for the hidden states (B, T, H).

A method's `info_layout` says which shapes it takes. For "vector" methods, (D,) applies to every
example and token, (B, D) to each example's tokens, (B, T, D) token by token. "basis" and "sequence"
methods take (K, D) for every example or (B, K, D) per example. D is the method's `info_dim(H)`.

>>> import torch
>>> Info(torch.ones(4, 8), layout="vector", size=8).tensor.shape
torch.Size([4, 1, 8])
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors import FileFormatError, InfoShapeError, InfoTypeError, InfoValueError
from .methods import INFO_SHAPES

RANKS = {"vector": (1, 2, 3), "basis": (2, 3), "sequence": (2, 3)}


def _check_finite(info: torch.Tensor) -> None:
    bad = int((~torch.isfinite(info)).sum())
    if bad:
        raise InfoValueError(
            f"info holds {bad} NaN or infinite value(s) in dtype {info.dtype}: every value must be finite"
        )


class Info:
    """Validated info, kept prepared in the hidden states' dtype and device, checked against each forward."""

    def __init__(
        self,
        info: torch.Tensor | None,
        *,
        layout: str,
        size: int,
        prepare: Callable[[torch.Tensor], torch.Tensor] = lambda info: info,
    ) -> None:
        self.layout, self.prepare = layout, prepare
        self.batch_size: int | None = None
        self.seq_len: int | None = None
        if layout == "none":
            if info is not None:
                raise InfoShapeError("this method takes no info: pass info=None")
            self.source = self.tensor = None
            return
        if not isinstance(info, torch.Tensor):
            raise InfoTypeError(
                f"info must be a torch.Tensor, got {type(info).__name__}: use torch.as_tensor(info)"
            )
        if not info.is_floating_point():
            raise InfoTypeError(f"info must be a floating-point tensor, got dtype {info.dtype}: use info.float()")
        if info.ndim not in RANKS[layout] or info.shape[-1] != size:
            raise InfoShapeError(
                f"info must have shape {INFO_SHAPES[layout]} with D = {size}, got {tuple(info.shape)}"
            )
        _check_finite(info)
        self.source = info.clone() if info.requires_grad else info.detach().clone()
        if info.ndim == max(RANKS[layout]) or (layout == "vector" and info.ndim == 2):
            self.batch_size = info.shape[0]
        if layout == "vector" and info.ndim == 3:
            self.seq_len = info.shape[1]
        self.tensor = self._shaped(self.source)

    def _shaped(self, info: torch.Tensor) -> torch.Tensor:
        info = self.prepare(info)
        return info.unsqueeze(1) if self.layout == "vector" and info.ndim == 2 else info

    def to(self, dtype: torch.dtype, device: torch.device) -> None:
        """Cast and prepare the info for `dtype` on `device` (a no-op when it is there already)."""
        if self.source is not None and (self.tensor.dtype != dtype or self.tensor.device != device):
            cast = self.source.to(device=device, dtype=dtype)
            _check_finite(cast)
            self.tensor = self._shaped(cast)

    def for_hidden(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The info as the method takes it for `hidden` (B, T, H), after checking B and T."""
        if self.tensor is None:
            return None
        if self.tensor.dtype is not hidden.dtype or self.tensor.device != hidden.device:
            self.to(hidden.dtype, hidden.device)
        if self.batch_size is not None and self.batch_size != hidden.shape[0]:
            raise InfoShapeError(
                f"info is for a batch of {self.batch_size} but this forward has {hidden.shape[0]} "
                "examples: give info without a batch dimension to use any batch size"
            )
        if self.seq_len is not None and self.seq_len != hidden.shape[1]:
            raise InfoShapeError(
                f"info is for {self.seq_len} tokens but this forward has {hidden.shape[1]}: "
                "pad the per-token info to the batch's length, or give (B, D) info"
            )
        return self.tensor


_READERS: dict[str, Callable[[Path], dict[str, object]]] = {
    ".npy": lambda path: {"info": torch.from_numpy(numpy.load(path, allow_pickle=False))},
    ".pt": lambda path: {"info": torch.load(path, map_location="cpu", weights_only=True)},
    ".safetensors": lambda path: dict(load_file(path)),
}


def read_info(path: str | os.PathLike[str]) -> torch.Tensor:
    """Read an info tensor from a `.npy`, `.pt` or `.safetensors` file (one tensor, or the one named "info")."""
    path = Path(path)
    if path.suffix not in _READERS:
        raise FileFormatError(f"cannot read info from {path.name}: use a {', '.join(_READERS)} file")
    if not path.is_file():
        raise FileFormatError(f"no info file at {path}")
    try:
        found = _READERS[path.suffix](path)
    except (ValueError, OSError, RuntimeError, pickle.UnpicklingError, SafetensorError) as error:
        raise FileFormatError(f"cannot read info from {path}: {error}") from error
    tensor = next(iter(found.values())) if len(found) == 1 else found.get("info")
    if not isinstance(tensor, torch.Tensor):
        what = type(tensor).__name__ if len(found) == 1 else f"tensors {sorted(found)} but none named 'info'"
        raise FileFormatError(f"{path} holds {what}, not one info tensor")
    return tensor
