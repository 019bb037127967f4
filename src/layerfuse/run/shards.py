"""`ShardStore`: a job's output while it runs, shard by shard, each file replaced by an atomic rename.

The folder holds, for each finished shard, its rows (`shard-000000.parquet`) and its rejects
(`shard-000000.rejects.jsonl`), and `manifest.json`: the job's settings and one entry per shard. A
shard counts once its entry is in the manifest, which is rewritten after the shard's files; so a
job killed at any moment leaves only whole shards listed, and resuming carries on after the last.

>>> import pathlib, tempfile, pyarrow as pa
>>> from layerfuse.run.corpus import Reject
>>> store = ShardStore(pathlib.Path(tempfile.mkdtemp()) / "out.partial", {"batch_size": 32})
>>> store.add(0, pa.table({"row": [0, 2]}), [Reject(1, "empty text")], rows=3, truncated=0)
>>> ShardStore(store.folder, {"batch_size": 32}, resume=True).next_row
3
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import ArgumentValueError
from .corpus import Reject

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def atomic_write(path: Path, write: Callable[[Path], object]) -> Path:
    """Make `path` by `write(temporary)` beside it, then a rename: `path` is never seen half-written."""
    temporary = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        write(temporary)
        with temporary.open("rb+") as file:
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def rejects_jsonl(rejects: list[Reject]) -> str:
    """Rejects as JSON lines: row, reason, detail."""
    return "".join(json.dumps(reject._asdict()) + "\n" for reject in rejects)


class ShardStore:
    """The shards of the job described by `job` (JSON-ready settings) in `folder`.

    With `resume`, the shards already in `folder` are kept if they were made with the same settings;
    otherwise the folder starts empty.
    """

    def __init__(self, folder: Path, job: dict[str, Any], *, resume: bool = False) -> None:
        self.folder, self.job = folder, job
        self.shards: list[dict[str, Any]] = []
        manifest = folder / MANIFEST
        if resume and manifest.is_file():
            saved = json.loads(manifest.read_text())
            changed = sorted(key for key in job.keys() | saved["job"].keys() if job.get(key) != saved["job"].get(key))
            if saved.get("format_version") != FORMAT_VERSION or changed:
                raise ArgumentValueError(
                    f"cannot resume the run in {folder}: it was made with other settings "
                    f"({', '.join(changed) or 'format version'}): run it with the same ones, "
                    "or start over (--overwrite, without --resume)"
                )
            self.shards = saved["shards"]
        else:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            self._write_manifest()

    @property
    def next_row(self) -> int:
        """The first corpus row that no shard in the store covers."""
        return sum(shard["rows"] for shard in self.shards)

    def _write_manifest(self) -> None:
        text = json.dumps({"format_version": FORMAT_VERSION, "job": self.job, "shards": self.shards}, indent=1)
        atomic_write(self.folder / MANIFEST, lambda path: path.write_text(text))

    def add(self, index: int, table: pa.Table, rejects: list[Reject], *, rows: int, truncated: int) -> None:
        """Store shard `index`: the `table` to write, its `rejects`, the corpus `rows` it covers."""
        name = f"shard-{index:06d}"
        atomic_write(self.folder / f"{name}.parquet", lambda path: pq.write_table(table, path))
        atomic_write(self.folder / f"{name}.rejects.jsonl", lambda path: path.write_text(rejects_jsonl(rejects)))
        reasons: dict[str, int] = {}
        for reject in rejects:
            reasons[reject.reason] = reasons.get(reject.reason, 0) + 1
        self.shards.append(
            {"name": name, "rows": rows, "written": table.num_rows, "truncated": truncated, "rejected": reasons}
        )
        self._write_manifest()

    def tables(self) -> Iterator[pa.Table]:
        """The shards' tables, in order."""
        for shard in self.shards:
            yield pq.ParquetFile(self.folder / f"{shard['name']}.parquet").read()

    def rejects(self) -> Iterator[str]:
        """The shards' rejects as JSON lines, in order."""
        for shard in self.shards:
            yield (self.folder / f"{shard['name']}.rejects.jsonl").read_text()

    def remove(self) -> None:
        """Delete the folder."""
        shutil.rmtree(self.folder)
