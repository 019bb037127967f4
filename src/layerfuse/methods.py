"""How info is combined with hidden states: small modules, `forward(hidden, info) -> hidden`, registered by name.

>>> import torch
>>> method = make_method("add")
>>> method(torch.ones(1, 2, 3), torch.full((3,), 2.0))[0, 0]
tensor([3., 3., 3.])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, TypeVar

import torch
from torch import nn

from .errors import ArgumentTypeError, UnknownNameError


class Method(nn.Module):
    """Base class of integration methods; subclasses set `formula` and implement `forward`.

    `hidden` is (B, T, H); `info` broadcasts against it: (H,), (B, 1, H) or (B, T, H), already in
    `hidden`'s dtype and on its device.
    """

    formula: ClassVar[str] = ""

    def forward(self, hidden: torch.Tensor, info: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


M = TypeVar("M", bound=type[Method])

METHODS: dict[str, type[Method]] = {}
_ALIASES: dict[str, str] = {}


def register_method(name: str, *, aliases: tuple[str, ...] = ()) -> Callable[[M], M]:
    """Class decorator that makes a `Method` subclass available to `fuse(method=name)`."""

    def register(cls: M) -> M:
        taken = [n for n in (name, *aliases) if n in METHODS or n in _ALIASES]
        if taken:
            raise ValueError(f"method name {taken[0]!r} is already registered")
        METHODS[name] = cls
        _ALIASES.update({alias: name for alias in aliases})
        return cls

    return register


def method_names() -> list[str]:
    """Registered method names, each followed by its aliases in parentheses."""
    aliases = {name: [a for a, n in _ALIASES.items() if n == name] for name in METHODS}
    return [f"{n} ({', '.join(a)})" if a else n for n, a in aliases.items()]


def make_method(method: str | Method) -> Method:
    """Return `method` itself if it is a `Method`, else a new instance of the one registered by that name."""
    if isinstance(method, Method):
        return method
    if not isinstance(method, str):
        raise ArgumentTypeError(
            f"method must be a registered name or a layerfuse.Method, got {type(method).__name__}"
        )
    cls = METHODS.get(_ALIASES.get(method, method))
    if cls is None:
        raise UnknownNameError(
            f"unknown method {method!r}: use one of {', '.join(method_names())}"
        )
    return cls()


@register_method("addition", aliases=("add",))
class Addition(Method):
    """Add the info, scaled: h + alpha * v.

    >>> Addition(alpha=0.5)(torch.zeros(1, 1, 2), torch.ones(2))
    tensor([[[0.5000, 0.5000]]])
    """

    formula = "h + alpha * v"

    def __init__(self, alpha: float = 1.0) -> None:
        super().__init__()
        self.alpha = float(alpha)

    def forward(self, hidden: torch.Tensor, info: torch.Tensor) -> torch.Tensor:
        return torch.add(hidden, info, alpha=self.alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


@register_method("multiplication", aliases=("multiply",))
class Multiplication(Method):
    """Multiply elementwise by the info: h * v.

    >>> Multiplication()(torch.full((1, 1, 2), 3.0), torch.tensor([2.0, 0.0]))
    tensor([[[6., 0.]]])
    """

    formula = "h * v"

    def forward(self, hidden: torch.Tensor, info: torch.Tensor) -> torch.Tensor:
        return hidden * info
