"""Gradient checkpointing recomputes a block in backward, after the model's forward has ended: a learned
fusion's gradients must be the same as without it, whatever positions it reads, by either approach."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import BertConfig, BertModel

import layerfuse
from conftest import POSITIONS, TINY, padded_batch

TRANSFORMERS_4 = int(transformers.__version__.split(".")[0]) < 5


def gradients(positions, approach: str, checkpointing: dict | None) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = BertModel(BertConfig(**TINY, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).train()
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    info = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    with layerfuse.fuse(model, info, layer=2, method="film", positions=positions, approach=approach) as fusion:
        with torch.no_grad():
            for parameter in fusion.method.parameters():
                parameter.normal_(0, 0.3, generator=torch.Generator().manual_seed(2))
        model(**padded_batch()).last_hidden_state.pow(2).sum().backward()
        return [parameter.grad for parameter in fusion.method.parameters()]


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("approach", ["hook", "layer"])
@pytest.mark.parametrize("positions", POSITIONS)
def test_learned_fusion_gradients_are_the_same_with_checkpointing(positions, approach, reentrant):
    expected = gradients(POSITIONS[positions], approach, None)
    assert all(bool(grad.abs().sum() > 0) for grad in expected)
    reads_mask = positions in ("tokens", "first", "last")
    if TRANSFORMERS_4 and approach == "hook" and reads_mask:
        # transformers 4 checkpoints the block's hooks too, and there the hook cannot know the mask.
        with pytest.raises(layerfuse.FusionStateError, match="recomputed by gradient checkpointing"):
            gradients(POSITIONS[positions], approach, {"use_reentrant": reentrant})
        return
    got = gradients(POSITIONS[positions], approach, {"use_reentrant": reentrant})
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
