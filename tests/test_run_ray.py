"""`layerfuse run --engine ray` on a local Ray with 2 CPUs: corpora of one file and of several files, with bad
rows, give the local engine's output row for row; so do a run whose worker is killed mid-run, and a run whose
driver is killed, then resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from layerfuse import FusionConfig
from layerfuse.cli import main
from layerfuse.run import embed_corpus
from test_run import sentences, small  # noqa: F401  (a fixture)

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'layerfuse[ray]' (CI installs it)")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")

WORKER = "MapWorker(MapBatches(WriteBlocks))"  # the title of a Ray actor that embeds and writes blocks


def local_run(input, output, **options):
    """The local engine's run, with one thread as each Ray worker has one CPU: the same arithmetic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return embed_corpus(input, output, **options)
    finally:
        torch.set_num_threads(threads)


def ray_rows(folder) -> pa.Table:
    """The Ray engine's output: its Parquet files in name order."""
    return pa.concat_tables(pq.read_table(path) for path in sorted(folder.glob("*.parquet")))


def parquet_corpus(folder) -> int:
    """Four Parquet files (one empty) with bad rows: null, blank and non-UTF-8 texts. Returns the block count."""
    folder.mkdir()
    sizes = {"a.parquet": 40, "b.parquet": 0, "c.parquet": 25, "d.parquet": 30}
    for number, (name, size) in enumerate(sizes.items()):
        texts: list[bytes | None] = [text.encode() for text in sentences(size, seed=number)]
        for row, bad in {5: None, 9: b"  ", 17: b"caf\xe9"}.items():
            if row < size:
                texts[row] = bad
        table = pa.table({"id": pa.array(range(size), pa.int64()), "text": pa.array(texts, pa.binary())})
        pq.write_table(table, folder / name)
    return 5 + 1 + 4 + 4  # shards of 8 rows; an empty file makes one empty block


def test_a_file_with_per_row_info_gives_the_local_engines_rows(small, tmp_path, capsys):  # noqa: F811
    lines = [json.dumps({"id": i, "text": text}).encode() for i, text in enumerate(sentences(60, seed=5))]
    lines[4], lines[33] = b'{"id": 4, "text": ""}', b"{not json"
    (tmp_path / "c.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    info = torch.randn(60, 32, generator=torch.Generator().manual_seed(0))
    info[50] = 3e38  # finite, but overflows: row 50 must be rejected by both engines
    torch.save(info, tmp_path / "info.pt")
    options = ["--model", str(small), "--id-column", "id", "--layer", "1", "--info", str(tmp_path / "info.pt")]
    options += ["--alpha", "10", "--include-text", "--batch-size", "8", "--shard-size", "16", "--quiet"]
    ray_output = ["-o", str(tmp_path / "ray"), "--engine", "ray", "--workers", "2"]
    assert main(["run", str(tmp_path / "c.jsonl"), *ray_output, *options]) == 1
    assert not ray.is_initialized()
    report = capsys.readouterr().out
    assert "wrote 57 of 60 rows" in report
    assert "rejected 3 rows (1 empty text, 1 non-finite output, 1 not JSON)" in report

    fusion = FusionConfig(layer=1, arguments={"alpha": 10.0})
    options = {"id_column": "id", "include_text": True, "batch_size": 8, "shard_size": 16}
    local = local_run(
        tmp_path / "c.jsonl", tmp_path / "local.parquet", model=small, fusion=fusion, info=info, **options
    )
    assert local.rejected == {"empty text": 1, "non-finite output": 1, "not JSON": 1}
    assert sorted(path.name for path in (tmp_path / "ray").iterdir()) == [
        "_summary.json",
        *(f"part-000000-{shard:06d}.parquet" for shard in range(4)),
    ]
    on_ray, expected = ray_rows(tmp_path / "ray"), pq.read_table(tmp_path / "local.parquet")
    assert on_ray.column("row").to_pylist() == [i for i in range(60) if i not in (4, 33, 50)]
    assert on_ray.equals(expected)
    assert (tmp_path / "ray.rejects.jsonl").read_text() == (tmp_path / "local.rejects.jsonl").read_text()
    summary = json.loads((tmp_path / "ray" / "_summary.json").read_text())
    assert (summary["rows"], summary["written"], summary["blocks"]) == (60, 57, 4)


def block_writers() -> list[int]:
    """The pids of this process's Ray actors that write blocks."""
    pids = []
    for process in psutil.Process().children(recursive=True):
        try:
            if WORKER in " ".join(process.cmdline()):
                pids.append(process.pid)
        except psutil.Error:  # a process that ended meanwhile
            pass
    return pids


def kill_a_worker_once_a_block_is_written(partial, seen: dict) -> None:
    """Wait for the first finished block, then kill one of the actors that write blocks."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        workers = block_writers()
        done = len(list(partial.glob("part-*.json"))) if partial.is_dir() else 0
        if done and workers:
            seen["done"] = done
            os.kill(workers[0], signal.SIGKILL)
            return
        time.sleep(0.005)


def test_a_corpus_of_several_files_survives_a_killed_worker_with_no_row_twice(small, tmp_path):  # noqa: F811
    blocks = parquet_corpus(tmp_path / "corpus")
    options = {"model": small, "id_column": "id", "batch_size": 4, "shard_size": 8}
    seen: dict = {}
    watcher = threading.Thread(target=kill_a_worker_once_a_block_is_written, args=(tmp_path / "ray.partial", seen))
    watcher.start()
    try:
        summary = embed_corpus(tmp_path / "corpus", tmp_path / "ray", engine="ray", workers=2, **options)
    finally:
        watcher.join()
    assert 1 <= seen.get("done", 0) < blocks, "the worker was not killed mid-run"
    local = local_run(tmp_path / "corpus", tmp_path / "local.parquet", **options)
    assert summary.rejected == local.rejected == {"empty text": 3, "missing column": 3, "not UTF-8": 3}
    assert (summary.rows, summary.written) == (local.rows, local.written) == (95, 86)
    on_ray = ray_rows(tmp_path / "ray")
    names = list(zip(on_ray["file"].to_pylist(), on_ray["row"].to_pylist()))
    assert len(set(names)) == len(names) == 86
    assert len(list((tmp_path / "ray").glob("*.parquet"))) == blocks
    assert on_ray.equals(pq.read_table(tmp_path / "local.parquet"))
    assert (tmp_path / "ray.rejects.jsonl").read_text() == (tmp_path / "local.rejects.jsonl").read_text()


def csv_corpus(folder) -> int:
    """Three .csv files with bad rows (blank text, a row of the wrong number of fields). Returns the block count."""
    folder.mkdir()
    for number, size in enumerate((30, 21, 12)):
        rows = [f'{i},"{text}"' for i, text in enumerate(sentences(size, seed=10 + number))]
        rows[2], rows[7] = '2,"  "', "7,too,many,fields"
        (folder / f"part{number}.csv").write_text("id,text\n" + "\n".join(rows) + "\n")
    return 4 + 3 + 2


def test_a_killed_driver_resumes_to_the_output_of_an_uninterrupted_run(small, tmp_path):  # noqa: F811
    blocks = csv_corpus(tmp_path / "corpus")
    glob = str(tmp_path / "corpus" / "*.csv")
    command = [sys.executable, "-m", "layerfuse", "run", glob, "-o", str(tmp_path / "ray"), "--engine", "ray"]
    command += ["--workers", "2", "--model", str(small), "--id-column", "id", "--batch-size", "4"]
    command += ["--shard-size", "8", "--quiet"]
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    partial = tmp_path / "ray.partial"
    try:
        deadline = time.monotonic() + 300
        while not (partial.is_dir() and any(partial.glob("part-*.json"))) and time.monotonic() < deadline:
            assert driver.poll() is None, "the job finished before it could be killed"
            time.sleep(0.005)
        driver.kill()
        done = len(list(partial.glob("part-*.json")))
    finally:
        driver.wait()
        os.killpg(driver.pid, signal.SIGKILL)  # the local Ray the driver started
    assert 1 <= done < blocks and not (tmp_path / "ray").exists()

    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "wrote 57 of 63 rows" in resumed.stdout and "resuming after row" in resumed.stdout
    options = {"model": small, "id_column": "id", "batch_size": 4, "shard_size": 8}
    local_run(glob, tmp_path / "local.parquet", **options)
    assert len(list((tmp_path / "ray").glob("*.parquet"))) == blocks
    assert ray_rows(tmp_path / "ray").equals(pq.read_table(tmp_path / "local.parquet"))
    assert (tmp_path / "ray.rejects.jsonl").read_text() == (tmp_path / "local.rejects.jsonl").read_text()


# Resuming checks, on the engine's own steps (no Ray needed to run them)


def test_resuming_refuses_other_settings_a_changed_input_file_and_other_weights(small, tmp_path):  # noqa: F811
    from layerfuse.errors import ArgumentValueError
    from layerfuse.run.inputs import Inputs
    from layerfuse.run.ray_engine import RayJob, WriteBlocks, _prepare, read_shards

    (tmp_path / "c.txt").write_text("one text\n\nthree\n")
    settings = {"model": small, "fusion": None, "info": None, "saved": None, "pooling": None, "normalize": None}
    settings |= {"max_length": None, "batch_size": 4, "bucket": True}
    job = RayJob(Inputs(tmp_path / "c.txt"), tmp_path / "out", tmp_path / "out.rejects.jsonl", 2, False, settings)
    assert _prepare(job, resume=False) == {}
    other = RayJob(job.inputs, job.output, job.rejects, 3, False, settings)
    with pytest.raises(ArgumentValueError, match=r"made with other settings \(shard_size\)"):
        _prepare(other, resume=True)

    path = str((tmp_path / "c.txt").resolve())
    batch = pa.table({"bytes": [(tmp_path / "c.txt").read_bytes()], "path": [path]})
    options = {"inputs": job.inputs, "numbers": {path: 0}, "size": 2, "folder": str(job.partial)}
    shards = [table.to_pylist()[0] for table in read_shards(batch, done={}, **options)]
    assert [(shard["name"], shard["rows"]) for shard in shards] == [
        ("part-000000-000000", 2),
        ("part-000000-000001", 1),
    ]
    kept = {"part-000000-000000": shards[0]["input_sha256"]}
    assert [table["name"][0].as_py() for table in read_shards(batch, done=kept, **options)] == ["part-000000-000001"]
    with pytest.raises(ArgumentValueError, match=r"c\.txt changed since it began"):
        list(read_shards(batch, done={"part-000000-000000": "0" * 64}, **options))

    writer = WriteBlocks(settings, str(job.partial), None, False, False, model_sha256=None)
    rows = writer(pa.Table.from_pylist(shards[:1]))
    assert rows.to_pylist() == [{"name": "part-000000-000000", "rows": 2}]
    counts = json.loads((job.partial / "part-000000-000000.json").read_text())
    assert (counts["rows"], counts["written"], counts["rejected"]) == (2, 1, {"empty text": 1})
    changed = WriteBlocks(settings, str(job.partial), None, False, False, model_sha256="0" * 64)
    with pytest.raises(ArgumentValueError, match="made with other weights"):
        changed(pa.Table.from_pylist(shards[1:]))
    assert not (job.partial / "part-000000-000001.json").exists()


def test_device_cuda_on_a_cluster_without_gpus_is_refused_and_leaves_nothing(small, tmp_path):  # noqa: F811
    from layerfuse.errors import ArgumentValueError

    (tmp_path / "c.txt").write_text("one text\nanother\n")
    ray.init(num_cpus=1, num_gpus=0, include_dashboard=False, logging_level="WARNING")
    try:
        address = ray.get_runtime_context().gcs_address  # a cluster: its GPUs count, not this machine's torch
        with pytest.raises(ArgumentValueError, match="puts each Ray actor on a GPU, and the Ray cluster has none"):
            embed_corpus(
                tmp_path / "c.txt", tmp_path / "out", model=small, engine="ray", ray_address=address, device="cuda"
            )
    finally:
        ray.shutdown()
    assert sorted(os.listdir(tmp_path)) == ["c.txt"]
