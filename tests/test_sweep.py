"""`sweep` gives what K separate fused forwards give, on padded batches and several architectures."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import layerfuse
from architectures import build
from conftest import TINY, assert_unchanged, padded_batch, snapshot
from layerfuse.cli import main
from layerfuse.lab.sweep_report import write_outputs
from layerfuse.sweep import cost_bound

H = TINY["hidden_size"]
B, T = 3, 7
GENERATOR = torch.Generator().manual_seed(3)
CASES = {
    "addition (H,)": (dict(method="addition"), torch.randn(5, H, generator=GENERATOR)),
    "addition (B,H) tokens": (
        dict(method="addition", alpha=0.5, positions="tokens"),
        torch.randn(5, B, H, generator=GENERATOR),
    ),
    "multiplication (B,T,H)": (dict(method="multiplication"), torch.randn(5, B, T, H, generator=GENERATOR)),
    "interpolate first": (dict(method="interpolate", positions="first"), torch.randn(5, H, generator=GENERATOR)),
    "replace last": (dict(method="replace", positions="last"), torch.randn(5, H, generator=GENERATOR)),
    "ablate indices": (dict(method="ablate", positions=[0, -1]), torch.randn(5, H, generator=GENERATOR)),
    "clamp mask": (
        dict(method="clamp", value=2.0, positions=torch.rand(B, T, generator=GENERATOR) > 0.5),
        torch.randn(5, B, H, generator=GENERATOR),
    ),
    "project (K,H)": (dict(method="project"), torch.randn(5, 2, H, generator=GENERATOR)),
    "project (B,K,H)": (dict(method="project"), torch.randn(5, B, 2, H, generator=GENERATOR)),
    "erase (B,1+2r,H) tokens": (
        dict(method="erase", positions="tokens"),
        torch.randn(5, B, 3, H, generator=GENERATOR) / H**0.5,
    ),
}


def separate(model, inputs, infos, layer, **options):
    """The reference: one fused forward per info, stacked."""
    outputs = []
    for info in infos:
        with torch.no_grad(), layerfuse.fuse(model, info, layer=layer, **options):
            outputs.append(model(**inputs)[0])
    return torch.stack(outputs)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("layer", range(TINY["num_hidden_layers"] + 1))
def test_equals_separate_fused_forwards(tiny, batch, layer, case):
    options, infos = CASES[case]
    before = snapshot(tiny)
    swept = layerfuse.sweep(tiny, batch, infos, layer=layer, chunk_size=2, **options)
    assert swept.shape == (5, B, T, H)
    torch.testing.assert_close(swept, separate(tiny, batch, infos, layer, **options), rtol=0, atol=1e-5)
    assert_unchanged(tiny, before)


@pytest.mark.parametrize("case", ["addition (H,)", "multiplication (B,T,H)"])
def test_bitwise_where_the_fused_layer_is_the_output(tiny, batch, case):
    """At the last block of a BERT the output is the fused hidden state: the same arithmetic, bit for bit."""
    options, infos = CASES[case]
    layer = TINY["num_hidden_layers"]
    assert torch.equal(
        layerfuse.sweep(tiny, batch, infos, layer=layer, **options), separate(tiny, batch, infos, layer, **options)
    )


def test_chunking_does_not_change_the_result(tiny, batch):
    infos = CASES["addition (H,)"][1]
    whole = layerfuse.sweep(tiny, batch, infos, layer=2)
    for chunk_size in (1, 2, 4, 100):
        torch.testing.assert_close(
            layerfuse.sweep(tiny, batch, infos, layer=2, chunk_size=chunk_size), whole, rtol=0, atol=1e-6
        )


def test_a_sequence_of_infos_is_a_stacked_tensor(tiny, batch):
    infos = CASES["addition (H,)"][1]
    assert torch.equal(layerfuse.sweep(tiny, batch, list(infos), layer=2), layerfuse.sweep(tiny, batch, infos, layer=2))


def test_the_prefix_runs_once(tiny, batch):
    """Blocks before the fused layer run once in all; blocks after it once per chunk of infos."""
    calls = [0] * TINY["num_hidden_layers"]
    handles = [
        block.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, block in enumerate(tiny.encoder.layer)
    ]
    layerfuse.sweep(tiny, batch, torch.randn(6, H), layer=2, chunk_size=3)
    for handle in handles:
        handle.remove()
    assert calls == [1 + 2, 1 + 2, 2]  # blocks 1 and 2: once computed, then replayed per chunk; block 3: per chunk


def test_minilm_padded_batch(minilm):
    model, tokenizer = minilm
    texts = ["Hello, how are you?", "A longer sentence, so that the batch is padded."]
    inputs = dict(tokenizer(texts, return_tensors="pt", padding=True))
    assert not inputs["attention_mask"].bool().all()
    infos = torch.randn(3, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    for layer in (3, 6):
        swept = layerfuse.sweep(model, inputs, infos, layer=layer, method="ablate", positions="tokens")
        expected = separate(model, inputs, infos, layer, method="ablate", positions="tokens")
        torch.testing.assert_close(swept, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "llama", "distilbert", "modernbert"])
@pytest.mark.parametrize("head", [False, True], ids=["base", "head"])
def test_other_architectures(name, head):
    """Decoders with a final norm, causal masks and heads: the model prepares everything, as in its forward."""
    model = build(name, head=head)
    batch = padded_batch()
    inputs = {"input_ids": batch["input_ids"] + 3 * batch["attention_mask"], "attention_mask": batch["attention_mask"]}
    infos = torch.randn(3, H, generator=torch.Generator().manual_seed(0))
    for layer in (1, TINY["num_hidden_layers"]):
        swept = layerfuse.sweep(model, inputs, infos, layer=layer, chunk_size=2)
        torch.testing.assert_close(swept, separate(model, inputs, infos, layer), rtol=0, atol=1e-5)


class PairBlock(nn.Module):
    """A block that returns its hidden states with an extra tensor, as attention weights would be."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.linear(hidden)
        return out, out.sum(-1)


class PairModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(num_hidden_layers=2, hidden_size=8)
        self.embed = nn.Embedding(10, 8)
        self.layers = nn.ModuleList([PairBlock(), PairBlock()])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(input_ids)
        for block in self.layers:
            hidden, _ = block(hidden)
        return hidden


def test_blocks_with_extra_outputs_are_refused_and_the_model_is_restored():
    model = PairModel()
    before = snapshot(model)
    with pytest.raises(layerfuse.ArchitectureError, match="returns more than its hidden states"):
        layerfuse.sweep(model, {"input_ids": torch.tensor([[1, 2, 3]])}, torch.randn(2, 8), layer=1)
    assert_unchanged(model, before)


def test_a_shared_block_is_refused():
    model = build("albert")
    with pytest.raises(layerfuse.ArchitectureError, match="shared by several layers"):
        layerfuse.sweep(model, padded_batch(), torch.randn(2, H), layer=2)


BAD = {
    "inputs not a mapping": (dict(inputs=[1, 2]), layerfuse.ArgumentTypeError, "mapping"),
    "batch sizes differ": (
        dict(inputs={"input_ids": torch.ones(3, 7, dtype=torch.long), "attention_mask": torch.ones(2, 7)}),
        layerfuse.ArgumentValueError,
        "same batch size",
    ),
    "infos not tensors": (dict(infos=[[1.0] * H]), layerfuse.ArgumentTypeError, "sequence of tensors"),
    "one info": (dict(infos=torch.randn(H)), layerfuse.InfoShapeError, "K >= 1 infos"),
    "infos of several shapes": (dict(infos=[torch.randn(H), torch.randn(B, H)]), layerfuse.InfoShapeError, "one shape"),
    "wrong size": (dict(infos=torch.randn(2, H + 1)), layerfuse.InfoShapeError, f"D = {H}"),
    "wrong batch": (dict(infos=torch.randn(2, B + 1, H)), layerfuse.InfoShapeError, "batch of 4"),
    "wrong tokens": (dict(infos=torch.randn(2, B, T + 1, H)), layerfuse.InfoShapeError, "8 tokens"),
    "nan": (dict(infos=torch.full((2, H), float("nan"))), layerfuse.InfoValueError, "NaN"),
    "no info method": (dict(method="scale", alpha=2.0), layerfuse.ArgumentValueError, "nothing to sweep"),
    "bad chunk": (dict(chunk_size=0), layerfuse.ArgumentValueError, "chunk_size"),
    "bad layer": (dict(layer=9), layerfuse.LayerIndexError, "out of range"),
    "bad positions mask": (
        dict(positions=torch.ones(B, T + 1, dtype=torch.bool)),
        layerfuse.InfoShapeError,
        "positions mask",
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_refused_before_the_model_runs(tiny, batch, case):
    changes, error, message = BAD[case]
    arguments = dict(inputs=batch, infos=torch.randn(2, H), layer=2) | changes
    before = snapshot(tiny)
    calls = []
    handle = tiny.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(error, match=message):
        layerfuse.sweep(tiny, arguments.pop("inputs"), arguments.pop("infos"), **arguments)
    handle.remove()
    assert calls == []
    assert_unchanged(tiny, before)


def test_cost_bound():
    assert cost_bound(3, 8, 6) == (3 + 8 * 3) / 48
    assert cost_bound(6, 32, 6) == 1 / 32
    assert cost_bound(0, 8, 6) == 1.0


@pytest.mark.parametrize("suffix", [".pt", ".npy", ".safetensors"])
def test_write_outputs(tmp_path, suffix):
    outputs = torch.randn(2, 3, 4, 5)
    path = write_outputs(tmp_path / f"out{suffix}", outputs)
    read = {
        ".pt": lambda: torch.load(path),
        ".npy": lambda: torch.from_numpy(numpy.load(path)),
        ".safetensors": lambda: load_file(path)["outputs"],
    }[suffix]()
    assert torch.equal(read, outputs)


def test_cli(tmp_path, capsys, minilm):
    model, tokenizer = minilm
    infos = torch.randn(3, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    torch.save(infos, tmp_path / "infos.pt")
    texts = ["Hello, how are you?", "A padded batch of two."]
    code = main(
        [
            "sweep",
            "--infos",
            str(tmp_path / "infos.pt"),
            "--layer",
            "5",
            "--method",
            "clamp",
            "--value",
            "2",
            "--text",
            texts[0],
            "--text",
            texts[1],
            "--output",
            str(tmp_path / "out.safetensors"),
            "--json",
        ]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    inputs = dict(tokenizer(texts, return_tensors="pt", padding=True))
    assert report["output_shape"] == [3, *inputs["input_ids"].shape, model.config.hidden_size]
    assert len(report["changes"]) == 3 and min(report["changes"]) > 0
    expected = separate(model, inputs, infos, 5, method="clamp", value=2.0)
    torch.testing.assert_close(load_file(tmp_path / "out.safetensors")["outputs"], expected, rtol=0, atol=1e-5)


def test_cli_bad_input(tmp_path, capsys):
    torch.save(torch.randn(3, 7), tmp_path / "infos.pt")
    assert main(["sweep", "--infos", str(tmp_path / "infos.pt")]) == 2
    assert "D = 384" in capsys.readouterr().err
