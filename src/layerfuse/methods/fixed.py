"""Fixed methods: formulas with nothing to learn. h is a hidden state (H,), v the info at its position.

>>> h, v = torch.tensor([[[3.0, 4.0]]]), torch.tensor([1.0, 0.0])
>>> Ablate()(h, Ablate().prepare(v))
tensor([[[0., 4.]]])
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import ArgumentTypeError, ArgumentValueError, InfoShapeError, InfoValueError
from .base import Method, register_method


def finite(name: str, value: Any) -> float:
    """`value` as a float, if it is a finite real number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArgumentTypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    try:
        number = float(value)
    except OverflowError:
        raise ArgumentValueError(f"{name} must be finite, got an int beyond the float range (±1.8e308)") from None
    if not math.isfinite(number):
        raise ArgumentValueError(f"{name} must be finite, got {value}")
    return number


def scalar(value: float) -> torch.Tensor:
    """`value` as a 0-d float64 CPU tensor, for a method to multiply or subtract instead of the float.

    Ops take it as they take a Python number (same dtype, device and bits of the result), but skip
    wrapping the number in a tensor at every call: inside a forward on CPU, where that rarely run code
    is out of the caches, this saves 10-20 us a call, 0.1-0.3% of a 1x8 forward.

    >>> torch.ones(2, dtype=torch.bfloat16) * scalar(0.5)
    tensor([0.5000, 0.5000], dtype=torch.bfloat16)
    """
    return torch.tensor(value, dtype=torch.float64)


def unit(direction: torch.Tensor) -> torch.Tensor:
    """`direction` scaled to unit length along its last dimension; zero vectors are refused."""
    norm = torch.linalg.vector_norm(direction.float(), dim=-1, keepdim=True)
    if bool((norm == 0).any()):
        raise InfoValueError("a direction in info has zero length: every direction must be non-zero")
    return (direction.float() / norm).to(direction.dtype)


def component(hidden: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """(h · v̂), kept as a trailing dimension of size 1, with no hidden-sized temporary."""
    dot = hidden @ direction if direction.ndim == 1 else torch.einsum("...h,...h->...", hidden, direction)
    return dot.unsqueeze(-1)


@register_method("addition", aliases=("add",))
class Addition(Method):
    """Add the info, scaled: h + α·v (activation addition, steering vectors).

    >>> Addition(alpha=0.5)(torch.zeros(1, 1, 2), torch.ones(2))
    tensor([[[0.5000, 0.5000]]])
    """

    formula = "h + alpha * v"

    def __init__(self, alpha: float = 1.0) -> None:
        super().__init__()
        self.alpha = finite("alpha", alpha)

    def arguments(self) -> dict[str, Any]:
        return {"alpha": self.alpha}

    def forward(self, hidden: torch.Tensor, info: torch.Tensor) -> torch.Tensor:
        return torch.add(hidden, info, alpha=self.alpha)


@register_method("multiplication", aliases=("multiply",))
class Multiplication(Method):
    """Multiply elementwise by the info: h ⊙ v.

    >>> Multiplication()(torch.full((1, 1, 2), 3.0), torch.tensor([2.0, 0.0]))
    tensor([[[6., 0.]]])
    """

    formula = "h * v"

    def forward(self, hidden: torch.Tensor, info: torch.Tensor) -> torch.Tensor:
        return hidden * info


@register_method("scale")
class Scale(Method):
    """Scale the hidden state: α·h. Takes no info.

    >>> Scale(alpha=2.0)(torch.ones(1, 1, 2), None)
    tensor([[[2., 2.]]])
    """

    formula = "alpha * h"
    info_layout = "none"

    def __init__(self, alpha: float) -> None:
        super().__init__()
        self.alpha = finite("alpha", alpha)
        self.factor = scalar(self.alpha)

    def arguments(self) -> dict[str, Any]:
        return {"alpha": self.alpha}

    def forward(self, hidden: torch.Tensor, info: None) -> torch.Tensor:
        return hidden * self.factor


@register_method("replace")
class Replace(Method):
    """Replace the hidden state by the info: h := v.

    >>> Replace()(torch.zeros(1, 2, 2), torch.tensor([1.0, 2.0]))
    tensor([[[1., 2.],
             [1., 2.]]])
    """

    formula = "v"

    def forward(self, hidden: torch.Tensor, info: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(hidden).copy_(info)


@register_method("interpolate", aliases=("lerp",))
class Interpolate(Method):
    """Move the hidden state towards the info: (1 − α)·h + α·v.

    >>> Interpolate(alpha=0.25)(torch.zeros(1, 1, 2), torch.ones(2))
    tensor([[[0.2500, 0.2500]]])
    """

    formula = "(1 - alpha) * h + alpha * v"

    def __init__(self, alpha: float = 0.5) -> None:
        super().__init__()
        self.alpha = finite("alpha", alpha)

    def arguments(self) -> dict[str, Any]:
        return {"alpha": self.alpha}

    def forward(self, hidden: torch.Tensor, info: torch.Tensor) -> torch.Tensor:
        return torch.lerp(hidden, info.expand_as(hidden), self.alpha)


@register_method("ablate")
class Ablate(Method):
    """Remove the component along the info's direction: h − (h·v̂)v̂ (directional ablation)."""

    formula = "h - (h . v^) v^"

    def prepare(self, info: torch.Tensor) -> torch.Tensor:
        return unit(info)

    def forward(self, hidden: torch.Tensor, info: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(hidden, component(hidden, info), info, value=-1)


@register_method("clamp")
class Clamp(Method):
    """Set the component along the info's direction to `value`: h − (h·v̂)v̂ + value·v̂.

    >>> Clamp(value=2.0)(torch.tensor([[[3.0, 4.0]]]), torch.tensor([1.0, 0.0]))
    tensor([[[2., 4.]]])
    """

    formula = "h - (h . v^) v^ + value * v^"

    def __init__(self, value: float = 0.0) -> None:
        super().__init__()
        self.value = finite("value", value)
        self.target = scalar(self.value)

    def arguments(self) -> dict[str, Any]:
        return {"value": self.value}

    def prepare(self, info: torch.Tensor) -> torch.Tensor:
        return unit(info)

    def forward(self, hidden: torch.Tensor, info: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(hidden, torch.sub(self.target, component(hidden, info)), info)


@register_method("project")
class Project(Method):
    """Project onto the subspace spanned by the rows of the info (a (K, H) basis): Q Qᵀ h, Q orthonormal.

    >>> basis = torch.tensor([[2.0, 0.0, 0.0]])
    >>> Project()(torch.tensor([[[1.0, 2.0, 3.0]]]), Project().prepare(basis)).abs()
    tensor([[[1., 0., 0.]]])
    """

    formula = "Q Q^T h, Q an orthonormal basis of span(v rows)"
    info_layout = "basis"

    def prepare(self, info: torch.Tensor) -> torch.Tensor:
        count, size = info.shape[-2:]
        if count > size:
            raise InfoValueError(f"a basis of a {size}-dimensional space has at most {size} rows, got {count}")
        q, r = torch.linalg.qr(info.double().mT)
        diagonal = r.diagonal(dim1=-2, dim2=-1).abs()
        if bool((diagonal <= 1e-10 * diagonal.amax(dim=-1, keepdim=True)).any()):
            raise InfoValueError(f"the {count} basis rows in info are linearly dependent: pass independent rows")
        return q.mT.to(info.dtype)

    def forward(self, hidden: torch.Tensor, info: torch.Tensor) -> torch.Tensor:
        return (hidden @ info.mT) @ info


@register_method("erase")
class Erase(Method):
    """Erase a concept by an affine eraser: h − A·B·(h − μ), the info's rows [μ; B; Aᵀ], (1 + 2r, H).

    A (H, r) and B (r, H) factor the rank-r map P = A·B that `layerfuse.eraser` estimates (LEACE,
    Belrose et al. 2023): the mean comes first, then the r rows of B, then the r rows of Aᵀ. With
    r = 0 (one row) it changes nothing.

    >>> info = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])  # μ = (0, 1), B = [1, 0], Aᵀ = [1, 0]
    >>> Erase()(torch.tensor([[[3.0, 4.0]]]), info)
    tensor([[[0., 4.]]])
    """

    formula = "h - A B (h - mu), info rows [mu; B; A^T]"
    info_layout = "eraser"

    def prepare(self, info: torch.Tensor) -> torch.Tensor:
        count = info.shape[-2]
        if count % 2 == 0:
            raise InfoShapeError(
                f"an eraser's info has 1 + 2r rows (the mean, the r rows of B, the r rows of Aᵀ), got {count}: "
                "pass what layerfuse.eraser returns"
            )
        return info

    def forward(self, hidden: torch.Tensor, info: torch.Tensor) -> torch.Tensor:
        rank = info.shape[-2] // 2
        mean, right, left = info[..., :1, :], info[..., 1 : 1 + rank, :], info[..., 1 + rank :, :]
        return hidden - ((hidden - mean) @ right.mT) @ left
