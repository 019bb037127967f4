"""Shared fixtures: tiny random BERTs (no download), the embedded MiniLM (loaded once), padded batches."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel

import layerfuse

TINY = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
)


POSITIONS = {
    "all": "all",
    "tokens": "tokens",
    "first": "first",
    "last": "last",
    "indices": [0, -2],
    "mask": torch.tensor([[True, False] * 3 + [True], [False] * 7, [True] * 7]),
}
"""Every kind of positions, for the padded batch below (3 examples of 7 tokens)."""


def tiny_bert(attn_implementation: str = "sdpa", seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    return BertModel(BertConfig(**TINY, attn_implementation=attn_implementation)).eval()


def padded_batch(lengths=(7, 4, 2), vocab_size: int = 99, seed: int = 1) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask and token_type_ids for sequences of `lengths`, right-padded with 0."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(1, vocab_size, (len(lengths), width), generator=generator)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def snapshot(model: nn.Module) -> dict:
    """Everything that fusing may touch: classes, instance attributes, hooks and weights."""
    return {
        "modules": [
            (
                name,
                type(module),
                sorted(module.__dict__),
                list(module._forward_hooks.items()),
                list(module._forward_pre_hooks.items()),
                dict(module._forward_hooks_with_kwargs),
                dict(module._forward_pre_hooks_with_kwargs),
            )
            for name, module in model.named_modules()
        ],
        "state": {key: value.clone() for key, value in model.state_dict().items()},
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key


@pytest.fixture
def tiny() -> BertModel:
    """A tiny BERT whose `hidden_states` capture hooks are installed (transformers adds them lazily)."""
    model = tiny_bert()
    with torch.no_grad():
        model(**padded_batch(), output_hidden_states=True)
    return model


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    return padded_batch()


@pytest.fixture(scope="session")
def minilm():
    return layerfuse.load_model()
