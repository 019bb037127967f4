"""What is combined: check info once and shape it to broadcast against hidden states (B, T, H).

(H,) applies to every example and token, (B, H) to each example's tokens, (B, T, H) token by token.

>>> import torch
>>> Info(torch.ones(4, 8), hidden_size=8).tensor.shape
torch.Size([4, 1, 8])
"""

from __future__ import annotations

import torch

from .errors import InfoShapeError, InfoTypeError, InfoValueError


class Info:
    """Validated info, kept in the hidden states' dtype and device, checked against each forward."""

    def __init__(self, info: torch.Tensor, hidden_size: int) -> None:
        if not isinstance(info, torch.Tensor):
            raise InfoTypeError(
                f"info must be a torch.Tensor, got {type(info).__name__}: use torch.as_tensor(info)"
            )
        if not info.is_floating_point():
            raise InfoTypeError(
                f"info must be a floating-point tensor, got dtype {info.dtype}: use info.float()"
            )
        if info.ndim not in (1, 2, 3) or info.shape[-1] != hidden_size:
            raise InfoShapeError(
                f"info must have shape (H,), (B, H) or (B, T, H) with H = {hidden_size}, "
                f"got {tuple(info.shape)}"
            )
        self.source = info.clone() if info.requires_grad else info.detach().clone()
        self._check_finite(self.source)
        self.per_token = info.ndim == 3
        self.batch_size = info.shape[0] if info.ndim > 1 else None
        self.seq_len = info.shape[1] if self.per_token else None
        self.tensor = self.source if info.ndim != 2 else self.source.unsqueeze(1)

    @staticmethod
    def _check_finite(info: torch.Tensor) -> None:
        bad = int((~torch.isfinite(info)).sum())
        if bad:
            raise InfoValueError(
                f"info holds {bad} NaN or infinite value(s) in dtype {info.dtype}: "
                "every value must be finite"
            )

    def to(self, dtype: torch.dtype, device: torch.device) -> None:
        """Cast the info to `dtype` on `device` (a no-op when it is there already)."""
        if self.tensor.dtype != dtype or self.tensor.device != device:
            tensor = self.source.to(device=device, dtype=dtype)
            self._check_finite(tensor)
            self.tensor = tensor if tensor.ndim != 2 else tensor.unsqueeze(1)

    def for_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """The info as it broadcasts against `hidden` (B, T, H), after checking B and T."""
        if self.tensor.dtype != hidden.dtype or self.tensor.device != hidden.device:
            self.to(hidden.dtype, hidden.device)
        if self.batch_size is not None and self.batch_size != hidden.shape[0]:
            raise InfoShapeError(
                f"info is for a batch of {self.batch_size} but this forward has {hidden.shape[0]} "
                "examples: fuse (H,) info to use any batch size"
            )
        if self.per_token and self.seq_len != hidden.shape[1]:
            raise InfoShapeError(
                f"info is for {self.seq_len} tokens but this forward has {hidden.shape[1]}: "
                "pad the per-token info to the batch's length, or fuse (B, H) info"
            )
        return self.tensor
