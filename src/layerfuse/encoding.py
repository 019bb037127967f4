"""`encode`: a sentence-transformers model's embeddings of texts, with per-text info fused text by text.

sentence-transformers' own `encode` sorts the texts by length before batching, so a fusion given
per-example info cannot know which text each row of a batch holds (it refuses, rather than guess).
`encode` batches the texts in their order and hands each batch its rows of the info.

>>> import torch, layerfuse
>>> from sentence_transformers import SentenceTransformer
>>> from layerfuse.models import embedded_model_path
>>> st = SentenceTransformer(embedded_model_path(), device="cpu")
>>> texts = ["a short text", "and a longer one, padded less"]
>>> encode(st, texts, layerfuse.FusionConfig(layer=3), info=torch.randn(2, 384)).shape
torch.Size([2, 384])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .config import FusionConfig
from .errors import ArgumentTypeError, ArgumentValueError, positive_int
from .fusion import fuse
from .info import LAYOUTS
from .methods import METHODS
from .models import transformer_of


def encode(
    st: nn.Module,
    texts: Sequence[str],
    config: FusionConfig,
    info: torch.Tensor | None = None,
    *,
    batch_size: int = 32,
) -> torch.Tensor:
    """What `st.encode(texts)` gives with `config` fused into its transformer, row i of `info` for text i.

    `info` has one row per text, (N, D) (or (N, K, D) for a basis), or is one info for every text.
    Returns the sentence embeddings (N, H) in the texts' order, computed under inference mode.
    """
    if not hasattr(st, "tokenize"):
        raise ArgumentTypeError(f"encode takes a sentence_transformers.SentenceTransformer, got {type(st).__name__}")
    texts = list(texts)
    if not texts or not all(isinstance(text, str) for text in texts):
        raise ArgumentValueError("texts must be a non-empty sequence of strings")
    positive_int("batch size", batch_size)
    per_text = info is not None and LAYOUTS[METHODS[config.method].info_layout].is_batched(info.ndim)
    if per_text and len(info) != len(texts):
        raise ArgumentValueError(f"the info has {len(info)} rows for {len(texts)} texts: give one row per text")
    model = transformer_of(st)
    device = next(model.parameters()).device
    embeddings = []
    with torch.inference_mode(), fuse(model, info[:batch_size] if per_text else info, config) as fusion:
        with fusion.examples_in_order():
            for start in range(0, len(texts), batch_size):
                if per_text:
                    fusion.set_info(info[start : start + batch_size])
                features: dict[str, Any] = st.tokenize(texts[start : start + batch_size])
                features = {
                    key: value.to(device) if isinstance(value, torch.Tensor) else value
                    for key, value in features.items()
                }
                embeddings.append(st(features)["sentence_embedding"])
    return torch.cat(embeddings)
