"""By which mechanism: a forward hook on the module, or a custom layer that changes its forward in place.

Both call `fuse_output` on the module's own output, so their results are the same tensor operations.
Each mechanism keeps one list of fusions per module, applied in the order they were attached:

- `hook` registers one forward hook, first in line (`prepend=True`), so that every other hook on the
  module, the model's own `hidden_states` capture included, sees the fused output;
- `layer` swaps the module's class for a generated subclass whose `forward` fuses the output, as
  `torch.nn.utils.parametrize` does: the module stays the same object, with the same name, parameters,
  `state_dict` keys and hooks.

On a module fused by both, the custom layer's fusions come first (they run inside `forward`).

>>> sorted(APPROACHES)
['hook', 'layer']
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn
from torch.utils.hooks import RemovableHandle

from .errors import FusionStateError
from .outputs import split_output

if TYPE_CHECKING:
    from .fusion import Fusion

Detach = Callable[[], None]

_HOOK = "_layerfuse_hook"
_LAYER = "_layerfuse_layer"


def fuse_output(fusions: Sequence[Fusion], output: Any) -> Any:
    """Apply `fusions` in order to the hidden states in `output`, and return it in its own form."""
    if not fusions:
        return output
    hidden, rebuild = split_output(output)
    for fusion in fusions:
        hidden = fusion.apply(hidden)
    return rebuild(hidden)


@dataclass
class _HookState:
    handle: RemovableHandle
    fusions: list[Fusion] = field(default_factory=list)


@dataclass
class _LayerState:
    original: type[nn.Module]
    fusions: list[Fusion] = field(default_factory=list)


def _output_hook(fusions: list[Fusion], module: nn.Module, args: Any, output: Any) -> Any:
    return fuse_output(fusions, output)


def attach_hook(module: nn.Module, fusion: Fusion) -> Detach:
    """Fuse `module`'s output with a forward hook; return the function that detaches it."""
    state = module.__dict__.get(_HOOK)
    if state is None:
        fusions: list[Fusion] = []
        handle = module.register_forward_hook(functools.partial(_output_hook, fusions), prepend=True)
        state = module.__dict__[_HOOK] = _HookState(handle, fusions)
    state.fusions.append(fusion)

    def detach() -> None:
        state.fusions.remove(fusion)
        if not state.fusions:
            state.handle.remove()
            del module.__dict__[_HOOK]

    return detach


def _refuse_pickle(self: nn.Module, protocol: int) -> Any:
    raise FusionStateError(
        f"cannot pickle or deep-copy a {type(self).__name__} while a layerfuse fusion changes its "
        "forward: remove the fusion first (fusion.remove(), or leave its with-block), "
        "or save model.state_dict() instead"
    )


@functools.cache
def _fused_class(cls: type[nn.Module]) -> type[nn.Module]:
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return fuse_output(self.__dict__[_LAYER].fusions, cls.forward(self, *args, **kwargs))

    return type(
        f"Fused{cls.__name__}",
        (cls,),
        {"forward": forward, "__reduce_ex__": _refuse_pickle, "__module__": __name__},
    )


def attach_layer(module: nn.Module, fusion: Fusion) -> Detach:
    """Fuse `module`'s output by swapping in a class whose forward fuses it; return the detacher."""
    state = module.__dict__.get(_LAYER)
    if state is None:
        original = type(module)
        state = module.__dict__[_LAYER] = _LayerState(original)
        module.__class__ = _fused_class(original)
    state.fusions.append(fusion)

    def detach() -> None:
        state.fusions.remove(fusion)
        # Restore the class only when ours is still on top; under another library's swap, our
        # forward stays in its chain with no fusions, a pass-through.
        if not state.fusions and type(module) is _fused_class(state.original):
            module.__class__ = state.original
            del module.__dict__[_LAYER]

    return detach


APPROACHES: dict[str, Callable[[nn.Module, Fusion], Detach]] = {
    "hook": attach_hook,
    "layer": attach_layer,
}
