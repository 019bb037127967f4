"""`train`: fit a learned fusion's parameters with the model frozen (its weights stay bitwise the same).

>>> import torch
>>> from layerfuse import fuse, train
>>> from transformers import BertConfig, BertModel
>>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)).eval()
>>> ids = {"input_ids": torch.tensor([[1, 2, 3], [4, 5, 6]])}
>>> with fuse(model, torch.randn(2, 4), layer=2, method="film") as fusion:
...     losses = train(fusion, [(ids, torch.randn(2, 4), torch.zeros(2))], loss=lambda out, y: out.last_hidden_state[:, 0, 0].sub(y).pow(2).mean())
>>> len(losses)
1
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from .errors import ArgumentValueError, positive_int, positive_number
from .fusion import Fusion

Batch = tuple[dict[str, torch.Tensor], "torch.Tensor | None", Any]


def train(
    fusion: Fusion,
    batches: Iterable[Batch],
    *,
    loss: Callable[[Any, Any], torch.Tensor],
    epochs: int = 1,
    lr: float = 1e-2,
) -> list[float]:
    """Train `fusion.method`'s parameters with Adam; return the loss of every step.

    `batches` yields `(inputs, info, target)`: `model(**inputs)` is run with `info` set on the fusion
    (None keeps the current info) and `loss(outputs, target)` is minimised. It must be re-iterable
    for several epochs. The model's parameters are frozen during training and restored after.
    """
    parameters = [p for p in fusion.method.parameters() if p.requires_grad]
    if not parameters:
        raise ArgumentValueError(
            f"the {fusion.method.method_name or type(fusion.method).__name__} fusion has no parameters "
            "to train: use a learned method such as film, gate, concat or cross_attention"
        )
    positive_int("epochs", epochs)
    positive_number("lr", lr)
    model = fusion.model
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    optimizer = torch.optim.Adam(parameters, lr=lr)
    losses = []
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        fusion.method.train()
        for _ in range(epochs):
            for inputs, info, target in batches:
                if info is not None:
                    fusion.set_info(info)
                optimizer.zero_grad()
                value = loss(model(**inputs), target)
                value.backward()
                optimizer.step()
                losses.append(float(value.detach()))
    finally:
        fusion.method.eval()
        for p, requires_grad in frozen:
            p.requires_grad_(requires_grad)
    return losses
