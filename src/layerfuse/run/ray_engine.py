"""The Ray engine: the job on Ray Data, streaming from the input files to a folder of Parquet files.

Ray Data's `read_binary_files` reads the input files in parallel (a file, a folder, a glob or a list,
on any filesystem pyarrow reaches); a task parses each file with the local engine's reader, so bad
rows get the same reasons, and cuts it into the local engine's shards; a pool of actors, each of which
loads the model and attaches the fusion once, embeds each shard as the local engine does and writes
it as a block of its own: `part-FFFFFF-SSSSSS.parquet` for shard S of input file F, its rejects and
its counts beside it, each file moved into place by an atomic rename. The driver holds no rows and
loads no model: it streams the blocks' counts; at the end it joins the rejects, writes
`_summary.json` and moves the folder into place. Ray runs locally for the job (one CPU per worker),
or on the cluster at `address`. With device "cuda" each actor asks Ray for a GPU besides its CPU;
Ray makes that GPU the only one the actor sees, its cuda:0. Ray is an optional dependency:
`pip install 'layerfuse[ray]'`.

A block is complete once its counts file (`part-FFFFFF-SSSSSS.json`) is in `OUT.partial/`, written
after the block's rows and rejects. Resuming skips the complete blocks and writes the others, which
are the blocks an uninterrupted run writes; a worker killed mid-block is restarted by Ray and the
block made again, its files replaced whole, so no row is written twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pa_fs
import pyarrow.parquet as pq
import torch
from tqdm import tqdm
from transformers.utils import logging as transformers_logging

from ..errors import ArgumentValueError, FileFormatError, LayerfuseError
from .corpus import Reject
from .embedding import Embedder, embedding_type
from .fusion import describe, model_digest
from .inputs import Inputs
from .shards import atomic_write, rejects_jsonl
from .summary import RunSummary
from .tables import Shard, corpus_shards, nonfinite_rejects, output_rows, output_schema

JOB = "_job.json"
SUMMARY = "_summary.json"
ACTORS_PER_PARSER = 8  # parsing a row costs little beside embedding it; each parsing process pays the imports


@dataclass(frozen=True)
class RayJob:
    """A checked run for the Ray engine: the input files, where to write, and how the actors embed."""

    inputs: Inputs
    output: Path
    rejects: Path
    shard_size: int
    include_text: bool
    embedder: dict[str, Any]

    @property
    def partial(self) -> Path:
        """The folder that holds the blocks while the job runs."""
        return self.output.with_name(self.output.name + ".partial")

    def settings(self) -> dict[str, Any]:
        """Everything that decides the output, as JSON; the files' contents and the weights are checked per block."""
        embedder = {key: value for key, value in self.embedder.items() if key not in ("fusion", "info", "saved")}
        return {
            **self.inputs.describe(),
            "include_text": self.include_text,
            "shard_size": self.shard_size,
            **embedder,
            "model": None if embedder["model"] is None else str(embedder["model"]),
            "fusion": describe(self.embedder["fusion"], self.embedder["info"], self.embedder["saved"]),
        }


def block_name(file: int, shard: int) -> str:
    """The name of shard `shard` of input file `file`: sorted by name, blocks are in input order."""
    return f"part-{file:06d}-{shard:06d}"


def _table_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def read_shards(
    batch: pa.Table, *, inputs: Inputs, numbers: dict[str, int], size: int, done: dict[str, str], folder: str
) -> Iterator[pa.Table]:
    """A Ray Data map: each input file's bytes to one row per shard not yet `done` (name -> the file's SHA-256).

    `numbers`: each file's index, by its path as `read_binary_files` reports it.
    """
    for data, path in zip(batch.column("bytes").to_pylist(), batch.column("path").to_pylist()):
        index = numbers[path]
        digest = hashlib.sha256(data).hexdigest()
        corpus = inputs.corpus(index, data)
        file = inputs.file(index)
        shards = corpus_shards(corpus, size, file=file)
        first = next(shards, None) or Shard(0, _empty(corpus, file), [], 0, file)  # an empty file: one empty block
        for shard in chain([first], shards):
            name = block_name(index, shard.index)
            if name in done:
                if done[name] != digest:
                    raise ArgumentValueError(
                        f"cannot resume the run in {folder}: {inputs.names[index]} changed since it began "
                        "(its SHA-256 differs): start over (--overwrite, without --resume)"
                    )
                continue
            yield pa.table(
                {
                    "name": [name],
                    "file": pa.array([file], pa.string()),
                    "rows": [shard.rows],
                    "table": [_table_bytes(shard.table)],
                    "rejects": [json.dumps([list(reject) for reject in shard.rejects])],
                    "input_sha256": [digest],
                }
            )


def _empty(corpus: Any, file: str | None) -> pa.Table:
    columns: dict[str, pa.Array] = {} if file is None else {"file": pa.array([], pa.string())}
    columns |= {"row": pa.array([], pa.int64()), "text": pa.array([], pa.string())}
    if corpus.id_type is not None:
        columns["id"] = pa.array([], corpus.id_type)
    return pa.table(columns)


def _ray_path(name: str) -> str:
    """A file's path as `read_binary_files` reports it."""
    return pa_fs.FileSystem.from_uri(name)[1] if "://" in name else os.path.abspath(name)


class WriteBlocks:
    """A Ray actor: loads the model and attaches the fusion once, then embeds and writes each shard it is given.

    `model_sha256`: the weights the blocks already done were made with (resuming), which this actor's must be.
    """

    def __init__(
        self,
        settings: dict[str, Any],
        folder: str,
        id_type: pa.DataType | None,
        include_text: bool,
        many: bool,
        model_sha256: str | None,
    ) -> None:
        transformers_logging.disable_progress_bar()
        self.embedder = Embedder.load(**settings)
        self.folder = Path(folder)
        embedding = embedding_type(self.embedder.hidden_size, self.embedder.pooling)
        self.schema = output_schema(embedding, id_type, include_text, file=many)
        self.model_sha256 = model_digest(self.embedder.model)
        self.changed = model_sha256 not in (None, self.model_sha256)

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.changed:
            raise ArgumentValueError(
                f"cannot resume the run in {self.folder}: it was made with other weights (their SHA-256 differs): "
                "start over (--overwrite, without --resume)"
            )
        for row in batch.to_pylist():
            self._write(row)
        return batch.select(["name", "rows"])

    def _write(self, block: dict[str, Any]) -> None:
        """Embed one shard and write its rows, its rejects, then its counts, each by an atomic rename."""
        embedded = self.embedder(pa.ipc.open_stream(block["table"]).read_all())
        rejects = sorted([Reject(*reject) for reject in json.loads(block["rejects"])] + nonfinite_rejects(embedded))
        table = output_rows(embedded, self.schema)
        counts = {
            "rows": block["rows"],
            "written": table.num_rows,
            "truncated": pc.sum(embedded.column("truncated")).as_py() or 0,
            "rejected": dict(Counter(reject.reason for reject in rejects)),
            "input_sha256": block["input_sha256"],
            "model_sha256": self.model_sha256,
            "pooling": self.embedder.pooling,
            "normalize": self.embedder.normalize,
            "max_length": self.embedder.max_length,
        }
        text = rejects_jsonl(rejects, block["file"])
        path = self.folder / block["name"]
        atomic_write(path.with_suffix(".parquet"), lambda temporary: pq.write_table(table, temporary))
        atomic_write(path.with_suffix(".rejects.jsonl"), lambda temporary: temporary.write_text(text))
        atomic_write(path.with_suffix(".json"), lambda temporary: temporary.write_text(json.dumps(counts)))


def _blocks_done(folder: Path) -> dict[str, dict[str, Any]]:
    """The complete blocks in `folder`, by name: their counts."""
    done = {}
    for path in sorted(folder.glob("part-*.json")):
        try:
            done[path.stem] = json.loads(path.read_text())
        except ValueError as error:
            raise FileFormatError(
                f"cannot resume the run in {folder}: {path.name} is not valid JSON ({error}); "
                "start over with --overwrite (without --resume)"
            ) from error
    return done


def _prepare(job: RayJob, resume: bool) -> dict[str, dict[str, Any]]:
    """The partial folder, made for `job`: its complete blocks when resuming the same job, else empty."""
    folder, settings = job.partial, job.settings()
    if resume and (folder / JOB).is_file():
        saved = json.loads((folder / JOB).read_text())
        changed = sorted(key for key in settings.keys() | saved.keys() if settings.get(key) != saved.get(key))
        if changed:
            raise ArgumentValueError(
                f"cannot resume the run in {folder}: it was made with other settings ({', '.join(changed)}): "
                "run it with the same ones, or start over (--overwrite, without --resume)"
            )
        return _blocks_done(folder)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    text = json.dumps(settings, indent=1)
    atomic_write(folder / JOB, lambda path: path.write_text(text))
    return {}


def _finish(job: RayJob, start: float, resumed: int) -> RunSummary:
    """Join the blocks' rejects, write the summary and move the folder into place."""
    folder = job.partial
    blocks = _blocks_done(folder)
    digests = {counts["model_sha256"] for counts in blocks.values()}
    if len(digests) > 1:
        raise FileFormatError(
            f"the blocks in {folder} were made with different weights: start over with --overwrite (without --resume)"
        )

    def join(path: Path) -> None:
        with path.open("wb") as out:
            for name in blocks:
                with (folder / f"{name}.rejects.jsonl").open("rb") as part:
                    shutil.copyfileobj(part, out)

    atomic_write(job.rejects, join)
    rejected: Counter[str] = Counter()
    for counts in blocks.values():
        rejected.update(counts["rejected"])
    first = next(iter(blocks.values()))
    summary = RunSummary(
        job.output,
        job.rejects,
        rows=sum(counts["rows"] for counts in blocks.values()),
        written=sum(counts["written"] for counts in blocks.values()),
        truncated=sum(counts["truncated"] for counts in blocks.values()),
        max_length=first["max_length"],
        pooling=first["pooling"],
        normalize=first["normalize"],
        rejected=dict(rejected),
        resumed=resumed,
        seconds=time.perf_counter() - start,
    )
    facts = {
        "rows": summary.rows,
        "written": summary.written,
        "truncated": summary.truncated,
        "rejected": summary.rejected,
        "blocks": len(blocks),
        "model_sha256": first["model_sha256"],
        "settings": job.settings(),
    }
    for name in blocks:  # each block stops counting as complete before its files go
        (folder / f"{name}.json").unlink()
        (folder / f"{name}.rejects.jsonl").unlink()
    (folder / JOB).unlink()
    text = json.dumps(facts, indent=1)
    atomic_write(folder / SUMMARY, lambda path: path.write_text(text))
    if job.output.is_dir():
        shutil.rmtree(job.output)
    elif job.output.exists():
        job.output.unlink()
    folder.rename(job.output)
    return summary


def run_on_ray(
    job: RayJob,
    *,
    address: str | None = None,
    workers: int | None = None,
    resume: bool = False,
    progress: bool = False,
) -> RunSummary:
    """Run `job` on the Ray cluster this process is connected to, or else on `address` or a local Ray."""
    import ray

    start = time.perf_counter()
    context = ray.data.DataContext.get_current()
    was = {"enable_progress_bars": context.enable_progress_bars, "target_max_block_size": context.target_max_block_size}
    done = _prepare(job, resume)
    resumed = sum(counts["rows"] for counts in done.values())
    model_sha256 = next((counts["model_sha256"] for counts in done.values()), None)
    started = not ray.is_initialized()
    try:
        if started:
            local_cpus = workers if address is None else None
            ray.init(address=address, num_cpus=local_cpus, include_dashboard=False, logging_level="WARNING")
        context.enable_progress_bars = False
        context.target_max_block_size = 1  # one shard a block, so that one file's shards go to every actor
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        resources = ray.cluster_resources()
        gpu = torch.device(job.embedder["device"]).type == "cuda"
        if gpu and not resources.get("GPU"):
            raise ArgumentValueError(
                "--device cuda puts each Ray actor on a GPU, and the Ray cluster has none: "
                "run on a cluster with GPUs, or use --device cpu"
            )
        workers = workers or max(1, int(resources.get("GPU" if gpu else "CPU", 1)))
        parsers = max(1, workers // ACTORS_PER_PARSER)
        inputs = job.inputs
        paths = [_ray_path(name) for name in inputs.names]
        filesystem = pa_fs.FileSystem.from_uri(inputs.names[0])[0] if inputs.remote else None
        blocks = (
            ray.data.read_binary_files(
                paths, filesystem=filesystem, include_paths=True, num_cpus=0, concurrency=parsers
            )
            .map_batches(
                read_shards,
                fn_kwargs={
                    "inputs": inputs,
                    "numbers": {path: index for index, path in enumerate(paths)},
                    "size": job.shard_size,
                    "done": {name: counts["input_sha256"] for name, counts in done.items()},
                    "folder": str(job.partial),
                },
                batch_size=1,
                batch_format="pyarrow",
                num_cpus=0,  # the actors hold the CPUs: beside them, a parsing task per ACTORS_PER_PARSER actors
                compute=ray.data.TaskPoolStrategy(size=parsers),
            )
            .map_batches(
                WriteBlocks,
                fn_constructor_kwargs={
                    "settings": job.embedder,
                    "folder": str(job.partial),
                    "id_type": inputs.id_type,
                    "include_text": job.include_text,
                    "many": inputs.many,
                    "model_sha256": model_sha256,
                },
                batch_size=1,
                batch_format="pyarrow",
                # one block at a time: a block queued behind another at one actor would leave the others idle
                compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1),
                num_cpus=1,
                num_gpus=1 if gpu else None,
            )
        )
        with tqdm(unit="rows", initial=resumed, disable=not progress, dynamic_ncols=True) as bar:
            for batch in blocks.iter_batches(batch_size=None, batch_format="pyarrow"):
                bar.update(pc.sum(batch.column("rows")).as_py() or 0)
    except BaseException as error:
        if not any(job.partial.glob("part-*.json")):  # nothing to resume: leave nothing behind
            shutil.rmtree(job.partial, ignore_errors=True)
        cause = getattr(error, "cause", None)  # a worker's error, as Ray hands it on
        if isinstance(error, ray.exceptions.RayTaskError) and isinstance(cause, LayerfuseError):
            raise cause from None
        raise
    finally:
        for name, value in was.items():  # the caller's Ray Data settings, as they were
            setattr(context, name, value)
        if started and ray.is_initialized():
            ray.shutdown()
    return _finish(job, start, resumed)
