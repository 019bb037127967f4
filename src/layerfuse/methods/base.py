"""The `Method` base class and the registry that `fuse(method=NAME)` looks names up in.

A method is a small module: `forward(hidden, info) -> hidden`, hidden (B, T, H). It says which info it
takes (`info_layout`), may prepare that info once (`prepare`, e.g. normalise a direction), and records
its constructor arguments (`arguments`) so that a fusion can be saved and rebuilt.

>>> make_method("add", alpha=0.5)
Addition(alpha=0.5)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, ClassVar, Literal, TypeVar

import torch
from torch import nn

from ..errors import ArgumentTypeError, ArgumentValueError, UnknownNameError

InfoLayout = Literal["vector", "basis", "sequence", "none"]
INFO_SHAPES: dict[str, str] = {
    "vector": "(D,), (B, D) or (B, T, D)",
    "basis": "(K, D) or (B, K, D)",
    "sequence": "(K, D) or (B, K, D)",
    "none": "no info (None)",
}


class Method(nn.Module):
    """Base class of integration methods.

    Subclasses set `formula` (one line) and implement `forward(hidden, info)`. `info` arrives in
    `hidden`'s dtype and device, prepared by `prepare`, and shaped by `info_layout`:

    - "vector": (D,), (B, 1, D) or (B, T, D), broadcasting against hidden (B, T, H);
    - "basis" and "sequence": (K, D) or (B, K, D);
    - "none": the method takes no info and gets None.

    D is `info_dim(H)`: H, unless the method projects info of its own size. A fusion calls
    `forward` directly, so hooks registered on a method do not run.
    """

    method_name: ClassVar[str] = ""
    formula: ClassVar[str] = ""
    info_layout: ClassVar[InfoLayout] = "vector"
    learned: ClassVar[bool] = False

    def info_dim(self, hidden_size: int) -> int:
        """The size D that info's last dimension must have."""
        return hidden_size

    def prepare(self, info: torch.Tensor) -> torch.Tensor:
        """Turn validated info into what `forward` takes; runs once per dtype and device, not per forward."""
        return info

    def arguments(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this method (JSON-ready)."""
        return {}

    def forward(self, hidden: torch.Tensor, info: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.arguments().items())


M = TypeVar("M", bound=type[Method])

METHODS: dict[str, type[Method]] = {}
_ALIASES: dict[str, str] = {}


def register_method(name: str, *, aliases: tuple[str, ...] = ()) -> Callable[[M], M]:
    """Class decorator that makes a `Method` subclass available as `fuse(method=name)`."""

    def register(cls: M) -> M:
        taken = [n for n in (name, *aliases) if n in METHODS or n in _ALIASES]
        if taken:
            raise ValueError(f"method name {taken[0]!r} is already registered")
        METHODS[name] = cls
        _ALIASES.update({alias: name for alias in aliases})
        cls.method_name = name
        return cls

    return register


def canonical_name(name: str) -> str:
    """The registered name that `name` (a name or an alias) stands for."""
    resolved = _ALIASES.get(name, name)
    if resolved not in METHODS:
        raise UnknownNameError(f"unknown method {name!r}: use one of {', '.join(method_names())}")
    return resolved


def method_names() -> list[str]:
    """Registered method names, each followed by its aliases in parentheses."""
    aliases = {name: [a for a, n in _ALIASES.items() if n == name] for name in METHODS}
    return [f"{n} ({', '.join(a)})" if a else n for n, a in aliases.items()]


def method_parameters(cls: type[Method]) -> dict[str, inspect.Parameter]:
    """The arguments a method's constructor takes, except those `fuse` fills in (sizes)."""
    signature = inspect.signature(cls.__init__)
    return {
        name: parameter
        for name, parameter in list(signature.parameters.items())[1:]
        if name not in ("hidden_size", "info_size")
        and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
    }


def make_method(
    method: str | Method,
    *,
    hidden_size: int | None = None,
    info_size: int | None = None,
    **arguments: Any,
) -> Method:
    """`method` itself if it is a `Method`, else a new instance of the one registered by that name.

    Learned methods get `hidden_size` and `info_size` (the model's H and the info's D) from `fuse`.
    """
    if isinstance(method, Method):
        if arguments:
            raise ArgumentValueError(
                f"method arguments {sorted(arguments)} go with a method name; "
                f"the {type(method).__name__} instance is already configured"
            )
        return method
    if not isinstance(method, str):
        raise ArgumentTypeError(
            f"method must be a registered name or a layerfuse.Method, got {type(method).__name__}"
        )
    cls = METHODS[canonical_name(method)]
    accepted = method_parameters(cls)
    unknown = sorted(set(arguments) - set(accepted))
    missing = [
        name
        for name, parameter in accepted.items()
        if parameter.default is parameter.empty and name not in arguments
    ]
    if unknown or missing:
        problem = f"unknown argument(s) {unknown}" if unknown else f"missing argument(s) {missing}"
        takes = ", ".join(
            name if p.default is p.empty else f"{name}={p.default!r}" for name, p in accepted.items()
        )
        raise ArgumentValueError(f"method {method!r}: {problem}; it takes: {takes or 'no arguments'}")
    if cls.learned:
        if hidden_size is None or info_size is None:
            raise ArgumentValueError(
                f"method {method!r} is learned: it is built for the model's hidden size and the size of "
                f"its info, so pass info with shape {INFO_SHAPES[cls.info_layout]}"
            )
        arguments = {"hidden_size": hidden_size, "info_size": info_size, **arguments}
    return cls(**arguments)
