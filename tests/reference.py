"""An independent BERT forward with a fusion, written from the architecture, sharing no code with layerfuse.

It runs the embeddings and then every block by hand, with the classic additive attention mask
(0 for real tokens, the dtype's minimum for padding), and combines `info` into the hidden states
after the fused layer with the given formula.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Combine = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

FORMULAS: dict[str, Combine] = {
    "addition": lambda h, v: h + v,
    "multiplication": lambda h, v: h * v,
}


def as_broadcast(info: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(H,), (B, H) or (B, T, H) info as a tensor that broadcasts against `like` (B, T, H)."""
    info = info.to(dtype=like.dtype, device=like.device)
    return info[:, None, :] if info.ndim == 2 else info


def bert_forward(model, batch: dict, *, layer: int | None = None, info=None, combine: Combine | None = None):
    """Hidden states 0..N of a BERT-family model, fused at `layer` (None: no fusion)."""
    mask = batch["attention_mask"]
    additive = (1.0 - mask[:, None, None, :].to(torch.float32)) * torch.finfo(torch.float32).min
    hidden = model.embeddings(input_ids=batch["input_ids"], token_type_ids=batch.get("token_type_ids"))
    states = []
    for index in range(len(model.encoder.layer) + 1):
        if index > 0:
            output = model.encoder.layer[index - 1](hidden, additive)
            hidden = output[0] if isinstance(output, tuple) else output
        if index == layer:
            hidden = combine(hidden, as_broadcast(info, hidden))
        states.append(hidden)
    return states
