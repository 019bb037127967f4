"""`word_info`: one feature vector per word, as per-token info and the positions of the words' tokens.

Word-aligned features (MAG-BERT and other multimodal fusion align one vector per word) become
(B, T, D) info and a (B, T) positions mask for `fuse`, from a fast tokenizer's encoding of the
batch: `tokens="first"` marks each word's first sub-token, `tokens="all"` every sub-token of the
word. Special tokens and padding get no feature (zeros, mask False).

>>> import torch, layerfuse
>>> from transformers import AutoTokenizer
>>> from layerfuse.models import embedded_model_path
>>> tokenizer = AutoTokenizer.from_pretrained(embedded_model_path())
>>> words = [["unbelievably", "fun"], ["hi"]]
>>> encoding = tokenizer(words, is_split_into_words=True, padding=True, return_tensors="pt")
>>> info, positions = word_info(encoding, [torch.ones(2, 384), torch.ones(1, 384)])
>>> encoding.tokens(0), positions[0].tolist()
(['[CLS]', 'un', '##bel', '##ie', '##va', '##bly', 'fun', '[SEP]'], [False, True, False, False, False, False, True, False])
>>> # with layerfuse.fuse(model, info, layer=3, positions=positions): model(**encoding)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from .errors import ArgumentTypeError, ArgumentValueError, InfoShapeError, InfoTypeError

TOKENS = ("first", "all")


class WordInfo(NamedTuple):
    """Per-token info (B, T, D) and the positions (B, T) that carry a word's feature: `fuse(model, info, positions=positions)`."""

    info: torch.Tensor
    positions: torch.Tensor


def _word_ids(encoding: Any) -> list[list[int | None]]:
    """The word index of every token of every example of `encoding` (None: a special token or padding)."""
    if not getattr(encoding, "is_fast", False):
        raise ArgumentTypeError(
            "word_info needs the BatchEncoding of a fast tokenizer (it reads encoding.word_ids(i)), got a "
            f"{type(encoding).__name__}: tokenize with a fast tokenizer, AutoTokenizer.from_pretrained(..., use_fast=True)"
        )
    if "overflow_to_sample_mapping" in encoding:
        raise ArgumentValueError(
            "word_info needs one row per example, but this encoding has overflowing rows: "
            "tokenize without return_overflowing_tokens"
        )
    rows = []
    for i, row in enumerate(encoding.encodings):
        if any(sequence == 1 for sequence in row.sequence_ids):
            raise ArgumentValueError(
                f"example {i} of the encoding is a pair of texts, whose words are numbered twice: "
                "word_info maps the words of one text per example"
            )
        rows.append(list(row.word_ids))
    if len({len(row) for row in rows}) > 1:
        raise ArgumentValueError(
            f"the encoding's examples have {sorted({len(row) for row in rows})} tokens: pad them to one length "
            "(tokenizer(..., padding=True)) so that the info is one (B, T, D) tensor"
        )
    return rows


def _word_count(encoding: Any, i: int) -> int:
    """How many words example `i` has, those cut off by truncation included."""
    row = encoding.encodings[i]
    ids = [w for part in (row, *row.overflowing) for w in part.word_ids if w is not None]
    return max(ids) + 1 if ids else 0


def word_info(
    encoding: Any, word_features: Sequence[torch.Tensor] | torch.Tensor, *, tokens: str = "first"
) -> WordInfo:
    """Per-token info and positions from one feature vector per word.

    `encoding` is a fast tokenizer's `BatchEncoding` of a padded batch, of word lists
    (`is_split_into_words=True`) or of texts (then the words are the tokenizer's own, those that
    `encoding.word_ids(i)` numbers). `word_features` holds, for each example i, a (W_i, D) tensor:
    row w is word w's feature, and W_i must be the example's number of words. A (B, W, D) tensor is
    taken as B examples of W words each. The token(s) of word w get row w; with `tokens="first"` only
    its first sub-token is in the positions, with `"all"` all of them. Words that truncation cut off
    have no token, and their features are left out; a word cut in the middle keeps the sub-tokens
    that remain.
    """
    if tokens not in TOKENS:
        raise ArgumentValueError(f"unknown tokens {tokens!r}: use one of {', '.join(TOKENS)}")
    if isinstance(word_features, torch.Tensor) and word_features.ndim != 3:
        raise InfoShapeError(
            "word features must be a list of (W_i, D) tensors, one per example, or a (B, W, D) tensor, "
            f"got a tensor of shape {tuple(word_features.shape)}"
        )
    if not isinstance(word_features, (Sequence, torch.Tensor)) or isinstance(word_features, str):
        raise ArgumentTypeError(
            f"word features must be a list of (W_i, D) tensors, one per example, got {type(word_features).__name__}"
        )
    rows = _word_ids(encoding)
    features = list(word_features)
    if not rows:
        raise ArgumentValueError("the encoding holds no example")
    if len(features) != len(rows):
        raise InfoShapeError(f"word features are given for {len(features)} examples but the encoding has {len(rows)}")
    first = features[0]
    for i, feature in enumerate(features):
        if not isinstance(feature, torch.Tensor) or not feature.is_floating_point():
            what = feature.dtype if isinstance(feature, torch.Tensor) else type(feature).__name__
            raise InfoTypeError(f"the word features of example {i} must be a floating-point tensor, got {what}")
        if feature.ndim != 2 or feature.shape[1] != first.shape[-1]:
            size = "" if i == 0 else f" with D = {first.shape[-1]}, as example 0's"
            raise InfoShapeError(f"the word features of example {i} must be (W_i, D){size}, got {tuple(feature.shape)}")
        if feature.dtype != first.dtype or feature.device != first.device:
            raise InfoTypeError(
                f"the word features of example {i} are {feature.dtype} on {feature.device}, those of example 0 "
                f"{first.dtype} on {first.device}: give every example's in one dtype and on one device"
            )
        words = _word_count(encoding, i)
        if feature.shape[0] != words:
            raise InfoShapeError(
                f"example {i} has {words} words in the encoding but {feature.shape[0]} word features: give one row "
                "per word (of a padded (B, W, D) tensor, features[i, :W_i])"
            )
    info = torch.zeros(len(rows), len(rows[0]), first.shape[-1], dtype=first.dtype, device=first.device)
    positions = torch.zeros(len(rows), len(rows[0]), dtype=torch.bool, device=first.device)
    for i, row in enumerate(rows):
        starts: dict[int, int] = {}
        for t, w in enumerate(row):
            if w is not None:
                starts.setdefault(w, t)
        chosen = [t for t, w in enumerate(row) if w is not None and (tokens == "all" or starts[w] == t)]
        index = torch.tensor(chosen, dtype=torch.long, device=first.device)
        info[i, index] = features[i][torch.tensor([row[t] for t in chosen], dtype=torch.long, device=first.device)]
        positions[i, index] = True
    return WordInfo(info, positions)
