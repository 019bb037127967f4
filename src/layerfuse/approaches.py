"""By which mechanism: a forward hook on the module, or a custom layer that changes its forward in place.

Both hand the module's own input or output to the same fusion code (`Fusion.fuse_input` and
`Fusion.fuse_output`), so their results are the same tensor operations. Each mechanism keeps, per
module, the fusions of its input and of its output, applied in the order they were attached:

- `hook` registers a forward pre-hook and a forward hook, first in line (`prepend=True`), so that
  every other hook on the module, the model's own `hidden_states` capture included, sees the fused
  value;
- `layer` swaps the module's class for a generated subclass, as `torch.nn.utils.parametrize` does:
  its `forward` fuses the output, and its call fuses the input before any hook sees it. The module
  stays the same object, with the same name, parameters, `state_dict` keys and hooks.

On a module fused by both, the custom layer's fusions come first (they run inside `forward`).

Fusions may be attached and removed from several threads: the bookkeeping is changed under a lock
(never taken in a forward), and a forward sees the fusions of a module as they were before or after
a change, never half-way. While a fusion is attached, pickling or deep-copying the model is refused
(`FusionStateError`): a copy would share the fusion's state, or lose it.

>>> sorted(APPROACHES)
['hook', 'layer']
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .errors import refuse_copy

if TYPE_CHECKING:
    from .fusion import ForwardState, Fusion

Detach = Callable[[], None]
Arguments = tuple[tuple[Any, ...], dict[str, Any]]


@dataclass
class _Attached:
    """The fusions one approach applies at one module, by point, in the order they were attached.

    The tuples are replaced, never changed in place, so that a forward in another thread reads them whole.
    It refuses pickling and deep copies, and so does every module and model that holds it.
    """

    input: tuple[Fusion, ...] = ()
    output: tuple[Fusion, ...] = ()
    handles: dict[str, RemovableHandle] = field(default_factory=dict)
    original: type[nn.Module] | None = None
    instance_forward: Callable[..., Any] | None = None

    def fuse_input_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Arguments:
        return fuse_inputs(self.input, args, kwargs)

    def fuse_output_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        return fuse_outputs(self.output, output)

    __reduce_ex__ = __deepcopy__ = refuse_copy


_LOCK = threading.Lock()
"""Held while a fusion is attached to or removed from a module's bookkeeping; never in a forward."""


def fuse_inputs(fusions: Sequence[Fusion], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Arguments:
    for fusion in fusions:
        args, kwargs = fusion.fuse_input(args, kwargs)
    return args, kwargs


def fuse_outputs(fusions: Sequence[Fusion], output: Any, states: dict[Fusion, ForwardState] | None = None) -> Any:
    for fusion in fusions:
        output = fusion.fuse_output(output, None if states is None else states[fusion])
    return output


_STATES = "_layerfuse_states"
"""The keyword that carries the fusions' forward states through a checkpointed forward (see `_fused_class`)."""


def _checkpointed(module: nn.Module) -> bool:
    """Whether transformers' gradient checkpointing will checkpoint this call of `module` (and recompute it in backward)."""
    return getattr(module, "gradient_checkpointing", False) is True and module.training and torch.is_grad_enabled()


def _attach(
    key: str,
    module: nn.Module,
    fusion: Fusion,
    install: Callable[[_Attached, str], None],
    uninstall: Callable[[_Attached, str], None],
) -> Detach:
    point = fusion.site.point

    def forget_if_empty(attached: _Attached) -> None:
        if not attached.input and not attached.output and attached.original is None:
            if module.__dict__.get(key) is attached:
                del module.__dict__[key]

    with _LOCK:
        attached = module.__dict__.get(key)
        if attached is None:
            attached = module.__dict__[key] = _Attached()
        if not getattr(attached, point):
            try:
                install(attached, point)
            except BaseException:
                forget_if_empty(attached)
                raise
        setattr(attached, point, (*getattr(attached, point), fusion))

    def detach() -> None:
        with _LOCK:
            fusions = list(getattr(attached, point))
            fusions.remove(fusion)
            setattr(attached, point, tuple(fusions))
            if not fusions:
                uninstall(attached, point)
            forget_if_empty(attached)

    return detach


def attach_hook(module: nn.Module, fusion: Fusion) -> Detach:
    """Fuse `module`'s input or output with a hook placed first; return the function that detaches it."""

    def install(attached: _Attached, point: str) -> None:
        if point == "input":
            attached.handles[point] = module.register_forward_pre_hook(
                attached.fuse_input_hook, prepend=True, with_kwargs=True
            )
        else:
            attached.handles[point] = module.register_forward_hook(attached.fuse_output_hook, prepend=True)

    def uninstall(attached: _Attached, point: str) -> None:
        attached.handles.pop(point).remove()

    return _attach("_layerfuse_hook", module, fusion, install, uninstall)


@functools.cache
def _fused_class(cls: type[nn.Module]) -> type[nn.Module]:
    def __call__(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        attached = self.__dict__.get("_layerfuse_layer")
        if attached is None:  # the last fusion was removed, by another thread, as this call began
            return cls.__call__(self, *args, **kwargs)
        if attached.input:
            args, kwargs = fuse_inputs(attached.input, args, kwargs)
        if attached.output and _checkpointed(self):
            # The checkpointed forward is recomputed in backward, after the model's forward has ended: its
            # keywords, which the recomputation gets again, carry what the fusions need of this forward.
            kwargs = {**kwargs, _STATES: {fusion: fusion.forward_state() for fusion in attached.output}}
        return cls.__call__(self, *args, **kwargs)

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        attached = self.__dict__.get("_layerfuse_layer")
        states = kwargs.pop(_STATES, None)
        inner = None if attached is None else attached.instance_forward
        output = inner(*args, **kwargs) if inner is not None else cls.forward(self, *args, **kwargs)
        fusions = tuple(states) if states is not None else () if attached is None else attached.output
        return fuse_outputs(fusions, output, states)

    return type(
        f"Fused{cls.__name__}",
        (cls,),
        {
            "__call__": __call__,
            "forward": forward,
            "__reduce_ex__": refuse_copy,
            "__deepcopy__": refuse_copy,
            "__module__": __name__,
        },
    )


def attach_layer(module: nn.Module, fusion: Fusion) -> Detach:
    """Fuse `module`'s input or output by swapping in a class whose forward does it; return the detacher."""

    def install(attached: _Attached, point: str) -> None:
        if attached.original is None:
            attached.original = type(module)
            # A forward set on the instance (accelerate's hooks, transformers 4.x output capture)
            # would shadow the class's: ours takes its place and calls it.
            attached.instance_forward = module.__dict__.pop("forward", None)
            module.__class__ = _fused_class(attached.original)

    def uninstall(attached: _Attached, point: str) -> None:
        # Restore the class once nothing is attached, and only while ours is on top; under another
        # library's later swap, our forward stays in its chain as a pass-through.
        fused = _fused_class(attached.original)
        if not attached.input and not attached.output and type(module) is fused:
            bound = module.__dict__.get("forward")
            if getattr(bound, "__func__", None) is fused.forward:
                del module.__dict__["forward"]
            if attached.instance_forward is not None:
                module.__dict__["forward"] = attached.instance_forward
            module.__class__ = attached.original
            attached.original = attached.instance_forward = None

    return _attach("_layerfuse_layer", module, fusion, install, uninstall)


APPROACHES: dict[str, Callable[[nn.Module, Fusion], Detach]] = {
    "hook": attach_hook,
    "layer": attach_layer,
}
