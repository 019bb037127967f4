"""Resolving layer indices to the modules whose outputs hidden_states reports."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

import layerfuse
from conftest import TINY
from layerfuse.sites import find_blocks, resolve_layer


def test_layer_zero_is_the_embeddings_and_k_the_kth_block(tiny):
    assert resolve_layer(tiny, 0).module is tiny.embeddings
    for k in range(1, 4):
        site = resolve_layer(tiny, k)
        assert site.module is tiny.encoder.layer[k - 1] and site.name == f"encoder.layer.{k - 1}"
    assert resolve_layer(tiny, -1).layer == 3 and resolve_layer(tiny, -4).layer == 0


def test_models_with_heads_are_resolved_through_their_base_model(batch):
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**TINY)).eval()
    assert find_blocks(model)[0] == "bert.encoder.layer"
    assert resolve_layer(model, 0).name == "bert.embeddings"
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
        self.encoder = nn.ModuleList(nn.Linear(32, 32) for _ in range(3))
        self.decoder = nn.ModuleList(nn.Linear(32, 32) for _ in range(3))


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (nn.Linear(4, 4), "cannot locate the blocks of Linear: expected a Hugging Face transformers model"),
        (NoBlocks(), "num_hidden_layers=3 blocks, found none"),
        (TwoStacks(), "found encoder, decoder"),
    ],
)
def test_architectures_without_findable_blocks_get_a_clear_error(model, message):
    with pytest.raises(layerfuse.ArchitectureError, match=message):
        layerfuse.fuse(model, torch.ones(32), layer=1)


def test_a_model_without_embeddings_module_cannot_fuse_layer_zero():
    model = TwoStacks()
    del model.decoder
    assert resolve_layer(model, 1).name == "encoder.0"
    with pytest.raises(layerfuse.ArchitectureError, match="embeddings module .* fuse at layer 1 or later"):
        resolve_layer(model, 0)
