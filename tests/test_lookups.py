"""A fusion made per call: `fuse` on a model it has fused before reads only what its site was found by, and
sees every change of the model's structure, weights or info since."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification
from transformers.models.bert.modeling_bert import BertLayer

import layerfuse
from conftest import TINY, padded_batch, tiny_bert
from layerfuse.lookups import remembered, submodule
from layerfuse.sites import resolve_site

H = TINY["hidden_size"]
APPROACHES = ("hook", "layer")


def hidden(model: nn.Module, batch: dict[str, torch.Tensor], k: int) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch, output_hidden_states=True).hidden_states[k]


WALKS = ("named_modules", "modules", "named_parameters", "parameters", "named_buffers", "buffers", "children")


def walks_forbidden(monkeypatch: pytest.MonkeyPatch, model: nn.Module) -> None:
    """Make every walk of the modules, parameters or buffers of `model` or of a module in it fail."""
    inside = {id(module) for module in model.modules()}

    def forbidding(name: str):
        walk = getattr(nn.Module, name)

        def forbidden(self: nn.Module, *args: object, **kwargs: object) -> object:
            if id(self) in inside:
                raise AssertionError(f"{name}() of {type(self).__name__}, a walk of the model")
            return walk(self, *args, **kwargs)

        return forbidden

    for name in WALKS:
        monkeypatch.setattr(nn.Module, name, forbidding(name))


@pytest.mark.parametrize("approach", APPROACHES)
@pytest.mark.parametrize("positions", ["all", "tokens"])
def test_fusing_again_walks_none_of_the_model_and_fuses_as_the_first_time(monkeypatch, approach, positions):
    model, batch = tiny_bert(), padded_batch()
    info = torch.randn(H, generator=torch.Generator().manual_seed(0))
    plain = hidden(model, batch, 2)
    real = batch["attention_mask"].bool()[..., None] if positions == "tokens" else torch.tensor(True)
    expected = torch.where(real, plain + info, plain)
    layerfuse.fuse(model, info, layer=2, approach=approach, positions=positions).remove()
    with monkeypatch.context() as patched:
        walks_forbidden(patched, model)
        fusion = layerfuse.fuse(model, info, layer=2, approach=approach, positions=positions)
        fused = hidden(model, batch, 2)
        fusion.remove()
    assert torch.equal(fused, expected)
    assert torch.equal(hidden(model, batch, 2), plain)


@pytest.mark.parametrize("approach", APPROACHES)
def test_a_block_replaced_between_fusions_is_the_one_fused_next(approach):
    model, batch = tiny_bert(), padded_batch()
    info = torch.ones(H)
    first = resolve_site(model, layer=2).module
    layerfuse.fuse(model, info, layer=2, approach=approach).remove()
    torch.manual_seed(5)
    model.encoder.layer[1] = BertLayer(model.config).eval()
    plain = hidden(model, batch, 2)
    with layerfuse.fuse(model, info, layer=2, approach=approach) as fusion:
        fused = hidden(model, batch, 2)
    assert fusion.site.module is model.encoder.layer[1] is not first
    assert torch.equal(fused, plain + info)


def test_a_list_of_blocks_grown_or_shrunk_is_seen():
    model = tiny_bert()
    assert resolve_site(model, layer=-1).module is model.encoder.layer[2]
    model.encoder.layer.append(BertLayer(model.config))
    with pytest.raises(layerfuse.ArchitectureError, match="num_hidden_layers=3 blocks"):
        resolve_site(model, layer=-1)
    model.config.num_hidden_layers = 4
    assert resolve_site(model, layer=-1).module is model.encoder.layer[3]
    del model.encoder.layer[3]
    model.config.num_hidden_layers = 3
    assert resolve_site(model, layer=-1).module is model.encoder.layer[2]


def test_a_base_model_replaced_is_the_one_fused_next():
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**TINY)).eval()
    assert resolve_site(model, layer=1).module is model.bert.encoder.layer[0]
    torch.manual_seed(1)
    model.bert = type(model.bert)(model.config)
    assert resolve_site(model, layer=1).module is model.bert.encoder.layer[0]
    assert resolve_site(model, layer=1, site="mlp").module is model.bert.encoder.layer[0].output.dense


def test_a_config_replaced_is_read_again():
    model = tiny_bert()
    assert resolve_site(model, layer=0).module is model.embeddings
    model.config = BertConfig(**{**TINY, "num_hidden_layers": 2})
    with pytest.raises(layerfuse.ArchitectureError, match="num_hidden_layers=2 blocks"):
        resolve_site(model, layer=0)


@pytest.mark.parametrize("where", ["instance", "class"])
def test_an_attribute_a_block_lacked_when_fused_is_seen_once_it_has_one(monkeypatch, where):
    model = tiny_bert()
    block = model.encoder.layer[1]
    layerfuse.fuse(model, torch.ones(H), layer=2).remove()
    wider = BertConfig(**{**TINY, "hidden_size": 2 * H})
    if where == "instance":
        object.__setattr__(block, "config", wider)
    else:
        monkeypatch.setattr(BertLayer, "config", wider, raising=False)
    with pytest.raises(layerfuse.InfoShapeError, match=str(2 * H)):
        layerfuse.fuse(model, torch.ones(H), layer=2)


@pytest.mark.parametrize("approach", APPROACHES)
def test_info_changed_in_place_between_fusions_is_the_info_fused(approach):
    model, batch = tiny_bert(), padded_batch()
    info = torch.ones(H)
    plain = hidden(model, batch, 1)
    layerfuse.fuse(model, info, layer=1, approach=approach).remove()
    info.numpy()[:] = 2.0  # a write the tensor's version counter does not see
    with layerfuse.fuse(model, info, layer=1, approach=approach):
        assert torch.equal(hidden(model, batch, 1), plain + 2.0)
    info.data.fill_(float("nan"))
    with pytest.raises(layerfuse.InfoValueError, match="NaN or infinite"):
        layerfuse.fuse(model, info, layer=1, approach=approach)


def test_weights_cast_or_emptied_between_fusions_are_seen():
    model, batch = tiny_bert(), padded_batch()
    layerfuse.fuse(model, torch.ones(H), layer=1).remove()
    model.double()
    with layerfuse.fuse(model, torch.ones(H), layer=1) as fusion:
        assert fusion.info.tensor.dtype == torch.float64
        assert hidden(model, batch, 1).dtype == torch.float64
    model.to("meta")
    with pytest.raises(layerfuse.ArgumentValueError, match="on the meta device with nothing to load them"):
        layerfuse.fuse(model, torch.ones(H), layer=1)


def test_what_is_remembered_does_not_keep_the_model_alive():
    model = tiny_bert()
    layerfuse.fuse(model, torch.ones(H), layer=1, positions="tokens").remove()
    layerfuse.fuse(model, torch.ones(H), layer=-1, site="mlp", approach="layer").remove()
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None


@pytest.mark.parametrize("approach", APPROACHES)
@pytest.mark.parametrize("positions", ["all", "tokens"])
@pytest.mark.parametrize("info", ["vector", "per example"])
def test_a_model_deleted_with_its_fusions_attached_is_freed(approach, positions, info):
    model = tiny_bert()
    vector = torch.ones(3, H) if info == "per example" else torch.ones(H)
    for _ in range(2):  # made, then reused
        fusion = layerfuse.fuse(model, vector, layer=2, approach=approach, positions=positions)
    layerfuse.fuse(model, torch.ones(H), layer=-1, site="mlp", approach=approach)  # attached and not kept by the caller
    with torch.no_grad():
        model(**padded_batch())
    gone = weakref.ref(model)
    del model, fusion
    gc.collect()
    assert gone() is None


def test_a_module_gone_and_replaced_by_none_is_not_taken_for_the_one_remembered():
    model = nn.Sequential(nn.Sequential(nn.Linear(2, 2)))
    assert remembered(model, "found", lambda: submodule(model, "0.0") is not None)
    model[0][0] = None  # the module is freed, and its place holds None
    gc.collect()
    assert not remembered(model, "found", lambda: submodule(model, "0.0") is not None)
