"""Positions "first" and "last" on a padded batch with a row of padding only: that row has no first or last
real token, so nothing in it changes; the other rows change at their own first or last real token.
Positions "tokens" on a batch without padding: every position, as "all", also where a trace records
the forward once and runs it on padded batches."""

from __future__ import annotations

import pytest
import torch

import layerfuse
from conftest import TINY, padded_batch, tiny_bert
from reference import bert_forward

H = TINY["hidden_size"]
LAYER = 2


def first_or_last(attention_mask: torch.Tensor, which: str) -> torch.Tensor:
    """(B, T) booleans, written out row by row: each row's first or last real token, none in a row of padding."""
    chosen = torch.zeros(attention_mask.shape, dtype=torch.bool)
    for row, real in enumerate(attention_mask.tolist()):
        columns = [column for column, value in enumerate(real) if value]
        if columns:
            chosen[row, columns[0] if which == "first" else columns[-1]] = True
    return chosen


@pytest.mark.parametrize("approach", ["hook", "layer"])
@pytest.mark.parametrize("which", ["first", "last"])
def test_a_row_of_padding_only_is_left_unchanged(which, approach):
    model = tiny_bert()
    batch = padded_batch(lengths=(7, 0, 4))
    info = torch.randn(3, H, generator=torch.Generator().manual_seed(0))
    chosen = first_or_last(batch["attention_mask"], which)[..., None]
    assert not chosen[1].any() and chosen[0].sum() == chosen[2].sum() == 1
    real = [0, 2]
    with torch.no_grad():
        plain = model(**batch, output_hidden_states=True).hidden_states
        reference = bert_forward(model, batch, layer=LAYER, edit=lambda h: torch.where(chosen, h + info[:, None], h))
        with layerfuse.fuse(model, info, layer=LAYER, positions=which, approach=approach):
            fused = model(**batch, output_hidden_states=True).hidden_states
    # The row of padding is the model's own, bitwise, at every layer; the others are the reference's.
    assert all(torch.equal(got[1], expected[1]) for got, expected in zip(fused, plain, strict=True))
    assert not torch.equal(fused[LAYER][real], plain[LAYER][real])
    for got, expected in zip(fused, reference, strict=True):
        torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("approach", ["hook", "layer"])
@pytest.mark.parametrize("mask", ["ones", "none"])
def test_tokens_of_a_batch_without_padding_are_every_position(approach, mask):
    model = tiny_bert()
    batch = padded_batch(lengths=(5, 5))
    assert bool(batch["attention_mask"].all())
    if mask == "none":
        del batch["attention_mask"]
    info = torch.randn(H, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = bert_forward(model, padded_batch(lengths=(5, 5)), layer=LAYER, info=info, combine=torch.add)
        with layerfuse.fuse(model, info, layer=LAYER, positions="tokens", approach=approach):
            fused = model(**batch, output_hidden_states=True).hidden_states
        with layerfuse.fuse(model, info, layer=LAYER, approach=approach):
            everywhere = model(**batch, output_hidden_states=True).hidden_states
    assert all(torch.equal(got, expected) for got, expected in zip(fused, everywhere, strict=True))
    for got, expected in zip(fused, reference, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


class _Hidden(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def test_tokens_traced_on_a_batch_without_padding_still_leave_the_padding_of_later_batches():
    model = tiny_bert("eager")
    unpadded, padded = padded_batch(lengths=(5, 5)), padded_batch(lengths=(5, 3))
    info = torch.randn(H, generator=torch.Generator().manual_seed(0))
    inputs = ("input_ids", "attention_mask")
    with torch.no_grad(), layerfuse.fuse(model, info, layer=LAYER, positions="tokens"):
        traced = torch.jit.trace(_Hidden(model), tuple(unpadded[name] for name in inputs), check_trace=False)
        eager = _Hidden(model)(*(padded[name] for name in inputs))
    with torch.no_grad():
        got = traced(*(padded[name] for name in inputs))
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
