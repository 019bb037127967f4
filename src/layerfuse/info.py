"""What is combined: info layouts, and info checked once, then cast, prepared and shaped for the hidden states (B, T, H).

A method's `info_layout` names one of `LAYOUTS`. For "vector" methods, (D,) applies to every
example and token, (B, D) to each example's tokens, (B, T, D) token by token. "basis" and "sequence"
methods take (K, D) for every example or (B, K, D) per example; "eraser" methods (1 + 2r, D) or
(B, 1 + 2r, D): a mean, then the r rows of B and the r rows of Aᵀ of a rank-r map A·B. D is the
method's `info_dim(H)`.

>>> import torch
>>> Info(torch.ones(4, 8), layout="vector", size=8).tensor.shape
torch.Size([4, 1, 8])
>>> LAYOUTS["basis"].shapes, LAYOUTS["vector"].is_batched(2)
('(K, D) or (B, K, D)', True)
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch.utils.weak import WeakIdKeyDictionary

from .errors import FileFormatError, InfoShapeError, InfoTypeError, InfoValueError


@dataclass(frozen=True)
class InfoLayout:
    """The shapes a kind of info takes: its ranks, the ranks that carry a batch or a token dimension, an example."""

    name: str
    ranks: tuple[int, ...]
    shapes: str
    batched: tuple[int, ...] = ()
    per_token: tuple[int, ...] = ()
    example: tuple[int, ...] = ()

    def is_batched(self, rank: int) -> bool:
        """Whether info of this rank has one row per example, first."""
        return rank in self.batched

    def is_per_token(self, rank: int) -> bool:
        """Whether info of this rank has one row per token, second (after the batch)."""
        return rank in self.per_token

    def check(self, shape: tuple[int, ...], size: int, what: str = "info") -> None:
        """Refuse `shape` unless it is one of the layout's, with last dimension `size`."""
        if len(shape) not in self.ranks or shape[-1] != size:
            raise InfoShapeError(f"{what} must have shape {self.shapes} with D = {size}, got {tuple(shape)}")

    def example_shape(self, size: int) -> tuple[int, ...] | None:
        """A shape of info for every example (seeded random info of the commands); None: no info."""
        return None if not self.ranks else (*self.example, size)

    def broadcastable(self, info: torch.Tensor) -> torch.Tensor:
        """`info` shaped to broadcast against hidden states (B, T, H): (B, D) gains a token dimension."""
        if self.per_token and self.is_batched(info.ndim) and not self.is_per_token(info.ndim):
            return info.unsqueeze(1)
        return info

    def stacked_per_example(self, infos: torch.Tensor, batch: int) -> torch.Tensor:
        """C infos stacked along a first dimension as one info for a batch of `batch` examples repeated C times.

        >>> LAYOUTS["vector"].stacked_per_example(torch.arange(2.0)[:, None], 3).flatten().tolist()
        [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
        """
        if self.is_batched(infos.ndim - 1):
            return infos.flatten(0, 1)
        return infos.repeat_interleave(batch, dim=0)


LAYOUTS: dict[str, InfoLayout] = {
    "vector": InfoLayout("vector", (1, 2, 3), "(D,), (B, D) or (B, T, D)", batched=(2, 3), per_token=(3,)),
    "basis": InfoLayout("basis", (2, 3), "(K, D) or (B, K, D)", batched=(3,), example=(2,)),
    "sequence": InfoLayout("sequence", (2, 3), "(K, D) or (B, K, D)", batched=(3,), example=(2,)),
    "eraser": InfoLayout("eraser", (2, 3), "(1 + 2r, D) or (B, 1 + 2r, D)", batched=(3,), example=(3,)),
    "none": InfoLayout("none", (), "no info (None)"),
}


def example_info(layout: str, size: int, *, seed: int) -> torch.Tensor | None:
    """Seeded standard-normal info of `layout` with D = `size`, for every example: (D,) or (2, D); None for "none".

    >>> example_info("basis", 4, seed=0).shape
    torch.Size([2, 4])
    """
    shape = LAYOUTS[layout].example_shape(size)
    return None if shape is None else torch.randn(shape, generator=torch.Generator().manual_seed(seed))


FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
"""The dtypes info may have: those of hidden states."""


def check_tensor(tensor: object, what: str, error: type[Exception] = InfoTypeError) -> torch.Tensor:
    """`tensor` if it is a dense torch.Tensor with data (not meta, sparse or nested); else `error` saying so.

    >>> check_tensor(torch.ones(2, device="meta"), "info")
    Traceback (most recent call last):
    ...
    layerfuse.errors.InfoTypeError: info must be a dense tensor with data, got a meta tensor (shape and dtype only): pass one with values, e.g. on "cpu"
    """
    if not isinstance(tensor, torch.Tensor):
        raise error(f"{what} must be a torch.Tensor, got {type(tensor).__name__}: use torch.as_tensor(...)")
    if tensor.is_meta:
        raise error(
            f"{what} must be a dense tensor with data, got a meta tensor (shape and dtype only): "
            'pass one with values, e.g. on "cpu"'
        )
    if tensor.layout is not torch.strided or tensor.is_nested:
        layout = "nested" if tensor.is_nested else str(tensor.layout).removeprefix("torch.")
        raise error(f"{what} must be a dense tensor, got a {layout} tensor: use .to_dense()")
    return tensor


def _check_finite(info: torch.Tensor, source: torch.dtype | None = None) -> None:
    """Refuse non-finite info; `source`: the dtype it was cast from, whose range it may not hold."""
    bad = int((~torch.isfinite(info)).sum())
    if bad and source is not None:
        largest = torch.finfo(info.dtype).max
        raise InfoValueError(
            f"{bad} value(s) of the {source} info overflow the model's dtype {info.dtype}, whose largest finite "
            f"value is {largest:.4g}: scale the info into that range"
        )
    if bad:
        raise InfoValueError(
            f"info holds {bad} NaN or infinite value(s) in dtype {info.dtype}: every value must be finite"
        )


_COPIES = WeakIdKeyDictionary()
"""For a small info tensor of the caller's, the checked copy made of it last, while the tensor lives."""
SMALL = 1 << 16
"""The most elements an info may have for its checked copy to be kept for the next fusion of the same tensor."""


def _checked_copy(info: torch.Tensor) -> torch.Tensor:
    """A copy of `info` after refusing non-finite values; for the same small tensor with the same values
    as at its last copy, that copy again, without a check: `fuse` called per batch with one info copies it once.
    A copy made under `torch.inference_mode` is given again only under it (autograd cannot record it).

    A tensor that requires grad is copied with its graph every time.
    """
    if info.requires_grad:
        _check_finite(info)
        return info.clone()
    earlier = _COPIES.get(info)
    if (
        earlier is not None
        and (torch.is_inference_mode_enabled() or not earlier.is_inference())
        and earlier.shape == info.shape
        and earlier.dtype == info.dtype
        and earlier.device == info.device
        and torch.equal(earlier, info)
    ):
        return earlier
    _check_finite(info)
    copy = info.detach().clone()
    if info.numel() <= SMALL:
        _COPIES[info] = copy
    return copy


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
        check_tensor(info, "info")
        if info.dtype not in FLOATS:
            raise InfoTypeError(
                f"info must be a floating-point tensor of dtype float16, bfloat16, float32 or float64, "
                f"got {info.dtype}: use info.float()"
            )
        shapes = LAYOUTS[layout]
        shapes.check(tuple(info.shape), size)
        self.source = _checked_copy(info)
        if shapes.is_batched(info.ndim):
            self.batch_size = info.shape[0]
        if shapes.is_per_token(info.ndim):
            self.seq_len = info.shape[1]
        self.tensor = self._shaped(self.source)

    def _shaped(self, info: torch.Tensor) -> torch.Tensor:
        return LAYOUTS[self.layout].broadcastable(self.prepare(info))

    def to(self, dtype: torch.dtype, device: torch.device | None = None) -> None:
        """Cast and prepare the info for `dtype` on `device` (None: where it is); a no-op when it is there already.

        A cast to another dtype is checked for overflow; a move to another device keeps the values.
        """
        if self.source is None:
            return
        device = self.tensor.device if device is None else device
        if self.tensor.dtype != dtype or self.tensor.device != device:
            cast = self.source.to(device=device, dtype=dtype)
            if dtype != self.source.dtype:
                _check_finite(cast, self.source.dtype)
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
                "examples: give info without a batch dimension to use any batch size, or one row per example "
                "of this forward (generate with num_beams or num_return_sequences n runs each prompt n times: "
                "info.repeat_interleave(n, dim=0))"
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
    if path.stat().st_size == 0:
        raise FileFormatError(f"cannot read info from {path}: the file is empty")
    try:
        found = _READERS[path.suffix](path)
    except (ValueError, OSError, EOFError, RuntimeError, pickle.UnpicklingError, SafetensorError) as error:
        raise FileFormatError(f"cannot read info from {path}: {error}") from error
    tensor = next(iter(found.values())) if len(found) == 1 else found.get("info")
    if not isinstance(tensor, torch.Tensor):
        what = type(tensor).__name__ if len(found) == 1 else f"tensors {sorted(found)} but none named 'info'"
        raise FileFormatError(f"{path} holds {what}, not one info tensor")
    return tensor
