"""`Inputs`: the files of a corpus, given as a file, a folder, a glob or a list, local or on any filesystem pyarrow reaches.

A folder stands for the corpus files under it (by their suffix), a glob for the files it matches;
each is sorted by name, and the files keep the order in which they were given. A corpus of more than
one plain file (a folder, a glob or several paths) is `many`: its rows are named by file and row,
the row counted from 0 in each file. All its files are of one format. `s3://…`, `gs://…` and other
URIs are listed through pyarrow's filesystems (for the Ray engine; the local engine reads local files).

>>> import pathlib, tempfile
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> for name in ("b.txt", "a.txt", "notes.md"):
...     _ = (folder / name).write_text("one text\\n")
>>> inputs = Inputs(folder)
>>> [pathlib.Path(name).name for name in inputs.names], inputs.many, inputs.format
(['a.txt', 'b.txt'], True, '.txt')
"""

from __future__ import annotations

import fnmatch
import glob
import os
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.fs as pa_fs
import pyarrow.parquet as pq

from ..errors import ArgumentValueError
from .corpus import FORMATS, Corpus
from .tables import Shard, corpus_shards

GLOB_CHARACTERS = "*?["
Spec = str | os.PathLike[str]


def _is_uri(spec: str) -> bool:
    return "://" in spec


def _listed(filesystem: pa_fs.FileSystem, folder: str) -> list[str]:
    selector = pa_fs.FileSelector(folder, recursive=True)
    return sorted(
        info.path
        for info in filesystem.get_file_info(selector)
        if info.type == pa_fs.FileType.File and os.path.splitext(info.path)[1].lower() in FORMATS
    )


def _expand(spec: str) -> tuple[list[str], bool]:
    """The files `spec` names, and whether it names them as a folder or a glob rather than as one file."""
    cut = min((spec.index(character) for character in GLOB_CHARACTERS if character in spec), default=None)
    if not _is_uri(spec):
        if cut is not None:
            return sorted(path for path in glob.glob(spec, recursive=True) if os.path.isfile(path)), True
        if os.path.isdir(spec):
            folder = os.path.abspath(spec)
            listed = _listed(pa_fs.LocalFileSystem(), folder)
            return [os.path.join(spec, os.path.relpath(path, folder)) for path in listed], True
        return [spec], False
    scheme = spec.split("://", 1)[0] + "://"
    filesystem, path = pa_fs.FileSystem.from_uri(spec if cut is None else spec[:cut].rsplit("/", 1)[0])
    if cut is not None:
        return [scheme + found for found in _listed(filesystem, path) if fnmatch.fnmatch(scheme + found, spec)], True
    if filesystem.get_file_info(path).type == pa_fs.FileType.Directory:
        return [scheme + found for found in _listed(filesystem, path)], True
    return [spec], False


class Inputs:
    """The corpus files that `input` names (a path or URI, or a list of them), checked before any work.

    `check`: open every local file as a `Corpus` now (the local engine), or only the first (the Ray
    engine, whose workers check each file as they read it).
    """

    def __init__(
        self,
        input: Spec | Sequence[Spec],
        *,
        text_column: str | None = None,
        id_column: str | None = None,
        check: str = "all",
    ) -> None:
        specs = [os.fspath(input)] if isinstance(input, (str, os.PathLike)) else [os.fspath(spec) for spec in input]
        if not specs:
            raise ArgumentValueError("no input given: name a corpus file, a folder, a glob or several files")
        names: list[str] = []
        self.many = len(specs) > 1
        for spec in specs:
            found, many = _expand(spec)
            if not found:
                raise ArgumentValueError(f"no corpus file in {spec}: it holds or matches no {', '.join(FORMATS)} file")
            names += found
            self.many = self.many or many
        doubled = sorted({name for name in names if names.count(name) > 1})
        if doubled:
            raise ArgumentValueError(f"{doubled[0]} is given twice: name each input file once")
        formats = sorted({os.path.splitext(name)[1].lower() for name in names})
        if len(formats) > 1:
            raise ArgumentValueError(
                f"the input's files are of several formats ({', '.join(formats)}): give files of one format"
            )
        if formats[0] not in FORMATS:
            raise ArgumentValueError(
                f"cannot read a corpus from {os.path.basename(names[0])}: use a {', '.join(FORMATS)} file"
            )
        self.names, self.format = names, formats[0]
        self.text_column, self.id_column = text_column, id_column
        self.remote = any(_is_uri(name) for name in names)
        if self.remote:
            self.id_type = None if id_column is None else self._remote_id_type()
        else:
            checked = [self.corpus(index) for index in range(len(names) if check == "all" else 1)]
            self.id_type = checked[0].id_type

    def _remote_id_type(self) -> pa.DataType:
        if self.format != ".parquet":
            return pa.string()
        filesystem, path = pa_fs.FileSystem.from_uri(self.names[0])
        with filesystem.open_input_file(path) as file:
            return pq.read_schema(file).field(self.id_column).type

    def corpus(self, index: int, data: bytes | None = None) -> Corpus:
        """File `index` as a `Corpus`: read from its path, or from `data`, its bytes."""
        return Corpus(self.names[index], text_column=self.text_column, id_column=self.id_column, data=data)

    def file(self, index: int) -> str | None:
        """The `file` of rows and rejects from file `index`: its name when the corpus is `many`, else None."""
        return self.names[index] if self.many else None

    def count(self) -> int:
        """The rows of every file, bad ones included."""
        return sum(self.corpus(index).count() for index in range(len(self.names)))

    def shards(self, size: int, skip: int = 0) -> Iterator[Shard]:
        """The shards of every file in turn (numbered on across files), after the first `skip`."""
        number = 0
        for index in range(len(self.names)):
            for shard in corpus_shards(self.corpus(index), size, file=self.file(index)):
                if number >= skip:
                    yield shard._replace(index=number)
                number += 1

    def describe(self) -> dict[str, Any]:
        """The input as JSON: its files, and their text and id columns."""
        return {"input": self.names, "text_column": self.text_column, "id_column": self.id_column}
