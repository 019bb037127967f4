"""`layerfuse bench`: the grid it runs, its report, JSON and plot, and the memory probe. No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import layerfuse
from conftest import assert_unchanged, snapshot, tiny_bert
from layerfuse.cli import main
from layerfuse.lab.bench import FIXED_METHODS, Cost, Point, Report, bench, environment, measure_memory, plot, rounds_for
from layerfuse.lab.bench.grid import attach_merged, time_point
from layerfuse.lab.timing import Summary
from layerfuse.lab.twins import shared_copy

PNG = b"\x89PNG\r\n\x1a\n"


def check_point(point: Point, rounds: int, compiled: bool = False) -> None:
    # the eager grid times the merged model too, where the fusion merges: not ablate at a LayerNorm's output
    merged = ["merged"] if point.method != "ablate" and not compiled else []
    assert sorted(point.timings) == sorted(["hook", "layer", "plain", *merged])
    assert point.rounds == rounds
    for summary in point.timings.values():
        assert 0 < summary.q1 <= summary.median <= summary.q3
    assert point.ratio("plain").median == 1.0
    for approach in ("hook", "layer", *merged):
        per_round = sorted(f / p for f, p in zip(point.seconds[approach], point.seconds["plain"]))
        middle = len(per_round) // 2
        median = per_round[middle] if len(per_round) % 2 else (per_round[middle - 1] + per_round[middle]) / 2
        assert point.ratio(approach).median == pytest.approx(median)


def test_the_merged_twin_times_the_merged_model_and_leaves_the_model_as_it_was():
    model = tiny_bert()
    before = snapshot(model)
    point = time_point(model, 1, 4, 1, "addition", 2, rounds=2)
    assert "merged" in point.seconds and len(point.seconds["merged"]) == 2
    assert_unchanged(model, before)
    twin = shared_copy(model)
    with attach_merged(twin, "addition", 2) as merged:
        changed = {name for name, _ in twin.named_parameters()} & set(merged.parameters)
        assert changed and all(twin.get_parameter(n) is not model.get_parameter(n) for n in changed)
        assert all(
            twin.get_parameter(n) is model.get_parameter(n) for n, _ in twin.named_parameters() if n not in changed
        )
    assert_unchanged(model, before)


def test_grid_every_method_and_costs():
    report = bench(
        shapes=((1, 4), (2, 8)),
        method_shapes=((1, 4),),
        threads=(1,),
        methods=("addition", "ablate", "scale"),
        rounds=2,
        memory=False,
    )
    assert [(p.batch, p.tokens, p.threads, p.method) for p in report.points] == [
        (1, 4, 1, "addition"),
        (1, 4, 1, "ablate"),
        (1, 4, 1, "scale"),
        (2, 8, 1, "addition"),
    ]
    for point in report.points:
        check_point(point, rounds=2)
    assert [(c.method, c.batch, c.tokens) for c in report.costs] == [
        (m, b, t) for b, t in ((1, 4), (2, 8)) for m in ("addition", "ablate", "scale")
    ]
    assert all(c.share == c.seconds.median / c.plain > 0 for c in report.costs)
    assert report.max_ratio() == max(p.ratio(a).median for p in report.points for a in ("hook", "layer"))
    point, approach, ratio = report.largest()
    assert ratio == point.ratio(approach) and ratio.median == report.max_ratio()
    assert report.layer == 3 and report.memory is None and report.compiled == []
    data = json.loads(json.dumps(report.to_dict()))
    assert data["max_ratio"] == report.max_ratio() and data["target_ratio"] == 1.02
    assert data["points"][1]["method"] == "ablate"
    assert set(data["points"][0]["ratio_to_plain"]) == {"hook", "layer", "merged"}
    table = report.table()
    assert table.count("| 1 x 4 | 1 |") == 3 and "| ablate | 1 |" in table
    assert (
        f"Largest fused / plain median: {ratio.median:.3f}x (target: 1.02x or less), {approach} at "
        f"{point.batch} x {point.tokens} with 1 thread ({point.method}), where the paired ratios' IQR is "
        f"{ratio.q1:.3f}-{ratio.q3:.3f} over 2 forwards"
    ) in table


def test_compiled_forwards():
    report = bench(
        shapes=((1, 4),),
        threads=(1,),
        methods=(),
        rounds=1,
        memory=False,
        compiled=True,
        compile_shapes=((1, 4),),
        compile_backend="eager",
    )
    assert len(report.compiled) == 1
    check_point(report.compiled[0], rounds=rounds_for(1, 4), compiled=True)
    assert sorted(report.compile_seconds) == ["hook 1x4", "layer 1x4", "plain 1x4"]
    assert "torch.compile" in report.table()


def test_memory_is_measured_in_fresh_processes():
    memory = measure_memory(
        None, method="ablate", layer=3, batch=4, tokens=32, threads=1, device="cpu", dtype="float32", hidden_size=384
    )
    assert memory.hidden == 4 * 32 * 384 * 4
    assert sorted(memory.peak) == sorted(memory.allocated) == ["hook", "layer", "plain"]
    assert memory.peak["plain"] >= memory.hidden  # the forward's output alone is one hidden-sized tensor
    for approach in ("hook", "layer"):
        # The fusion adds one hidden-sized tensor and the (B, T, 1) component, and no peak.
        assert memory.extra_allocated(approach) == memory.hidden + 4 * 32 * 4
        assert memory.extra(approach) == 0
    assert json.loads(json.dumps(memory.to_dict()))["extra_allocated_bytes"]["hook"] == memory.hidden + 512


def test_a_failed_memory_probe_is_a_measurement_error(monkeypatch):
    popen = subprocess.Popen
    failing = [sys.executable, "-c", "import sys; sys.exit('probe broke')"]
    monkeypatch.setattr(subprocess, "Popen", lambda argv, **options: popen(failing, **options))
    with pytest.raises(layerfuse.MeasurementError, match="the plain memory probe failed:\nprobe broke"):
        measure_memory(
            None,
            method="addition",
            layer=1,
            batch=1,
            tokens=4,
            threads=1,
            device="cpu",
            dtype="float32",
            hidden_size=384,
        )


def synthetic_report(compiled: bool) -> Report:
    def point(batch: int, tokens: int, threads: int, fused: float) -> Point:
        plain = [1.0, 0.9, 1.1, 0.95, 1.05]
        seconds = {"plain": plain, "hook": [fused * t for t in plain], "layer": [fused * t * 1.01 for t in plain]}
        return Point(batch, tokens, threads, "addition", seconds)

    points = [point(b, t, n, 1.01) for n in (1, 2) for b, t in ((1, 8), (8, 64))]
    cost = Cost("addition", 1, 8, 1, Summary(1e-5, 1e-5, 1e-5), 1e-2)
    return Report(
        model="m",
        layer=3,
        method="addition",
        device="cpu",
        dtype="float32",
        environment=environment(torch.device("cpu")),
        points=points,
        costs=[cost],
        compiled=[point(1, 8, 2, 0.99)] if compiled else [],
    )


@pytest.mark.parametrize("compiled", [False, True])
def test_plot_writes_a_png(tmp_path, compiled):
    path = plot(synthetic_report(compiled), tmp_path / "bench.png")
    assert path.read_bytes().startswith(PNG) and path.stat().st_size > 10_000


def test_rounds_fit_the_default_grid():
    assert [rounds_for(b, t) for b, t in ((1, 8), (8, 64), (32, 128), (16, 512))] == [80, 32, 16, 6]
    assert "clamp" in FIXED_METHODS and "film" not in FIXED_METHODS


def test_cli_json_and_plot(tmp_path, capsys):
    png = tmp_path / "bench.png"
    code = main(
        ["bench", "--shapes", "1x4", "--threads", "1", "--rounds", "1", "--no-memory", "--json", "--plot", str(png)]
    )
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert [(p["batch"], p["tokens"], p["method"]) for p in data["points"]] == [(1, 4, "addition")]
    assert {c["method"] for c in data["fusion_costs"]} == set(FIXED_METHODS)
    assert [(p["threads"], p["rounds"]) for p in data["per_call"]] == [(1, 1)]
    assert png.read_bytes().startswith(PNG)
    assert main(["bench", "--shapes", "1x4", "--threads", "1", "--rounds", "1", "--no-memory", "--no-per-call"]) == 0
    assert "Per call" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"], "device"),
        (["--dtype", "float8"], "unknown dtype"),
        (["--method", "film"], "must be trained first"),
        (["--method", "nope"], "unknown method"),
        (["--rounds", "0"], "rounds must be a positive int"),
    ],
)
def test_cli_bad_input(capsys, arguments, message):
    assert main(["bench", "--no-memory", *arguments]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("shapes", ["2", "1x0", "axb", ""])
def test_cli_bad_shapes(capsys, shapes):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--shapes", shapes])
    assert exit_.value.code == 2
    assert "BATCHxTOKENS" in capsys.readouterr().err


def test_library_bad_input():
    with pytest.raises(layerfuse.ArgumentValueError, match="threads"):
        bench(threads=(0,))
    with pytest.raises(layerfuse.ArgumentValueError, match="shapes"):
        bench(shapes=((1, 0),))


def test_per_call_protocol_beside_the_attached_once_grid():
    report = bench(shapes=((1, 4),), threads=(1, 2), methods=("addition",), rounds=2, memory=False)
    variants = ["hook", "layer", "hook tokens", "layer tokens"]
    assert [(point.threads, point.rounds, point.method) for point in report.per_call] == [
        (1, 2, "addition"),
        (2, 2, "addition"),
    ]
    for point in report.per_call:
        assert sorted(point.seconds) == sorted(["plain", *variants])
        for name in variants:
            per_round = sorted(f / p for f, p in zip(point.seconds[name], point.seconds["plain"]))
            assert point.ratio(name).median == pytest.approx(sum(per_round) / 2)
        assert sorted(point.attach) == sorted([*variants, "one forward hook"])
        assert all(0 < s.q1 <= s.median <= s.q3 for s in point.attach.values())
    data = json.loads(json.dumps(report.to_dict()))
    assert [p["threads"] for p in data["per_call"]] == [1, 2]
    assert set(data["per_call"][0]["ratio_to_plain"]) == set(variants)
    assert set(data["per_call"][0]["fuse_remove_seconds"]) == {*variants, "one forward hook"}
    table = report.table()
    assert "Per call: `with fuse(model, v, layer=3): model(**batch)`" in table
    assert "| hook / plain | layer / plain | hook tokens / plain | layer tokens / plain |" in table
    assert table.count("| 1 | 2 | ") == 1 and "| fuse+remove, hook |" in table
