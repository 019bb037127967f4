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

>>> sorted(APPROACHES)
['hook', 'layer']
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .errors import FusionStateError

if TYPE_CHECKING:
    from .fusion import ForwardState, Fusion

Detach = Callable[[], None]
Arguments = tuple[tuple[Any, ...], dict[str, Any]]


@dataclass
class _Attached:
    """The fusions one approach applies at one module, by point, in the order they were attached."""

    input: list[Fusion] = field(default_factory=list)
    output: list[Fusion] = field(default_factory=list)
    handles: dict[str, RemovableHandle] = field(default_factory=dict)
    original: type[nn.Module] | None = None
    instance_forward: Callable[..., Any] | None = None


def fuse_inputs(fusions: list[Fusion], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Arguments:
    for fusion in fusions:
        args, kwargs = fusion.fuse_input(args, kwargs)
    return args, kwargs


def fuse_outputs(fusions: list[Fusion], output: Any, states: dict[Fusion, ForwardState] | None = None) -> Any:
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
    attached = module.__dict__.get(key)
    if attached is None:
        attached = module.__dict__[key] = _Attached()
    point = fusion.site.point
    fusions = getattr(attached, point)
    if not fusions:
        install(attached, point)
    fusions.append(fusion)

    def detach() -> None:
        fusions.remove(fusion)
        if not fusions:
            uninstall(attached, point)
        if not attached.input and not attached.output and attached.original is None:
            del module.__dict__[key]

    return detach


def attach_hook(module: nn.Module, fusion: Fusion) -> Detach:
    """Fuse `module`'s input or output with a hook placed first; return the function that detaches it."""

    def install(attached: _Attached, point: str) -> None:
        if point == "input":
            fusions = attached.input
            attached.handles[point] = module.register_forward_pre_hook(
                lambda _, args, kwargs: fuse_inputs(fusions, args, kwargs), prepend=True, with_kwargs=True
            )
        else:
            fusions = attached.output
            attached.handles[point] = module.register_forward_hook(
                lambda _, args, output: fuse_outputs(fusions, output), prepend=True
            )

    def uninstall(attached: _Attached, point: str) -> None:
        attached.handles.pop(point).remove()

    return _attach("_layerfuse_hook", module, fusion, install, uninstall)


def _refuse_pickle(self: nn.Module, protocol: int) -> Any:
    raise FusionStateError(
        f"cannot pickle or deep-copy a {type(self).__name__} while a layerfuse fusion changes its "
        "forward: remove the fusion first (fusion.remove(), or leave its with-block), "
        "or save model.state_dict() instead"
    )


@functools.cache
def _fused_class(cls: type[nn.Module]) -> type[nn.Module]:
    def __call__(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        attached = self.__dict__["_layerfuse_layer"]
        if attached.input:
            args, kwargs = fuse_inputs(attached.input, args, kwargs)
        if attached.output and _checkpointed(self):
            # The checkpointed forward is recomputed in backward, after the model's forward has ended: its
            # keywords, which the recomputation gets again, carry what the fusions need of this forward.
            kwargs = {**kwargs, _STATES: {fusion: fusion.forward_state() for fusion in attached.output}}
        return cls.__call__(self, *args, **kwargs)

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        attached = self.__dict__["_layerfuse_layer"]
        states = kwargs.pop(_STATES, None)
        inner = attached.instance_forward
        output = inner(*args, **kwargs) if inner is not None else cls.forward(self, *args, **kwargs)
        return fuse_outputs(attached.output, output, states)

    return type(
        f"Fused{cls.__name__}",
        (cls,),
        {"__call__": __call__, "forward": forward, "__reduce_ex__": _refuse_pickle, "__module__": __name__},
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
