"""The `Method` base class and the registry that `fuse(method=NAME)` looks names up in.

A method is a small module: `forward(hidden, info) -> hidden`, hidden (B, T, H). It says which info it
takes (`info_layout`), may prepare that info once (`prepare`, e.g. normalise a direction), and records
its constructor arguments (`arguments`) so that a fusion can be saved and rebuilt.

>>> make_method("add", {"alpha": 0.5})
Addition(alpha=0.5)
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal, TypeVar

import torch
from torch import nn

from ..errors import ArgumentTypeError, ArgumentValueError, UnknownNameError, positive_int
from ..info import LAYOUTS

InfoLayout = Literal["vector", "basis", "sequence", "eraser", "none"]
SIZES = ("hidden_size", "info_size")
"""The constructor arguments of a learned method that `fuse` fills in from the model and the info."""


class Method(nn.Module):
    """Base class of integration methods.

    Subclasses set `formula` (one line) and implement `forward(hidden, info)`. `info` arrives in
    `hidden`'s dtype and device, prepared by `prepare`, and shaped by `info_layout`:

    - "vector": (D,), (B, 1, D) or (B, T, D), broadcasting against hidden (B, T, H);
    - "basis" and "sequence": (K, D) or (B, K, D);
    - "eraser": (1 + 2r, D) or (B, 1 + 2r, D), the rows [μ; B; Aᵀ] of h ↦ h − A·B·(h − μ);
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

    def check_dtype(self, dtype: torch.dtype) -> None:
        """Refuse a numeric argument that hidden states of `dtype` cannot hold (beyond its largest finite value).

        >>> make_method("add", {"alpha": 1e5}).check_dtype(torch.float16)
        Traceback (most recent call last):
        ...
        layerfuse.errors.ArgumentValueError: alpha=1e+05 overflows the dtype the fusion runs in, torch.float16, whose largest finite value is 6.55e+04: use a value within ±6.55e+04
        """
        largest = torch.finfo(dtype).max
        for key, value in self.arguments().items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) > largest:
                raise ArgumentValueError(
                    f"{key}={value:.4g} overflows the dtype the fusion runs in, {dtype}, whose largest finite "
                    f"value is {largest:.3g}: use a value within ±{largest:.3g}"
                )

    def forward(self, hidden: torch.Tensor, info: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.arguments().items())


M = TypeVar("M", bound=type[Method])

METHODS: dict[str, type[Method]] = {}
_ALIASES: dict[str, str] = {}


def register_method(name: str, *, aliases: tuple[str, ...] = ()) -> Callable[[M], M]:
    """Class decorator that makes a `Method` subclass available as `fuse(method=name)`, and by its `aliases`.

    Everything is checked before the registry changes: the names (non-empty strings, none taken), the
    class (a `Method` subclass not registered yet) and its `info_layout`.
    """
    names = (name, *aliases) if isinstance(aliases, (tuple, list)) else None
    if names is None or not all(isinstance(n, str) and n for n in names) or len(set(names)) < len(names):
        raise ArgumentTypeError(
            f"register_method takes a name and a tuple of aliases, non-empty distinct strings, got {name!r} and {aliases!r}"
        )

    def register(cls: M) -> M:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise ArgumentTypeError(f"register_method decorates a layerfuse.Method subclass, got {cls!r}")
        taken = [n for n in names if n in METHODS or n in _ALIASES]
        if taken:
            raise ArgumentValueError(f"method name {taken[0]!r} is already registered: choose another name")
        if cls in METHODS.values():
            raise ArgumentValueError(
                f"{cls.__name__} is already registered as {cls.method_name!r}: give it aliases there, or "
                "register a subclass under the new name"
            )
        if not isinstance(cls.info_layout, str) or cls.info_layout not in LAYOUTS:
            raise ArgumentValueError(
                f"{cls.__name__}.info_layout is {cls.info_layout!r}: use one of {', '.join(map(repr, LAYOUTS))}"
            )
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
    return dict(_constructor_parameters(cls))


@functools.cache
def _constructor_parameters(cls: type[Method]) -> tuple[tuple[str, inspect.Parameter], ...]:
    """`method_parameters` of a class, read from its constructor's signature once."""
    signature = inspect.signature(cls.__init__)
    return tuple(
        (name, parameter)
        for name, parameter in list(signature.parameters.items())[1:]
        if name not in ("hidden_size", "info_size")
        and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
    )


def recorded_arguments(cls: type[Method], arguments: Mapping[str, Any]) -> dict[str, Any]:
    """What a method of class `cls` built with `arguments` records of itself (`Method.arguments()`), with the
    checks its constructor makes; for arguments of immutable values, built once per class and arguments.

    >>> recorded_arguments(METHODS["scale"], {"alpha": 2})
    {'alpha': 2.0}
    """
    key = tuple((name, type(value), value) for name, value in arguments.items())
    try:
        hash(key)
    except TypeError:
        return cls(**arguments).arguments()
    return dict(_recorded(cls, key))


@functools.lru_cache(maxsize=1024)
def _recorded(cls: type[Method], key: tuple[tuple[str, type, Any], ...]) -> tuple[tuple[str, Any], ...]:
    return tuple(cls(**{name: value for name, _, value in key}).arguments().items())


def check_arguments(name: str, arguments: Mapping[str, Any]) -> type[Method]:
    """The registered method `name` stands for, after checking that `arguments` are the ones it takes.

    A learned method may also be given its sizes (`hidden_size`, `info_size`), as its `arguments()` records them.

    >>> check_arguments("scale", {})
    Traceback (most recent call last):
    ...
    layerfuse.errors.ArgumentValueError: method 'scale': missing argument(s) ['alpha']; it takes: alpha
    """
    cls = METHODS[canonical_name(name)]
    accepted = method_parameters(cls)
    unknown = sorted(set(arguments) - set(accepted) - set(SIZES if cls.learned else ()))
    missing = [
        key for key, parameter in accepted.items() if parameter.default is parameter.empty and key not in arguments
    ]
    if unknown or missing:
        problem = f"unknown argument(s) {unknown}" if unknown else f"missing argument(s) {missing}"
        takes = ", ".join(key if p.default is p.empty else f"{key}={p.default!r}" for key, p in accepted.items())
        raise ArgumentValueError(f"method {name!r}: {problem}; it takes: {takes or 'no arguments'}")
    for key in SIZES:
        if key in arguments:
            positive_int(key, arguments[key])
    return cls


def make_method(
    method: str | Method,
    arguments: Mapping[str, Any] | None = None,
    *,
    hidden_size: int | None = None,
    info_size: int | None = None,
) -> Method:
    """`method` itself if it is a `Method`, else a new instance of the one registered by that name, with `arguments`.

    Learned methods get `hidden_size` and `info_size` (the model's H and the info's D) from `fuse`;
    sizes given among `arguments` must agree with them.
    """
    arguments = dict(arguments or {})
    if isinstance(method, Method):
        if arguments:
            raise ArgumentValueError(
                f"method arguments {sorted(arguments)} go with a method name; "
                f"the {type(method).__name__} instance is already configured"
            )
        return method
    if not isinstance(method, str):
        raise ArgumentTypeError(f"method must be a registered name or a layerfuse.Method, got {type(method).__name__}")
    cls = check_arguments(method, arguments)
    if cls.learned:
        given = {"hidden_size": hidden_size, "info_size": info_size}
        for key, size in given.items():
            if key in arguments and size is not None and arguments[key] != size:
                what = "the model's hidden size" if key == "hidden_size" else "the info's last dimension"
                raise ArgumentValueError(
                    f"method {method!r} is configured for {key}={arguments[key]}, but {what} is {size}"
                )
        sizes = {key: arguments.get(key, size) for key, size in given.items()}
        if None in sizes.values():
            raise ArgumentValueError(
                f"method {method!r} is learned: it is built for the model's hidden size and the size of "
                f"its info, so pass info with shape {LAYOUTS[cls.info_layout].shapes}"
            )
        arguments = {**arguments, **sizes}
    return cls(**arguments)
