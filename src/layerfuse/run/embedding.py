"""`Embedder`: embed a table of texts with a model and its fusion, sorted by length into batches.

Sorting by token count puts texts of similar length together, so batches carry little padding; the
embeddings come back in the table's order. Pooling is one of sentence-transformers' modes (`pool`:
"mean" over real tokens, "cls" the first one, "max", "lasttoken", "weightedmean",
"mean_sqrt_len_tokens"), optionally L2-normalised, or "none" (every real token's state). A
sentence-transformers folder brings its own pooling, normalisation and max length (`read_st_folder`),
so that its embeddings are those of `SentenceTransformer(folder).encode`. Each row is flagged if it was
truncated to `max_length` tokens or if its embedding holds NaN or infinity. The forwards run in PyTorch
(backend "torch") or in ONNX Runtime on the fused model exported once (backend "onnx", `OnnxModel`).

>>> import pyarrow as pa
>>> with Embedder.load(max_length=8) as embedder:
...     out = embedder(pa.table({"row": [0, 1], "text": ["a short text", "a text that is longer than eight tokens"]}))
>>> out.column_names, out["embedding"].type.list_size, out["truncated"].to_pylist(), out["finite"].to_pylist()
(['row', 'text', 'embedding', 'truncated', 'finite'], 384, [False, True], [True, True])
"""

from __future__ import annotations

import os
from collections.abc import Callable
from types import TracebackType

import numpy
import pyarrow as pa
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..config import FusionConfig
from ..errors import ArgumentValueError, positive_int
from ..fusion import Fusion
from ..models import embedded_model_path, load_model
from .fusion import attach, row_info
from .onnx_backend import OnnxModel, import_onnxruntime
from .pooling import POOLINGS as POOLED
from .pooling import pool
from .st_folder import read_st_folder
from .truncation import capped

POOLINGS = (*POOLED, "none")
BACKENDS = ("torch", "onnx")
DEVICE_TYPES = ("cpu", "cuda")


def parse_device(device: str | torch.device, backend: str = "torch") -> torch.device:
    """`device` as a `torch.device`: the CPU or a CUDA device (`cuda`, `cuda:N`), the CPU alone for backend "onnx".

    >>> parse_device("cpu"), parse_device("cuda:1")
    (device(type='cpu'), device(type='cuda', index=1))
    """
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in DEVICE_TYPES:
        raise ArgumentValueError(f"unknown device {str(device)!r}: use cpu, cuda or cuda:N (N a CUDA device's index)")
    if backend == "onnx" and parsed.type != "cpu":
        raise ArgumentValueError(
            f"the onnx backend runs on the CPU, not on {parsed}: use --device cpu, or --backend torch"
        )
    return parsed


def check_device(device: str | torch.device, backend: str = "torch") -> torch.device:
    """`parse_device(device, backend)`, which must also be a device that this process's torch reaches.

    >>> check_device("cpu")
    device(type='cpu')
    """
    parsed = parse_device(device, backend)
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ArgumentValueError(
                f"device {str(parsed)!r} needs CUDA, which this torch does not reach (torch.cuda.is_available() "
                "is false): use --device cpu, or a torch built for CUDA on a machine with a GPU"
            )
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise ArgumentValueError(
                f"there is no device {str(parsed)!r}: this machine has {count} CUDA device{'s' * (count != 1)}, "
                f"cuda:0 to cuda:{count - 1}"
            )
    return parsed


def embedding_type(hidden_size: int, pooling: str) -> pa.DataType:
    """The Arrow type of an embedding: a fixed-size list of floats, or a list of them per token."""
    vector = pa.list_(pa.float32(), hidden_size)
    return pa.list_(vector) if pooling == "none" else vector


class Embedder:
    """Embeds the `text` column of Arrow tables with `model` (fused by `fusion`, if any), under inference mode.

    `rows_info`, info with one row per corpus row, is handed to the fusion batch by batch, by the `row` column.
    `onnx`, the fused model exported to ONNX Runtime, runs the forwards instead of `model` where given.
    The forwards run on the model's device; the embeddings come back on the CPU.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        fusion: Fusion | None = None,
        *,
        onnx: OnnxModel | None = None,
        rows_info: torch.Tensor | None = None,
        pooling: str = "mean",
        normalize: bool = False,
        max_length: int | None = None,
        batch_size: int = 32,
        bucket: bool = True,
    ) -> None:
        if pooling not in POOLINGS:
            raise ArgumentValueError(f"unknown pooling {pooling!r}: use one of {', '.join(POOLINGS)}")
        if normalize and pooling == "none":
            raise ArgumentValueError("normalize L2-normalises a pooled embedding: pooling 'none' makes none")
        positive_int("batch size", batch_size)
        limits = (tokenizer.model_max_length, getattr(model.config, "max_position_embeddings", None))
        limit = min(value for value in limits if value)
        shortest = tokenizer.num_special_tokens_to_add() + 1
        if max_length is not None and not shortest <= max_length <= limit:
            raise ArgumentValueError(
                f"max length must be from {shortest} to this model's {limit} tokens, got {max_length}"
            )
        self.model, self.tokenizer, self.fusion, self.onnx = model, tokenizer, fusion, onnx
        self.pooling, self.normalize, self.batch_size, self.bucket = pooling, normalize, batch_size, bucket
        self.max_length = limit if max_length is None else max_length
        self.hidden_size: int = model.config.hidden_size
        self.device = model.device
        self.rows_info = None if rows_info is None else rows_info.to(self.device)

    @classmethod
    def load(
        cls,
        model: str | os.PathLike[str] | None = None,
        fusion: FusionConfig | None = None,
        info: torch.Tensor | None = None,
        saved: str | os.PathLike[str] | None = None,
        *,
        pooling: str | None = None,
        normalize: bool | None = None,
        max_length: int | None = None,
        backend: str = "torch",
        device: str | torch.device = "cpu",
        **options: object,
    ) -> Embedder:
        """Load `model` (None: the embedded MiniLM BERT) on `device`, fuse it as `fusion` says, embed with `options`.

        `fusion` and `info` are a run's, as `run_fusion` checks them; `saved` a saved fusion's folder.
        `pooling`, `normalize` and `max_length` not given are a sentence-transformers folder's own, else
        "mean", no normalisation and the model's limit; a folder's normalisation is of its pooled
        embedding, so pooling "none" drops it. `backend` "onnx" runs the forwards in ONNX Runtime, on the
        model exported with its fusion (`OnnxModel`), which takes no info per corpus row, on the CPU.
        `device` is checked by `check_device`.
        """
        if backend not in BACKENDS:
            raise ArgumentValueError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
        device = check_device(device, backend)
        rows_info = row_info(fusion, info)
        if backend == "onnx":
            if rows_info is not None:
                raise ArgumentValueError(
                    f"the onnx backend exports the fusion once, its info a constant of the graph, and this info has "
                    f"a row per corpus row {tuple(rows_info.shape)}: give one info for every row, or use --backend torch"
                )
            import_onnxruntime()
        folder = read_st_folder(embedded_model_path() if model is None else model)
        network, tokenizer = load_model(model if folder is None else folder.transformer)
        network.to(device)
        if folder is not None:
            pooling = folder.pooling if pooling is None else pooling
            normalize = folder.normalize and pooling != "none" if normalize is None else normalize
            max_length = folder.max_length if max_length is None else max_length
        pooling = "mean" if pooling is None else pooling
        settings = {"pooling": pooling, "normalize": bool(normalize), "max_length": max_length, **options}
        if backend == "onnx":
            onnx = OnnxModel(network, tokenizer, fusion, info, saved)
            return cls(network, tokenizer, onnx=onnx, **settings)
        attached = None if fusion is None else attach(network, fusion, info, saved)
        try:
            return cls(network, tokenizer, attached, rows_info=rows_info, **settings)
        except BaseException:
            if attached is not None:
                attached.remove()
            raise

    def __call__(self, table: pa.Table, progress: Callable[[int], None] | None = None) -> pa.Table:
        """`table` with `embedding`, `truncated` and `finite` columns added; `progress(n)` after each batch."""
        texts = [capped(self.tokenizer, text, self.max_length) for text in table.column("text").to_pylist()]
        rows = torch.tensor(table.column("row").to_pylist(), dtype=torch.long)
        tokens = self.tokenizer(texts, verbose=False, return_attention_mask=False)["input_ids"] if texts else []
        lengths = numpy.array([len(ids) for ids in tokens], dtype=numpy.int64)
        order = numpy.argsort(lengths, kind="stable") if self.bucket else numpy.arange(len(texts))
        states: list[numpy.ndarray] = [numpy.empty((0, self.hidden_size), numpy.float32)] * len(texts)
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                for index, state in zip(batch, self._forward([texts[i] for i in batch], rows[batch])):
                    states[index] = state
                if progress is not None:
                    progress(len(batch))
        values = numpy.concatenate([numpy.empty((0, self.hidden_size), numpy.float32), *states])
        vectors = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), self.hidden_size)
        if self.pooling == "none":
            offsets = numpy.cumsum([0] + [len(state) for state in states], dtype=numpy.int32)
            vectors = pa.ListArray.from_arrays(pa.array(offsets), vectors)
        finite = [bool(numpy.isfinite(state).all()) for state in states]
        return (
            table.append_column("embedding", vectors)
            .append_column("truncated", pa.array(lengths > self.max_length, pa.bool_()))
            .append_column("finite", pa.array(finite, pa.bool_()))
        )

    def _forward(self, texts: list[str], rows: torch.Tensor) -> list[numpy.ndarray]:
        """One padded batch: each text's pooled state (1, H), or its real tokens' states (T, H)."""
        inputs = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        if self.rows_info is not None:
            self.fusion.set_info(self.rows_info[rows.to(self.device)])
        if self.onnx is None:
            hidden = self.model(**inputs.to(self.device)).last_hidden_state.float()
        else:
            hidden = self.onnx(inputs).float()
        mask = inputs["attention_mask"]
        if self.pooling == "none":
            hidden, mask = hidden.cpu(), mask.cpu()
            return [state[real.bool()].numpy() for state, real in zip(hidden, mask)]
        pooled = pool(self.pooling, hidden, mask)
        if self.normalize:
            pooled = F.normalize(pooled, p=2, dim=-1)
        return list(pooled[:, None].cpu().numpy())

    def close(self) -> None:
        """Remove the fusion from the model."""
        if self.fusion is not None:
            self.fusion.remove()

    def __enter__(self) -> Embedder:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()
