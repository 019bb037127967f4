"""A `fuse` call repeated: the parts an identical earlier call checked and built, used again while they hold.

`with fuse(model, v, layer=k): model(**batch)` around every batch makes the same fusion each time.
The first call checks everything and builds the fusion's parts: its site, its method, the info cast
and prepared. A later call with the same arguments on the same model gets a new `Fusion` of those
parts, once a few look-ups say that nothing they came from has changed:

- the modules and attributes the site and its width were found by, and the model's first weight
  (`lookups.recording`), with that weight's dtype and device;
- the method's arguments (`Method.arguments()`);
- the info: the same tensor, of the same shape, dtype and device, with the same values.

Anything else is checked and built anew, and kept in place of what was. Only calls whose arguments
are plain values (strings, numbers, None, tuples or lists of ints) are kept: a `Method` instance, a
learned method (new parameters every call), a positions mask, info that requires grad are built
every time, and what a call under `torch.inference_mode` built is used again only under it. The last
few calls are kept per model, which is held weakly, as are its modules (in the site and the reads):
what is kept never keeps a model alive, also while fusions are attached to it.

>>> import torch
>>> from transformers import BertConfig, BertModel
>>> from layerfuse import fuse
>>> model = BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8))
>>> v = torch.ones(8)
>>> with fuse(model, v, layer=1) as first:
...     pass
>>> with fuse(model, v, layer=1) as again:
...     again.method is first.method and again is not first
True
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .config import FusionConfig
from .info import Info
from .lookups import Reads, remembered_first_parameter
from .methods import Method
from .positions import Positions
from .sites import Site

if TYPE_CHECKING:
    from .fusion import Fusion

KEPT_PER_MODEL = 16
"""How many distinct calls are kept per model; the oldest goes first."""
_PLAIN = (str, int, float, type(None))
_PLAIN_TYPES = frozenset(_PLAIN)


@dataclass(frozen=True)
class Kept:
    """What a call built, with what it was built from: the fusion's parts (all but its model, which the
    cache must not hold), the reads that found its site, the weight whose dtype and device it was cast
    for, the method's arguments, and the caller's info tensor."""

    site: Site
    method: Method
    info: Info
    approach: str
    positions: Positions
    reads: Reads
    weight: torch.Tensor
    dtype: torch.dtype
    device: torch.device
    arguments: dict[str, Any]
    given: weakref.ref[torch.Tensor] | None
    inference: bool
    """Built under `torch.inference_mode`: its tensors cannot join a graph autograd records, so not reused outside it."""


_KEPT: dict[int, tuple[weakref.ReferenceType[nn.Module], dict[Hashable, Kept]]] = {}
"""The calls kept per model, by the model's id, with a weak reference to it: one dictionary look-up to find them."""
_LOCK = threading.Lock()


def _kept_for(model: nn.Module) -> dict[Hashable, Kept]:
    """The calls kept for `model`, made empty if there are none; its entry goes when the model does. Under `_LOCK`."""
    ident = id(model)
    entry = _KEPT.get(ident)
    if entry is not None and entry[0]() is model:
        return entry[1]

    def forget(reference: weakref.ReferenceType[nn.Module]) -> None:  # no lock: it may run amid any allocation
        if _KEPT.get(ident, (None,))[0] is reference:
            _KEPT.pop(ident, None)

    calls: dict[Hashable, Kept] = {}
    _KEPT[ident] = (weakref.ref(model, forget), calls)
    return calls


def call_key(config: FusionConfig | None, fields: tuple[Any, ...], arguments: Mapping[str, Any]) -> Hashable | None:
    """The key of a `fuse` call: its config, or its keywords (`fields` in a fixed order, None where not
    given, and the method's `arguments`), each value with its type; None for a call that is not kept
    (see the module's docstring).

    >>> call_key(None, (2, None), {"alpha": 0.5, "beta": 1.0}) == call_key(None, (2, None), {"beta": 1.0, "alpha": 0.5})
    True
    >>> call_key(None, (2,), {"alpha": 1}) == call_key(None, (2,), {"alpha": 1.0})
    False
    """
    if config is not None:
        if not isinstance(config, FusionConfig) or any(value is not None for value in fields) or arguments:
            return None  # refused by `config_or_keywords`
        fields = (config.method, config.layer, config.site, config.stack, config.approach, config.positions)
        arguments = config.arguments
    if not arguments and _PLAIN_TYPES.issuperset(map(type, fields)):  # the usual call, keyed in C
        return (config is not None, *zip(map(type, fields), fields))
    key: list[Hashable] = [config is not None]
    for value in fields:
        if (plain := _plain(value)) is None:
            return None
        key.append(plain)
    for name in sorted(arguments):
        if (plain := _plain(arguments[name])) is None:
            return None
        key.append((name, plain))
    return tuple(key)


def _plain(value: object) -> Hashable | None:
    """`value` with its type, if it is a plain value or a tuple or list of ints; else None."""
    kind = type(value)
    if kind in _PLAIN:
        return kind, value
    if kind in (tuple, list) and all(type(item) is int for item in value):  # type: ignore[attr-defined]
        return kind, tuple(value)  # type: ignore[call-overload]
    return None


def keep(model: nn.Module, key: Hashable, fusion: Fusion, reads: Reads, info: torch.Tensor | None) -> None:
    """Keep what the call `key` built on `model`, found by `reads`, if it may be used again; else nothing."""
    weight = remembered_first_parameter(model)
    if (
        not reads.complete
        or weight is None
        or weight.is_meta
        or fusion.method.learned
        or fusion.site.module is model
        or fusion.positions.mask is not None
        or (info is not None and info.requires_grad)
    ):
        return
    kept = Kept(
        site=fusion.site,
        method=fusion.method,
        info=fusion.info,
        approach=fusion.approach,
        positions=fusion.positions,
        reads=reads,
        weight=weight,
        dtype=weight.dtype,
        device=weight.device,
        arguments=fusion.method.arguments(),
        given=None if info is None else weakref.ref(info),
        inference=torch.is_inference_mode_enabled(),
    )
    with _LOCK:
        calls = _kept_for(model)
        calls.pop(key, None)
        calls[key] = kept
        while len(calls) > KEPT_PER_MODEL:
            del calls[next(iter(calls))]


def kept(model: nn.Module, key: Hashable, info: torch.Tensor | None) -> Kept | None:
    """What the call `key` built on `model` with `info`, if everything it was built from holds."""
    entry = _KEPT.get(id(model))
    found = entry[1].get(key) if entry is not None and entry[0]() is model else None
    if found is None:
        return None
    weight = found.weight
    if weight.dtype is not found.dtype or weight.device != found.device or not found.reads.holds():
        return None
    if found.method.arguments() != found.arguments:
        return None
    if not torch.is_inference_mode_enabled() and (found.inference or _inference(found.info.tensor)):
        return None
    if info is None:
        return found if found.given is None else None
    source = found.info.source
    if (
        found.given is None
        or found.given() is not info
        or info.requires_grad
        or info.dtype is not source.dtype
        or info.shape != source.shape
        or info.device != source.device
        or not torch.equal(info, source)
    ):
        return None
    return found


def _inference(tensor: torch.Tensor | None) -> bool:
    return tensor is not None and tensor.is_inference()
