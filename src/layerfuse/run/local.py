"""The local engine: embed a job shard by shard into its `ShardStore`, then write the output in one rename.

Killed at any moment, the job leaves the shards it finished; run again with `resume`, it starts at
the first missing shard and makes the same batches, so the output is the one an uninterrupted run
writes. The output and the rejects file appear only once every shard is done. A job that fails
before it finished a shard leaves no partial folder.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import pyarrow.compute as pc
from tqdm import tqdm

from .embedding import Embedder
from .formats import write_output
from .shards import ShardStore, atomic_write
from .summary import RunSummary
from .tables import nonfinite_rejects, output_rows

if TYPE_CHECKING:
    from .job import Job


def run_local(job: Job, embedder: Embedder, *, resume: bool = False, progress: bool = False) -> RunSummary:
    """Run `job` with `embedder` in this process; `progress` shows a bar (rows/s, ETA) on stderr."""
    start = time.perf_counter()
    store = ShardStore(job.partial, job.settings(), resume=resume)
    resumed = store.next_row
    try:
        with tqdm(total=job.rows, initial=resumed, unit="rows", disable=not progress, dynamic_ncols=True) as bar:
            for shard in job.inputs.shards(job.shard_size, skip=len(store.shards)):
                bar.update(len(shard.rejects))
                embedded = embedder(shard.table, progress=bar.update)
                store.add(
                    shard.index,
                    output_rows(embedded, job.schema),
                    sorted(shard.rejects + nonfinite_rejects(embedded)),
                    rows=shard.rows,
                    truncated=pc.sum(embedded.column("truncated")).as_py() or 0,
                    file=shard.file,
                )
    except BaseException:
        if not store.shards:  # nothing to resume: leave nothing behind
            store.remove()
        raise
    atomic_write(job.rejects, lambda path: path.write_text("".join(store.rejects())))
    write_output(job.output, store.tables(), job.schema, rows=sum(shard["written"] for shard in store.shards))
    store.remove()
    return job.summary(store.shards, resumed=resumed, seconds=time.perf_counter() - start)
