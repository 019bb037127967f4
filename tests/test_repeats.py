"""A `fuse` call repeated on the same model reuses what the first one built, and never where something it was
built from has changed: each result is checked against the independent BERT forward of `reference`."""

import gc
import weakref

import numpy
import pytest
import torch
from transformers.models.bert.modeling_bert import BertLayer

import layerfuse
from conftest import padded_batch, tiny_bert
from layerfuse import repeats
from layerfuse.methods import make_method
from reference import bert_forward

H = 32


def hidden(model, batch, layer):
    with torch.no_grad():
        return model(**batch, output_hidden_states=True).hidden_states[layer]


def expected(model, batch, layer, info, alpha=1.0):
    with torch.no_grad():
        return bert_forward(model, batch, layer=layer, info=info, combine=lambda h, v: h + alpha * v)[layer]


def fused(model, batch, info, **keywords):
    with layerfuse.fuse(model, info, **keywords) as fusion:
        return fusion, hidden(model, batch, keywords.get("layer", 1))


def assert_close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_repeated_call_reuses_what_the_first_built_and_fuses_as_the_reference():
    model, batch, v = tiny_bert(), padded_batch(), torch.randn(H)
    first, _ = fused(model, batch, v, layer=2, alpha=0.5)
    again, out = fused(model, batch, v, layer=2, alpha=0.5)
    assert again is not first and again.method is first.method and again.info is first.info
    assert_close(out, expected(model, batch, 2, v, alpha=0.5))
    assert not again.active and not first.active


def test_info_changed_in_place_is_fused_with_its_new_values_also_through_numpy():
    model, batch, v = tiny_bert(), padded_batch(), torch.randn(H)
    fused(model, batch, v, layer=1)
    v.add_(1.0)
    assert_close(fused(model, batch, v, layer=1)[1], expected(model, batch, 1, v))
    version = v._version
    numpy.asarray(v.numpy())[0] = 50.0  # no version counter sees a write through numpy
    assert v._version == version
    assert_close(fused(model, batch, v, layer=1)[1], expected(model, batch, 1, v))


def test_another_info_tensor_with_equal_values_is_checked_again():
    model, batch = tiny_bert(), padded_batch()
    fused(model, batch, torch.ones(H), layer=1)
    with pytest.raises(layerfuse.InfoValueError):
        layerfuse.fuse(model, torch.full((H,), float("nan")), layer=1)
    with pytest.raises(layerfuse.InfoShapeError):
        layerfuse.fuse(model, torch.ones(H + 1), layer=1)


def test_a_replaced_block_is_found_again():
    model, batch, v = tiny_bert(), padded_batch(), torch.randn(H)
    first, _ = fused(model, batch, v, layer=2)
    torch.manual_seed(5)
    model.encoder.layer[1] = BertLayer(model.config).eval()
    with layerfuse.fuse(model, v, layer=2) as again, torch.no_grad():
        out = model(**batch).last_hidden_state  # the model's hidden_states capture does not know the new block
    assert again.site.module is model.encoder.layer[1] is not first.site.module
    with torch.no_grad():
        want = bert_forward(model, batch, layer=2, info=v, combine=lambda h, v: h + v)[-1]
    assert_close(out, want)


def test_a_model_cast_after_a_call_gets_its_info_in_the_new_dtype():
    model, batch, v = tiny_bert(), padded_batch(), torch.randn(H)
    fused(model, batch, v, layer=1)
    model.double()
    again, out = fused(model, batch, v, layer=1)
    assert again.info.tensor.dtype == out.dtype == torch.float64
    assert_close(out, expected(model, batch, 1, v.double()))
    large = torch.full((H,), 1e5)
    layerfuse.fuse(model, large, layer=1).remove()
    layerfuse.fuse(model, v, layer=1, alpha=1e5).remove()
    model.half()  # neither the info nor alpha fits in float16
    with pytest.raises(layerfuse.ArgumentValueError):
        layerfuse.fuse(model, v, layer=1, alpha=1e5)
    with pytest.raises(layerfuse.InfoValueError):
        layerfuse.fuse(model, large, layer=1)


def test_arguments_of_another_type_are_checked_again():
    model, batch, v = tiny_bert(), padded_batch(), torch.randn(H)
    fused(model, batch, v, layer=1, alpha=1)
    with pytest.raises(layerfuse.ArgumentTypeError):
        layerfuse.fuse(model, v, layer=1, alpha=True)
    fused(model, batch, v, layer=1)
    with pytest.raises(layerfuse.ArgumentTypeError):
        layerfuse.fuse(model, v, layer=True)
    fused(model, batch, v, layer=1, positions=[0, 1])
    with pytest.raises(layerfuse.ArgumentTypeError):
        layerfuse.fuse(model, v, layer=1, positions=[True, 1])


def test_a_method_or_config_changed_by_the_caller_is_not_reused():
    model, batch, v = tiny_bert(), padded_batch(), torch.randn(H)
    first, _ = fused(model, batch, v, layer=1, alpha=0.5)
    first.method.alpha = 3.0
    again, out = fused(model, batch, v, layer=1, alpha=0.5)
    assert again.method.alpha == 0.5
    assert_close(out, expected(model, batch, 1, v, alpha=0.5))
    config = layerfuse.FusionConfig(layer=1, arguments={"alpha": 0.5})
    with layerfuse.fuse(model, v, config):
        pass
    config.arguments["alpha"] = 2.0
    with layerfuse.fuse(model, v, config) as fusion:
        out = hidden(model, batch, 1)
    assert fusion.method.alpha == 2.0
    assert_close(out, expected(model, batch, 1, v, alpha=2.0))


def test_learned_methods_method_instances_and_masks_are_built_every_call():
    model, v = tiny_bert(), torch.randn(H)
    with layerfuse.fuse(model, v, layer=1, method="gate") as first:
        pass
    with layerfuse.fuse(model, v, layer=1, method="gate") as again:
        pass
    assert again.method is not first.method
    method = make_method("add", {"alpha": 2.0})
    with layerfuse.fuse(model, v, layer=1, method=method) as fusion:
        assert fusion.method is method
    mask = torch.ones(3, 7, dtype=torch.bool)
    with layerfuse.fuse(model, v, layer=1, positions=mask) as first:
        pass
    with layerfuse.fuse(model, v, layer=1, positions=mask) as again:
        assert again.positions is not first.positions


def test_two_fusions_of_one_call_attached_together_both_apply():
    model, batch, v = tiny_bert(), padded_batch(), torch.randn(H)
    with layerfuse.fuse(model, v, layer=1), layerfuse.fuse(model, v, layer=1):
        out = hidden(model, batch, 1)
    assert_close(out, expected(model, batch, 1, v, alpha=2.0))


def test_what_is_kept_holds_neither_the_model_nor_the_info_and_goes_with_the_model():
    model, v = tiny_bert(), torch.randn(H)
    layerfuse.fuse(model, v, layer=1).remove()
    layerfuse.fuse(model, v, layer=1, positions="tokens", approach="layer").remove()
    model_ref, info_ref, address = weakref.ref(model), weakref.ref(v), id(model)
    assert address in repeats._KEPT
    del model, v
    gc.collect()
    assert model_ref() is None and info_ref() is None
    assert address not in repeats._KEPT


def test_what_a_call_built_in_inference_mode_is_not_reused_where_autograd_records():
    model, batch, v = tiny_bert(), padded_batch(), torch.rand(H) + 0.5
    with torch.inference_mode(), layerfuse.fuse(model, v, layer=1, method="multiply"):
        model(**batch)
    model.train()
    with layerfuse.fuse(model, v, layer=1, method="multiply") as fusion:
        model(**batch).last_hidden_state.sum().backward()
    assert not fusion.info.tensor.is_inference()
    assert model.embeddings.word_embeddings.weight.grad is not None
