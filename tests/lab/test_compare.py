"""The notebook's experiment done right, as a function and as a command."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import numpy
import pytest
import torch
from safetensors.torch import save_file

import layerfuse
from layerfuse.cli import main
from layerfuse.info import read_info


@pytest.fixture(scope="module")
def comparison():
    return layerfuse.compare(layer=3, method="multiplication", repeats=2)


def test_compare_finds_the_approaches_identical_and_the_fusion_effective(comparison):
    assert comparison.identical and comparison.max_abs_diff == 0.0
    assert comparison.fusion_change > 0
    batch, tokens = comparison.batch_shape
    assert batch == 4 and tokens > 4
    assert set(comparison.timings) == {"plain", "hook", "layer"}
    assert comparison.ratio("plain").median == 1.0 and comparison.ratio("hook").median > 0


def test_json_has_agreement_and_per_approach_medians_and_ratios(comparison):
    data = json.loads(json.dumps(comparison.to_dict()))
    assert data["identical"] is True and data["max_abs_diff"] == 0.0
    for name in ("plain", "hook", "layer"):
        assert data["timings"][name]["median_s"] > 0
        per_run = [t / p for t, p in zip(data["seconds"][name], data["seconds"]["plain"])]
        assert len(per_run) == data["repeats"] == 2
        assert data["timings"][name]["ratio_to_plain"] == pytest.approx(statistics.median(per_run))


def test_table_reads_as_a_report(comparison):
    table = comparison.table()
    assert "hook vs layer: identical" in table and "multiplication at layer 3" in table
    assert "layer " in table and "x" in table


def test_cli_json_prints_only_json(capsys):
    assert main(["compare", "--json", "--repeats", "1", "--layer", "-1", "--text", "one", "--text", "two words"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["identical"] is True and data["layer"] == 6 and data["batch_shape"][0] == 2


def test_cli_table_by_default(capsys):
    assert main(["compare", "--repeats", "1", "--layer", "0", "--method", "add", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "identical" in out and "addition at layer 0" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compare", "--layer", "9"], "layer 9 is out of range for a 6-block model: use 0..6 or -7..-1"),
        (["compare", "--method", "nope"], "unknown method 'nope'"),
        (["compare", "--repeats", "0"], "repeats must be a positive int, got 0"),
        (["compare", "--method", "scale"], "method 'scale': missing argument(s) ['alpha']"),
        (["compare", "--method", "multiply", "--alpha", "2"], "unknown argument(s) ['alpha']"),
    ],
)
def test_cli_bad_input_exits_2_with_the_reason(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


FIXED_METHOD_ARGS = {
    "addition": ["--alpha", "0.5"],
    "multiplication": [],
    "scale": ["--alpha", "2"],
    "replace": [],
    "interpolate": ["--alpha", "0.25"],
    "ablate": [],
    "clamp": ["--value", "3"],
    "project": [],
    "erase": [],
}


@pytest.mark.parametrize("method", FIXED_METHOD_ARGS)
def test_cli_compare_works_for_every_fixed_method(capsys, method):
    argv = ["compare", "--json", "--repeats", "1", "--layer", "2", "--method", method, *FIXED_METHOD_ARGS[method]]
    assert main([*argv, "--positions", "tokens"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["identical"] is True and data["fusion_change"] > 0


def test_cli_methods_lists_every_method_with_formula_and_arguments(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name, cls in layerfuse.METHODS.items():
        assert name in out and cls.formula in out
    assert "alpha=1.0" in out and "learned; heads=1" in out


def save_info(path, tensor):
    if path.suffix == ".npy":
        numpy.save(path, tensor.numpy())
    elif path.suffix == ".pt":
        torch.save(tensor, path)
    else:
        save_file({"info": tensor}, path)


@pytest.mark.parametrize("suffix", [".npy", ".pt", ".safetensors"])
def test_cli_reads_info_from_files_and_checks_its_shape(tmp_path, capsys, suffix):
    good, bad = tmp_path / f"good{suffix}", tmp_path / f"bad{suffix}"
    save_info(good, torch.ones(384))
    save_info(bad, torch.ones(5))
    assert main(["compare", "--json", "--repeats", "1", "--info", str(good)]) == 0
    assert json.loads(capsys.readouterr().out)["fusion_change"] > 0
    assert main(["compare", "--repeats", "1", "--info", str(bad)]) == 2
    assert "D = 384, got (5,)" in capsys.readouterr().err


def test_cli_inspect_shows_layers_and_sites(capsys):
    assert main(["inspect"]) == 0
    out = capsys.readouterr().out
    assert "hidden size 384" in out and "6 blocks" in out and "encoder.layer.5.output.dense" in out


def test_read_info_refuses_what_it_cannot_read(tmp_path):
    (tmp_path / "info.txt").write_text("1 2 3")
    with pytest.raises(layerfuse.FileFormatError, match="use a .npy, .pt, .safetensors file"):
        read_info(tmp_path / "info.txt")
    with pytest.raises(layerfuse.FileFormatError, match="no info file at"):
        read_info(tmp_path / "missing.npy")
    (tmp_path / "broken.npy").write_bytes(b"not numpy")
    with pytest.raises(layerfuse.FileFormatError, match="cannot read info from"):
        read_info(tmp_path / "broken.npy")
    save_file({"a": torch.ones(2), "b": torch.ones(2)}, tmp_path / "two.safetensors")
    with pytest.raises(layerfuse.FileFormatError, match="none named 'info'"):
        read_info(tmp_path / "two.safetensors")
    torch.save({"info": [1.0]}, tmp_path / "dict.pt")
    with pytest.raises(layerfuse.FileFormatError, match="holds dict, not one info tensor"):
        read_info(tmp_path / "dict.pt")


def test_cli_positions_take_names_or_indices(capsys):
    assert main(["compare", "--json", "--repeats", "1", "--positions", "0,-1"]) == 0
    assert json.loads(capsys.readouterr().out)["identical"] is True
    with pytest.raises(SystemExit):
        main(["compare", "--positions", "middle"])
    assert "not one of all, tokens, first, last" in capsys.readouterr().err


def test_console_script_help_for_every_command():
    helps = {}
    for argv in ([], ["compare"], ["methods"], ["inspect"]):
        helps[tuple(argv)] = subprocess.run(
            [sys.executable, "-m", "layerfuse", *argv, "--help"], capture_output=True, text=True, check=True
        ).stdout
        assert "usage: layerfuse" in helps[tuple(argv)]
    assert "compare" in helps[()] and "methods" in helps[()]
    assert all(option in helps[("compare",)] for option in ("--json", "--repeats", "--alpha", "--info", "--positions"))
