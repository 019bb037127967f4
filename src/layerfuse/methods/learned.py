"""Learned methods: modules with parameters, for info of its own size D. Each starts as the identity.

Their output projection (or gate) is zero-initialised, so a fresh fusion changes nothing until it is
trained (see `layerfuse.train`).

>>> film = Film(hidden_size=4, info_size=3)
>>> h = torch.randn(2, 5, 4)
>>> torch.equal(film(h, torch.randn(2, 1, 3)), h)
True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ArgumentValueError, positive_int
from .base import Method, register_method
from .fixed import finite


def zero_linear(inputs: int, outputs: int) -> nn.Linear:
    """A linear layer whose weight and bias start at zero."""
    linear = nn.Linear(inputs, outputs)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    return linear


class LearnedMethod(Method):
    """Base of methods with parameters: H is the model's hidden size, D the info's size."""

    learned = True

    def __init__(self, hidden_size: int, info_size: int) -> None:
        super().__init__()
        self.hidden_size = positive_int("hidden_size", hidden_size)
        self.info_size = positive_int("info_size", info_size)

    def info_dim(self, hidden_size: int) -> int:
        if hidden_size != self.hidden_size:
            raise ArgumentValueError(
                f"this {type(self).__name__} was built for hidden size {self.hidden_size}, the model's is {hidden_size}"
            )
        return self.info_size

    def arguments(self) -> dict[str, Any]:
        return {"hidden_size": self.hidden_size, "info_size": self.info_size}

    def follow(self, hidden: torch.Tensor) -> None:
        """Move the parameters to `hidden`'s dtype and device if the model has moved since `fuse`."""
        weight = next(self.parameters())
        if weight.dtype != hidden.dtype or weight.device != hidden.device:
            self.to(dtype=hidden.dtype, device=hidden.device)


@register_method("film")
class Film(LearnedMethod):
    """Feature-wise linear modulation (Perez et al. 2018): h ⊙ (1 + γ(v)) + β(v), γ and β linear."""

    formula = "h * (1 + gamma(v)) + beta(v)"

    def __init__(self, hidden_size: int, info_size: int) -> None:
        super().__init__(hidden_size, info_size)
        self.gamma = zero_linear(self.info_size, self.hidden_size)
        self.beta = zero_linear(self.info_size, self.hidden_size)

    def forward(self, hidden: torch.Tensor, info: torch.Tensor) -> torch.Tensor:
        self.follow(hidden)
        return hidden * (1 + self.gamma(info)) + self.beta(info)


@register_method("gate", aliases=("mag",))
class Gate(LearnedMethod):
    """Multimodal adaptation gate (MAG, Rahman et al. 2020): h + α·m, m = ReLU(W_g[h; v]) ⊙ W_v v,
    α = min(β‖h‖ / ‖m‖, 1), the norm-ratio clamp that keeps the shift smaller than the hidden state.

    The paper's final LayerNorm and dropout are left to the model's own next block.
    """

    formula = "h + min(beta*|h|/|m|, 1) * m,  m = relu(W_g [h; v]) * W_v v"

    def __init__(self, hidden_size: int, info_size: int, beta: float = 1.0) -> None:
        super().__init__(hidden_size, info_size)
        self.beta = finite("beta", beta)
        if self.beta <= 0:
            raise ArgumentValueError(f"beta must be positive, got {beta}")
        self.gate = nn.Linear(self.hidden_size + self.info_size, self.hidden_size)
        self.project = zero_linear(self.info_size, self.hidden_size)

    def arguments(self) -> dict[str, Any]:
        return {**super().arguments(), "beta": self.beta}

    def forward(self, hidden: torch.Tensor, info: torch.Tensor) -> torch.Tensor:
        self.follow(hidden)
        info = info.expand(*hidden.shape[:-1], info.shape[-1])
        shift = F.relu(self.gate(torch.cat([hidden, info], dim=-1))) * self.project(info)
        ratio = self.beta * hidden.norm(dim=-1, keepdim=True) / (shift.norm(dim=-1, keepdim=True) + 1e-6)
        return hidden + ratio.clamp(max=1.0) * shift


@register_method("concat")
class Concat(LearnedMethod):
    """Concatenate and project, as a residual: h + W[h; v] + b."""

    formula = "h + W [h; v] + b"

    def __init__(self, hidden_size: int, info_size: int) -> None:
        super().__init__(hidden_size, info_size)
        self.project = zero_linear(self.hidden_size + self.info_size, self.hidden_size)

    def forward(self, hidden: torch.Tensor, info: torch.Tensor) -> torch.Tensor:
        self.follow(hidden)
        info = info.expand(*hidden.shape[:-1], info.shape[-1])
        return hidden + self.project(torch.cat([hidden, info], dim=-1))


@register_method("cross_attention", aliases=("cross-attention",))
class CrossAttention(LearnedMethod):
    """Each position attends over an info sequence (K, D) or (B, K, D): h + W_o · attention(W_q h, W_k v, W_v v)."""

    formula = "h + W_o softmax((W_q h)(W_k v)^T / sqrt(d)) (W_v v)"
    info_layout = "sequence"

    def __init__(self, hidden_size: int, info_size: int, heads: int = 1) -> None:
        super().__init__(hidden_size, info_size)
        self.heads = positive_int("heads", heads)
        if self.hidden_size % self.heads:
            raise ArgumentValueError(f"heads must divide the hidden size {self.hidden_size}, got {heads}")
        self.query = nn.Linear(self.hidden_size, self.hidden_size)
        self.key = nn.Linear(self.info_size, self.hidden_size)
        self.value = nn.Linear(self.info_size, self.hidden_size)
        self.output = zero_linear(self.hidden_size, self.hidden_size)

    def arguments(self) -> dict[str, Any]:
        return {**super().arguments(), "heads": self.heads}

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(-3, -2)

    def forward(self, hidden: torch.Tensor, info: torch.Tensor) -> torch.Tensor:
        self.follow(hidden)
        info = info.expand(hidden.shape[0], *info.shape[-2:])
        attended = F.scaled_dot_product_attention(
            self._split(self.query(hidden)), self._split(self.key(info)), self._split(self.value(info))
        )
        return hidden + self.output(attended.transpose(-3, -2).flatten(-2))
