"""The Ray engine: the same job on Ray Data, for corpora that one machine embeds too slowly.

The driver reads and checks the corpus shard by shard, as the local engine does, and puts each
shard's good rows in Ray's object store as one block. `map_batches` hands whole blocks to a pool of
actors that load the model and attach the fusion once each, so every actor makes the local engine's
batches; the finite rows are written as a folder of Parquet files, in corpus order, moved into place
when complete. Ray runs locally for the job (one CPU per worker), or on the cluster at `address`.
Ray is an optional dependency: `pip install 'layerfuse[ray]'`.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from transformers.utils import logging as transformers_logging

from .embedding import Embedder
from .shards import atomic_write, rejects_jsonl
from .summary import RunSummary
from .tables import corpus_shards, nonfinite_rejects, output_rows

if TYPE_CHECKING:
    from .job import Job


class EmbedWorker:
    """A Ray actor: loads the model and attaches the fusion once, then embeds each block it is given."""

    def __init__(self, settings: dict[str, Any]) -> None:
        transformers_logging.disable_progress_bar()
        self.embedder = Embedder.load(**settings)

    def __call__(self, table: pa.Table) -> pa.Table:
        return self.embedder(table)


def _replace(folder: Path, output: Path) -> None:
    if output.is_dir():
        shutil.rmtree(output)
    elif output.exists():
        output.unlink()
    folder.rename(output)


def run_on_ray(
    job: Job, *, address: str | None = None, workers: int | None = None, progress: bool = False
) -> RunSummary:
    """Run `job` on the Ray cluster this process is connected to, or else on `address` or a local Ray."""
    import ray

    start = time.perf_counter()
    started = not ray.is_initialized()
    if started:
        local_cpus = workers if address is None else None
        ray.init(address=address, num_cpus=local_cpus, include_dashboard=False, logging_level="WARNING")
    try:
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        context.enable_progress_bars = progress
        logging.getLogger("ray.data").setLevel(logging.INFO if progress else logging.WARNING)
        workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        blocks, rejects, flags = [], [], []
        for shard in corpus_shards(job.corpus, job.shard_size):
            rejects += shard.rejects
            if shard.table.num_rows:
                blocks.append(ray.put(shard.table))
        folder = job.partial
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        if blocks:
            embedded = (
                ray.data.from_arrow_refs(blocks)
                .map_batches(
                    EmbedWorker,
                    fn_constructor_kwargs={"settings": job.embedder},
                    batch_size=None,
                    batch_format="pyarrow",
                    compute=ray.data.ActorPoolStrategy(size=min(workers, len(blocks))),
                    num_cpus=1,
                )
                .materialize()
            )
            flags = ray.get(embedded.select_columns(["row", "truncated", "finite"]).to_arrow_refs())
            rejects = sorted(rejects + [reject for table in flags for reject in nonfinite_rejects(table)])
            written = embedded.map_batches(
                output_rows, fn_kwargs={"schema": job.schema}, batch_size=None, batch_format="pyarrow"
            )
            written.write_parquet(str(folder))
        if not any(folder.glob("*.parquet")):
            pq.write_table(job.schema.empty_table(), folder / "empty.parquet")
    finally:
        if started:
            ray.shutdown()
    atomic_write(job.rejects, lambda path: path.write_text(rejects_jsonl(rejects)))
    _replace(folder, job.output)
    counts = {
        "written": job.rows - len(rejects),
        "truncated": sum(pc.sum(table.column("truncated")).as_py() or 0 for table in flags),
        "rejected": Counter(reject.reason for reject in rejects),
    }
    return job.summary([counts], resumed=0, seconds=time.perf_counter() - start)
