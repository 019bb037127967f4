"""Lookups in a model's structure, remembered per model for as long as what they read stays as it was.

Finding a layer's module reads a few things of the model: submodules along dotted paths, attributes
(its config, a module's class) and the length of its list of blocks. `remembered(model, key, find)`
runs `find` once and records each of those reads made through `submodule`, `attribute` and `length`;
later calls give the same result while every recorded read would still give what it gave, a check of a
few dictionary look-ups however large the model. A block replaced, a list of blocks grown, a config
swapped: the check fails, and `find` runs again. A `find` that reads more than it records (a walk of
all modules) calls `unrecorded()`, and its result is not remembered. The cache holds the model and its
modules weakly, and errors are never remembered.

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
from operator import eq, is_
from typing import Any, TypeVar

from torch import nn

T = TypeVar("T")
_MISSING = object()


class Reads:
    """What one lookup of the model `root` read, each once: a name in a dictionary of a module (its
    `__dict__`, `_modules`, `_parameters` or `_buffers`) or of another object (a config's `__dict__`),
    with the value it gave or `_MISSING`; the size of a module's dictionary; an attribute found
    otherwise; and the class of a module that has no attribute of a name.

    Modules, as owners or values, are held by weak references: what is remembered for a model keeps
    none of its modules alive, nor, through them, the fusions attached to them and the model those
    hold. `root` is the model while the lookup is recorded, then None.
    """

    def __init__(self, root: nn.Module) -> None:
        self.root: nn.Module | None = root
        self.modules: dict[int, weakref.ReferenceType[nn.Module]] = {}
        """The modules read, by id."""
        self.entries: dict[tuple[int, str], tuple[dict[str, Any], str, object]] = {}
        """Names in the `__dict__` of objects other than modules: (dictionary, name, value)."""
        self.own: dict[tuple[int, str], tuple[int, str, object]] = {}
        """Names in a module's `__dict__`: (module's id, name, value), a value that is not a module."""
        self.inner: dict[tuple[int, str, str], tuple[int, str, str, object]] = {}
        """Names in a module's `_modules`, `_parameters` or `_buffers`: (module's id, dictionary, name, value), a
        value that is not a module."""
        self.children: dict[tuple[int, str], tuple[int, str, weakref.ReferenceType[nn.Module]]] = {}
        """Names in a module's `_modules` whose value is a module: (module's id, name, child)."""
        self.sizes: dict[tuple[int, str], tuple[int, str, int]] = {}
        """Sizes of a module's dictionaries: (module's id, dictionary, size)."""
        self.attributes: dict[tuple[int, str], tuple[int | None, object, str, object]] = {}
        """Attributes read by `getattr`: (module's id, or None and the object, name, value)."""
        self.classes: dict[tuple[int, str], tuple[int, type, str]] = {}
        """A name that a module's class lacks: (module's id, class, name)."""
        self.complete = True
        self._checks: tuple[Any, ...] | None = None

    def _module(self, module: nn.Module) -> int:
        self.modules[id(module)] = weakref.ref(module)
        return id(module)

    def lookup(self, owner: object, dictionary: str, name: str) -> object:
        """`name` in `owner`'s `dictionary` ("__dict__", or a module's "_modules", "_parameters", "_buffers"),
        or `_MISSING`, recorded."""
        stored = vars(owner) if dictionary == "__dict__" else vars(owner)[dictionary]
        value = stored.get(name, _MISSING)
        if not isinstance(owner, nn.Module):
            if isinstance(value, nn.Module):
                self.complete = False  # held weakly, a module could be another by the next check
            else:
                self.entries[id(stored), name] = (stored, name, value)
        elif isinstance(value, nn.Module):
            if dictionary == "_modules":
                self.children[id(owner), name] = (self._module(owner), name, weakref.ref(value))
            else:
                self.complete = False
        elif dictionary == "__dict__":
            self.own[id(owner), name] = (self._module(owner), name, value)
        else:
            self.inner[id(owner), dictionary, name] = (self._module(owner), dictionary, name, value)
        return value

    def size(self, module: nn.Module, dictionary: str) -> int:
        """The number of entries of `module`'s `dictionary`, recorded."""
        size = len(vars(module)[dictionary])
        self.sizes[id(module), dictionary] = (self._module(module), dictionary, size)
        return size

    def attribute(self, owner: object, name: str, value: object) -> None:
        """Record that `getattr(owner, name, None)` gave `value`."""
        if isinstance(value, nn.Module):
            self.complete = False
        elif isinstance(owner, nn.Module):
            self.attributes[id(owner), name] = (self._module(owner), None, name, value)
        elif owner is not None:  # None's attributes do not change
            self.attributes[id(owner), name] = (None, owner, name, value)

    def absent(self, module: nn.Module, name: str) -> None:
        """Record that `module` has no attribute `name` anywhere: not in its instance's dictionaries, nor its class's."""
        for dictionary in ("__dict__", "_parameters", "_buffers", "_modules"):
            if dictionary == "__dict__" or isinstance(vars(module).get(dictionary), dict):
                self.lookup(module, dictionary, name)
        self.classes[id(module), name] = (self._module(module), type(module), name)

    def holds(self) -> bool:
        """Whether every read would give, in the model now, what it gave."""
        modules, entries, own, inner, children, sizes, attributes, classes = self._checks or self._compile()
        dictionaries, names, expected = entries
        if not all(map(is_, map(dict.get, dictionaries, names, repeat(_MISSING)), expected)):
            return False
        try:
            spaces = tuple(map(vars, map(_CALL, modules)))  # TypeError: vars(None), a module gone
            space = spaces.__getitem__
            index, names, expected = own
            if not all(map(is_, map(dict.get, map(space, index), names, repeat(_MISSING)), expected)):
                return False
            index, dictionaries, names, expected = inner
            found = map(dict.get, map(dict.__getitem__, map(space, index), dictionaries), names, repeat(_MISSING))
            if not all(map(is_, found, expected)):
                return False
            index, names, expected = children
            expected = tuple(map(_CALL, expected))
            found = map(dict.get, map(dict.__getitem__, map(space, index), repeat("_modules")), names)
            if None in expected or not all(map(is_, found, expected)):
                return False  # None: a child gone, so another is there now, or none
            index, dictionaries, counts = sizes
            if not all(map(eq, map(len, map(dict.__getitem__, map(space, index), dictionaries)), counts)):
                return False
        except (TypeError, KeyError):  # a module gone, or one of its dictionaries
            return False
        for index, owner, name, value in attributes:
            if getattr(owner if index is None else modules[index](), name, None) is not value:
                return False
        for index, cls, name in classes:  # a class's getattr looks through its bases, in C
            if type(modules[index]()) is not cls or getattr(cls, name, _MISSING) is not _MISSING:
                return False
        return True

    def _compile(self) -> tuple[Any, ...]:
        """The reads as the columns that `holds` checks: passes of dictionary look-ups in C, over the modules'
        `vars` found once; a module by its index in `modules`."""
        position = {key: index for index, key in enumerate(self.modules)}

        def columns(table: dict[Any, tuple[Any, ...]], width: int) -> tuple[tuple[Any, ...], ...]:
            rows = [(position[row[0]], *row[1:]) for row in table.values()]
            return tuple(zip(*rows, strict=True)) or ((),) * width

        self._checks = (
            tuple(self.modules.values()),
            tuple(zip(*self.entries.values(), strict=True)) or ((), (), ()),
            columns(self.own, 3),
            columns(self.inner, 4),
            columns(self.children, 3),
            columns(self.sizes, 3),
            tuple((None if index is None else position[index], *row) for index, *row in self.attributes.values()),
            tuple((position[row[0]], *row[1:]) for row in self.classes.values()),
        )
        return self._checks

    def add(self, other: Reads) -> None:
        """Count `other`'s reads, of the same model, as this lookup's own."""
        for mine, theirs in (
            (self.modules, other.modules),
            (self.entries, other.entries),
            (self.own, other.own),
            (self.inner, other.inner),
            (self.children, other.children),
            (self.sizes, other.sizes),
            (self.attributes, other.attributes),
            (self.classes, other.classes),
        ):
            mine.update(theirs)
        self.complete = self.complete and other.complete
        self._checks = None


_CALL = weakref.ref.__call__
"""What a weak reference holds (None once it is gone), as a function that `map` calls in C."""


_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[Hashable, tuple[object, Reads]]] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()
_READS: ContextVar[Reads | None] = ContextVar("layerfuse_reads", default=None)


def remembered(model: nn.Module, key: Hashable, find: Callable[[], T]) -> T:
    """`find()`, or its result for `key` from an earlier call on `model` while the reads it made still hold."""
    outer = _READS.get()
    entries = _CACHE.get(model)
    found = None if entries is None else entries.get(key)
    if found is not None and found[1].holds():
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
    """Record the reads that the lookups run within make of `model`; the record's `holds()` says later,
    in a few dictionary look-ups, whether they would all give what they gave (if `complete`: all were recorded).

    >>> model = nn.Sequential(nn.Linear(2, 2))
    >>> with recording(model) as reads:
    ...     found = remembered(model, "first", lambda: submodule(model, "0"))
    >>> reads.complete, reads.holds()
    (True, True)
    >>> model[0] = nn.Linear(2, 2)
    >>> reads.holds()
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
            if isinstance(registered, dict) and registered.get(name) is child:
                reads.lookup(module, "_modules", name)
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
        elif isinstance(stored, dict) and stored.get(name, _MISSING) is value:
            reads.lookup(obj, "__dict__", name)
        else:
            reads.attribute(obj, name, value)
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
    reads = _READS.get()
    return len(modules._modules) if reads is None else reads.size(modules, "_modules")


def first_parameter(root: nn.Module) -> nn.Parameter | None:
    """`next(root.parameters(), None)`, recorded: the parameters of the modules visited on the way (the path
    to the first one that has any, in the same order as `parameters()`) and the children taken."""
    reads = _READS.get()
    own = tuple(root._parameters.values())
    if reads is not None:
        reads.size(root, "_parameters")
        for name in root._parameters:
            reads.lookup(root, "_parameters", name)
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
