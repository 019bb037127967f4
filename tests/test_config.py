"""`FusionConfig`: one checked value for a fusion, round-tripping through `Fusion.config` and JSON bitwise."""

from __future__ import annotations

import json

import pytest
import torch

import layerfuse
from conftest import POSITIONS, TINY, assert_unchanged, snapshot
from layerfuse import FusionConfig
from layerfuse.methods import METHODS

H = TINY["hidden_size"]
B, T = 3, 7
ARGUMENTS = {
    "scale": {"alpha": 0.5},
    "clamp": {"value": 1.5},
    "addition": {"alpha": 2.0},
    "cross_attention": {"heads": 2},
}


def info_for(name: str) -> torch.Tensor | None:
    generator = torch.Generator().manual_seed(3)
    cls = METHODS[name]
    size = 5 if cls.learned else H
    shape = {"vector": (B, size), "basis": (2, size), "sequence": (4, size), "eraser": (3, size), "none": None}[
        cls.info_layout
    ]
    return None if shape is None else torch.randn(shape, generator=generator)


def randomise(method: torch.nn.Module) -> None:
    with torch.no_grad():
        for parameter in method.parameters():
            parameter.normal_(0, 0.3, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("name", METHODS)
def test_fuse_config_json_config_fuse_round_trips_bitwise(tiny, batch, name, positions):
    info = info_for(name)
    config = FusionConfig(method=name, arguments=ARGUMENTS.get(name, {}), layer=2, positions=POSITIONS[positions])
    with torch.no_grad():
        plain = tiny(**batch).last_hidden_state
        with layerfuse.fuse(tiny, info, config) as first:
            randomise(first.method)
            expected = tiny(**batch).last_hidden_state
            saved = json.loads(json.dumps(first.config.to_dict()))
            state = first.method.state_dict()
        mask = POSITIONS[positions] if positions == "mask" else None
        rebuilt = FusionConfig.from_dict(saved, mask=mask)
        assert rebuilt == first.config
        with layerfuse.fuse(tiny, info, rebuilt.replace(approach="layer")) as second:
            second.method.load_state_dict(state)
            assert torch.equal(tiny(**batch).last_hidden_state, expected)
    assert not torch.equal(expected, plain)


def test_names_are_canonical_and_fixed_arguments_complete():
    config = FusionConfig(method="add", layer=1)
    assert config.method == "addition" and config.arguments == {"alpha": 1.0}
    assert config == FusionConfig(method="addition", arguments={"alpha": 1}, layer=1)
    assert hash(config) == hash(FusionConfig(method="addition", layer=1))
    assert FusionConfig(method="gate", layer=1).arguments == {"beta": 1.0}
    assert FusionConfig(layer=1, positions=[0, 2]).positions == (0, 2)


def test_a_fusion_gives_back_its_config(tiny):
    config = FusionConfig(
        method="clamp", arguments={"value": 2.0}, layer=-1, site="mlp", approach="layer", positions="last"
    )
    with layerfuse.fuse(tiny, torch.ones(H), config) as fusion:
        assert fusion.config == config.replace(layer=3)
    with layerfuse.fuse(tiny, torch.ones(H), site="encoder.layer.0.output") as fusion:
        assert fusion.config.to_dict()["site"] == "encoder.layer.0.output" and fusion.config.layer is None


BAD = {
    "unknown method": (dict(method="telepathy", layer=1), layerfuse.UnknownNameError, "unknown method 'telepathy'"),
    "method not a name": (dict(method=3, layer=1), layerfuse.ArgumentTypeError, "method must be a registered name"),
    "unknown argument": (
        dict(method="scale", arguments={"beta": 1}, layer=1),
        layerfuse.ArgumentValueError,
        r"unknown argument\(s\) \['beta'\]",
    ),
    "missing argument": (
        dict(method="scale", layer=1),
        layerfuse.ArgumentValueError,
        r"missing argument\(s\) \['alpha'\]",
    ),
    "bad argument value": (
        dict(method="scale", arguments={"alpha": float("nan")}, layer=1),
        layerfuse.ArgumentValueError,
        "alpha must be finite",
    ),
    "arguments not a mapping": (
        dict(arguments=[1], layer=1),
        layerfuse.ArgumentTypeError,
        "arguments must be a mapping",
    ),
    "bad learned size": (
        dict(method="film", arguments={"hidden_size": 0}, layer=1),
        layerfuse.ArgumentValueError,
        "hidden_size must be a positive int",
    ),
    "no layer": (dict(), layerfuse.ArgumentValueError, "site 'output' needs a layer"),
    "layer not an int": (dict(layer="3"), layerfuse.ArgumentTypeError, "layer must be an int"),
    "module with a layer": (dict(layer=1, site="encoder.layer.0"), layerfuse.ArgumentValueError, "takes no layer"),
    "unknown approach": (
        dict(layer=1, approach="graft"),
        layerfuse.UnknownNameError,
        "unknown approach 'graft': use one of hook, layer",
    ),
    "unknown positions": (
        dict(layer=1, positions="middle"),
        layerfuse.ArgumentValueError,
        "unknown positions 'middle'",
    ),
    "mask not boolean": (dict(layer=1, positions=torch.ones(2, 3)), layerfuse.ArgumentTypeError, "boolean"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_configs_are_refused_when_made(case):
    fields, error, message = BAD[case]
    with pytest.raises(error, match=message):
        FusionConfig(**fields)


def test_bad_dicts_and_replacements_are_refused():
    with pytest.raises(layerfuse.ArgumentValueError, match=r"unknown config key\(s\) \['alhpa'\]"):
        FusionConfig.from_dict({"layer": 1, "alhpa": 2})
    with pytest.raises(layerfuse.ArgumentTypeError, match="a fusion config is a JSON object"):
        FusionConfig.from_dict([1])
    with pytest.raises(layerfuse.ArgumentValueError, match="pass the mask tensor"):
        FusionConfig.from_dict({"layer": 1, "positions": None})
    with pytest.raises(layerfuse.ArgumentValueError, match=r"unknown config field\(s\) \['depth'\]"):
        FusionConfig(layer=1).replace(depth=2)
    with pytest.raises(layerfuse.UnknownNameError, match="unknown approach 'graft'"):
        FusionConfig(layer=1).replace(approach="graft")


def test_fuse_takes_a_config_or_keywords_not_both(tiny):
    before = snapshot(tiny)
    with pytest.raises(layerfuse.ArgumentValueError, match="a config or its fields as keywords, not both.*layer"):
        layerfuse.fuse(tiny, torch.ones(H), FusionConfig(layer=1), layer=2)
    with pytest.raises(layerfuse.ArgumentValueError, match="not both.*alpha"):
        layerfuse.fuse(tiny, torch.ones(H), FusionConfig(layer=1), alpha=2.0)
    with pytest.raises(layerfuse.ArgumentTypeError, match="config must be a layerfuse.FusionConfig"):
        layerfuse.fuse(tiny, torch.ones(H), {"layer": 1})
    with pytest.raises(layerfuse.ArgumentTypeError, match=r"fuse_many takes \(FusionConfig, info\) pairs"):
        layerfuse.fuse_many(tiny, [dict(layer=1)])
    assert_unchanged(tiny, before)


def test_a_config_of_a_learned_method_must_fit_the_model_and_info(tiny):
    config = FusionConfig(method="film", arguments={"hidden_size": H, "info_size": 5}, layer=1)
    before = snapshot(tiny)
    with pytest.raises(
        layerfuse.ArgumentValueError, match="configured for info_size=5, but the info's last dimension is 6"
    ):
        layerfuse.fuse(tiny, torch.ones(6), config)
    with pytest.raises(
        layerfuse.ArgumentValueError, match="configured for hidden_size=64, but the model's hidden size is 32"
    ):
        layerfuse.fuse(tiny, torch.ones(5), config.replace(arguments={"hidden_size": 64, "info_size": 5}))
    assert_unchanged(tiny, before)
