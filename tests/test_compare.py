"""The notebook's experiment done right, as a function and as a command."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import layerfuse
from layerfuse.cli import main


@pytest.fixture(scope="module")
def comparison():
    return layerfuse.compare(layer=3, method="multiplication", repeats=2)


def test_compare_finds_the_approaches_identical_and_the_fusion_effective(comparison):
    assert comparison.identical and comparison.max_abs_diff == 0.0
    assert comparison.fusion_change > 0
    batch, tokens = comparison.batch_shape
    assert batch == 4 and tokens > 4
    assert set(comparison.timings) == {"plain", "hook", "layer"}
    assert comparison.ratio("plain") == 1.0 and comparison.ratio("hook") > 0


def test_json_has_agreement_and_per_approach_medians_and_ratios(comparison):
    data = json.loads(json.dumps(comparison.to_dict()))
    assert data["identical"] is True and data["max_abs_diff"] == 0.0
    for name in ("plain", "hook", "layer"):
        assert data["timings"][name]["median_s"] > 0
        assert data["timings"][name]["ratio_to_plain"] == pytest.approx(
            data["timings"][name]["median_s"] / data["timings"]["plain"]["median_s"]
        )


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
    assert "identical" in out and "add at layer 0" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compare", "--layer", "9"], "layer 9 is out of range for a 6-block model: use 0..6 or -7..-1"),
        (["compare", "--method", "nope"], "unknown method 'nope'"),
        (["compare", "--repeats", "0"], "repeats must be at least 1"),
    ],
)
def test_cli_bad_input_exits_2_with_the_reason(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_console_script_help_for_every_command():
    for argv in ([], ["compare"]):
        out = subprocess.run([sys.executable, "-m", "layerfuse", *argv, "--help"], capture_output=True, text=True, check=True).stdout
        assert "usage: layerfuse" in out
    assert "--json" in out and "--repeats" in out
