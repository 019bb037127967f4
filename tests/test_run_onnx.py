"""`layerfuse run --backend onnx`: the fused model exported once and run by ONNX Runtime gives the embeddings of
an independent forward and of the torch backend, merged or hooked, at every pooling; what it cannot export is
refused before any work, the model left as it was."""

from __future__ import annotations

import os
import re
import sys

import numpy
import pyarrow as pa
import pytest
import torch

import layerfuse
from conftest import assert_unchanged, snapshot
from layerfuse import FusionConfig
from layerfuse.cli import main
from layerfuse.errors import ArchitectureError
from layerfuse.methods import METHODS, register_method
from layerfuse.run import Embedder
from layerfuse.run.embedding import POOLINGS
from layerfuse.run.onnx_backend import OnnxModel
from reference import as_broadcast, bert_forward, bert_forward_with_sublayer_edit, fixed_formula, learned_formula
from test_run import read_embeddings, sentences, small  # noqa: F401  (small: a fixture)

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'layerfuse[onnx]')")

STEER = torch.randn(32, generator=torch.Generator().manual_seed(3))
CASES = {
    "addition, merged": (FusionConfig(layer=1, method="addition", arguments={"alpha": 2.0}), True),
    "clamp at the mlp of the first token, by custom layer": (
        FusionConfig(
            layer=2, site="mlp", method="clamp", arguments={"value": 2.0}, positions="first", approach="layer"
        ),
        False,
    ),
}
"""A fusion that merges, and one that the trace records with how it reads the mask; a learned one by hook below."""


def reference_states(model, tokenizer, texts, config):
    """Each text alone, unpadded, through tests/reference.py's BERT forward: its tokens' last hidden states."""
    states = []
    with torch.no_grad():
        for text in texts:
            batch = tokenizer([text], return_tensors="pt")
            if config.site == "mlp":
                first = torch.zeros(1, batch["input_ids"].shape[1], 1, dtype=torch.bool)
                first[0, 0] = True
                clamp = fixed_formula("clamp", config.arguments)
                edit = lambda h: torch.where(first, clamp(h, as_broadcast(STEER, h)), h)
                hidden = bert_forward_with_sublayer_edit(model, batch, layer=config.layer, site="mlp", edit=edit)[-1][0]
            else:
                add = fixed_formula("addition", config.arguments)
                hidden = bert_forward(model, batch, layer=config.layer, edit=lambda h: add(h, as_broadcast(STEER, h)))
                hidden = hidden[-1][0]
            states.append(hidden)
    return states


def pooled(pooling, hidden):
    """sentence-transformers' poolings of one unpadded text's states (T, H), written out."""
    count = torch.tensor(float(len(hidden)))
    weights = torch.arange(1, len(hidden) + 1, dtype=torch.float32)[:, None]
    return {
        "mean": hidden.mean(0),
        "cls": hidden[0],
        "max": hidden.max(0).values,
        "lasttoken": hidden[-1],
        "weightedmean": (hidden * weights).sum(0) / weights.sum(),
        "mean_sqrt_len_tokens": hidden.sum(0) / count.sqrt(),
    }[pooling]


def embeddings(embedder, texts):
    table = embedder(pa.table({"row": range(len(texts)), "text": texts}))
    column = table["embedding"].combine_chunks()
    if embedder.pooling == "none":
        return [numpy.asarray(row, dtype=numpy.float32).reshape(-1, embedder.hidden_size) for row in column.to_pylist()]
    return list(column.flatten().to_numpy().reshape(len(texts), -1))


@pytest.mark.parametrize("case", CASES)
def test_onnx_gives_the_embeddings_of_an_independent_forward_and_of_the_torch_backend(small, case):  # noqa: F811
    config, merged = CASES[case]
    info = STEER
    model, tokenizer = layerfuse.load_model(small)
    texts = sentences(12, seed=5)
    expected = reference_states(model, tokenizer, texts, config)
    before, attention = snapshot(model), model.config._attn_implementation
    onnx = OnnxModel(model, tokenizer, config, info)
    assert_unchanged(model, before)
    assert model.config._attn_implementation == attention
    assert onnx.merged is merged
    with layerfuse.fuse(model, info, config) as fused:
        torch_backend = embeddings(Embedder(model, tokenizer, fused, batch_size=4), texts)
        for pooling in POOLINGS:
            got = embeddings(Embedder(model, tokenizer, onnx=onnx, pooling=pooling, batch_size=4), texts)
            for index, states in enumerate(expected):
                reference = states.numpy() if pooling == "none" else pooled(pooling, states).numpy()
                assert numpy.abs(got[index] - reference).max() <= 1e-5, (pooling, index)
                if pooling == "mean":
                    assert numpy.abs(got[index] - torch_backend[index]).max() <= 1e-5, index


def test_the_cli_writes_with_onnx_what_it_writes_with_torch_for_the_plain_model(small, tmp_path):  # noqa: F811
    (tmp_path / "c.txt").write_text("\n".join(sentences(40, seed=7)) + "\n")
    common = ["run", str(tmp_path / "c.txt"), "--model", str(small), "--batch-size", "8", "--normalize", "--quiet"]
    assert main([*common, "-o", str(tmp_path / "torch.parquet")]) == 0
    assert main([*common, "-o", str(tmp_path / "onnx.parquet"), "--backend", "onnx"]) == 0
    torch_backend, onnx = read_embeddings(tmp_path / "torch.parquet"), read_embeddings(tmp_path / "onnx.parquet")
    assert torch_backend.shape == onnx.shape == (40, 32)
    assert numpy.abs(onnx - torch_backend).max() <= 1e-5


def test_a_saved_learned_fusion_exports_with_its_trained_parameters(small, tmp_path):  # noqa: F811
    model, tokenizer = layerfuse.load_model(small)
    with (
        layerfuse.fuse(model, STEER, FusionConfig(layer=1, method="gate", positions="tokens")) as fusion,
        torch.no_grad(),
    ):
        for parameter in fusion.method.parameters():
            parameter.normal_(generator=torch.Generator().manual_seed(parameter.numel()))
        folder = fusion.save(tmp_path / "gate")
        method = fusion.method
    before = snapshot(model)
    onnx = OnnxModel(model, tokenizer, layerfuse.load_config(folder), STEER, saved=folder)
    assert_unchanged(model, before)
    batch = tokenizer(sentences(5, seed=9), padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = bert_forward(model, batch, layer=1, info=STEER, combine=learned_formula(method))[-1]
    real = batch["attention_mask"].bool()
    assert (onnx(batch) - expected)[real].abs().max() <= 1e-5


@pytest.fixture
def plus_length():
    """A method whose trace keeps the traced batch's length as a constant: its export computes something else."""

    @register_method("plus_length_test")
    class PlusLength(layerfuse.Method):
        formula = "h + T"
        info_layout = "none"

        def forward(self, hidden, info):
            return hidden + float(hidden.shape[1])

    try:
        yield
    finally:
        del METHODS["plus_length_test"]


def test_an_export_that_computes_something_else_is_refused_and_the_model_left_as_it_was(small, plus_length):  # noqa: F811
    model, tokenizer = layerfuse.load_model(small)
    before = snapshot(model)
    with pytest.raises(ArchitectureError, match="computes other hidden states than PyTorch .* use --backend torch"):
        OnnxModel(model, tokenizer, FusionConfig(layer=1, method="plus_length_test"))
    assert_unchanged(model, before)


def test_what_the_onnx_backend_cannot_do_exits_2_before_any_work(small, tmp_path, capsys, monkeypatch, plus_length):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.txt").write_text("one text\nanother text\n")
    numpy.save(tmp_path / "rows.npy", numpy.ones((2, 32), numpy.float32))
    cases = [
        (
            ["--layer", "1", "--info", "rows.npy"],
            r"info has a row per corpus row \(2, 32\): give one info for every row",
        ),
        (["--layer", "1", "--method", "plus_length_test"], "computes other hidden states than PyTorch"),
    ]
    for arguments, message in cases:
        assert main(["run", "c.txt", "-o", "out.npy", "--model", str(small), "--backend", "onnx", *arguments]) == 2
        error = capsys.readouterr().err
        assert error.startswith("layerfuse run: error: ") and re.search(message, error), error
        assert error.count("\n") == 1
    assert main(["run", "c.txt", "-o", "out.npy", "--model", str(small), "--backend", "tensorrt"]) == 2
    assert "unknown backend 'tensorrt': use one of torch, onnx" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert main(["run", "c.txt", "-o", "out.npy", "--model", str(small), "--backend", "onnx"]) == 2
    assert "pip install 'layerfuse[onnx]'" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["c.txt", "rows.npy"]


def test_the_session_runs_on_torch_threads_that_sleep_between_runs(small):  # noqa: F811
    """Spinning threads would take the cores from tokenising and pooling between runs, and from other work."""
    model, tokenizer = layerfuse.load_model(small)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        options = OnnxModel(model, tokenizer).session.get_session_options()
    finally:
        torch.set_num_threads(previous)
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 1)
    for key in ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning"):
        assert options.get_session_config_entry(key) == "0", key
