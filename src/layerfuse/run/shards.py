"""`ShardStore`: a job's output while it runs, shard by shard, each file replaced by an atomic rename.

The folder holds, for each finished shard, its rows (`shard-000000.parquet`) and its rejects
(`shard-000000.rejects.jsonl`), and `manifest.json`: the job's settings and one entry per shard,
with the SHA-256 of its two files, and the SHA-256 of all that. A shard counts once its entry is in the manifest, which is
rewritten after the shard's files; so a job killed at any moment leaves only whole shards listed,
and resuming carries on after the last. A manifest or shard that was damaged or changed since is
refused on resuming, and when the shards are read for the output.

>>> import pathlib, tempfile, pyarrow as pa
>>> from layerfuse.run.corpus import Reject
>>> store = ShardStore(pathlib.Path(tempfile.mkdtemp()) / "out.partial", {"batch_size": 32})
>>> store.add(0, pa.table({"row": [0, 2]}), [Reject(1, "empty text")], rows=3, truncated=0)
>>> ShardStore(store.folder, {"batch_size": 32}, resume=True).next_row
3
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import ArgumentValueError, FileFormatError
from .corpus import Reject

MANIFEST = "manifest.json"
FORMAT_VERSION = 3
SHARD_KEYS = {"name": str, "rows": int, "written": int, "truncated": int, "rejected": dict, "sha256": dict}


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


def manifest_digest(job: dict[str, Any], shards: list[dict[str, Any]]) -> str:
    """The SHA-256 of a manifest's settings and shard entries, as canonical JSON."""
    return hashlib.sha256(json.dumps({"job": job, "shards": shards}, sort_keys=True).encode()).hexdigest()


def finished_shards(folder: Path) -> int | None:
    """How many shards the partial folder `folder` lists as finished: 0 if it is empty, None if it cannot tell."""
    if not any(folder.iterdir()):
        return 0
    try:
        shards = json.loads((folder / MANIFEST).read_text()).get("shards")
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        return None
    return len(shards) if isinstance(shards, list) else None


def rejects_jsonl(rejects: list[Reject], file: str | None = None) -> str:
    """Rejects as JSON lines: row, reason, detail; led by the `file` they are from, if given."""
    named = {} if file is None else {"file": file}
    return "".join(json.dumps(named | reject._asdict()) + "\n" for reject in rejects)


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
            saved = self._saved(manifest)
            changed = sorted(key for key in job.keys() | saved["job"].keys() if job.get(key) != saved["job"].get(key))
            if changed:
                raise ArgumentValueError(
                    f"cannot resume the run in {folder}: it was made with other settings "
                    f"({', '.join(changed)}): run it with the same ones, "
                    "or start over (--overwrite, without --resume)"
                )
            self.shards = saved["shards"]
            for shard in self.shards:
                self._read(shard, "parquet")
                self._read(shard, "rejects.jsonl")
        else:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            self._write_manifest()

    def _damaged(self, what: str) -> FileFormatError:
        return FileFormatError(
            f"cannot resume the run in {self.folder}: {what}; start over with --overwrite (without --resume)"
        )

    def _saved(self, manifest: Path) -> dict[str, Any]:
        """The manifest, after checking its form: this store's format, and shard entries 0, 1, ... in order."""
        try:
            saved = json.loads(manifest.read_text())
        except (ValueError, UnicodeDecodeError) as error:
            raise self._damaged(f"its {MANIFEST} is not valid JSON ({error})") from error
        if not isinstance(saved, dict) or saved.get("format_version") != FORMAT_VERSION:
            found = saved.get("format_version") if isinstance(saved, dict) else None
            raise self._damaged(f"its {MANIFEST} has format version {found!r}, not {FORMAT_VERSION}")
        shards = saved.get("shards")
        if not isinstance(saved.get("job"), dict) or not isinstance(shards, list):
            raise self._damaged(f"its {MANIFEST} lacks the job's settings or the list of shards")
        for index, shard in enumerate(shards):
            good = isinstance(shard, dict) and all(
                type(shard.get(key)) is kind and (kind is not int or shard[key] >= 0)
                for key, kind in SHARD_KEYS.items()
            )
            if not good or shard["name"] != f"shard-{index:06d}":
                raise self._damaged(f"entry {index} of its {MANIFEST} is not the entry of shard {index}")
        if saved.get("sha256") != manifest_digest(saved["job"], shards):
            raise self._damaged(f"its {MANIFEST} is not the one the run wrote (its SHA-256 differs)")
        return saved

    def _read(self, shard: dict[str, Any], suffix: str) -> bytes:
        """The bytes of one of `shard`'s files, after checking them against the manifest's digest."""
        path = self.folder / f"{shard['name']}.{suffix}"
        try:
            data = path.read_bytes()
        except OSError as error:
            raise self._damaged(f"{path.name} cannot be read ({error.strerror})") from error
        if hashlib.sha256(data).hexdigest() != shard["sha256"].get(suffix):
            raise self._damaged(f"{path.name} is not the file the run wrote (its SHA-256 differs)")
        return data

    @property
    def next_row(self) -> int:
        """The first corpus row that no shard in the store covers."""
        return sum(shard["rows"] for shard in self.shards)

    def _write_manifest(self) -> None:
        manifest = {
            "format_version": FORMAT_VERSION,
            "job": self.job,
            "shards": self.shards,
            "sha256": manifest_digest(self.job, self.shards),
        }
        text = json.dumps(manifest, indent=1)
        atomic_write(self.folder / MANIFEST, lambda path: path.write_text(text))

    def add(
        self, index: int, table: pa.Table, rejects: list[Reject], *, rows: int, truncated: int, file: str | None = None
    ) -> None:
        """Store shard `index`: the `table` to write, its `rejects` (from `file`), the corpus `rows` it covers."""
        name = f"shard-{index:06d}"
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        files = {"parquet": sink.getvalue().to_pybytes(), "rejects.jsonl": rejects_jsonl(rejects, file).encode()}
        for suffix, data in files.items():
            atomic_write(self.folder / f"{name}.{suffix}", lambda path, data=data: path.write_bytes(data))
        reasons: dict[str, int] = {}
        for reject in rejects:
            reasons[reject.reason] = reasons.get(reject.reason, 0) + 1
        self.shards.append(
            {
                "name": name,
                "rows": rows,
                "written": table.num_rows,
                "truncated": truncated,
                "rejected": reasons,
                "sha256": {suffix: hashlib.sha256(data).hexdigest() for suffix, data in files.items()},
            }
        )
        self._write_manifest()

    def tables(self) -> Iterator[pa.Table]:
        """The shards' tables, in order."""
        for shard in self.shards:
            yield pq.read_table(pa.BufferReader(self._read(shard, "parquet")))

    def rejects(self) -> Iterator[str]:
        """The shards' rejects as JSON lines, in order."""
        for shard in self.shards:
            yield self._read(shard, "rejects.jsonl").decode()

    def remove(self) -> None:
        """Delete the folder."""
        shutil.rmtree(self.folder)
