"""Resolving layers and sites to the modules whose inputs or outputs a fusion edits."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

import layerfuse
from conftest import TINY, assert_unchanged, snapshot
from layerfuse import FusionConfig
from layerfuse.sites import find_blocks, resolve_site


def test_layer_zero_is_the_first_blocks_input_and_k_the_kth_blocks_output(tiny):
    zero = resolve_site(tiny, layer=0)
    assert zero.module is tiny.embeddings and zero.point == "output"
    embeddings = resolve_site(tiny, site="embeddings")
    assert (embeddings.layer, embeddings.module, embeddings.point) == (0, tiny.embeddings, "output")
    for k in range(1, 4):
        site = resolve_site(tiny, layer=k)
        assert site.module is tiny.encoder.layer[k - 1] and site.name == f"encoder.layer.{k - 1}"
        assert site.point == "output" and site.call is None
    assert resolve_site(tiny, layer=-1).layer == 3 and resolve_site(tiny, layer=-4).layer == 0


def test_sites_within_a_block(tiny):
    block = tiny.encoder.layer[1]
    assert resolve_site(tiny, layer=2, site="input").module is block
    assert resolve_site(tiny, layer=2, site="input").point == "input"
    assert resolve_site(tiny, layer=2, site="attention").module is block.attention.output.dense
    assert resolve_site(tiny, layer=2, site="mlp").module is block.output.dense
    named = resolve_site(tiny, site="encoder.layer.1.intermediate")
    assert named.module is block.intermediate and named.layer is None and named.kind == "module"


def test_models_with_heads_are_resolved_through_their_base_model(batch):
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**TINY)).eval()
    assert [block.name for block in find_blocks(model)] == [f"bert.encoder.layer.{i}" for i in range(3)]
    assert resolve_site(model, layer=3, site="mlp").name == "bert.encoder.layer.2.output.dense"
    with torch.no_grad():
        plain = model(**batch).logits
        with layerfuse.fuse(model, torch.ones(TINY["hidden_size"]), layer=2, approach="layer"):
            fused = model(**batch).logits
    assert not torch.equal(plain, fused)


class NoBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = BertConfig(**TINY)
        self.linear = nn.Linear(32, 32)


class TwoStacks(NoBlocks):
    def __init__(self) -> None:
        super().__init__()
        self.config.model_type = "two-stacks"
        self.encoder = nn.ModuleList(nn.Linear(32, 32) for _ in range(3))
        self.decoder = nn.ModuleList(nn.Linear(32, 32) for _ in range(3))


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (nn.Linear(4, 4), "cannot locate the blocks of Linear: expected a Hugging Face transformers model"),
        (NoBlocks(), "num_hidden_layers=3 blocks, found none; name the module to fuse instead"),
        (TwoStacks(), "found encoder, decoder"),
    ],
)
def test_architectures_without_findable_blocks_get_a_clear_error(model, message):
    with pytest.raises(layerfuse.ArchitectureError, match=message):
        layerfuse.fuse(model, torch.ones(32), layer=1)


def test_a_named_module_works_where_blocks_cannot_be_found():
    model = TwoStacks()
    with layerfuse.fuse(model, torch.ones(32), site="decoder.1") as fusion:
        with torch.no_grad():
            torch.testing.assert_close(model.decoder[1](torch.zeros(1, 32)), model.decoder[1].bias[None] + 1)
    assert fusion.layer is None


BAD_SITES = {
    "unknown site": (
        dict(layer=1, site="ffn"),
        layerfuse.ArgumentValueError,
        "unknown site 'ffn': use one of output, input, attention, mlp, embeddings",
    ),
    "module and layer": (
        dict(layer=1, site="encoder.layer.0"),
        layerfuse.ArgumentValueError,
        "if 'encoder.layer.0' is a module name, it takes no layer",
    ),
    "no layer": (dict(site="mlp"), layerfuse.ArgumentValueError, "site 'mlp' needs a layer"),
    "embeddings at 2": (dict(layer=2, site="embeddings"), layerfuse.ArgumentValueError, "site 'embeddings' is layer 0"),
    "input of layer 0": (
        dict(layer=0, site="input"),
        layerfuse.ArgumentValueError,
        "layer 0 is the embeddings' output, it has no 'input'",
    ),
    "site not a string": (dict(layer=1, site=3), layerfuse.ArgumentTypeError, "site must be a string"),
}


@pytest.mark.parametrize("case", BAD_SITES)
def test_bad_sites_get_clear_errors_and_touch_nothing(tiny, case):
    options, error, message = BAD_SITES[case]
    before = snapshot(tiny)
    with pytest.raises(error, match=message):
        layerfuse.fuse(tiny, torch.ones(32), **options)
    assert_unchanged(tiny, before)


def test_positions_that_need_the_attention_mask_refuse_a_model_without_one():
    model = TwoStacks()
    before = snapshot(model)
    with pytest.raises(
        layerfuse.ArchitectureError, match="forward takes no attention_mask: give token indices or a boolean mask"
    ):
        layerfuse.fuse_many(
            model,
            [
                (FusionConfig(site="decoder.0"), torch.ones(32)),
                (FusionConfig(site="decoder.1", positions="tokens"), torch.ones(32)),
            ],
        )
    assert_unchanged(model, before)
