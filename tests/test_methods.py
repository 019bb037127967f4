"""The method registry and the formulas of the core methods."""

from __future__ import annotations

import pytest
import torch

import layerfuse
from conftest import assert_unchanged, snapshot
from layerfuse.methods import METHODS, make_method, method_names, register_method

HIDDEN = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
INFO = torch.randn(4, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("addition", layerfuse.Addition),
        ("add", layerfuse.Addition),
        ("multiplication", layerfuse.Multiplication),
        ("multiply", layerfuse.Multiplication),
    ],
)
def test_names_and_aliases_make_their_method(name, cls):
    assert type(make_method(name)) is cls


def test_formulas():
    assert torch.equal(layerfuse.Addition()(HIDDEN, INFO), HIDDEN + INFO)
    torch.testing.assert_close(layerfuse.Addition(alpha=-0.5)(HIDDEN, INFO), HIDDEN - 0.5 * INFO)
    assert torch.equal(layerfuse.Multiplication()(HIDDEN, INFO), HIDDEN * INFO)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_scale_and_clamp_round_as_with_a_python_number(dtype):
    hidden, direction = HIDDEN.to(dtype), (INFO / INFO.norm()).to(dtype)
    scaled = layerfuse.Scale(alpha=0.3)(hidden, None)
    assert scaled.dtype == dtype and torch.equal(scaled, hidden * 0.3)
    clamped = layerfuse.Clamp(value=0.7)(hidden, direction)
    assert clamped.dtype == dtype
    assert torch.equal(clamped, torch.addcmul(hidden, 0.7 - (hidden @ direction).unsqueeze(-1), direction))


def test_a_method_instance_is_used_as_it_is():
    method = layerfuse.Addition(alpha=2.0)
    assert make_method(method) is method


def test_unknown_names_list_the_registered_ones():
    with pytest.raises(layerfuse.UnknownNameError, match=r"unknown method 'nope': use one of .*addition \(add\)"):
        make_method("nope")


def test_a_user_method_plugs_into_both_approaches(tiny, batch):
    @register_method("subtract_test")
    class Subtract(layerfuse.Method):
        formula = "h - v"

        def forward(self, hidden, info):
            return hidden - info

    try:
        assert "subtract_test" in method_names()
        with torch.no_grad():
            plain = tiny(**batch, output_hidden_states=True).hidden_states[2]
            for approach in ("hook", "layer"):
                with layerfuse.fuse(tiny, torch.ones(32), layer=2, method="subtract_test", approach=approach):
                    assert torch.equal(tiny(**batch, output_hidden_states=True).hidden_states[2], plain - 1)
    finally:
        del METHODS["subtract_test"]


@pytest.mark.parametrize("approach", ["hook", "layer"])
@pytest.mark.parametrize(
    ("name", "info_shape"), [("film", (3, 5)), ("gate", (5,)), ("concat", (3, 7, 5)), ("cross_attention", (3, 4, 5))]
)
def test_learned_methods_start_as_the_identity(tiny, batch, name, info_shape, approach):
    info = torch.randn(info_shape)
    with torch.no_grad():
        plain = tiny(**batch, output_hidden_states=True).hidden_states
        with layerfuse.fuse(tiny, info, layer=2, method=name, approach=approach) as fusion:
            fused = tiny(**batch, output_hidden_states=True).hidden_states
    assert fusion.method.learned and sum(p.numel() for p in fusion.method.parameters()) > 0
    assert all(torch.equal(p, f) for p, f in zip(plain, fused))


def test_learned_methods_are_built_for_the_model_and_the_info(tiny):
    with layerfuse.fuse(tiny, torch.randn(2, 5), layer=1, method="film") as fusion:
        assert fusion.method.gamma.weight.shape == (32, 5)
    with layerfuse.fuse(tiny, torch.randn(4, 6), layer=1, method="cross_attention", heads=4) as fusion:
        assert fusion.method.key.weight.shape == (32, 6) and fusion.method.heads == 4


BAD_METHODS = {
    "alpha not finite": (
        dict(method="addition", alpha=float("nan")),
        layerfuse.ArgumentValueError,
        "alpha must be finite",
    ),
    "alpha not a number": (dict(method="scale", alpha="2"), layerfuse.ArgumentTypeError, "alpha must be a real number"),
    "unknown argument": (
        dict(method="multiply", alpha=2.0),
        layerfuse.ArgumentValueError,
        r"unknown argument\(s\) \['alpha'\]; it takes: no arguments",
    ),
    "missing argument": (
        dict(method="scale", info=None),
        layerfuse.ArgumentValueError,
        r"missing argument\(s\) \['alpha'\]; it takes: alpha",
    ),
    "info for a method without": (
        dict(method="scale", alpha=2.0),
        layerfuse.InfoShapeError,
        "takes no info: pass info=None",
    ),
    "zero direction": (dict(method="ablate", info=torch.zeros(32)), layerfuse.InfoValueError, "zero length"),
    "dependent basis": (dict(method="project", info=torch.ones(2, 32)), layerfuse.InfoValueError, "linearly dependent"),
    "basis too large": (dict(method="project", info=torch.randn(33, 32)), layerfuse.InfoValueError, "at most 32 rows"),
    "basis as a vector": (
        dict(method="project", info=torch.randn(32)),
        layerfuse.InfoShapeError,
        r"\(K, D\) or \(B, K, D\)",
    ),
    "eraser of even rows": (
        dict(method="erase", info=torch.randn(2, 32)),
        layerfuse.InfoShapeError,
        r"an eraser's info has 1 \+ 2r rows .* got 2",
    ),
    "eraser as a vector": (dict(method="erase", info=torch.randn(32)), layerfuse.InfoShapeError, r"\(1 \+ 2r, D\)"),
    "learned without info": (dict(method="film", info=None), layerfuse.ArgumentValueError, "learned.*pass info"),
    "heads not dividing": (
        dict(method="cross_attention", info=torch.randn(2, 4, 5), heads=3),
        layerfuse.ArgumentValueError,
        "heads must divide",
    ),
    "gate beta": (
        dict(method="gate", info=torch.randn(5), beta=0.0),
        layerfuse.ArgumentValueError,
        "beta must be positive",
    ),
    "instance and arguments": (
        dict(method=layerfuse.Addition(), alpha=2.0),
        layerfuse.ArgumentValueError,
        "already configured",
    ),
    "learned for another size": (
        dict(method=layerfuse.Film(hidden_size=16, info_size=5), info=torch.randn(5)),
        layerfuse.ArgumentValueError,
        "built for hidden size 16",
    ),
    "unknown positions": (
        dict(positions="middle"),
        layerfuse.ArgumentValueError,
        "unknown positions 'middle': use one of all, tokens, first, last",
    ),
    "empty positions": (dict(positions=[]), layerfuse.ArgumentTypeError, "non-empty list"),
    "float mask": (dict(positions=torch.ones(3, 7)), layerfuse.ArgumentTypeError, "boolean \\(B, T\\) mask"),
}


@pytest.mark.parametrize("approach", ["hook", "layer"])
@pytest.mark.parametrize("case", BAD_METHODS)
def test_bad_method_arguments_get_clear_errors_and_touch_nothing(tiny, case, approach):
    overrides, error, message = BAD_METHODS[case]
    options = dict(info=torch.ones(32), layer=1, approach=approach) | overrides
    before = snapshot(tiny)
    with pytest.raises(error, match=message):
        layerfuse.fuse(tiny, **options)
    assert_unchanged(tiny, before)


@pytest.mark.parametrize("approach", ["hook", "layer"])
def test_positions_out_of_range_fail_in_the_forward_and_leave_nothing(tiny, batch, approach):
    before = snapshot(tiny)
    with pytest.raises(layerfuse.InfoShapeError, match=r"positions \[9\] are out of range for a forward of 7 tokens"):
        with layerfuse.fuse(tiny, torch.ones(32), layer=1, positions=[0, 9], approach=approach):
            tiny(**batch)
    assert_unchanged(tiny, before)


@pytest.mark.parametrize("approach", ["hook", "layer"])
def test_token_positions_leave_padding_alone_and_the_watch_goes_with_the_fusion(tiny, batch, approach):
    before = snapshot(tiny)
    ids = batch["input_ids"]
    with torch.no_grad():
        plain = tiny(**batch, output_hidden_states=True).hidden_states[1]
        plain_without_mask = tiny(input_ids=ids, output_hidden_states=True).hidden_states[1]
        with layerfuse.fuse(tiny, torch.ones(32), layer=1, positions="tokens", approach=approach):
            fused = tiny(**batch, output_hidden_states=True).hidden_states[1]
            fused_without_mask = tiny(input_ids=ids, output_hidden_states=True).hidden_states[1]
            positional = tiny(ids, batch["attention_mask"], batch["token_type_ids"], output_hidden_states=True)
    assert torch.equal(positional.hidden_states[1], fused)
    real = batch["attention_mask"].bool()
    assert torch.equal(fused[~real], plain[~real]) and torch.equal(fused[real], plain[real] + 1)
    assert torch.equal(fused_without_mask, plain_without_mask + 1)  # no mask given: every token is real
    assert_unchanged(tiny, before)


def test_names_cannot_be_registered_twice():
    with pytest.raises(ValueError, match="'add' is already registered"):
        register_method("add")(layerfuse.Addition)


@pytest.mark.parametrize("approach", ["hook", "layer"])
def test_a_learned_fusion_follows_the_model_to_another_dtype(tiny, batch, approach):
    with layerfuse.fuse(tiny, torch.randn(3, 5), layer=2, method="film", approach=approach) as fusion:
        tiny.to(torch.bfloat16)
        out = tiny(**batch).last_hidden_state
    assert out.dtype == torch.bfloat16 and fusion.method.gamma.weight.dtype == torch.bfloat16


def test_registering_something_that_is_no_method_leaves_the_registry_as_it_was():
    before = dict(METHODS)
    with pytest.raises(layerfuse.ArgumentTypeError, match="decorates a layerfuse.Method subclass"):
        register_method("oops")(int)
    with pytest.raises(layerfuse.ArgumentValueError, match="info_layout is 'vectors': use one of"):

        @register_method("typo_test")
        class Typo(layerfuse.Method):
            info_layout = "vectors"

    with pytest.raises(layerfuse.ArgumentValueError, match="'addition' is already registered"):
        register_method("addition")(type("Again", (layerfuse.Method,), {}))
    assert METHODS == before and "oops" not in method_names()
