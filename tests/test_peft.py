"""PEFT: fusing a PEFT-wrapped model fuses its base model with the adapters in place, at every kind of
positions, by both approaches, against a hook written here on the base model's block."""

from __future__ import annotations

import pytest
import torch

import layerfuse
from conftest import POSITIONS, TINY, assert_unchanged, padded_batch, snapshot, tiny_bert
from reference import chosen_positions

peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install -e '.[test]'")

H = TINY["hidden_size"]


def lora(model):
    """`model` with LoRA adapters on its attention's query and value, initialised away from the identity."""
    torch.manual_seed(1)
    config = peft.LoraConfig(target_modules=["query", "value"], r=2, init_lora_weights=False)
    return peft.get_peft_model(model, config).eval()


def reference_output(wrapped, block, batch, info, positions):
    """`wrapped(**batch)` with `info` added by a hook on `block` at the chosen positions."""
    chosen = chosen_positions(positions, batch["attention_mask"])[..., None]

    def add(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        fused = torch.where(chosen, hidden + info[:, None, :], hidden)
        return (fused, *output[1:]) if isinstance(output, tuple) else fused

    handle = block.register_forward_hook(add)
    try:
        return wrapped(**batch)
    finally:
        handle.remove()


@pytest.mark.parametrize("approach", ["hook", "layer"])
@pytest.mark.parametrize("kind", POSITIONS)
def test_a_peft_model_is_fused_in_its_base_model_with_its_adapters(kind, approach):
    wrapped, batch = lora(tiny_bert()), padded_batch()
    info = torch.randn(3, H, generator=torch.Generator().manual_seed(2))
    block = wrapped.get_base_model().encoder.layer[1]
    with torch.no_grad():
        expected = reference_output(wrapped, block, batch, info, POSITIONS[kind]).last_hidden_state
        before = snapshot(wrapped)
        with layerfuse.fuse(wrapped, info, layer=2, positions=POSITIONS[kind], approach=approach) as fusion:
            fused = wrapped(**batch).last_hidden_state
        assert fusion.site.module is block
    torch.testing.assert_close(fused, expected, rtol=0, atol=1e-6)
    assert_unchanged(wrapped, before)


def test_a_peft_classifier_gives_the_logits_of_the_fused_base_model():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    classifier = BertForSequenceClassification(BertConfig(**TINY, num_labels=3)).eval()
    config = peft.LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"], r=2, init_lora_weights=False)
    wrapped, batch = peft.get_peft_model(classifier, config).eval(), padded_batch()
    info = torch.randn(3, H, generator=torch.Generator().manual_seed(3))
    block = wrapped.get_base_model().bert.encoder.layer[2]
    with torch.no_grad():
        expected = reference_output(wrapped, block, batch, info, "last").logits
        with layerfuse.fuse(wrapped, info, layer=3, positions="last"):
            fused = wrapped(**batch).logits
    torch.testing.assert_close(fused, expected, rtol=0, atol=1e-6)
