"""Write a run's output in the format its name ends with: .parquet, .npy or .safetensors.

Parquet holds every column (`row`, `id`, `text` if asked for, `embedding` as a fixed-size list of
float32); .npy the embeddings alone, an (N, H) float32 array; .safetensors the tensors `embedding`
(N, H) and `row` (N,). Rows are in corpus order, bad rows left out.

>>> import pathlib, tempfile, numpy, pyarrow as pa
>>> vectors = pa.FixedSizeListArray.from_arrays(pa.array([1.0, 2, 3, 4], pa.float32()), 2)
>>> table = pa.table({"row": [0, 2], "embedding": vectors})
>>> path = write_output(pathlib.Path(tempfile.mkdtemp()) / "out.npy", [table], table.schema, rows=2)
>>> numpy.load(path)
array([[1., 2.],
       [3., 4.]], dtype=float32)
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy
import pyarrow as pa
import pyarrow.parquet as pq
from safetensors.numpy import save_file

from ..errors import ArgumentValueError
from .shards import atomic_write

OUTPUT_FORMATS = (".parquet", ".npy", ".safetensors")


def check_output_format(path: Path, pooling: str) -> None:
    """Refuse an output name of an unknown format, or per-token states (pooling "none") outside Parquet."""
    if path.suffix not in OUTPUT_FORMATS:
        raise ArgumentValueError(f"cannot write {path.name}: name the output .parquet, .npy or .safetensors")
    if pooling == "none" and path.suffix != ".parquet":
        raise ArgumentValueError(
            f"per-token states (pooling 'none') have a length per row: write them to .parquet, not {path.suffix}"
        )


def _embeddings(table: pa.Table) -> numpy.ndarray:
    vectors = table.column("embedding").combine_chunks()
    return vectors.flatten().to_numpy(zero_copy_only=False).reshape(len(vectors), vectors.type.list_size)


def write_output(path: Path, tables: Iterable[pa.Table], schema: pa.Schema, *, rows: int) -> Path:
    """Write `tables` (of `schema`, `rows` rows in all) to `path`, in one atomic rename."""

    def parquet(temporary: Path) -> None:
        with pq.ParquetWriter(temporary, schema) as writer:
            for table in tables:
                writer.write_table(table)

    def npy(temporary: Path) -> None:
        size = schema.field("embedding").type.list_size
        array = numpy.lib.format.open_memmap(temporary, mode="w+", dtype=numpy.float32, shape=(rows, size))
        start = 0
        for table in tables:
            array[start : start + table.num_rows] = _embeddings(table)
            start += table.num_rows
        array.flush()
        del array

    def safetensors(temporary: Path) -> None:
        table = pa.concat_tables(tables).cast(schema) if rows else schema.empty_table()
        save_file({"embedding": _embeddings(table), "row": table.column("row").to_numpy()}, temporary)

    return atomic_write(path, {".parquet": parquet, ".npy": npy, ".safetensors": safetensors}[path.suffix])
