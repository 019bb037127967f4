"""The Arrow tables of a run: a corpus cut into shards of good rows, and the rows that go to the output.

A shard is the corpus rows `[k * size, (k + 1) * size)` of one file; its good rows form a table of
`row`, `text` and `id` (with an id column), led by `file` in a corpus of several files, its bad rows a
list of rejects. Both engines embed whole shards, so they
make the same batches and the same numbers.

>>> import pathlib, tempfile
>>> from layerfuse.run.corpus import Corpus
>>> path = pathlib.Path(tempfile.mkdtemp()) / "texts.txt"
>>> _ = path.write_text("one\\n\\nthree\\nfour\\n")
>>> for shard in corpus_shards(Corpus(path), size=2):
...     shard.index, shard.table["text"].to_pylist(), [reject.row for reject in shard.rejects]
(0, ['one'], [1])
(1, ['three', 'four'], [])
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import groupby
from typing import NamedTuple

import pyarrow as pa
import pyarrow.compute as pc

from .corpus import Corpus, Reject, Text

NONFINITE = "non-finite output"


class Shard(NamedTuple):
    """Shard `index`: the table of its good rows, its bad rows, how many corpus rows it covers, and
    the `file` they are from (None in a corpus of one file)."""

    index: int
    table: pa.Table
    rejects: list[Reject]
    rows: int
    file: str | None = None


def corpus_shards(corpus: Corpus, size: int, start: int = 0, *, file: str | None = None) -> Iterator[Shard]:
    """The shards of `corpus` of `size` rows each, from the one holding row `start` on; `file` names their rows."""
    for index, rows in groupby(corpus.rows(start), key=lambda row: row.row // size):
        rows = list(rows)
        texts = [row for row in rows if isinstance(row, Text)]
        columns = {} if file is None else {"file": pa.array([file] * len(texts), pa.string())}
        columns |= {
            "row": pa.array([text.row for text in texts], pa.int64()),
            "text": pa.array([text.text for text in texts], pa.string()),
        }
        if corpus.id_type is not None:
            columns["id"] = pa.array([text.id for text in texts], corpus.id_type)
        yield Shard(index, pa.table(columns), [row for row in rows if isinstance(row, Reject)], len(rows), file)


def output_schema(
    embedding: pa.DataType, id_type: pa.DataType | None, include_text: bool, *, file: bool = False
) -> pa.Schema:
    """The columns written: `file` for a corpus of several files, `row`, then `id` and `text` if asked for, then `embedding`."""
    fields = [pa.field("file", pa.string(), nullable=False)] if file else []
    fields.append(pa.field("row", pa.int64(), nullable=False))
    if id_type is not None:
        fields.append(pa.field("id", id_type))
    if include_text:
        fields.append(pa.field("text", pa.string()))
    return pa.schema([*fields, pa.field("embedding", embedding)])


def output_rows(embedded: pa.Table, schema: pa.Schema) -> pa.Table:
    """The rows of an embedded table that are written: those with finite embeddings, in `schema`'s columns."""
    return embedded.filter(embedded.column("finite")).select(schema.names).cast(schema)


def nonfinite_rejects(embedded: pa.Table) -> list[Reject]:
    """A reject for each row of an embedded table whose embedding holds NaN or infinity."""
    rows = embedded.filter(pc.invert(embedded.column("finite"))).column("row").to_pylist()
    detail = "the embedding holds NaN or infinity: check the info and the method's arguments"
    return [Reject(row, NONFINITE, detail) for row in rows]
