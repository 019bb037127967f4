"""`pool`: one embedding per text from the hidden states of its real tokens, as sentence-transformers pools.

Each pooling takes the hidden states (B, T, H) and the attention mask (B, T) of a padded batch, left
or right padded, and computes what sentence-transformers' `Pooling` module of that mode computes,
operation for operation, so that the two agree bitwise.

>>> hidden = torch.tensor([[[1.0, 2.0], [3.0, 6.0], [9.0, 9.0]]])
>>> mask = torch.tensor([[1, 1, 0]])
>>> {name: [round(x, 3) for x in pool(name, hidden, mask)[0].tolist()] for name in POOLINGS}
{'mean': [2.0, 4.0], 'cls': [1.0, 2.0], 'max': [3.0, 6.0], 'lasttoken': [3.0, 6.0], 'weightedmean': [2.333, 4.667], 'mean_sqrt_len_tokens': [2.828, 5.657]}
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import ArgumentValueError


def _accumulation(hidden: torch.Tensor) -> torch.dtype:
    return torch.float32 if hidden.dtype in (torch.float16, torch.bfloat16) else hidden.dtype


def _sum_and_count(hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    total = (hidden * weights).sum(dim=1, dtype=_accumulation(hidden))
    return total, torch.clamp(weights.sum(dim=1, dtype=_accumulation(hidden)), min=1e-9)


def mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of the real tokens' states."""
    total, count = _sum_and_count(hidden, mask)
    return (total / count).to(hidden.dtype)


def mean_sqrt_len_tokens(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The sum of the real tokens' states over the square root of their number."""
    total, count = _sum_and_count(hidden, mask)
    return (total / torch.sqrt(count)).to(hidden.dtype)


def cls(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The first real token's state."""
    first = mask.to(torch.int).argmax(dim=1)
    return torch.gather(hidden, 1, first[:, None, None].expand(-1, 1, hidden.shape[-1])).squeeze(1)


def lasttoken(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The last real token's state."""
    length = hidden.shape[1]
    found, from_end = mask.flip(1).max(1)
    from_end = torch.where(found == 0, length - 1, from_end)
    last = (length - from_end - 1)[:, None, None].expand(-1, 1, hidden.shape[-1])
    return torch.gather(hidden * mask.unsqueeze(-1).to(hidden.dtype), 1, last).squeeze(1)


def maximum(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The largest value of each feature over the real tokens."""
    return hidden.masked_fill(mask.unsqueeze(-1) == 0, float("-inf")).max(dim=1).values


def weightedmean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of the real tokens' states weighted by position: 1 for the first real token, 2 for the next, ..."""
    accumulation = _accumulation(hidden)
    positions = torch.arange(1, hidden.shape[1] + 1, device=hidden.device, dtype=accumulation).view(1, -1, 1)
    padding_before = mask.to(torch.int32).argmax(dim=1)
    weights = mask.unsqueeze(-1).to(accumulation) * (positions - padding_before.view(-1, 1, 1))
    total = (hidden * weights).sum(dim=1)
    return (total / torch.clamp(weights.sum(dim=1), min=1e-9)).to(hidden.dtype)


POOLINGS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mean": mean,
    "cls": cls,
    "max": maximum,
    "lasttoken": lasttoken,
    "weightedmean": weightedmean,
    "mean_sqrt_len_tokens": mean_sqrt_len_tokens,
}
"""The poolings by the name sentence-transformers gives their mode."""


def pool(name: str, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The (B, H) embeddings that pooling `name` makes of `hidden` (B, T, H) under the attention `mask` (B, T)."""
    if name not in POOLINGS:
        raise ArgumentValueError(f"unknown pooling {name!r}: use one of {', '.join(POOLINGS)}")
    return POOLINGS[name](hidden, mask)
