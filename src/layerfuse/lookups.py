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
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from itertools import repeat
from operator import contains, eq, is_
from typing import Any, TypeVar

from torch import nn

T = TypeVar("T")
_ROOT = object()
"""Stands for the model itself in a recorded read, so that the cache never holds the model it is keyed on."""
_MISSING = object()


class Reads:
    """What one lookup of the model `root` read, each once: a name in a dictionary (a module's child or
    parameter, an attribute in an instance's `__dict__`, or that the name was not there), a dictionary's
    size, an attribute found otherwise, and the class of a module that does not have an attribute.

    `entries` holds (dictionary, name, value or `_MISSING`), keyed by the dictionary's id and the name;
    `sizes` (dictionary, size), keyed by its id; `attributes` (owner, name, value) and `classes`
    (module, its class, the class's MRO and their `__dict__`s, name: a name none of them has), keyed by the
    owner's id and the name. The model itself, as an owner or a value, is recorded as `_ROOT`, so that a
    read never holds it; `root` is None once the lookup is done.
    """

    def __init__(self, root: nn.Module) -> None:
        self.root: nn.Module | None = root
        self.entries: dict[tuple[int, str], tuple[dict[str, Any], str, object]] = {}
        self.sizes: dict[int, tuple[dict[str, Any], int]] = {}
        self.attributes: dict[tuple[int, str], tuple[Any, str, object]] = {}
        self.classes: dict[tuple[int, str], tuple[Any, type, tuple[type, ...], tuple[Any, ...], str]] = {}
        self.complete = True
        self._checks: tuple[Any, ...] | None = None

    def owner(self, obj: object) -> object:
        """`obj` as a read records it: the model itself as `_ROOT`."""
        return _ROOT if obj is self.root else obj

    def holds(self, root: nn.Module) -> bool:
        """Whether every read would give, in the model `root` now, what it gave."""
        dictionaries, names, values, sized, sizes, attributes, classes = self._checks or self._compile()
        if not all(map(is_, map(dict.get, dictionaries, names, repeat(_MISSING)), values)):
            return False
        if not all(map(eq, map(len, sized), sizes)):
            return False
        for owner, name, value in attributes:
            if getattr(root if owner is _ROOT else owner, name, None) is not (root if value is _ROOT else value):
                return False
        for owner, cls, mro, namespaces, name in classes:
            if type(root if owner is _ROOT else owner) is not cls or cls.__mro__ is not mro:
                return False
            if any(map(contains, namespaces, repeat(name))):
                return False
        return True

    def _compile(self) -> tuple[Any, ...]:
        """The reads as the columns that `holds` checks: most of them one pass of dictionary look-ups."""
        dictionaries, names, values = zip(*self.entries.values(), strict=True) if self.entries else ((), (), ())
        sized, sizes = zip(*self.sizes.values(), strict=True) if self.sizes else ((), ())
        self._checks = (
            dictionaries,
            names,
            values,
            sized,
            sizes,
            tuple(self.attributes.values()),
            tuple(self.classes.values()),
        )
        return self._checks

    def add(self, other: Reads) -> None:
        """Count `other`'s reads, of the same model, as this lookup's own."""
        self.entries.update(other.entries)
        self.sizes.update(other.sizes)
        self.attributes.update(other.attributes)
        self.classes.update(other.classes)
        self.complete = self.complete and other.complete
        self._checks = None

    def absent(self, module: nn.Module, name: str) -> None:
        """Record that `module` has no attribute `name` anywhere: not in its instance's dictionaries, nor its class's."""
        stored = module.__dict__
        for table in (stored, stored.get("_parameters"), stored.get("_buffers"), stored.get("_modules")):
            if isinstance(table, dict):
                self.entries[id(table), name] = (table, name, _MISSING)
        cls = type(module)
        namespaces = tuple(c.__dict__ for c in cls.__mro__)
        self.classes[id(module), name] = (self.owner(module), cls, cls.__mro__, namespaces, name)


_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[Hashable, tuple[object, Reads]]] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()
_READS: ContextVar[Reads | None] = ContextVar("layerfuse_reads", default=None)


def remembered(model: nn.Module, key: Hashable, find: Callable[[], T]) -> T:
    """`find()`, or its result for `key` from an earlier call on `model` while the reads it made still hold."""
    outer = _READS.get()
    entries = _CACHE.get(model)
    found = None if entries is None else entries.get(key)
    if found is not None and found[1].holds(model):
        value, reads = found
    else:
        with recording(model) as reads:
            value = find()
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


@contextmanager
def recording(model: nn.Module) -> Iterator[Reads]:
    """Record the reads that the lookups run within make of `model`; the record's `holds(model)` says later,
    in a few dictionary look-ups, whether they would all give what they gave (if `complete`: all were recorded).

    >>> model = nn.Sequential(nn.Linear(2, 2))
    >>> with recording(model) as reads:
    ...     found = remembered(model, "first", lambda: submodule(model, "0"))
    >>> reads.complete, reads.holds(model)
    (True, True)
    >>> model[0] = nn.Linear(2, 2)
    >>> reads.holds(model)
    False
    """
    reads = Reads(model)
    token = _READS.set(reads)
    try:
        yield reads
    finally:
        _READS.reset(token)
        reads.root = None


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
            if isinstance(registered, dict) and registered.get(name) is child and child is not reads.root:
                reads.entries[id(registered), name] = (registered, name, registered.get(name, _MISSING))
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
        if isinstance(obj, nn.Module) and not _found_in_module(obj, name):
            reads.absent(obj, name)
        elif isinstance(stored, dict) and stored.get(name, _MISSING) is value and value is not reads.root:
            reads.entries[id(stored), name] = (stored, name, value)
        else:
            reads.attributes[id(obj), name] = (reads.owner(obj), name, reads.owner(value))
    return value


def _found_in_module(module: nn.Module, name: str) -> bool:
    """Whether `getattr(module, name)` finds anything, seen in dictionaries only: the instance's, its parameters,
    buffers and modules, and its class (looked up in C, without the exception a module's `__getattr__` raises)."""
    stored = module.__dict__
    return (
        name in stored
        or name in stored.get("_parameters", ())
        or name in stored.get("_buffers", ())
        or name in stored.get("_modules", ())
        or getattr(type(module), name, _MISSING) is not _MISSING
    )


def length(modules: nn.Module) -> int:
    """The number of `modules`' children (of an `nn.ModuleList`: its length), recorded."""
    size = len(modules._modules)
    reads = _READS.get()
    if reads is not None:
        reads.sizes[id(modules._modules)] = (modules._modules, size)
    return size


def first_parameter(root: nn.Module) -> nn.Parameter | None:
    """`next(root.parameters(), None)`, recorded: the parameters of the modules visited on the way (the path
    to the first one that has any, in the same order as `parameters()`) and the children taken."""
    reads = _READS.get()
    table = root._parameters
    own = tuple(table.values())
    if reads is not None:
        reads.sizes[id(table)] = (table, len(table))
        for name, parameter in table.items():
            reads.entries[id(table), name] = (table, name, parameter)
    found = next((parameter for parameter in own if parameter is not None), None)
    if found is not None:
        return found
    for name in list(root._modules):
        child = submodule(root, name)
        if child is not None and (found := first_parameter(child)) is not None:
            return found
    return None


def remembered_first_parameter(model: nn.Module) -> nn.Parameter | None:
    """`first_parameter(model)`, remembered per model while the modules and parameters on its way stay as they were."""
    return remembered(model, "first parameter", lambda: first_parameter(model))


def unrecorded() -> None:
    """Say that the lookup under way read something it cannot record: its result is not remembered."""
    reads = _READS.get()
    if reads is not None:
        reads.complete = False
