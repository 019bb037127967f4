"""The life of a fusion: what it changes while active, and that the model is exactly as before after."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import layerfuse
from conftest import TINY, assert_unchanged, snapshot, tiny_bert
from layerfuse import FusionConfig

APPROACHES = ["hook", "layer"]
H = TINY["hidden_size"]


def run(model, batch, **options):
    with torch.no_grad():
        return model(**batch, **options)


@pytest.mark.parametrize("approach", APPROACHES)
def test_remove_restores_the_model_exactly(tiny, batch, approach):
    before, plain = snapshot(tiny), run(tiny, batch).last_hidden_state
    fusion = layerfuse.fuse(tiny, torch.ones(H), layer=2, approach=approach)
    assert fusion.active
    assert not torch.equal(run(tiny, batch).last_hidden_state, plain)
    fusion.remove()
    fusion.remove()
    assert not fusion.active
    assert_unchanged(tiny, before)
    assert torch.equal(run(tiny, batch).last_hidden_state, plain)


@pytest.mark.parametrize("approach", APPROACHES)
def test_a_removed_fusion_attached_again_fuses_again_unless_its_module_was_replaced(tiny, batch, approach):
    with layerfuse.fuse(tiny, torch.ones(H), layer=2, approach=approach) as fusion:
        fused = run(tiny, batch).last_hidden_state
    with fusion.attach():
        assert torch.equal(run(tiny, batch).last_hidden_state, fused)
    tiny.encoder.layer[1] = copy.deepcopy(tiny.encoder.layer[1])
    before = snapshot(tiny)
    with pytest.raises(layerfuse.FusionStateError, match="no longer holds the module .* at encoder.layer.1"):
        fusion.attach()
    assert not fusion.active
    assert_unchanged(tiny, before)
    with layerfuse.fuse(tiny, torch.ones(H), layer=2, approach=approach):
        assert torch.equal(run(tiny, batch).last_hidden_state, fused)


@pytest.mark.parametrize("positions", ["all", "tokens"])
@pytest.mark.parametrize("approach", APPROACHES)
def test_a_block_replaced_while_the_fusion_is_attached_is_reported_once_it_is_removed(tiny, batch, approach, positions):
    old, replacement = tiny.encoder.layer[1], copy.deepcopy(tiny.encoder.layer[1])
    before, plain = snapshot(tiny), run(tiny, batch).last_hidden_state
    fusion = layerfuse.fuse(tiny, torch.ones(H), layer=2, approach=approach, positions=positions)
    tiny.encoder.layer[1] = replacement
    assert torch.equal(run(tiny, batch).last_hidden_state, plain)  # unfused, what the error reports
    with pytest.raises(layerfuse.FusionStateError, match="at encoder.layer.1 was replaced or removed while"):
        fusion.remove()
    assert not fusion.active
    fusion.remove()
    tiny.encoder.layer[1] = old
    assert_unchanged(tiny, before)
    with pytest.raises(layerfuse.FusionStateError, match="replaced or removed while"):
        with layerfuse.fuse(tiny, torch.ones(H), layer=2, approach=approach, positions=positions):
            del tiny.encoder.layer[1]
    tiny.encoder.layer.insert(1, old)
    assert_unchanged(tiny, before)


@pytest.mark.parametrize("approach", APPROACHES)
def test_a_block_set_again_to_itself_or_changed_within_is_not_reported(tiny, batch, approach):
    before, dropout = snapshot(tiny), tiny.encoder.layer[1].output.dropout
    with layerfuse.fuse(tiny, torch.ones(H), layer=2, approach=approach):
        tiny.encoder.layer[1] = tiny.encoder.layer[1]
        tiny.encoder.layer[1].output.dropout = torch.nn.Dropout(0.5)
    tiny.encoder.layer[1].output.dropout = dropout
    assert_unchanged(tiny, before)


def test_a_group_removes_every_fusion_before_reporting_a_replaced_block(tiny, batch):
    old, replacement = tiny.encoder.layer[0], copy.deepcopy(tiny.encoder.layer[0])
    before = snapshot(tiny)
    pairs = [(FusionConfig(layer=1), torch.ones(H)), (FusionConfig(layer=3, approach="layer"), torch.ones(H))]
    group = layerfuse.fuse_many(tiny, pairs)
    tiny.encoder.layer[0] = replacement
    with pytest.raises(layerfuse.FusionStateError, match="at encoder.layer.0 was replaced"):
        group.remove()
    assert not any(fusion.active for fusion in group)
    tiny.encoder.layer[0] = old
    assert_unchanged(tiny, before)


@pytest.mark.parametrize("approach", APPROACHES)
def test_exception_inside_with_leaves_nothing_behind(tiny, batch, approach):
    before = snapshot(tiny)
    with pytest.raises(layerfuse.InfoShapeError, match="batch of 5"):
        with layerfuse.fuse(tiny, torch.ones(5, H), layer=1, approach=approach):
            run(tiny, batch)
    assert_unchanged(tiny, before)
    with pytest.raises(KeyError):
        with layerfuse.fuse(tiny, torch.ones(H), layer=1, approach=approach):
            raise KeyError("user code failed")
    assert_unchanged(tiny, before)


@pytest.mark.parametrize("capture_hooks_first", [True, False])
@pytest.mark.parametrize("approach", APPROACHES)
def test_hidden_states_report_the_fused_value(batch, approach, capture_hooks_first):
    """Whether transformers installed its capture hooks before the fusion or during its first forward."""
    model = tiny_bert()
    if capture_hooks_first:
        run(model, batch, output_hidden_states=True)
    with layerfuse.fuse(model, torch.ones(H), layer=2, approach=approach):
        fused = run(model, batch, output_hidden_states=True)
    plain = run(model, batch, output_hidden_states=True).hidden_states
    assert torch.equal(fused.hidden_states[2], plain[2] + 1)
    assert torch.equal(fused.hidden_states[-1], fused.last_hidden_state)


@pytest.mark.parametrize("approach", APPROACHES)
def test_others_hooks_on_the_block_stay_and_see_the_fused_output(tiny, batch, approach):
    block = tiny.encoder.layer[0]
    seen = []
    theirs = block.register_forward_hook(
        lambda module, args, output: seen.append(output[0] if isinstance(output, tuple) else output)
    )
    theirs_pre = block.register_forward_pre_hook(lambda module, args: None)
    before = snapshot(tiny)
    with layerfuse.fuse(tiny, torch.ones(H), layer=1, approach=approach):
        fused = run(tiny, batch, output_hidden_states=True).hidden_states[1]
        assert theirs.id in block._forward_hooks and theirs_pre.id in block._forward_pre_hooks
    assert torch.equal(seen[-1], fused)
    assert_unchanged(tiny, before)
    theirs.remove()
    theirs_pre.remove()


def test_custom_layer_keeps_names_parameters_and_state_dict_keys(tiny, batch):
    block = tiny.encoder.layer[1]
    names = [name for name, _ in tiny.named_modules()]
    parameters = [id(p) for p in tiny.parameters()]
    keys = list(tiny.state_dict())
    with layerfuse.fuse(tiny, torch.ones(H), layer=2, approach="layer"):
        assert tiny.encoder.layer[1] is block
        assert type(block).__name__ == "FusedBertLayer" and isinstance(block, type(tiny.encoder.layer[0]))
        assert [name for name, _ in tiny.named_modules()] == names
        assert [id(p) for p in tiny.parameters()] == parameters
        assert list(tiny.state_dict()) == keys
    assert type(block) is type(tiny.encoder.layer[0])


@pytest.mark.parametrize("approach", APPROACHES)
def test_fusions_compose_in_the_order_they_were_made(tiny, batch, approach):
    plain = run(tiny, batch, output_hidden_states=True).hidden_states[2]
    first = layerfuse.fuse(tiny, torch.full((H,), 2.0), layer=2, method="add", approach=approach)
    second = layerfuse.fuse(tiny, torch.full((H,), 3.0), layer=2, method="multiply", approach=approach)
    assert torch.equal(run(tiny, batch, output_hidden_states=True).hidden_states[2], (plain + 2) * 3)
    first.remove()
    assert torch.equal(run(tiny, batch, output_hidden_states=True).hidden_states[2], plain * 3)
    second.remove()
    assert torch.equal(run(tiny, batch, output_hidden_states=True).hidden_states[2], plain)


def test_both_approaches_on_one_block_apply_layer_first_then_hook(tiny, batch):
    before = snapshot(tiny)
    plain = run(tiny, batch, output_hidden_states=True).hidden_states[1]
    with layerfuse.fuse(tiny, torch.full((H,), 2.0), layer=1, method="add", approach="hook"):
        with layerfuse.fuse(tiny, torch.full((H,), 3.0), layer=1, method="multiply", approach="layer"):
            fused = run(tiny, batch, output_hidden_states=True).hidden_states[1]
    assert torch.equal(fused, plain * 3 + 2)
    assert_unchanged(tiny, before)


def test_info_is_cast_to_the_hidden_dtype_and_copied(tiny, batch):
    info = torch.randn(H, dtype=torch.float64)
    plain = run(tiny, batch, output_hidden_states=True).hidden_states[1]
    with layerfuse.fuse(tiny, info, layer=1) as fusion:
        info.fill_(1e6)  # changing the caller's tensor afterwards does not change the fusion
        fused = run(tiny, batch, output_hidden_states=True).hidden_states[1]
    assert fusion.info.tensor.dtype == torch.float32
    assert torch.equal(fused, plain + fusion.info.source.to(torch.float32))


@pytest.mark.parametrize("approach", APPROACHES)
def test_a_model_cast_after_fusing_gets_info_in_its_new_dtype(tiny, batch, approach):
    with layerfuse.fuse(tiny, torch.randn(H), layer=3, approach=approach) as fusion:
        tiny.to(torch.bfloat16)
        out = run(tiny, batch).last_hidden_state
    assert out.dtype == torch.bfloat16 and fusion.info.tensor.dtype == torch.bfloat16


def test_gradients_flow_to_info_that_requires_them(tiny, batch):
    info = torch.zeros(H, requires_grad=True)
    with layerfuse.fuse(tiny, info, layer=1, approach="layer"):
        tiny(**batch).last_hidden_state.sum().backward()
    assert info.grad is not None and info.grad.abs().sum() > 0


def test_a_block_fused_by_custom_layer_refuses_pickling_with_a_way_out():
    tiny = tiny_bert()
    with layerfuse.fuse(tiny, torch.ones(H), layer=1, approach="layer"):
        with pytest.raises(layerfuse.FusionStateError, match="state_dict"):
            pickle.dumps(tiny)
        with pytest.raises(layerfuse.FusionStateError, match="remove the fusion"):
            copy.deepcopy(tiny)
    pickle.dumps(tiny)


def test_repr_says_where_how_and_whether_active(tiny):
    fusion = layerfuse.fuse(tiny, torch.ones(H), layer=-1, method="multiply", approach="layer")
    assert "layer=3, site='output' (encoder.layer.2)" in repr(fusion) and "active" in repr(fusion)
    fusion.remove()
    assert "removed" in repr(fusion)


BAD_CALLS = {
    "layer too high": (
        dict(layer=4),
        layerfuse.LayerIndexError,
        r"layer 4 is out of range for a 3-block model: use 0\.\.3 or -4\.\.-1",
    ),
    "layer too low": (dict(layer=-5), layerfuse.LayerIndexError, "use 0..3 or -4..-1"),
    "layer not an int": (dict(layer=1.0), layerfuse.ArgumentTypeError, "layer must be an int"),
    "unknown method": (
        dict(method="nope"),
        layerfuse.UnknownNameError,
        "unknown method 'nope': use one of .*addition \\(add\\)",
    ),
    "method not a name": (dict(method=3), layerfuse.ArgumentTypeError, "registered name"),
    "unknown approach": (dict(approach="wrap"), layerfuse.UnknownNameError, "use one of hook, layer"),
    "wrong hidden size": (dict(info=torch.ones(31)), layerfuse.InfoShapeError, r"D = 32, got \(31,\)"),
    "wrong rank": (dict(info=torch.ones(2, 3, 4, H)), layerfuse.InfoShapeError, r"\(D,\), \(B, D\) or \(B, T, D\)"),
    "scalar info": (dict(info=torch.tensor(1.0)), layerfuse.InfoShapeError, "got \\(\\)"),
    "integer info": (dict(info=torch.ones(H, dtype=torch.long)), layerfuse.InfoTypeError, "floating-point.*int64"),
    "not a tensor": (dict(info=[1.0] * H), layerfuse.InfoTypeError, "torch.Tensor"),
    "NaN in info": (dict(info=torch.full((H,), float("nan"))), layerfuse.InfoValueError, "32 NaN or infinite"),
    "inf in info": (
        dict(info=torch.ones(H).index_fill(0, torch.tensor([3]), float("inf"))),
        layerfuse.InfoValueError,
        "1 NaN",
    ),
    "overflows the model dtype": (
        dict(info=torch.full((H,), 1e300, dtype=torch.float64)),
        layerfuse.InfoValueError,
        "float32",
    ),
}


@pytest.mark.parametrize("approach", APPROACHES)
@pytest.mark.parametrize("case", BAD_CALLS)
def test_bad_input_gets_a_clear_error_and_touches_nothing(tiny, case, approach):
    overrides, error, message = BAD_CALLS[case]
    options = dict(info=torch.ones(H), layer=1, method="addition", approach=approach) | overrides
    before = snapshot(tiny)
    with pytest.raises(error, match=message):
        layerfuse.fuse(tiny, **options)
    assert_unchanged(tiny, before)


@pytest.mark.parametrize("approach", APPROACHES)
def test_per_token_info_must_match_the_sequence_length(tiny, batch, approach):
    before = snapshot(tiny)
    with pytest.raises(layerfuse.InfoShapeError, match="for 5 tokens but this forward has 7"):
        with layerfuse.fuse(tiny, torch.ones(3, 5, H), layer=2, approach=approach):
            run(tiny, batch)
    assert_unchanged(tiny, before)


def test_errors_are_layerfuse_errors_and_builtin_kinds():
    assert issubclass(layerfuse.LayerIndexError, IndexError)
    assert issubclass(layerfuse.InfoShapeError, ValueError)
    assert issubclass(layerfuse.InfoTypeError, TypeError)
    for name in layerfuse.__all__:
        value = getattr(layerfuse, name)
        if isinstance(value, type) and issubclass(value, Exception):
            assert issubclass(value, layerfuse.LayerfuseError)


@pytest.mark.parametrize("approach", APPROACHES)
def test_fuse_many_attaches_in_order_and_removes_all(tiny, batch, approach):
    before = snapshot(tiny)
    plain = run(tiny, batch, output_hidden_states=True).hidden_states
    pairs = [
        (FusionConfig(layer=2, approach=approach), torch.full((H,), 2.0)),
        (FusionConfig(layer=2, method="multiply", approach=approach), torch.full((H,), 3.0)),
        (FusionConfig(layer=3, method="scale", arguments={"alpha": 0.5}, approach=approach), None),
    ]
    with layerfuse.fuse_many(tiny, pairs) as group:
        assert len(group) == 3 and all(f.approach == approach for f in group)
        fused = run(tiny, batch, output_hidden_states=True).hidden_states
        assert torch.equal(fused[2], (plain[2] + 2) * 3)
        group[2].remove()
        partly = run(tiny, batch, output_hidden_states=True).hidden_states
        assert torch.equal(partly[2], fused[2]) and torch.equal(partly[3], fused[3] * 2)
    assert_unchanged(tiny, before)


def test_fuse_many_checks_every_fusion_before_attaching_any(tiny):
    before = snapshot(tiny)
    with pytest.raises(layerfuse.LayerIndexError, match="layer 9"):
        layerfuse.fuse_many(tiny, [(FusionConfig(layer=1), torch.ones(H)), (FusionConfig(layer=9), torch.ones(H))])
    assert_unchanged(tiny, before)


def test_nested_fusions_at_different_sites_leave_the_others_working(tiny, batch):
    plain = run(tiny, batch, output_hidden_states=True).hidden_states
    with layerfuse.fuse(tiny, torch.ones(H), layer=1, approach="layer") as first:
        with layerfuse.fuse(tiny, torch.ones(H), layer=2, site="input", approach="hook"):
            both = run(tiny, batch, output_hidden_states=True).hidden_states
        only_first = run(tiny, batch, output_hidden_states=True).hidden_states
        assert first.active
    assert torch.equal(both[1], plain[1] + 1) and torch.equal(only_first[1], plain[1] + 1)
    assert not torch.equal(both[2], only_first[2])


def test_custom_layer_runs_inside_a_forward_set_on_the_instance(tiny, batch):
    """Libraries such as accelerate replace a module's forward on the instance; the custom layer wraps it."""
    block = tiny.encoder.layer[1]
    calls = []
    original = block.forward

    def wrapped(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    block.forward = wrapped
    before = snapshot(tiny)
    plain = run(tiny, batch, output_hidden_states=True).hidden_states
    with layerfuse.fuse(tiny, torch.ones(H), layer=2, approach="layer"):
        fused = run(tiny, batch, output_hidden_states=True).hidden_states
    assert len(calls) == 2 and torch.equal(fused[2], plain[2] + 1)
    assert block.__dict__["forward"] is wrapped
    assert_unchanged(tiny, before)


@pytest.mark.parametrize("approach", APPROACHES)
def test_a_model_whose_forward_is_watched_refuses_copies_and_pickles(tiny, approach):
    with layerfuse.fuse(tiny, torch.ones(H), layer=1, positions="tokens", approach=approach):
        with pytest.raises(layerfuse.FusionStateError, match="remove the fusion first"):
            copy.deepcopy(tiny)
        with pytest.raises(layerfuse.FusionStateError, match="remove the fusion first"):
            pickle.dumps(tiny)
    assert copy.deepcopy(tiny) is not tiny
