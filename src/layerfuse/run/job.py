"""`embed_corpus`: check a run's arguments before any work, then hand the job to the local or the Ray engine.

>>> import pathlib, tempfile, torch, pyarrow.parquet as pq
>>> from layerfuse import FusionConfig
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> _ = (folder / "texts.txt").write_text("a first text\\n\\na third text\\n")
>>> fusion = FusionConfig(layer=3, method="addition")
>>> summary = embed_corpus(folder / "texts.txt", folder / "out.parquet", fusion=fusion, info=torch.ones(384))
>>> summary.written, summary.rejected
(2, {'empty text': 1})
>>> pq.read_table(folder / "out.parquet")["row"].to_pylist()
[0, 2]
"""

from __future__ import annotations

import importlib.util
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from ..config import FusionConfig
from ..errors import ArgumentValueError, positive_int
from ..paths import check_writable
from .embedding import Embedder, check_device, embedding_type, parse_device
from .formats import check_output_format
from .fusion import describe, file_digest, model_digest, row_info, run_fusion
from .inputs import Inputs, Spec
from .local import run_local
from .ray_engine import RayJob, run_on_ray
from .shards import finished_shards
from .summary import RunSummary
from .tables import output_schema

ENGINES = ("local", "ray")


@dataclass(frozen=True)
class Job:
    """A checked run: the corpus and its row count, where to write, and how the local engine embeds."""

    inputs: Inputs
    rows: int
    output: Path
    rejects: Path
    schema: pa.Schema
    shard_size: int
    embedder: dict[str, Any]
    model_sha256: str

    @property
    def partial(self) -> Path:
        """The folder that holds the output while the job runs."""
        return partial_folder(self.output)

    def settings(self) -> dict[str, Any]:
        """Everything that decides the output, as JSON: a run resumes only under the same settings."""
        embedder = {key: value for key, value in self.embedder.items() if key not in ("fusion", "info", "saved")}
        paths = [Path(name) for name in self.inputs.names]
        one = not self.inputs.many
        return {
            "input": str(paths[0].resolve()) if one else [str(path.resolve()) for path in paths],
            "input_sha256": file_digest(paths[0]) if one else [file_digest(path) for path in paths],
            "text_column": self.inputs.text_column or "text",
            "id_column": self.inputs.id_column,
            "schema": self.schema.to_string(),
            "shard_size": self.shard_size,
            **embedder,
            "model": None if self.embedder["model"] is None else str(self.embedder["model"]),
            "model_sha256": self.model_sha256,
            "fusion": describe(self.embedder["fusion"], self.embedder["info"], self.embedder["saved"]),
        }

    def summary(self, shards: Iterable[dict[str, Any]], *, resumed: int, seconds: float) -> RunSummary:
        """The summary of the job from its shards' counts: `written`, `truncated` and `rejected` by reason."""
        shards = list(shards)
        rejected: Counter[str] = Counter()
        for shard in shards:
            rejected.update(shard["rejected"])
        return RunSummary(
            self.output,
            self.rejects,
            rows=self.rows,
            written=sum(shard["written"] for shard in shards),
            truncated=sum(shard["truncated"] for shard in shards),
            max_length=self.embedder["max_length"],
            pooling=self.embedder["pooling"],
            normalize=self.embedder["normalize"],
            rejected=dict(rejected),
            resumed=resumed,
            seconds=seconds,
        )


def partial_folder(output: Path) -> Path:
    """Where the output of a job is made, beside it: `OUT.partial`."""
    return output.with_name(output.name + ".partial")


def _check_paths(
    inputs: Inputs, output: Path, rejects: Path, partial: Path, *, overwrite: bool, resume: bool, folder: bool
) -> None:
    """Refuse paths that are one another, or that the job could not write: all before any work.

    `folder`: the output is a folder (the Ray engine's), not a file.
    """
    named = [("the input", Path(name)) for name in inputs.names if not inputs.remote]
    named += [("the output", output), ("the rejects file", rejects), ("the partial folder", partial)]
    seen: dict[Path, str] = {}
    for what, path in named:
        where = path.resolve()
        if where in seen:
            raise ArgumentValueError(
                f"{seen[where]} and {what} are both {path}: give each its own path (--output, --rejects)"
            )
        seen[where] = what
    check_writable(output, "the output", folder=folder)
    check_writable(rejects, "the rejects file")
    check_writable(partial, "the partial folder", folder=True)
    # Resuming a run killed while it wrote its results: they are that run's, made again from its shards.
    finishing = resume and partial.is_dir()
    for path in (output, rejects):
        if path.exists() and not (overwrite or finishing):
            raise ArgumentValueError(f"{path} exists: pass --overwrite to replace it")
    finished = finished_shards(partial) if partial.is_dir() else 0
    if finished != 0 and not (resume or overwrite):
        done = "" if finished is None else f" ({finished} shard{'s' * (finished != 1)} done)"
        raise ArgumentValueError(
            f"{partial} holds an interrupted run{done}: carry on with --resume and the same options, "
            "or start over with --overwrite"
        )


def _check_run_device(device: str | torch.device, backend: str, engine: str, ray_address: str | None) -> torch.device:
    """The run's device, checked: this machine's, or each Ray actor's.

    Ray gives each actor a GPU of its own, so it takes "cuda" without an index. A Ray started for the
    job runs on this machine, whose torch must reach CUDA; on a cluster (`ray_address`) the GPUs are
    the cluster's, which `run_on_ray` checks once connected.
    """
    checked = parse_device(device, backend)
    if engine == "ray" and checked.type == "cuda" and checked.index is not None:
        raise ArgumentValueError(
            f"the ray engine assigns each actor a GPU of its own, which the actor sees as cuda: "
            f"give --device cuda, not {checked}"
        )
    if engine == "local" or ray_address is None:
        check_device(checked, backend)
    return checked


def embed_corpus(
    input: Spec | list[Spec],
    output: str | os.PathLike[str],
    *,
    model: str | os.PathLike[str] | None = None,
    fusion: FusionConfig | None = None,
    info: torch.Tensor | None = None,
    saved: str | os.PathLike[str] | None = None,
    text_column: str | None = None,
    id_column: str | None = None,
    include_text: bool = False,
    pooling: str | None = None,
    normalize: bool | None = None,
    max_length: int | None = None,
    batch_size: int = 32,
    shard_size: int = 4096,
    rejects: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = False,
    bucket: bool = True,
    backend: str = "torch",
    device: str | torch.device = "cpu",
    engine: str = "local",
    ray_address: str | None = None,
    workers: int | None = None,
) -> RunSummary:
    """Embed every text of `input` with `model` fused by `fusion` with `info` (neither: the plain model) into `output`.

    `saved` names a saved fusion's folder, which supplies the config, info and parameters not given.

    `input` is a .txt (one text a line), .jsonl, .csv or .parquet file, with `text_column` (default
    "text") and `id_column`; or several of one format: a folder, a glob or a list (`Inputs`), whose
    rows are named by `file` and `row`. The `output` name says its format: .parquet (columns `row`, `id`, `text`
    if `include_text`, `embedding`), .npy or .safetensors; with `engine="ray"`, a folder of Parquet
    files (see `ray_engine`). Bad rows are skipped and listed in `rejects` (default: the output's name
    with .rejects.jsonl). `pooling`, `normalize` and `max_length` default to a sentence-transformers
    folder's own (so the embeddings are its `encode`'s), else to mean pooling, none and the model's
    limit. `backend` "onnx" runs the forwards in ONNX Runtime, on the model exported once with its
    fusion. Both engines write shards of `shard_size` rows as they go; `resume` carries on an
    interrupted run. `device` ("cpu", "cuda", "cuda:N") is where the torch backend's forwards run;
    the Ray engine puts each actor on a GPU of its own for "cuda" (`ray_engine`).
    Bad arguments raise a `LayerfuseError` before any work.
    """
    if engine not in ENGINES:
        raise ArgumentValueError(f"unknown engine {engine!r}: use one of {', '.join(ENGINES)}")
    device = str(_check_run_device(device, backend, engine, ray_address))
    positive_int("shard size", shard_size)
    inputs = Inputs(input, text_column=text_column, id_column=id_column, check="first" if engine == "ray" else "all")
    output = Path(output)
    if engine == "ray":
        if output.suffix not in ("", ".parquet"):
            raise ArgumentValueError(f"the ray engine writes a folder of Parquet files, not {output.suffix}")
        if importlib.util.find_spec("ray") is None:
            raise ArgumentValueError("the ray engine needs Ray: pip install 'layerfuse[ray]'")
    else:
        check_output_format(output, pooling)
        if ray_address is not None or workers is not None:
            raise ArgumentValueError("a Ray address and workers are for the ray engine (--engine ray)")
        if inputs.remote:
            raise ArgumentValueError("the local engine reads local files: run remote ones with --engine ray")
    rejects = Path(rejects) if rejects is not None else output.with_suffix(".rejects.jsonl")
    _check_paths(
        inputs, output, rejects, partial_folder(output), overwrite=overwrite, resume=resume, folder=engine == "ray"
    )
    fusion, info = run_fusion(fusion, info, saved)
    per_row = row_info(fusion, info)
    if per_row is not None and inputs.many:
        raise ArgumentValueError(
            "info with one row per corpus row is numbered by the rows of one file: "
            "give one input file, or one info for every row"
        )
    settings: dict[str, Any] = {
        "model": model,
        "fusion": fusion,
        "info": info,
        "saved": saved,
        "pooling": pooling,
        "normalize": normalize,
        "max_length": max_length,
        "batch_size": batch_size,
        "bucket": bucket,
        "backend": backend,
        "device": device,
    }
    rows = inputs.count() if engine == "local" or per_row is not None else None
    if per_row is not None and len(per_row) != rows:
        raise ArgumentValueError(
            f"the info has {len(per_row)} rows but {Path(inputs.names[0]).name} has {rows}: give one info row "
            "per corpus row, bad rows included, or one info for every row"
        )
    if engine == "ray":
        ray_job = RayJob(inputs, output, rejects, shard_size=shard_size, include_text=include_text, embedder=settings)
        return run_on_ray(ray_job, address=ray_address, workers=workers, resume=resume, progress=progress)
    with Embedder.load(**settings) as embedder:
        schema = output_schema(
            embedding_type(embedder.hidden_size, embedder.pooling), inputs.id_type, include_text, file=inputs.many
        )
        job = Job(
            inputs,
            rows,
            output,
            rejects,
            schema=schema,
            shard_size=shard_size,
            embedder=settings
            | {"pooling": embedder.pooling, "normalize": embedder.normalize, "max_length": embedder.max_length},
            model_sha256=model_digest(embedder.model),
        )
        return run_local(job, embedder, resume=resume, progress=progress)
