"""Read a corpus row by row from .txt, .jsonl, .csv or .parquet: each row a text, or a reject with its reason.

A UTF-8 byte order mark opening a .txt, .jsonl or .csv file is not part of its first row.
Rows are numbered from 0 in file order (in a .csv, the records after the header), bad rows included,
so that row k of the corpus is row k of per-row info. A .txt file holds one text a line; the other
formats name the text column (default "text") and optionally an id column carried to the output.

>>> import pathlib, tempfile
>>> path = pathlib.Path(tempfile.mkdtemp()) / "texts.txt"
>>> _ = path.write_bytes(b"first text\\n  \\nthird \\xff text\\nlast text\\n")
>>> corpus = Corpus(path)
>>> corpus.count()
4
>>> for row in corpus.rows():
...     print(row)
Text(row=0, text='first text', id=None)
Reject(row=1, reason='empty text', detail='')
Reject(row=2, reason='not UTF-8', detail="'text': invalid byte 0xff at position 6")
Text(row=3, text='last text', id=None)
"""

from __future__ import annotations

import codecs
import io
import json
import os
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from ..errors import ArgumentValueError, FileFormatError
from ..paths import check_readable

FORMATS = (".txt", ".jsonl", ".csv", ".parquet")
JSONL_KEYS_CHECKED = 100


class Text(NamedTuple):
    """A good row: its number, its text, and its id (None without an id column)."""

    row: int
    text: str
    id: Any = None


class Reject(NamedTuple):
    """A bad row: its number, a short reason (what the summary counts) and the details."""

    row: int
    reason: str
    detail: str = ""


def _decoded(value: Any, column: str, row: int) -> str | Reject:
    if value is None:
        return Reject(row, "missing column", f"{column!r} is null")
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as error:
            return Reject(
                row, "not UTF-8", f"{column!r}: invalid byte 0x{value[error.start]:02x} at position {error.start}"
            )
    if not isinstance(value, str):
        return Reject(row, "not text", f"{column!r} is a {type(value).__name__}, not a string")
    return value


def _checked(row: int, text: Any, text_column: str, id: Any = None, id_column: str | None = None) -> Text | Reject:
    """A `Text` if `text` is a non-blank UTF-8 string (and the id, if any, decodes), else a `Reject`."""
    text = _decoded(text, text_column, row)
    if isinstance(text, Reject):
        return text
    if not text.strip():
        return Reject(row, "empty text")
    if id_column is not None:
        id = _decoded(id, id_column, row)
        if isinstance(id, Reject):
            return id
    return Text(row, text, id)


def _count_lines(file: BinaryIO) -> int:
    lines, last = 0, b"\n"
    with file:
        while chunk := file.read(1 << 20):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    return lines + (last != b"\n")


def _lines(file: BinaryIO) -> Iterator[bytes]:
    """The lines of a file without their line ends, and without the UTF-8 byte order mark that may open it."""
    with file:
        for number, line in enumerate(file):
            line = line.removesuffix(b"\n").removesuffix(b"\r")
            yield line.removeprefix(codecs.BOM_UTF8) if number == 0 else line


class Corpus:
    """A corpus file, checked on opening: it exists, its format is known and the columns are there.

    `data`: the file's bytes, already read (by a Ray worker, say); `path` then only names it.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        text_column: str | None = None,
        id_column: str | None = None,
        data: bytes | None = None,
    ) -> None:
        self.path, self.data = Path(path), data
        self.format = self.path.suffix.lower()
        if self.format not in FORMATS:
            raise ArgumentValueError(f"cannot read a corpus from {self.path.name}: use a {', '.join(FORMATS)} file")
        if data is None and not self.path.is_file():
            raise ArgumentValueError(f"no input file at {self.path}")
        if data is None:
            check_readable(self.path, "the input")
        if self.format == ".txt" and (text_column or id_column):
            raise ArgumentValueError(
                "a .txt corpus holds one text a line and no columns: "
                "--text-column and --id-column apply to .jsonl, .csv and .parquet input"
            )
        self.text_column = text_column or "text"
        self.id_column = id_column
        self.id_type: pa.DataType | None = None if id_column is None else pa.string()
        columns = self._columns()
        if self.format == ".parquet":
            self._check_parquet(columns)
        elif self.format == ".csv":
            self._check_columns(columns, self._csv_reader().schema.names, "its header has")
        elif self.format == ".jsonl":
            self._check_jsonl(columns)

    def _open(self) -> BinaryIO:
        return self.path.open("rb") if self.data is None else io.BytesIO(self.data)

    def _source(self) -> Any:
        """The file as pyarrow reads it."""
        return self.path if self.data is None else pa.BufferReader(self.data)

    def _check_columns(self, wanted: list[str], found: list[str], where: str) -> None:
        missing = [column for column in wanted if column not in found]
        if missing:
            raise ArgumentValueError(
                f"unknown column {missing[0]!r} in {self.path.name}: {where} {', '.join(map(repr, found)) or 'none'}"
            )

    def _check_parquet(self, columns: list[str]) -> None:
        try:
            schema = pq.read_schema(self._source())
        except (pa.ArrowException, OSError) as error:
            raise FileFormatError(f"cannot read {self.path} as Parquet: {error}") from error
        self._check_columns(columns, schema.names, "its columns are")
        text_type = schema.field(self.text_column).type
        if not (
            pa.types.is_string(text_type)
            or pa.types.is_large_string(text_type)
            or pa.types.is_binary(text_type)
            or pa.types.is_large_binary(text_type)
        ):
            raise ArgumentValueError(f"column {self.text_column!r} of {self.path.name} holds {text_type}, not text")
        if self.id_column:
            self.id_type = schema.field(self.id_column).type

    def _check_jsonl(self, columns: list[str]) -> None:
        """Refuse a column that none of the first JSON objects has: a misspelt name, not bad rows."""
        keys: set[str] = set()
        for line in islice(_lines(self._open()), JSONL_KEYS_CHECKED):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                keys.update(value)
        if keys:
            self._check_columns(columns, sorted(keys), f"the first {JSONL_KEYS_CHECKED} rows have keys")

    def _csv_reader(self, skipped: dict[int, Reject] | None = None, columns: list[str] | None = None) -> Any:
        def skip(row: pa_csv.InvalidRow) -> str:
            if skipped is not None:
                number = row.number - 2  # 1-based, counting the header
                skipped[number] = Reject(
                    number, "malformed CSV row", f"{row.actual_columns} fields, the header has {row.expected_columns}"
                )
            return "skip"

        try:
            return pa_csv.open_csv(
                self._source(),
                read_options=pa_csv.ReadOptions(use_threads=False),
                parse_options=pa_csv.ParseOptions(newlines_in_values=True, invalid_row_handler=skip),
                convert_options=pa_csv.ConvertOptions(
                    include_columns=columns, column_types={column: pa.binary() for column in columns or ()}
                ),
            )
        except (pa.ArrowException, OSError) as error:
            raise FileFormatError(f"cannot read {self.path} as CSV: {error}") from error

    def _columns(self) -> list[str]:
        return [self.text_column] + ([self.id_column] if self.id_column else [])

    def count(self) -> int:
        """The number of rows, bad ones included."""
        if self.format in (".txt", ".jsonl"):
            return _count_lines(self._open())
        if self.format == ".parquet":
            return pq.ParquetFile(self._source()).metadata.num_rows
        skipped: dict[int, Reject] = {}
        return sum(batch.num_rows for batch in self._csv_reader(skipped, [self.text_column])) + len(skipped)

    def rows(self, start: int = 0) -> Iterator[Text | Reject]:
        """Every row from row `start` on, in order, as a `Text` or a `Reject`."""
        if self.format in (".txt", ".jsonl"):
            lines = islice(enumerate(_lines(self._open())), start, None)
            return self._txt(lines) if self.format == ".txt" else self._jsonl(lines)
        rows = self._csv() if self.format == ".csv" else self._parquet()
        return (row for row in rows if row.row >= start)

    def _txt(self, lines: Iterator[tuple[int, bytes]]) -> Iterator[Text | Reject]:
        for row, line in lines:
            yield _checked(row, line, "text")

    def _jsonl(self, lines: Iterator[tuple[int, bytes]]) -> Iterator[Text | Reject]:
        for row, line in lines:
            try:
                value = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as error:
                yield Reject(row, "not UTF-8", f"invalid byte 0x{line[error.start]:02x} at position {error.start}")
                continue
            except ValueError as error:
                yield Reject(row, "not JSON", str(error) if line.strip() else "empty line")
                continue
            if not isinstance(value, dict):
                yield Reject(row, "not a JSON object", f"a JSON {type(value).__name__}")
                continue
            missing = [column for column in self._columns() if column not in value]
            if missing:
                yield Reject(row, "missing column", f"no {missing[0]!r} key")
                continue
            id = None
            if self.id_column:
                id = value[self.id_column]
                id = id if id is None or isinstance(id, str) else json.dumps(id)
            yield _checked(row, value[self.text_column], self.text_column, id)

    def _csv(self) -> Iterator[Text | Reject]:
        skipped: dict[int, Reject] = {}
        row = 0
        for batch in self._csv_reader(skipped, self._columns()):
            texts = batch.column(self.text_column).to_pylist()
            ids = batch.column(self.id_column).to_pylist() if self.id_column else [None] * len(texts)
            for text, id in zip(texts, ids):
                while row in skipped:
                    yield skipped.pop(row)
                    row += 1
                yield _checked(row, text, self.text_column, id, self.id_column)
                row += 1
        yield from (skipped[number] for number in sorted(skipped))

    def _parquet(self) -> Iterator[Text | Reject]:
        row = 0
        for batch in pq.ParquetFile(self._source()).iter_batches(columns=self._columns()):
            texts = batch.column(self.text_column).to_pylist()
            ids = batch.column(self.id_column).to_pylist() if self.id_column else [None] * len(texts)
            for text, id in zip(texts, ids):
                yield _checked(row, text, self.text_column, id)
                row += 1
