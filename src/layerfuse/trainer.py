"""`FusionTrainer`: train a learned fusion with the Hugging Face `Trainer`, the model frozen.

The Trainer sees a `FusionModule`: calling it calls the fused model, and its parameters are the
fusion's only, so they are what the optimizer, `grad_norm` and gradient clipping see. The model's own
weights are frozen while `train` runs and stay bitwise the same. Checkpoints and `save_model` write
the fusion as `fusion.save` does, loadable by `layerfuse.load_fusion`; `resume_from_checkpoint` reads
it back. A dataset row's `"info"`, if it has one, is collated with the row and set on the fusion for
its batch, so per-example info follows its examples however the Trainer shuffles.
Needs `accelerate` (`pip install 'layerfuse[train]'`).

>>> import tempfile, torch
>>> from transformers import BertConfig, BertForSequenceClassification, TrainingArguments
>>> from layerfuse import fuse
>>> model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)).eval()
>>> rows = [{"input_ids": torch.tensor([1, 2, 3]), "info": torch.randn(4), "labels": torch.tensor(k % 2)} for k in range(8)]
>>> fusion = fuse(model, torch.zeros(4), layer=2, method="film", positions="first")
>>> args = TrainingArguments(tempfile.mkdtemp(), max_steps=2, per_device_train_batch_size=4, report_to=[], use_cpu=True)
>>> trainer = FusionTrainer(fusion, args, train_dataset=rows)
>>> trainer.train().global_step  # the Trainer prints its metrics  # doctest: +ELLIPSIS
{...}
2
>>> sorted(p.shape for group in trainer.optimizer.param_groups for p in group["params"]) == sorted(p.shape for p in fusion.method.parameters())
True
"""

from __future__ import annotations

import importlib.util
import inspect
import operator
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import SequentialSampler
from transformers import PrinterCallback, ProgressCallback, Trainer
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.utils import can_return_loss, find_labels

from .errors import ArgumentTypeError, ArgumentValueError, FusionStateError
from .fusion import Fusion
from .saving import load_fusion
from .training import trainable_parameters

if importlib.util.find_spec("accelerate") is None:
    raise ArgumentValueError(
        "FusionTrainer and layerfuse.train run the Hugging Face Trainer, which needs accelerate: "
        "pip install 'layerfuse[train]'"
    )


class FusionModule(nn.Module):
    """The fused model as a trainer sees it: `module(info=..., **inputs)` runs the model on `inputs` with
    `info` (if given) set on the fusion; its parameters and `state_dict` are the fusion's method's only.

    Moving it (`.to(device)`) moves the model too; other attributes are the model's.
    """

    def __init__(self, fusion: Fusion) -> None:
        super().__init__()
        self.method = fusion.method
        self.__dict__["fusion"] = fusion

    def forward(self, info: torch.Tensor | None = None, **inputs: Any) -> Any:
        if info is not None:
            self.fusion.set_info(info)
        return self.fusion.model(**inputs)

    def _apply(self, fn: Any, recurse: bool = True) -> FusionModule:
        self.fusion.model._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "fusion" or "fusion" not in self.__dict__:
                raise
            return getattr(self.__dict__["fusion"].model, name)


class FusionTrainer(Trainer):
    """A `transformers.Trainer` that trains `fusion`'s parameters, and only those; it takes the other
    arguments of `Trainer` (`args`, `train_dataset`, `data_collator`, `eval_dataset`, `callbacks`, ...).

    Rows of the dataset hold the model's inputs, their labels and, for per-example info, `"info"`.
    The model keeps its mode (eval or train, for dropout) and its weights; the fusion is saved in
    layerfuse's format at every checkpoint and by `save_model`.
    """

    def __init__(self, fusion: Fusion, args: Any = None, **kwargs: Any) -> None:
        if not isinstance(fusion, Fusion):
            raise ArgumentTypeError(
                f"FusionTrainer takes a Fusion (from layerfuse.fuse), got a {type(fusion).__name__}"
            )
        for name in ("model", "model_init"):
            if name in kwargs:
                raise ArgumentTypeError(f"FusionTrainer trains the fusion it is given: pass no {name}=")
        if not fusion.active:
            raise FusionStateError("the fusion was removed, so training it would change nothing: train an active one")
        trainable_parameters(fusion)
        if args is not None and args.n_gpu > 1:
            raise ArgumentValueError(
                f"FusionTrainer cannot use torch DataParallel over {args.n_gpu} GPUs (it would copy the fusion away "
                "from the model): use one GPU (CUDA_VISIBLE_DEVICES=0) or one process per GPU (torchrun)"
            )
        self.fusion = fusion
        super().__init__(model=FusionModule(fusion), args=args, **kwargs)
        model = fusion.model
        if self.args.label_names is None:
            self.label_names = find_labels(type(model))
        self.can_return_loss = can_return_loss(type(model))
        self.model_accepts_loss_kwargs = getattr(
            model,
            "accepts_loss_kwargs",
            any(p.kind is p.VAR_KEYWORD for p in inspect.signature(model.forward).parameters.values()),
        )
        if self.args.save_strategy != "no":
            _ = fusion.config  # a method that cannot be saved is refused now, not at the first checkpoint

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """`Trainer.train`, with the model's parameters frozen while it runs and restored after."""
        frozen = [(p, p.requires_grad) for p in self.fusion.model.parameters()]
        training = self.fusion.method.training
        try:
            for p, _ in frozen:
                p.requires_grad_(False)
            return super().train(*args, **kwargs)
        finally:
            self.fusion.method.train(training)
            for p, requires_grad in frozen:
                p.requires_grad_(requires_grad)

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            forward = inspect.signature(self.fusion.model.forward).parameters
            self._signature_columns = [*forward, "info", "label", "label_ids", *self.label_names]

    def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        self.fusion.save(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        self._load_fusion(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        self._load_fusion(self.state.best_model_checkpoint)

    def _load_fusion(self, folder: str) -> None:
        """Set the fusion's parameters to those saved in `folder`, read and checked by `load_fusion`."""
        fusion = self.fusion
        loaded = load_fusion(folder, fusion.model, config=fusion.config, info=fusion.info.source)
        try:
            state = loaded.method.state_dict()
        finally:
            loaded.remove()
        fusion.method.load_state_dict(state)


class BatchesTrainer(FusionTrainer):
    """A `FusionTrainer` over ready-made batches, what `layerfuse.train` runs: each item of its dataset is a
    whole batch, `{**inputs, "info": ..., "target": ...}`, run in the order given every epoch, and the
    loss is `loss(outputs, target)`. It prints nothing.
    """

    def __init__(
        self, fusion: Fusion, args: Any, batches: list[dict[str, Any]], loss: Callable[[Any, Any], Any]
    ) -> None:
        super().__init__(fusion, args, train_dataset=batches, data_collator=operator.itemgetter(0))
        self.remove_callback(PrinterCallback)
        self.remove_callback(ProgressCallback)
        self.loss = loss
        self.losses: list[float] = []

    def _get_train_sampler(self, train_dataset: Any = None) -> SequentialSampler:
        return SequentialSampler(self.train_dataset)

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        target = inputs.pop("target")
        outputs = model(**inputs)
        value = self.loss(outputs, target)
        self.losses.append(float(value.detach()))
        return (value, outputs) if return_outputs else value
