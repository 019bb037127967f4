"""`train`: fit a learned fusion's parameters with the model frozen (its weights stay bitwise the same).

A short call over `layerfuse.FusionTrainer`, the Hugging Face Trainer (needs `layerfuse[train]`), for
batches made by hand; use `FusionTrainer` itself for schedules, accumulation, mixed precision,
evaluation, checkpoints or several devices.

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

import tempfile
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .errors import ArgumentValueError, positive_int, positive_number
from .fusion import Fusion

Batch = tuple[dict[str, torch.Tensor], "torch.Tensor | None", Any]


def trainable_parameters(fusion: Fusion) -> list[nn.Parameter]:
    """The fusion's parameters that training changes; an error if it has none."""
    parameters = [p for p in fusion.method.parameters() if p.requires_grad]
    if not parameters:
        raise ArgumentValueError(
            f"the {fusion.method.method_name or type(fusion.method).__name__} fusion has no parameters "
            "to train: use a learned method such as film, gate, concat or cross_attention"
        )
    return parameters


def train(
    fusion: Fusion,
    batches: Iterable[Batch],
    *,
    loss: Callable[[Any, Any], torch.Tensor],
    epochs: int = 1,
    lr: float = 1e-2,
) -> list[float]:
    """Train `fusion.method`'s parameters with Adam at the constant rate `lr`; return the loss of every step.

    `batches` yields `(inputs, info, target)`: `model(**inputs)` is run with `info` set on the fusion
    (None keeps the current info) and `loss(outputs, target)` is minimised. It is read once and run in
    its order every epoch. The model's parameters are frozen during training and restored after. As
    every Trainer does, it seeds Python's, NumPy's and torch's generators (with 42).
    """
    positive_int("epochs", epochs)
    positive_number("lr", lr)
    trainable_parameters(fusion)
    from transformers import TrainingArguments

    from .trainer import BatchesTrainer

    steps = [
        {**inputs, **({} if info is None else {"info": info}), "target": target} for inputs, info, target in batches
    ]
    weight = next(fusion.model.parameters(), None)
    with tempfile.TemporaryDirectory() as folder:
        args = TrainingArguments(
            folder,
            num_train_epochs=epochs,
            per_device_train_batch_size=1,
            learning_rate=lr,
            weight_decay=0.0,
            lr_scheduler_type="constant",
            max_grad_norm=0.0,
            optim="adamw_torch",
            save_strategy="no",
            logging_strategy="no",
            report_to=[],
            disable_tqdm=True,
            use_cpu=weight is None or weight.device.type == "cpu",
            dataloader_num_workers=0,
            remove_unused_columns=False,
        )
        trainer = BatchesTrainer(fusion, args, steps, loss)
        trainer.train()
    return trainer.losses
