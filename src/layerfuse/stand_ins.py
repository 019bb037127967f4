"""`StandIn`: a callable put on a model instance in place of one of its methods, until it is taken off.

While fusions are attached, layerfuse watches a few of a model's methods (`forward`, `generate`,
`save_pretrained`) by putting a stand-in in the instance's `__dict__`, where it shadows the class's
method and calls the one it replaced. One stand-in per method and model is shared by the fusions;
taking it off puts back exactly what the instance had, so the model's `__dict__` ends as it began.
It looks like the method it replaces to `inspect.signature` and `help` (`__wrapped__`, name, doc).

>>> from torch import nn
>>> class Loud(StandIn):
...     method = "forward"
>>> model = nn.Linear(2, 2)
>>> loud = Loud.on(model)
>>> model.forward is loud, Loud.on(model) is loud
(True, True)
>>> loud.take_off(model)
>>> "forward" in model.__dict__
False
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from .errors import refuse_copy

_NONE = object()
"""Stands for "no such method on the instance" in `StandIn.previous`."""


class StandIn:
    """Stands on a model instance for its method `method`; `on` puts one there (or finds the one there)."""

    method: ClassVar[str]
    key: ClassVar[str]
    """Where a model's `__dict__` keeps its stand-in of this kind: `_layerfuse_<method>`."""

    def __init_subclass__(cls) -> None:
        cls.key = f"_layerfuse_{cls.method}"

    def __init__(self, model: nn.Module) -> None:
        self.previous = model.__dict__.get(self.method, _NONE)
        inner = getattr(model, self.method)
        self.inner = self.__wrapped__ = inner
        self.__name__ = getattr(inner, "__name__", self.method)
        self.__qualname__ = getattr(inner, "__qualname__", self.method)
        self.__doc__ = getattr(inner, "__doc__", None)

    @classmethod
    def found(cls, model: nn.Module) -> Any:
        """The stand-in of this kind that stands on `model` now, or None."""
        current = model.__dict__.get(cls.key)
        return current if current is not None and model.__dict__.get(cls.method) is current else None

    @classmethod
    def on(cls, model: nn.Module) -> Any:
        """The stand-in of this kind on `model`, put there if there is none."""
        current = cls.found(model)
        if current is None:
            current = cls(model)
            model.__dict__[cls.method] = model.__dict__[cls.key] = current
        return current

    def take_off(self, model: nn.Module) -> None:
        """Put back what the instance had in the stand-in's place (if it still stands there)."""
        if model.__dict__.get(self.method) is self:
            if self.previous is _NONE:
                del model.__dict__[self.method]
            else:
                model.__dict__[self.method] = self.previous
        if model.__dict__.get(self.key) is self:
            del model.__dict__[self.key]

    __reduce_ex__ = __deepcopy__ = refuse_copy
