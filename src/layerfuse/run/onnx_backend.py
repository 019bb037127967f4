"""`OnnxModel`: a run's fused model exported once to ONNX and run by ONNX Runtime (`layerfuse run --backend onnx`).

The model is exported by `torch.onnx.export`'s TorchScript exporter (`dynamo=False`), with eager
attention, whose graph onnxruntime's BERT optimizer fuses into its Attention, SkipLayerNormalization
and BiasGelu kernels. A fusion that merges (`layerfuse.merge`) is merged for the export, so the graph
is the plain model's; any other is exported attached, by its hook or custom layer, whose operations
the trace records, with the info a constant of the graph. The session runs with every graph
optimisation (`ORT_ENABLE_ALL`) on as many threads as torch uses, which sleep between runs rather
than spin (`NOT_SPINNING`), so that tokenising and pooling the batches between runs have the cores to
themselves. Before it is used, the export is checked on a padded batch of another shape than the one
traced: ONNX Runtime must give the PyTorch model's hidden states, else it is refused. The model is
left as it was; the ONNX files, made in a temporary folder, are gone once the session holds the graph.

ONNX Runtime is an extra: `pip install 'layerfuse[onnx]'`.

>>> import torch
>>> from transformers import AutoTokenizer, BertConfig, BertModel
>>> from layerfuse import FusionConfig
>>> from layerfuse.models import embedded_model_path
>>> tokenizer = AutoTokenizer.from_pretrained(embedded_model_path())
>>> model = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
...                              num_attention_heads=4, intermediate_size=37)).eval()
>>> onnx = OnnxModel(model, tokenizer, FusionConfig(layer=1), torch.ones(32))
>>> onnx.merged, onnx(tokenizer(["a text", "a longer text"], padding=True, return_tensors="pt")).shape
(True, torch.Size([2, 5, 32]))
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..config import FusionConfig
from ..errors import ArchitectureError, ArgumentValueError, MergeError
from .fusion import attach

BERT_OPTIMIZED = ("bert", "roberta", "xlm-roberta", "electra")
"""The model types whose graphs onnxruntime's BERT optimizer fuses; others run with ONNX Runtime's own optimisations."""
TOLERANCE = 1e-4
"""The largest difference, relative to the hidden states' largest value (at least 1), of a checked export."""
TRACED = ["a short text", "a text"]
CHECKED = ["one text that is longer than the texts traced", "a third", "another text"]
"""The padded batches the model is traced with and the export is checked on: of other sizes and lengths."""
NOT_SPINNING = {"session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"}
"""ONNX Runtime's threads block once a run is done: spinning, they would take the cores from the tokenizer, torch's
pooling and any other work on the machine (on 2 busy cores, a run with spinning threads took 1.6x as long)."""


def import_onnxruntime() -> Any:
    """The onnxruntime module, or the error that says how to install it."""
    try:
        import onnx  # noqa: F401  (torch.onnx.export writes the graph with it)
        import onnxruntime
    except ImportError as error:
        raise ArgumentValueError(
            f"the onnx backend needs onnx and onnxruntime ({error}): pip install 'layerfuse[onnx]', "
            "or use --backend torch"
        ) from None
    return onnxruntime


class _LastHiddenState(nn.Module):
    """The model called with its inputs by name, returning the last hidden state: what the graph computes."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.names, inputs))).last_hidden_state


@contextlib.contextmanager
def _eager_attention(model: PreTrainedModel) -> Iterator[None]:
    """The model with eager attention, which the exporter writes as the MatMul-Softmax graph the optimizer fuses."""
    original = model.config._attn_implementation
    changeable = hasattr(model, "set_attn_implementation") and original not in (None, "eager")
    if changeable:
        with _quiet():
            model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if changeable:
            with _quiet():
                model.set_attn_implementation(original)


@contextlib.contextmanager
def _fused(
    model: PreTrainedModel, config: FusionConfig | None, info: torch.Tensor | None, saved: str | os.PathLike[str] | None
) -> Iterator[bool]:
    """The model with the fusion merged (yields True) or attached (False), taken off again after."""
    if config is None:
        yield False
        return
    fusion = attach(model, config, info, saved)
    fusion.method.requires_grad_(False)  # a learned method's parameters become constants of the graph
    merged = None
    try:
        with contextlib.suppress(MergeError):
            merged = fusion.merge()
        yield merged is not None
    finally:
        if merged is not None:
            merged.unmerge()
        fusion.remove()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No warnings, log lines or prints from the exporter and the optimizer: notes on what they keep as constants
    and on the shapes they infer (the optimizer's modules log under their own top-level names, and print)."""
    disabled = logging.root.manager.disable
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(disabled)


def _real_tokens(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return hidden[mask.bool()]


class OnnxModel:
    """`model` fused by `config` with `info` (or a `saved` fusion), as an ONNX Runtime session: `onnx(inputs)`
    gives the last hidden state (B, T, H) of a tokenizer's batch, as the fused model's forward would.

    `merged` says whether the fusion was merged into the exported weights. Refused with a
    `LayerfuseError` where the model does not export or its export computes something else.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        config: FusionConfig | None = None,
        info: torch.Tensor | None = None,
        saved: str | os.PathLike[str] | None = None,
    ) -> None:
        onnxruntime = import_onnxruntime()
        accepted = inspect.signature(model.forward).parameters
        self.names = [name for name in tokenizer.model_input_names if name in accepted]
        traced = tokenizer(TRACED, padding=True, return_tensors="pt")
        checked = tokenizer(CHECKED, padding=True, return_tensors="pt")
        with (
            tempfile.TemporaryDirectory(prefix="layerfuse-onnx-") as folder,
            _eager_attention(model),
            _fused(model, config, info, saved) as self.merged,
            torch.no_grad(),
            _quiet(),
        ):
            path = self._export(model, traced, Path(folder))
            options = onnxruntime.SessionOptions()
            options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.intra_op_num_threads = torch.get_num_threads()
            options.inter_op_num_threads = 1
            for key, value in NOT_SPINNING.items():
                options.add_session_config_entry(key, value)
            self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            self.inputs = [given.name for given in self.session.get_inputs()]
            self._check(model(**{name: checked[name] for name in self.names}).last_hidden_state, checked)

    def _export(self, model: PreTrainedModel, traced: Mapping[str, torch.Tensor], folder: Path) -> Path:
        """Write the graph to `folder`, optimised by onnxruntime's BERT optimizer for a BERT-like model."""
        path = folder / "model.onnx"
        axes = {name: {0: "batch", 1: "tokens"} for name in [*self.names, "last_hidden_state"]}
        try:
            torch.onnx.export(
                _LastHiddenState(model, self.names),
                tuple(traced[name] for name in self.names),
                str(path),
                input_names=self.names,
                output_names=["last_hidden_state"],
                dynamic_axes=axes,
                opset_version=17,
                dynamo=False,
                training=torch.onnx.TrainingMode.PRESERVE,
            )
        except Exception as error:
            raise ArchitectureError(
                f"{type(model).__name__} does not export to ONNX with its fusion ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}): use --backend torch"
            ) from error
        model_type = getattr(model.config, "model_type", "")
        if model_type not in BERT_OPTIMIZED:
            return path
        from onnxruntime.transformers import optimizer

        optimized = optimizer.optimize_model(
            str(path),
            model_type="bert",
            num_heads=model.config.num_attention_heads,
            hidden_size=model.config.hidden_size,
            opt_level=0,
        )
        optimized.save_model_to_file(str(folder / "optimized.onnx"))
        return folder / "optimized.onnx"

    def _check(self, expected: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> None:
        """Refuse an export whose hidden states on `batch` differ from the PyTorch model's `expected`."""
        mask = batch["attention_mask"]
        difference = (_real_tokens(self(batch), mask) - _real_tokens(expected.float(), mask)).abs().max().item()
        scale = max(1.0, _real_tokens(expected, mask).abs().max().item())
        if not difference <= TOLERANCE * scale:
            raise ArchitectureError(
                f"the ONNX export of this model and fusion computes other hidden states than PyTorch (largest "
                f"difference {difference:.3g} on a batch of another shape than the one traced: the trace kept "
                "something of that batch as a constant): use --backend torch"
            )

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The last hidden state (B, T, H), float32, of the tokenizer's `batch`."""
        feed = {name: batch[name].numpy() for name in self.inputs}
        return torch.from_numpy(self.session.run(None, feed)[0])
