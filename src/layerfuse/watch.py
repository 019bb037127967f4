"""`ForwardWatch`: what a fusion needs to know about the current forward of the model it fuses.

The attention mask the forward was given (for positions such as "tokens"), and how many times the
fused module has run in it (for a block shared by several layers, as in ALBERT). The model's forward
is wrapped on the instance while a watch is on it, so the watch sees every forward however the model
is called: `model(...)`, or `model.forward(...)` as sentence-transformers does. A fusion that needs
the mask and runs outside a forward it saw (a module called on its own, or recomputed in backward)
gets an error, never a guess. What a watch records is kept per thread, so forwards of the model in
several threads at once each see their own.

>>> from transformers import BertConfig, BertModel
>>> model = BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8))
>>> watch = ForwardWatch(model, needs_mask=True)
>>> "forward" in model.__dict__
True
>>> watch.remove()
>>> "forward" in model.__dict__
False
"""

from __future__ import annotations

import functools
import inspect
import operator
import threading
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .errors import ArchitectureError, FusionStateError
from .stand_ins import StandIn


def attention_mask_index(model: nn.Module, name: str | None = "attention_mask") -> int:
    """Where `model.forward` takes the mask `name` (`decoder_attention_mask` for a decoder stack) among its positional arguments.

    `name` None: the site is in none or several of the model's stacks, so no mask is known to be its own.
    """
    if name is None:
        raise ArchitectureError(
            f"positions 'tokens', 'first' and 'last' read the attention mask, and the site is in none or both of the "
            f"stacks of {type(model).__name__}, each with a mask of its own: give token indices or a boolean mask"
        )
    forward = model.__dict__.get("forward")
    parameters = _parameters(type(model)) if forward is None else list(inspect.signature(forward).parameters)
    if name not in parameters:
        raise ArchitectureError(
            f"positions 'tokens', 'first' and 'last' read the attention mask, but "
            f"{type(model).__name__}.forward takes no {name}: give token indices or a boolean mask"
        )
    return parameters.index(name)


@functools.lru_cache(maxsize=256)  # bounded: some libraries make a class per instance
def _parameters(cls: type[nn.Module]) -> tuple[str, ...]:
    """The parameters of the forward of `cls`, after `self`: those of its instances' `model.forward`."""
    return tuple(inspect.signature(cls.forward).parameters)[1:]


_LOCK = threading.Lock()
"""Held while a watch is put on or taken off a model; never in a forward."""


class WatchedForward(StandIn):
    """A model's forward, put in its place on the instance: it tells the watches on the model when a forward starts and ends."""

    method = "forward"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.watches: list[ForwardWatch] = []
        self.tells_direct = False
        """Whether each forward is told if it was called as `model.forward(...)`: once a watch needs to know."""
        self.handle: RemovableHandle | None = None
        """The pre-hook that tells `model(...)` from `model.forward(...)`, while `tells_direct`."""

    def tell_direct_calls(self, model: nn.Module) -> None:
        """Tell each forward whether it was called as `model.forward(...)`, from now until taken off."""
        if not self.tells_direct:
            self.thread = threading.local()
            self.handle = model.register_forward_pre_hook(self._called, prepend=True)
            self.tells_direct = True

    def _called(self, *_: Any) -> None:
        self.thread.called = True

    def take_off(self, model: nn.Module) -> None:
        if self.handle is not None:
            self.handle.remove()
        super().take_off(model)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        direct = False
        if self.tells_direct:  # read as a bool: torch.compile cannot trace a hook's handle
            direct, self.thread.called = not getattr(self.thread, "called", False), False
        watches = tuple(self.watches)
        for watch in watches:
            watch.enter(args, kwargs, direct=direct)
        try:
            return self.inner(*args, **kwargs)
        finally:
            for watch in watches:
                watch.exit()


class _ThreadState:
    """What a watch knows of the forward running in one thread."""

    __slots__ = ("calls", "depth", "direct", "in_order", "mask", "outer")

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None
        self.calls = 0
        self.depth = 0
        self.direct = False
        self.in_order = 0
        self.outer: list[tuple[torch.Tensor | None, int, bool]] = []


class _PerThread(threading.local):
    """A watch's `_ThreadState` for each thread: found once per call, then read as plain slots."""

    def __init__(self) -> None:
        self.state = _ThreadState()


def _per_thread(name: str) -> Any:
    """An attribute of the watch whose value is the current thread's."""
    return property(
        operator.attrgetter(f"_thread.state.{name}"), lambda self, value: setattr(self._thread.state, name, value)
    )


class ForwardWatch:
    """Records, for each forward of `model`, its attention mask (`mask_name`) and a count of the fused module's calls.

    `mask`, `calls` (of the fused module), `depth` (of nested forwards), `direct` (called as
    `model.forward(...)`; known once `needs_order` or `watch_order()` asked for it, else False) and
    `in_order` are those of the current thread's forward.
    """

    mask = _per_thread("mask")
    calls = _per_thread("calls")
    depth = _per_thread("depth")
    direct = _per_thread("direct")
    in_order = _per_thread("in_order")

    def __init__(
        self, model: nn.Module, *, needs_mask: bool, mask_name: str | None = "attention_mask", needs_order: bool = False
    ) -> None:
        self.index = attention_mask_index(model, mask_name) if needs_mask else None
        self.mask_name = mask_name
        self.model = model
        self._thread = _PerThread()
        with _LOCK:
            watched = WatchedForward.on(model)
            watched.watches.append(self)
        self._watched: WatchedForward | None = watched
        if needs_order:
            self.watch_order()

    def watch_order(self) -> None:
        """From now on, know whether each forward was called as `model.forward(...)`, whose examples' order
        is not known (`check_rows`): needed for per-example info only, as it costs a hook on the model."""
        with _LOCK:
            if self._watched is not None:
                self._watched.tell_direct_calls(self.model)

    def enter(self, args: tuple[Any, ...], kwargs: dict[str, Any], *, direct: bool = False) -> None:
        """A forward of the model starts with `args` and `kwargs`; `direct`: called as `model.forward(...)`."""
        state = self._thread.state
        state.outer.append((state.mask, state.calls, state.direct))
        state.depth += 1
        state.calls, state.direct = 0, direct
        if self.index is not None:
            state.mask = kwargs.get(self.mask_name, args[self.index] if len(args) > self.index else None)

    def exit(self) -> None:
        """The forward that started last has ended, or raised."""
        state = self._thread.state
        state.mask, state.calls, state.direct = state.outer.pop()
        state.depth -= 1

    def check_rows(self, batch_size: int) -> None:
        """Refuse per-example info where this forward's examples may not be in the info's order.

        A forward called as `model.forward(...)`, as sentence-transformers' `encode` calls it after
        sorting the texts by length, may hold the examples in any order; `model(...)`, or a caller that
        says it keeps the order (`in_order`), holds them as given.
        """
        state = self._thread.state
        if state.depth and state.direct and not state.in_order:
            raise FusionStateError(
                f"per-example info for {batch_size} examples is matched to a forward's examples by their order, and "
                f"this forward of {type(self.model).__name__} was called as model.forward(...), as "
                "sentence-transformers' encode does after sorting the texts by length, so the order is not known: "
                "use layerfuse.encode(...), or call the model as model(...) with the batch in the info's order"
            )

    def current_mask(self, positions: object) -> torch.Tensor | None:
        """The attention mask of the forward running now (None: it was given none), for a fusion at `positions`;
        an error outside a forward."""
        state = self._thread.state
        if state.depth == 0:
            raise FusionStateError(
                f"a fusion at positions {positions!r} needs the attention mask of the current forward of "
                f"{type(self.model).__name__}, but the fused module ran outside one (called on its own, or "
                "recomputed by gradient checkpointing): call the model itself, or fuse at positions that need no "
                "mask ('all', token indices or a mask)"
            )
        return state.mask

    def remove(self) -> None:
        """Stop watching, restoring the model's forward once no watch is left; calling it again does nothing."""
        with _LOCK:
            watched, self._watched = self._watched, None
            if watched is None:
                return
            watched.watches.remove(self)
            if not watched.watches:
                watched.take_off(self.model)
