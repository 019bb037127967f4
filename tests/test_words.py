"""word_info: per-word features become per-token info and positions, checked against a mapping built by hand.

The reference lays out each example as [CLS], every word's sub-tokens (the tokenizer run on that word
alone), [SEP] and padding, so it knows where each word's tokens are without `word_ids`.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

import layerfuse
from layerfuse.models import embedded_model_path

WORDS = [
    ["unbelievably", "tokenization", "is", "fun"],
    ["hi"],
    ["antidisestablishmentarianism", "x", "unbelievably"],
]
"""A padded batch whose words split into 1 to 8 sub-tokens."""
SIZE = 32


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(embedded_model_path())


def features(words: list[list[str]], seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(len(example), SIZE, generator=generator) for example in words]


def by_hand(tokenizer, words, feats, tokens: str, max_length: int | None = None):
    """The expected input ids, info and positions, from each word's sub-tokens counted one word at a time."""
    pieces = [[tokenizer(word, add_special_tokens=False)["input_ids"] for word in example] for example in words]
    rows = []
    for example, example_feats in zip(pieces, feats):
        ids, info, chosen = [tokenizer.cls_token_id], [torch.zeros(SIZE)], [False]
        for w, word in enumerate(example):
            for k, piece in enumerate(word):
                ids.append(piece)
                info.append(example_feats[w] if tokens == "all" or k == 0 else torch.zeros(SIZE))
                chosen.append(tokens == "all" or k == 0)
        if max_length is not None:
            ids, info, chosen = ids[: max_length - 1], info[: max_length - 1], chosen[: max_length - 1]
        ids.append(tokenizer.sep_token_id), info.append(torch.zeros(SIZE)), chosen.append(False)
        rows.append((ids, info, chosen))
    length = max(len(ids) for ids, _, _ in rows)
    pad = [(length - len(ids)) for ids, _, _ in rows]
    return (
        torch.tensor([ids + [tokenizer.pad_token_id] * n for (ids, _, _), n in zip(rows, pad)]),
        torch.stack([torch.stack(info + [torch.zeros(SIZE)] * n) for (_, info, _), n in zip(rows, pad)]),
        torch.tensor([chosen + [False] * n for (_, _, chosen), n in zip(rows, pad)]),
    )


@pytest.mark.parametrize("tokens", ["first", "all"])
def test_word_info_gives_each_words_tokens_its_feature(tokenizer, tokens):
    encoding = tokenizer(WORDS, is_split_into_words=True, padding=True, return_tensors="pt")
    feats = features(WORDS)
    ids, expected_info, expected_positions = by_hand(tokenizer, WORDS, feats, tokens)
    assert torch.equal(encoding["input_ids"], ids)  # the hand-built layout is the tokenizer's
    assert expected_positions.sum() == (8 if tokens == "first" else 24)  # words split into several tokens
    info, positions = layerfuse.word_info(encoding, feats, tokens=tokens)
    assert positions.dtype == torch.bool and torch.equal(positions, expected_positions)
    assert torch.equal(info, expected_info)


def test_word_info_reads_a_batch_tokenized_as_texts(tokenizer):
    texts = ["unbelievably, tokenization", "hi"]
    words = [["unbelievably", ",", "tokenization"], ["hi"]]  # BERT's pre-tokenizer splits off punctuation
    feats = features(words, seed=3)
    ids, expected_info, expected_positions = by_hand(tokenizer, words, feats, "all")
    encoding = tokenizer(texts, padding=True, return_tensors="pt")
    assert torch.equal(encoding["input_ids"], ids)
    info, positions = layerfuse.word_info(encoding, feats, tokens="all")
    assert torch.equal(info, expected_info) and torch.equal(positions, expected_positions)


@pytest.mark.parametrize("tokens", ["first", "all"])
def test_words_cut_off_by_truncation_are_left_out(tokenizer, tokens):
    """At 8 tokens the first example keeps "unbelievably" and 1 of the 2 pieces of "tokenization"; the third keeps
    6 of the 8 pieces of its first word: features are still given for every word, and the cut ones have no token."""
    encoding = tokenizer(WORDS, is_split_into_words=True, padding=True, truncation=True, max_length=8)
    feats = features(WORDS, seed=5)
    ids, expected_info, expected_positions = by_hand(tokenizer, WORDS, feats, tokens, max_length=8)
    assert encoding["input_ids"] == ids.tolist()
    info, positions = layerfuse.word_info(encoding, feats, tokens=tokens)
    assert torch.equal(info, expected_info) and torch.equal(positions, expected_positions)
    with pytest.raises(layerfuse.InfoShapeError, match="example 0 has 4 words in the encoding but 2"):
        layerfuse.word_info(encoding, [feats[0][:2], feats[1], feats[2]])


def test_a_padded_tensor_is_taken_as_examples_of_equal_word_counts(tokenizer):
    words = [["unbelievably", "fun"], ["hi", "tokenization"]]
    encoding = tokenizer(words, is_split_into_words=True, padding=True, return_tensors="pt")
    stacked = torch.randn(2, 2, SIZE)
    _, expected_info, expected_positions = by_hand(tokenizer, words, list(stacked), "all")
    info, positions = layerfuse.word_info(encoding, stacked, tokens="all")
    assert torch.equal(info, expected_info) and torch.equal(positions, expected_positions)
    with pytest.raises(layerfuse.InfoShapeError, match=r"example 1 has 1 words .* but 4 .*features\[i, :W_i\]"):
        layerfuse.word_info(tokenizer(WORDS[:2], is_split_into_words=True, padding=True), torch.randn(2, 4, SIZE))


@pytest.mark.parametrize("tokens", ["first", "all"])
@pytest.mark.parametrize("approach", ["hook", "layer"])
def test_fusing_word_info_adds_each_feature_at_its_words_tokens(tokenizer, tokens, approach):
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=SIZE,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    model = BertModel(config).eval()
    encoding = tokenizer(WORDS, is_split_into_words=True, padding=True, return_tensors="pt")
    feats = features(WORDS, seed=7)
    _, expected_info, expected_positions = by_hand(tokenizer, WORDS, feats, tokens)
    with torch.no_grad():
        plain = model(**encoding, output_hidden_states=True).hidden_states[1]
        info, positions = layerfuse.word_info(encoding, feats, tokens=tokens)
        with layerfuse.fuse(model, info, layer=1, positions=positions, approach=approach):
            fused = model(**encoding, output_hidden_states=True).hidden_states[1]
    chosen = expected_positions.unsqueeze(-1)
    assert torch.equal(fused, torch.where(chosen, plain + expected_info, plain))
    assert not torch.equal(fused, plain)


def test_word_info_refuses_what_it_cannot_map(tokenizer):
    encoding = tokenizer(WORDS, is_split_into_words=True, padding=True)
    feats = features(WORDS)
    with pytest.raises(layerfuse.InfoShapeError, match="example 2 has 3 words in the encoding but 4"):
        layerfuse.word_info(encoding, [*feats[:2], torch.randn(4, SIZE)])
    with pytest.raises(layerfuse.InfoShapeError, match="for 2 examples but the encoding has 3"):
        layerfuse.word_info(encoding, feats[:2])
    with pytest.raises(layerfuse.InfoShapeError, match=r"example 1 must be \(W_i, D\) with D = 32"):
        layerfuse.word_info(encoding, [feats[0], torch.randn(1, 8), feats[2]])
    with pytest.raises(layerfuse.InfoTypeError, match="floating-point"):
        layerfuse.word_info(encoding, [feats[0], torch.ones(1, SIZE, dtype=torch.long), feats[2]])
    with pytest.raises(layerfuse.InfoTypeError, match="one dtype"):
        layerfuse.word_info(encoding, [feats[0], feats[1].double(), feats[2]])
    with pytest.raises(layerfuse.InfoShapeError, match=r"a \(B, W, D\) tensor, got a tensor of shape \(3, 32\)"):
        layerfuse.word_info(encoding, torch.randn(3, SIZE))
    with pytest.raises(layerfuse.ArgumentValueError, match="unknown tokens 'last': use one of first, all"):
        layerfuse.word_info(encoding, feats, tokens="last")
    with pytest.raises(layerfuse.ArgumentValueError, match="pad them to one length"):
        layerfuse.word_info(tokenizer(WORDS, is_split_into_words=True), feats)
    with pytest.raises(layerfuse.ArgumentValueError, match="pair of texts"):
        layerfuse.word_info(tokenizer(["a b"], ["c"]), [torch.randn(2, SIZE)])
    with pytest.raises(layerfuse.ArgumentValueError, match="return_overflowing_tokens"):
        overflowing = tokenizer(["a b c d e f"], truncation=True, max_length=4, return_overflowing_tokens=True)
        layerfuse.word_info(overflowing, [torch.randn(6, SIZE)])
    with pytest.raises(layerfuse.ArgumentTypeError, match="fast tokenizer"):
        layerfuse.word_info(dict(encoding), feats)
