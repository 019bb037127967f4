"""Lookups in a model's structure, remembered per model for as long as what they read stays as it was.

Finding a layer's module reads a few things of the model: submodules along dotted paths, attributes
(its config, a module's class) and the length of its list of blocks. `remembered(model, key, find)`
runs `find` once and records each of those reads made through `submodule`, `attribute` and `length`;
later calls give the same result while every recorded read would still give what it gave, a check of a
few dictionary look-ups however large the model. A block replaced, a list of blocks grown, a config
swapped: the check fails, and `find` runs again. A `find` that reads more than it records (a walk of
all modules) calls `unrecorded()`, and its result is not remembered. The cache holds the model weakly,
and errors are never remembered.

>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(2, 2))
>>> remembered(model, "first", lambda: submodule(model, "0")) is model[0]
True
>>> model[0] = nn.Linear(2, 3)
>>> remembered(model, "first", lambda: submodule(model, "0")).out_features
3
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Hashable
from contextvars import ContextVar
from typing import Any, TypeVar

from torch import nn

T = TypeVar("T")
_ROOT = object()
"""Stands for the model itself in a recorded read, so that the cache never holds the model it is keyed on."""
_MISSING = object()


class _Reads:
    """What one lookup of the model `root` read, each once: a module's child by name (or that it has none), an
    attribute, a module's number of children.

    Keyed by the owner's id and the name: `children` holds (owner, name, child), `attributes` (owner,
    name, value, and the owner's `__dict__` where the value was found there), `lengths` (owner, number),
    `parameters` (owner, its parameters). The model itself is recorded as `_ROOT`, and `root` is None
    once the lookup is done.
    """

    def __init__(self, root: nn.Module) -> None:
        self.root: nn.Module | None = root
        self.children: dict[tuple[int, str], tuple[Any, str, nn.Module | None]] = {}
        self.attributes: dict[tuple[int, str], tuple[Any, str, object, dict[str, Any] | None]] = {}
        self.lengths: dict[int, tuple[Any, int]] = {}
        self.parameters: dict[int, tuple[Any, tuple[Any, ...]]] = {}
        self.complete = True

    def owner(self, obj: object) -> object:
        """`obj` as a read records it: the model itself as `_ROOT`."""
        return _ROOT if obj is self.root else obj

    def holds(self, root: nn.Module) -> bool:
        """Whether every read would give, in the model `root` now, what it gave."""
        for owner, name, child in self.children.values():
            if (root if owner is _ROOT else owner)._modules.get(name) is not child:
                return False
        for owner, name, value, stored in self.attributes.values():
            if stored is not None:
                got = stored.get(name, _MISSING)
            else:
                got = getattr(root if owner is _ROOT else owner, name, None)
            if got is not (root if value is _ROOT else value):
                return False
        for owner, parameters in self.parameters.values():
            now = (root if owner is _ROOT else owner)._parameters
            if len(now) != len(parameters) or any(a is not b for a, b in zip(now.values(), parameters)):
                return False
        return all(len((root if owner is _ROOT else owner)._modules) == n for owner, n in self.lengths.values())

    def add(self, other: _Reads) -> None:
        """Count `other`'s reads, of the same model, as this lookup's own."""
        self.children.update(other.children)
        self.attributes.update(other.attributes)
        self.lengths.update(other.lengths)
        self.parameters.update(other.parameters)
        self.complete = self.complete and other.complete


_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[Hashable, tuple[object, _Reads]]] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()
_READS: ContextVar[_Reads | None] = ContextVar("layerfuse_reads", default=None)


def remembered(model: nn.Module, key: Hashable, find: Callable[[], T]) -> T:
    """`find()`, or its result for `key` from an earlier call on `model` while the reads it made still hold."""
    outer = _READS.get()
    entries = _CACHE.get(model)
    found = None if entries is None else entries.get(key)
    if found is not None and found[1].holds(model):
        value, reads = found
    else:
        reads = _Reads(model)
        token = _READS.set(reads)
        try:
            value = find()
        finally:
            _READS.reset(token)
        reads.root = None
        if _holds_root(value, model):
            reads.complete = False
        if reads.complete:
            with _LOCK:
                _CACHE.setdefault(model, {})[key] = (value, reads)
    if outer is not None:  # a lookup within another: that one read all this one did
        if outer.root is model:
            outer.add(reads)
        else:
            outer.complete = False
    return value  # type: ignore[return-value]


def _holds_root(value: object, model: nn.Module) -> bool:
    """Whether `value` is, or names as its module, the model itself (which the cache must not hold)."""
    return value is model or getattr(value, "module", None) is model


def submodule(root: nn.Module, path: str) -> nn.Module | None:
    """The module at dotted `path` under `root` (`root` for ""), as `get_submodule` finds it; None if there is none."""
    module: Any = root
    reads = _READS.get()
    for name in path.split(".") if path else ():
        child = getattr(module, name, None)
        child = child if isinstance(child, nn.Module) else None
        if reads is not None:
            registered = getattr(module, "__dict__", {}).get("_modules")
            if isinstance(registered, dict) and registered.get(name) is child:
                reads.children[id(module), name] = (reads.owner(module), name, child)
            else:  # found other than as a registered child: a look-up in `_modules` cannot vouch for it
                reads.complete = False
        if child is None:
            return None
        module = child
    return module


def attribute(obj: object, name: str) -> Any:
    """`getattr(obj, name, None)`, recorded: the result holds while the attribute is the same object.

    One stored in the instance's `__dict__` is checked there, a dictionary look-up, rather than through
    `getattr` (slow for a transformers config, whose `__getattribute__` is Python).
    """
    value = getattr(obj, name, None)
    reads = _READS.get()
    if reads is not None:
        stored = getattr(obj, "__dict__", None)
        if not isinstance(stored, dict) or stored.get(name, _MISSING) is not value:
            stored = None
        reads.attributes[id(obj), name] = (reads.owner(obj), name, reads.owner(value), stored)
    return value


def length(modules: nn.Module) -> int:
    """The number of `modules`' children (of an `nn.ModuleList`: its length), recorded."""
    size = len(modules._modules)
    reads = _READS.get()
    if reads is not None:
        reads.lengths[id(modules)] = (reads.owner(modules), size)
    return size


def first_parameter(root: nn.Module) -> nn.Parameter | None:
    """`next(root.parameters(), None)`, recorded: the parameters of the modules visited on the way (the path
    to the first one that has any, in the same order as `parameters()`) and the children taken."""
    reads = _READS.get()
    own = tuple(root._parameters.values())
    if reads is not None:
        reads.parameters[id(root)] = (reads.owner(root), own)
    found = next((parameter for parameter in own if parameter is not None), None)
    if found is not None:
        return found
    for name in list(root._modules):
        child = submodule(root, name)
        if child is not None and (found := first_parameter(child)) is not None:
            return found
    return None


def unrecorded() -> None:
    """Say that the lookup under way read something it cannot record: its result is not remembered."""
    reads = _READS.get()
    if reads is not None:
        reads.complete = False
