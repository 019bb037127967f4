"""`sweep_report`: what `layerfuse sweep` runs and prints — a sweep over a padded batch of texts, timed, with each info's effect.

>>> import torch
>>> report, outputs = sweep_report(None, torch.randn(2, 384), layer=3, texts=["one text", "and another"])
>>> report.output_shape[0], len(report.changes), outputs.shape[0]
(2, 2, 2)
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy
import torch
from safetensors.torch import save_file

from ..config import FusionConfig
from ..errors import FileFormatError
from ..models import DEFAULT_TEXTS, model_label
from ..outputs import split_output
from ..paths import check_writable
from ..sweep import chunk_size_for, sweep
from .compare import fused_batch


@dataclass(frozen=True)
class SweepReport:
    """What `sweep_report` ran, how long it took and how much each info changed the output."""

    model: str
    layer: int
    method: str
    batch_shape: tuple[int, int]
    output_shape: tuple[int, ...]
    chunk_size: int
    seconds: float
    changes: list[float]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields; `changes` is the largest |fused - plain| on real tokens, per info."""
        return asdict(self)

    def table(self) -> str:
        """A short human-readable report."""
        batch, tokens = self.batch_shape
        count = self.output_shape[0]
        lines = [
            f"model   {self.model}",
            f"sweep   {count} infos, {self.method} at layer {self.layer}, padded batch of {batch} x {tokens} tokens",
            f"output  {tuple(self.output_shape)} in {self.seconds:.2f} s, {self.chunk_size} infos per pass",
            "",
            f"{'info':>5}  largest change of the output (real tokens)",
        ]
        lines += [f"{index:>5}  {change:.4g}" for index, change in enumerate(self.changes)]
        return "\n".join(lines)


def sweep_report(
    model: str | os.PathLike[str] | None,
    infos: torch.Tensor | Sequence[torch.Tensor],
    config: FusionConfig | None = None,
    *,
    texts: Sequence[str] = DEFAULT_TEXTS,
    chunk_size: int | None = None,
    **fields: Any,
) -> tuple[SweepReport, torch.Tensor]:
    """Sweep `infos` over a padded batch of `texts` with `model` (default: the embedded MiniLM BERT).

    The fusion is `config`, or its fields as keywords, as `compare` takes it (`layer` defaults to
    the middle block). Returns the report and the outputs (K, B, T, H).
    """
    network, config, layer, batch = fused_batch(model, config, texts, fields)
    start = time.perf_counter()
    outputs = sweep(network, batch, infos, config, chunk_size=chunk_size)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        plain, _ = split_output(network(**batch))
    real = batch["attention_mask"].bool()
    changes = (outputs - plain)[:, real].abs().flatten(1).amax(dim=1)
    shape = tuple(batch["input_ids"].shape)
    report = SweepReport(
        model=model_label(model),
        layer=layer,
        method=config.method,
        batch_shape=shape,
        output_shape=tuple(outputs.shape),
        chunk_size=chunk_size_for(network, chunk_size, len(outputs), shape[0] * shape[1]),
        seconds=seconds,
        changes=changes.tolist(),
    )
    return report, outputs


OUTPUT_FORMATS = (".pt", ".npy", ".safetensors")


def check_outputs_path(path: str | os.PathLike[str]) -> None:
    """Refuse a path that `write_outputs` could not write to, before the sweep runs."""
    path = Path(path)
    if path.suffix not in OUTPUT_FORMATS:
        raise FileFormatError(f"cannot write outputs to {path.name}: use a {', '.join(OUTPUT_FORMATS)} file")
    check_writable(path, "the outputs")


def write_outputs(path: str | os.PathLike[str], outputs: torch.Tensor) -> Path:
    """Write a sweep's outputs to a `.pt`, `.npy` or `.safetensors` file (as the tensor named "outputs")."""
    path = Path(path)
    check_outputs_path(path)
    tensor = outputs.detach().cpu().contiguous()
    writers = {
        ".pt": lambda: torch.save(tensor, path),
        ".npy": lambda: numpy.save(path, (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()),
        ".safetensors": lambda: save_file({"outputs": tensor}, path),
    }
    writers[path.suffix]()
    return path
