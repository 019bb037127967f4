"""The command line itself: method arguments as --arg NAME=VALUE, run's positions, a light --help."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import ClassVar

import numpy
import pytest
import torch
from safetensors.torch import load_file

import layerfuse
from layerfuse.cli import main
from layerfuse.cli.main import parser
from layerfuse.cli.options import method_value
from layerfuse.methods import METHODS, register_method


@pytest.mark.parametrize(
    ("text", "value"),
    [("2", 2), ("-3", -3), ("0.5", 0.5), ("1e-3", 0.001), ("true", True), ("False", False), ("mean", "mean"), ("", "")],
)
def test_method_values_are_ints_floats_bools_or_text(text, value):
    assert method_value(text) == value and type(method_value(text)) is type(value)


def test_arg_gathers_the_method_arguments_with_the_shortcuts():
    argv = ["compare", "--arg", "heads=2", "--alpha", "0.5", "--arg", "on=true", "--arg", "name=x=y", "--value", "1"]
    assert parser().parse_args(argv).arguments == {"heads": 2, "alpha": 0.5, "on": True, "name": "x=y", "value": 1}
    assert parser().parse_args(["compare"]).arguments is None


@pytest.mark.parametrize("command", ["compare", "sweep --infos x.pt", "run c.txt -o out.npy"])
@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--arg", "beta"], "'beta' is not NAME=VALUE"),
        (["--arg", "=2"], "'=2' is not NAME=VALUE"),
        (["--arg", "two words=2"], "'two words=2' is not NAME=VALUE"),
        (["--alpha", "1", "--arg", "alpha=2"], "argument --arg: method argument 'alpha' is given twice (1, then 2)"),
        (["--arg", "alpha=1", "--arg", "alpha=2"], "method argument 'alpha' is given twice (1, then 2): give it once"),
        (["--arg", "value=1", "--value", "1"], "argument --value: method argument 'value' is given twice"),
    ],
)
def test_malformed_or_repeated_method_arguments_are_usage_errors(capsys, command, arguments, message):
    with pytest.raises(SystemExit) as exit_:
        main([*command.split(), *arguments])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_an_unknown_argument_exits_2_with_what_the_method_takes(capsys):
    assert main(["compare", "--repeats", "1", "--method", "cross_attention", "--arg", "head=2"]) == 2
    assert "method 'cross_attention': unknown argument(s) ['head']; it takes: heads=1" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compare", "--arg", "seed=1"], "--arg seed: 'seed' is a keyword of compare itself, so it cannot reach"),
        (["compare", "--arg", "site=mlp"], "'site' is a keyword of fuse itself"),
        (["sweep", "--infos", "x.pt", "--arg", "inputs=1"], "'inputs' is a keyword of sweep itself"),
        (["run", "c.txt", "-o", "o.npy", "--layer", "1", "--arg", "hidden_size=3"], "'hidden_size' is a keyword of"),
    ],
)
def test_a_command_s_own_keywords_are_no_method_arguments(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_learned_method_takes_its_arguments_and_starts_as_the_identity(capsys):
    assert main(["compare", "--json", "--repeats", "1", "--method", "gate", "--arg", "beta=0.5"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["method"] == "gate" and data["identical"] is True and data["fusion_change"] == 0.0


@pytest.fixture
def shift():
    """A user's method, `h + amount * v`, registered for one test; `built` records each instance's arguments."""

    @register_method("shift_test")
    class Shift(layerfuse.Method):
        formula = "h + amount * v"
        built: ClassVar[list[tuple[float, str, bool]]] = []

        def __init__(self, amount: float, label: str = "none", scaled: bool = False) -> None:
            super().__init__()
            self.amount = amount
            Shift.built.append((amount, label, scaled))

        def arguments(self):
            return {"amount": self.amount}

        def forward(self, hidden, info):
            return torch.add(hidden, info, alpha=self.amount)

    try:
        yield Shift
    finally:
        del METHODS["shift_test"]


def test_a_registered_method_gets_its_arguments_from_compare(capsys, shift):
    argv = ["compare", "--json", "--repeats", "1", "--layer", "-1", "--method", "shift_test"]
    assert main([*argv, "--arg", "amount=0.25", "--arg", "label=steer", "--arg", "scaled=true"]) == 0
    data = json.loads(capsys.readouterr().out)
    info = torch.randn(384, generator=torch.Generator().manual_seed(0))
    assert data["identical"] is True
    assert data["fusion_change"] == pytest.approx(0.25 * float(info.abs().max()), rel=1e-4)
    assert shift.built and set(shift.built) == {(0.25, "steer", True)}


def test_a_registered_method_gets_its_arguments_from_sweep_and_run(tmp_path, capsys, shift):
    infos, corpus = tmp_path / "infos.pt", tmp_path / "c.txt"
    torch.save(torch.randn(2, 384, generator=torch.Generator().manual_seed(1)), infos)
    torch.save(torch.randn(384, generator=torch.Generator().manual_seed(2)), tmp_path / "info.pt")
    corpus.write_text("a first text\nand a second, longer one\n")
    for method in (["--method", "shift_test", "--arg", "amount=0.5"], ["--method", "addition", "--alpha", "0.5"]):
        name = method[1]
        sweep = ["sweep", "--infos", str(infos), "--layer", "2", "-o", str(tmp_path / f"{name}.safetensors")]
        assert main([*sweep, *method]) == 0
        run = ["run", str(corpus), "-o", str(tmp_path / f"{name}.npy"), "--layer", "2", "--quiet"]
        assert main([*run, "--info", str(tmp_path / "info.pt"), *method]) == 0
    capsys.readouterr()
    assert torch.equal(*(load_file(tmp_path / f"{n}.safetensors")["outputs"] for n in ("shift_test", "addition")))
    assert numpy.array_equal(*(numpy.load(tmp_path / f"{n}.npy") for n in ("shift_test", "addition")))
    assert {built[0] for built in shift.built} == {0.5}


def test_run_positions_refuse_token_indices_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.txt").write_text("a text\n")
    torch.save(torch.ones(384), tmp_path / "info.pt")
    assert main(["run", "c.txt", "-o", "out.npy", "--layer", "1", "--info", "info.pt", "--positions", "0,-1"]) == 2
    error = capsys.readouterr().err
    assert "a run fuses at positions all, tokens, first, last" in error
    assert sorted(os.listdir(tmp_path)) == ["c.txt", "info.pt"]
    with pytest.raises(SystemExit):
        main(["run", "c.txt", "-o", "out.npy", "--positions", "middle"])
    assert "not one of all, tokens, first, last" in capsys.readouterr().err


HEAVY = ("matplotlib", "pyarrow", "tqdm", "ray", "layerfuse.lab.bench", "layerfuse.run")
TORCH_ALONE = "import json, sys, torch; print(json.dumps([name for name in sys.argv[1:] if name in sys.modules]))"
HELP_OF_EACH_COMMAND = """
import contextlib, io, json, sys
from layerfuse.cli import main
loaded = {}
for argv in ([], ["methods"], ["inspect"], ["compare"], ["run"], ["bench"], ["sweep"]):
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            main([*argv, "--help"])
        except SystemExit:
            pass
    loaded[" ".join(argv)] = [name for name in sys.argv[1:] if name in sys.modules]
print(json.dumps(loaded))
"""


def loaded_modules(code: str) -> object:
    """What `code`, run in a fresh interpreter with the names of HEAVY as its arguments, prints as JSON."""
    done = subprocess.run([sys.executable, "-c", code, *HEAVY], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def test_help_imports_no_heavy_module():
    # torch imports tqdm itself (torch.hub) wherever it is installed: then only the rest can be left out
    by_torch = loaded_modules(TORCH_ALONE)
    assert set(by_torch) <= {"tqdm"}
    loaded = loaded_modules(HELP_OF_EACH_COMMAND)
    assert len(loaded) == 7 and all(set(names) <= set(by_torch) for names in loaded.values()), loaded


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sweep", "--infos", "infos.pt", "-o", "nope/out.pt"], "cannot write the outputs to nope/out.pt: .*nope does"),
        (["sweep", "--infos", "infos.pt", "-o", "out.txt"], "cannot write outputs to out.txt: use a .pt, .npy, .safe"),
        (["sweep", "--infos", "infos.pt", "-o", "folder.pt"], "cannot write the outputs to folder.pt: it is a folder"),
        (
            ["bench", "--shapes", "1x8", "--plot", "nope/plot.png"],
            "cannot write the plot to nope/plot.png: .*nope does",
        ),
        (["bench", "--shapes", "1x8,1x100000"], "shape 1x100000 has more tokens than this model's 512 positions"),
    ],
)
def test_outputs_and_shapes_are_checked_before_any_work(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    torch.save(torch.ones(2, 384), tmp_path / "infos.pt")
    (tmp_path / "folder.pt").mkdir()
    monkeypatch.setattr("layerfuse.cli.sweep.sweep_report", forbidden)
    monkeypatch.setattr("layerfuse.lab.bench.time_point", forbidden)
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and re.search(message, error), error
    assert sorted(os.listdir(tmp_path)) == ["folder.pt", "infos.pt"]


def forbidden(*args, **kwargs):
    raise AssertionError("the work began before its arguments were checked")


def test_inspect_prints_what_layerfuse_inspect_returns(capsys):
    assert main(["inspect"]) == 0
    model, _ = layerfuse.load_model(None)
    assert capsys.readouterr().out == repr(layerfuse.inspect(model)) + "\n"
