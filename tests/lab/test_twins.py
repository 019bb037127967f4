"""Twins share the model's weights, carry their own fusion, and leave the model exactly as it was."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_unchanged, snapshot
from layerfuse import fuse
from layerfuse.lab.twins import shared_copy, side_by_side
from reference import FORMULAS, bert_forward


def test_a_shared_copy_holds_the_same_tensors_in_new_modules(tiny):
    twin = shared_copy(tiny)
    assert twin is not tiny and twin.encoder.layer[0] is not tiny.encoder.layer[0]
    for (name, tensor), (twin_name, twin_tensor) in zip(
        [*tiny.named_parameters(), *tiny.named_buffers()],
        [*twin.named_parameters(), *twin.named_buffers()],
        strict=True,
    ):
        assert name == twin_name and twin_tensor is tensor


def test_each_twin_runs_its_own_fusion_and_the_model_stays_plain(tiny, batch):
    before = snapshot(tiny)
    info = torch.randn(32, generator=torch.Generator().manual_seed(3))
    fusions = {
        a: (lambda twin, a=a: fuse(twin, info, layer=2, method="addition", approach=a)) for a in ("hook", "layer")
    }
    with torch.no_grad(), side_by_side(tiny, fusions) as networks:
        assert list(networks) == ["plain", "hook", "layer"] and networks["plain"] is tiny
        assert_unchanged(tiny, before)
        outputs = {name: network(**batch).last_hidden_state for name, network in networks.items()}
        expected = bert_forward(tiny, batch, layer=2, info=info, combine=FORMULAS["addition"])[-1]
        plain = bert_forward(tiny, batch)[-1]
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(outputs["plain"][real], plain[real])
    for approach in ("hook", "layer"):
        torch.testing.assert_close(outputs[approach][real], expected[real])
    assert torch.equal(outputs["hook"], outputs["layer"])
    assert_unchanged(tiny, before)


def test_fusions_are_removed_on_an_exception(tiny, batch):
    attached = []

    def attach(twin):
        attached.append(fuse(twin, torch.ones(32), layer=1, approach="hook"))
        return attached[-1]

    with pytest.raises(KeyError), side_by_side(tiny, {"hook": attach}):
        raise KeyError("inside")
    assert len(attached) == 1 and not attached[0].active
