"""`layerfuse run --engine ray`: the same job on a local Ray with 2 CPUs gives the local engine's output, row for row."""

from __future__ import annotations

import json

import numpy
import pyarrow.dataset
import pyarrow.parquet as pq
import pytest
import torch

from layerfuse import FusionConfig
from layerfuse.cli import main
from layerfuse.run import embed_corpus

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'layerfuse[ray]' (CI installs it)")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")

WORDS = "the a model layer fusion text corpus quick brown fox jumps over lazy dog vector batch token".split()


def test_the_ray_engine_writes_the_local_engines_rows(tmp_path, capsys):
    generator = numpy.random.default_rng(0)
    lines = [
        json.dumps({"id": i, "text": " ".join(generator.choice(WORDS, generator.integers(1, 40)))}).encode()
        for i in range(60)
    ]
    lines[4], lines[33] = b'{"id": 4, "text": ""}', b"{not json"
    (tmp_path / "c.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    info = torch.randn(60, 384, generator=torch.Generator().manual_seed(0))
    info[50] = 3e38  # finite, but overflows: row 50 must be rejected by both engines
    torch.save(info, tmp_path / "info.pt")
    options = [
        "--id-column",
        "id",
        "--layer",
        "3",
        "--info",
        str(tmp_path / "info.pt"),
        "--alpha",
        "10",
        "--include-text",
        "--batch-size",
        "8",
        "--shard-size",
        "16",
        "--quiet",
    ]

    assert (
        main(
            [
                "run",
                str(tmp_path / "c.jsonl"),
                "-o",
                str(tmp_path / "ray"),
                "--engine",
                "ray",
                "--workers",
                "2",
                *options,
            ]
        )
        == 1
    )
    assert not ray.is_initialized()
    report = capsys.readouterr().out
    assert (
        "wrote 57 of 60 rows" in report and "rejected 3 rows (1 empty text, 1 non-finite output, 1 not JSON)" in report
    )

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each Ray worker, which has one CPU
    try:
        local = embed_corpus(
            tmp_path / "c.jsonl",
            tmp_path / "local.parquet",
            id_column="id",
            include_text=True,
            batch_size=8,
            shard_size=16,
            fusion=FusionConfig(layer=3, arguments={"alpha": 10.0}),
            info=info,
        )
    finally:
        torch.set_num_threads(threads)
    assert local.rejected == {"empty text": 1, "non-finite output": 1, "not JSON": 1}

    on_ray = pyarrow.dataset.dataset(tmp_path / "ray").to_table()
    expected = pq.read_table(tmp_path / "local.parquet")
    assert on_ray.schema == expected.schema
    assert on_ray.column("row").to_pylist() == [i for i in range(60) if i not in (4, 33, 50)]
    assert on_ray.equals(expected)
    assert (tmp_path / "ray.rejects.jsonl").read_text() == (tmp_path / "local.rejects.jsonl").read_text()
