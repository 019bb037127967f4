"""`save_pretrained` of a fused model."""

from __future__ import annotations

import warnings

import pytest
import torch

import layerfuse
from conftest import TINY, assert_unchanged, snapshot, tiny_bert


@pytest.mark.parametrize("approach", ["hook", "layer"])
def test_save_pretrained_of_a_fused_model_warns_that_the_fusion_is_not_saved(tmp_path, approach):
    model = tiny_bert()
    before = snapshot(model)
    with layerfuse.fuse(model, torch.ones(TINY["hidden_size"]), layer=2, approach=approach, method="add"):
        with pytest.warns(
            UserWarning, match=r"without the attached fusion\(s\) addition at encoder\.layer\.1.*fusion\.save"
        ):
            model.save_pretrained(tmp_path / "fused")
    assert (tmp_path / "fused" / "model.safetensors").is_file()
    assert_unchanged(model, before)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.save_pretrained(tmp_path / "plain")


def test_save_pretrained_names_every_attached_fusion_and_is_restored_when_the_last_goes(tmp_path):
    model = tiny_bert()
    own = model.save_pretrained
    model.save_pretrained = own
    before = snapshot(model)
    first = layerfuse.fuse(model, torch.ones(TINY["hidden_size"]), layer=1)
    second = layerfuse.fuse(model, None, layer=3, method="scale", alpha=2.0, approach="layer")
    with pytest.warns(UserWarning, match="addition at encoder.layer.0; scale at encoder.layer.2"):
        model.save_pretrained(tmp_path / "both")
    first.remove()
    with pytest.warns(UserWarning, match="fusion\\(s\\) scale at encoder.layer.2:"):
        model.save_pretrained(tmp_path / "one")
    second.remove()
    second.remove()
    assert model.__dict__["save_pretrained"] is own
    assert_unchanged(model, before)
