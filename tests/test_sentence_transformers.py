"""sentence-transformers calls `auto_model.forward(...)` itself: a fusion still sees each forward's mask.

`encode` pads, sorts by length and calls the forward directly, bypassing the model's hooks; every
text of a padded batch must still get what it gets alone, checked against a hook written here.
"""

from __future__ import annotations

import pytest
import torch

import layerfuse
from conftest import assert_unchanged, snapshot

sentence_transformers = pytest.importorskip("sentence_transformers")

LAYER = 3
TEXTS = [
    "a short text",
    "a longer text, so that the batch is padded quite a bit more than the first",
    "middle length, this one",
    "tiny",
]


@pytest.fixture(scope="module")
def st():
    from layerfuse.models import embedded_model_path

    return sentence_transformers.SentenceTransformer(embedded_model_path(), device="cpu")


def steer() -> torch.Tensor:
    return torch.randn(384, generator=torch.Generator().manual_seed(11))


def hidden(output):
    return output[0] if isinstance(output, tuple) else output


def alone(st, text: str, positions: str, vector: torch.Tensor | None = None) -> torch.Tensor:
    """The reference: `text` encoded alone (no padding), `vector` (default: `steer`) added by a hook of this test's own."""
    vector = steer() if vector is None else vector
    length = len(st.tokenize([text])["input_ids"][0])
    chosen = {"all": slice(None), "tokens": slice(None), "first": slice(0, 1), "last": slice(length - 1, length)}

    def add(module, args, output):
        state = hidden(output).clone()
        state[:, chosen[positions]] += vector
        return (state, *output[1:]) if isinstance(output, tuple) else state

    handle = st[0].auto_model.encoder.layer[LAYER - 1].register_forward_hook(add)
    try:
        return st.encode([text], convert_to_tensor=True)[0]
    finally:
        handle.remove()


@pytest.mark.parametrize("approach", ["hook", "layer"])
@pytest.mark.parametrize("positions", ["all", "tokens", "first", "last"])
def test_encode_fuses_every_text_of_a_padded_sorted_batch_as_it_would_alone(st, positions, approach):
    bert = st[0].auto_model
    before = snapshot(bert)
    with layerfuse.fuse(bert, steer(), layer=LAYER, positions=positions, approach=approach):
        fused = st.encode(TEXTS, batch_size=8, convert_to_tensor=True)
    assert_unchanged(bert, before)
    plain = st.encode(TEXTS, batch_size=8, convert_to_tensor=True)
    for index, text in enumerate(TEXTS):
        torch.testing.assert_close(fused[index], alone(st, text, positions), rtol=0, atol=2e-6)
        assert not torch.allclose(fused[index], plain[index], atol=1e-4)


@pytest.mark.parametrize("approach", ["hook", "layer"])
def test_tokens_leave_the_padding_of_the_fused_layer_exactly_as_it_was(st, approach):
    bert = st[0].auto_model
    block = bert.encoder.layer[LAYER - 1]
    seen = []
    handle = block.register_forward_hook(lambda module, args, output: seen.append(hidden(output).clone()))
    try:
        st.encode(TEXTS, batch_size=8)
        with layerfuse.fuse(bert, steer(), layer=LAYER, positions="tokens", approach=approach):
            st.encode(TEXTS, batch_size=8)
    finally:
        handle.remove()
    plain, fused = seen
    mask = st.tokenize(sorted(TEXTS, key=len, reverse=True))["attention_mask"].bool()
    assert plain.shape[:2] == mask.shape
    assert torch.equal(fused[~mask], plain[~mask])
    assert not torch.equal(fused[mask], plain[mask])


def test_a_fusion_that_needs_the_mask_refuses_a_module_run_outside_the_model(st):
    bert = st[0].auto_model
    with layerfuse.fuse(bert, steer(), layer=LAYER, positions="last"):
        with pytest.raises(layerfuse.FusionStateError, match="needs the attention mask of the current forward"):
            bert.encoder.layer[LAYER - 1](torch.zeros(1, 4, 384))


def per_text_info() -> torch.Tensor:
    return torch.randn(len(TEXTS), 384, generator=torch.Generator().manual_seed(12))


def test_per_text_info_through_st_encode_is_refused_not_misaligned(st):
    bert = st[0].auto_model
    before = snapshot(bert)
    with layerfuse.fuse(bert, per_text_info(), layer=LAYER):
        with pytest.raises(layerfuse.FusionStateError, match="called as model.forward"):
            st.encode(TEXTS, batch_size=8)
    assert_unchanged(bert, before)


@pytest.mark.parametrize("positions", ["all", "tokens"])
def test_per_text_info_given_to_an_attached_fusion_is_refused_through_st_encode(st, positions):
    bert = st[0].auto_model
    before = snapshot(bert)
    with layerfuse.fuse(bert, steer(), layer=LAYER, positions=positions) as fusion:
        st.encode(TEXTS, batch_size=8)
        fusion.set_info(per_text_info())
        with pytest.raises(layerfuse.FusionStateError, match="called as model.forward"):
            st.encode(TEXTS, batch_size=8)
        tokens = st.tokenize(TEXTS)
        bert(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    assert_unchanged(bert, before)


@pytest.mark.parametrize("batch_size", [8, 3])
def test_encode_gives_each_text_its_own_row_of_info(st, batch_size):
    bert = st[0].auto_model
    before = snapshot(bert)
    info = per_text_info()
    config = layerfuse.FusionConfig(layer=LAYER, positions="tokens")
    got = layerfuse.encode(st, TEXTS, config, info, batch_size=batch_size)
    assert_unchanged(bert, before)
    for index, text in enumerate(TEXTS):
        torch.testing.assert_close(got[index], alone(st, text, "tokens", info[index]), rtol=0, atol=2e-6)


def test_encode_refuses_info_with_another_number_of_rows(st):
    with pytest.raises(layerfuse.ArgumentValueError, match="the info has 3 rows for 4 texts"):
        layerfuse.encode(st, TEXTS, layerfuse.FusionConfig(layer=LAYER), torch.randn(3, 384))


@pytest.mark.parametrize("positions", ["all", "tokens", "first", "last"])
def test_fusing_a_sentence_transformer_fuses_its_transformer(st, positions):
    config = layerfuse.FusionConfig(layer=LAYER, positions=positions)
    before = snapshot(st)
    with layerfuse.fuse(st, steer(), config) as fusion:
        assert fusion.model is st[0].auto_model
        whole = st.encode(TEXTS, batch_size=8, convert_to_tensor=True)
    assert_unchanged(st, before)
    with layerfuse.fuse(st[0].auto_model, steer(), config):
        inner = st.encode(TEXTS, batch_size=8, convert_to_tensor=True)
    assert torch.equal(whole, inner)
    assert not torch.allclose(whole, st.encode(TEXTS, batch_size=8, convert_to_tensor=True), atol=1e-4)


def test_a_sentence_transformer_without_a_hugging_face_model_is_refused_untouched():
    try:
        from sentence_transformers.base.modules import Dense
    except ImportError:  # sentence-transformers before 6
        from sentence_transformers.models import Dense
    dense = sentence_transformers.SentenceTransformer(modules=[Dense(4, 4)], device="cpu")
    before = snapshot(dense)
    with pytest.raises(
        layerfuse.ArchitectureError, match="has no Hugging Face model to fuse: its first module is a Dense"
    ):
        layerfuse.fuse(dense, torch.ones(4), layer=1)
    assert_unchanged(dense, before)
