"""`FusionConfig`: the one value that describes a fusion, without its model and its info.

It names the method and its arguments, the layer and site, the approach and the positions, and is
checked once, when made. `fuse(model, info, config)` attaches it; `Fusion.config` gives it back;
its JSON form (`to_dict` / `from_dict`) is what a saved fusion's `fusion_config.json` holds and
what the commands read and write.

>>> import torch
>>> from transformers import BertConfig, BertModel
>>> from layerfuse import fuse
>>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37))
>>> config = FusionConfig(method="add", arguments={"alpha": 0.5}, layer=1, positions="tokens")
>>> config.to_dict()
{'method': 'addition', 'arguments': {'alpha': 0.5}, 'layer': 1, 'site': 'output', 'stack': None, 'approach': 'hook', 'positions': 'tokens'}
>>> with fuse(model, torch.ones(32), config) as fusion:
...     fusion.config == config
True
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .approaches import APPROACHES
from .errors import ArgumentTypeError, ArgumentValueError, UnknownNameError
from .methods import Method, check_arguments, make_method, method_parameters, recorded_arguments
from .positions import Positions, PositionsLike
from .sites import check_site

FIELDS = ("method", "arguments", "layer", "site", "stack", "approach", "positions")


@dataclass(frozen=True, eq=False)
class FusionConfig:
    """A fusion without its model and info: `method` with its `arguments`, at `site` of `layer` (of `stack`), by `approach`, at `positions`.

    `method` is a registered name or alias (kept as the registered name); `arguments` are its
    constructor's keywords, completed by what the method records of itself (`Method.arguments()`:
    defaults, numbers as floats) for fixed methods and by the constructor's defaults for learned ones. `layer` is the index
    that `hidden_states` reports (None for a site named by module); `site` is "output", "input",
    "attention", "mlp", "embeddings" or a module's dotted name; `stack` is "encoder" or "decoder" for
    a layer of an encoder-decoder with both (None otherwise); `approach` is "hook" or "layer";
    `positions` is "all", "tokens", "first", "last", token indices or a boolean (B, T) mask.
    """

    method: str = "addition"
    arguments: Mapping[str, Any] = field(default_factory=dict)
    layer: int | None = None
    site: str = "output"
    stack: str | None = None
    approach: str = "hook"
    positions: PositionsLike = "all"

    def __post_init__(self) -> None:
        if not isinstance(self.method, str):
            raise ArgumentTypeError(
                f"method must be a registered name, got {type(self.method).__name__}: "
                "pass a layerfuse.Method instance to fuse(method=...) instead of a config"
            )
        if not isinstance(self.arguments, Mapping) or not all(isinstance(key, str) for key in self.arguments):
            raise ArgumentTypeError(f"arguments must be a mapping of names to values, got {self.arguments!r}")
        cls = check_arguments(self.method, self.arguments)
        if cls.learned:
            defaults = {key: p.default for key, p in method_parameters(cls).items() if p.default is not p.empty}
            arguments = {**defaults, **self.arguments}
        else:
            arguments = {**self.arguments, **recorded_arguments(cls, self.arguments)}
        check_site(self.layer, self.site, self.stack)
        if not isinstance(self.approach, str) or self.approach not in APPROACHES:
            raise UnknownNameError(f"unknown approach {self.approach!r}: use one of {', '.join(APPROACHES)}")
        positions = Positions(self.positions)
        chosen = positions.mask if positions.mask is not None else positions.value
        set_field = object.__setattr__
        set_field(self, "method", cls.method_name)
        set_field(self, "arguments", arguments)
        set_field(self, "positions", tuple(chosen) if positions.indices is not None else chosen)

    def replace(self, **changes: Any) -> FusionConfig:
        """A copy with `changes` (field names and values), checked as a new config is.

        >>> FusionConfig(layer=2).replace(approach="layer").approach
        'layer'
        """
        unknown = sorted(set(changes) - set(FIELDS))
        if unknown:
            raise ArgumentValueError(f"unknown config field(s) {unknown}: the fields are {', '.join(FIELDS)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-ready values; a positions mask is data, written as None (saved beside, as a tensor)."""
        positions = self.positions
        if isinstance(positions, torch.Tensor):
            positions = None
        elif isinstance(positions, tuple):
            positions = list(positions)
        try:
            arguments = json.loads(json.dumps(self.arguments))
        except (TypeError, ValueError) as error:
            raise ArgumentValueError(f"the arguments of method {self.method!r} are not JSON values: {error}") from error
        return {
            "method": self.method,
            "arguments": arguments,
            "layer": self.layer,
            "site": self.site,
            "stack": self.stack,
            "approach": self.approach,
            "positions": positions,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, mask: torch.Tensor | None = None) -> FusionConfig:
        """The config that `to_dict` wrote; `mask` supplies the positions where they were written as None.

        Keys other than the config's fields are refused, so a misspelt one is not silently dropped.

        >>> FusionConfig.from_dict({"method": "scale", "arguments": {"alpha": 2.0}, "layer": 1}).arguments
        {'alpha': 2.0}
        """
        if not isinstance(data, Mapping):
            raise ArgumentTypeError(f"a fusion config is a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - set(FIELDS))
        if unknown:
            raise ArgumentValueError(f"unknown config key(s) {unknown}: the keys are {', '.join(FIELDS)}")
        values = dict(data)
        if values.get("positions", "all") is None:
            if mask is None:
                raise ArgumentValueError("the config's positions are a mask (None in JSON): pass the mask tensor")
            values["positions"] = mask
        elif isinstance(values.get("positions"), list):
            values["positions"] = tuple(values["positions"])
        return cls(**values)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FusionConfig):
            return NotImplemented
        masks = [c.positions if isinstance(c.positions, torch.Tensor) else None for c in (self, other)]
        if (masks[0] is None) != (masks[1] is None):
            return False
        same_mask = masks[0] is None or (masks[0].shape == masks[1].shape and torch.equal(masks[0], masks[1]))
        return same_mask and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))


def config_or_keywords(
    config: FusionConfig | None, *, method: str | Method | None = None, **fields: Any
) -> tuple[FusionConfig, Method | None]:
    """The config of a call that takes a `FusionConfig` or its fields as keywords, and a `Method` instance if one was given.

    `fields` are `layer`, `site`, `stack`, `approach`, `positions` (None: not given) and the method's arguments.

    >>> config_or_keywords(None, layer=2, method="scale", alpha=0.5)[0].arguments
    {'alpha': 0.5}
    """
    named = {key: fields.pop(key) for key in ("layer", "site", "stack", "approach", "positions") if key in fields}
    given = sorted([key for key, value in {**named, "method": method}.items() if value is not None] + list(fields))
    if config is not None:
        if not isinstance(config, FusionConfig):
            raise ArgumentTypeError(f"config must be a layerfuse.FusionConfig, got {type(config).__name__}")
        if given:
            raise ArgumentValueError(
                f"give a config or its fields as keywords, not both (got config and {', '.join(given)}): "
                "change the config with config.replace(...)"
            )
        return config, None
    instance = method if isinstance(method, Method) else None
    if instance is not None:
        make_method(instance, fields)
    defaults = {"site": "output", "approach": "hook", "positions": "all"}
    config = FusionConfig(
        method="addition" if method is None or instance is not None else method,
        arguments={} if instance is not None else fields,
        **{key: defaults.get(key) if value is None else value for key, value in named.items()},
    )
    return config, instance
