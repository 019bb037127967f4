"""`derive` and `layerfuse derive`: the fitted info against numpy on hand-pooled hidden states, the held-out
scores, the eraser leaving a fresh probe at the majority rate, the saved fusion in `run`, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.metrics import roc_auc_score

import layerfuse
from conftest import assert_unchanged, snapshot
from layerfuse.cli import main
from layerfuse.deriving import derive, separation_by_layer, split

EXAMPLES = Path(__file__).parent.parent / "examples" / "sentiment"
POSITIVE = (EXAMPLES / "positive.txt").read_text().splitlines()
NEGATIVE = (EXAMPLES / "negative.txt").read_text().splitlines()
TEXTS, LABELS = POSITIVE + NEGATIVE, ["positive"] * len(POSITIVE) + ["negative"] * len(NEGATIVE)


def pooled_by_hand(model, tokenizer, texts, layer: int) -> numpy.ndarray:
    """Mean over real tokens of output_hidden_states[layer] of one padded batch, the mask applied by hand."""
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        states = model(**batch, output_hidden_states=True).hidden_states[layer].double()
    mask = batch["attention_mask"][..., None].double()
    return ((states * mask).sum(1) / mask.sum(1)).numpy()


def test_split_is_seeded_stratified_and_holds_out_at_least_one_of_each_class():
    labels = ["a"] * 2 + ["b"] * 9 + ["c"] * 5
    train, held = split(labels, 0.25, seed=3)
    assert split(labels, 0.25, seed=3) == (train, held) and split(labels, 0.25, seed=4) != (train, held)
    assert sorted(train + held) == list(range(len(labels)))
    assert sorted(labels[i] for i in held) == ["a", "b", "b", "c"]
    train, held = split(["p"] * 40 + ["n"] * 40, 0.25, seed=0)  # contrastive pairs i, 40 + i stay together
    assert [i + 40 for i in held if i < 40] == [i for i in held if i >= 40] and len(held) == 20


def test_mean_difference_is_the_difference_of_the_class_means_of_the_hidden_states(minilm):
    model, tokenizer = minilm
    before = snapshot(model)
    derived = derive(model, tokenizer, TEXTS, LABELS, layer=3, arguments={"alpha": 2.0})
    assert_unchanged(model, before)
    states = pooled_by_hand(model, tokenizer, TEXTS, layer=3)
    train, held = split(LABELS, 0.25, seed=0)
    positive = [i for i in train if LABELS[i] == "positive"]
    negative = [i for i in train if LABELS[i] == "negative"]
    expected = states[positive].mean(0) - states[negative].mean(0)
    numpy.testing.assert_allclose(derived.info.double().numpy(), expected, atol=1e-5)
    projections = states[held] @ expected
    assert derived.scores["auc"] == pytest.approx(roc_auc_score([LABELS[i] == "positive" for i in held], projections))
    assert derived.scores["auc"] > 0.9
    assert derived.scores["direction_norm"] == pytest.approx(float(numpy.linalg.norm(expected)), rel=1e-4)
    assert derived.config == layerfuse.FusionConfig(layer=3, method="addition", arguments={"alpha": 2.0})
    assert derived.classes == ("positive", "negative") and derived.counts == {"train": 60, "held_out": 20}


def test_the_eraser_leaves_a_fresh_probe_at_the_majority_rate(minilm):
    model, tokenizer = minilm
    derived = derive(model, tokenizer, TEXTS, LABELS, layer=4, estimator="eraser")
    scores = derived.scores
    assert derived.config.method == "erase"
    assert scores["probe_accuracy"] > 0.85
    assert scores["erased_probe_accuracy"] <= scores["majority_rate"] + 0.02


def test_separation_by_layer_scores_every_layer_as_derive_does(minilm):
    model, tokenizer = minilm
    rows = separation_by_layer(model, tokenizer, TEXTS, LABELS)
    assert [row["layer"] for row in rows] == list(range(7))
    alone = derive(model, tokenizer, TEXTS, LABELS, layer=5)
    assert rows[5]["mean_difference"]["auc"] == pytest.approx(alone.scores["auc"], abs=1e-6)
    assert rows[5]["mean_difference"]["score"] == rows[5]["mean_difference"]["auc"]


@pytest.fixture(scope="module")
def class_files(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("classes")
    (folder / "a.txt").write_text("\n".join(POSITIVE) + "\n")
    (folder / "b.txt").write_text("\n".join(NEGATIVE) + "\n")
    return folder / "a.txt", folder / "b.txt"


def test_derive_then_run_with_the_saved_fusion(class_files, tmp_path, capsys, minilm):
    a, b = class_files
    steer = tmp_path / "steer"
    argv = [
        "derive",
        "--positive",
        str(a),
        "--negative",
        str(b),
        "--layer",
        "3",
        "--alpha",
        "4",
        "--output",
        str(steer),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "ROC AUC of the projection" in printed and "median hidden-state norm" in printed
    config, info = layerfuse.saving.read_fusion(steer)
    assert config == layerfuse.FusionConfig(layer=3, method="addition", arguments={"alpha": 4.0})
    record = json.loads((steer / "derivation.json").read_text())
    assert record["estimator"] == "mean_difference" and 0.9 < record["scores"]["auc"] <= 1.0
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The train leaves at nine.\nA short note.\n")
    assert main(["run", str(corpus), "--fusion", str(steer), "--output", str(tmp_path / "e.parquet")]) == 0
    fused = numpy.stack(pq.read_table(tmp_path / "e.parquet")["embedding"].to_numpy(zero_copy_only=False))
    model, tokenizer = minilm
    with layerfuse.fuse(model, info, config), torch.no_grad():
        batch = tokenizer(corpus.read_text().splitlines(), return_tensors="pt", padding=True)
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None]
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    numpy.testing.assert_allclose(fused, expected.numpy(), atol=1e-5)


def test_layer_all_writes_the_table_and_the_plot(class_files, tmp_path, capsys):
    a, b = class_files
    out = tmp_path / "layers"
    argv = ["derive", "--positive", str(a), "--negative", str(b), "--layer", "all", "--output", str(out)]
    assert main([*argv, "--estimator", "mean_difference", "--estimator", "eraser"]) == 0
    assert "| layer | mean_difference | eraser |" in capsys.readouterr().out
    assert (out / "layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = (out / "layers.csv").read_text().splitlines()
    assert lines[0].startswith("layer,estimator,score") and len(lines) == 1 + 7 * 2


def test_labels_from_a_column(tmp_path, capsys):
    rows = [{"text": t, "mood": str(label == "positive").lower()} for t, label in zip(TEXTS, LABELS)]
    path = tmp_path / "moods.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    argv = ["derive", "--input", str(path), "--label-column", "mood", "--layer", "2", "--estimator", "probe"]
    assert main([*argv, "--output", str(tmp_path / "probe"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["classes"] == ["true", "false"] and result["scores"]["probe_accuracy"] > 0.8


@pytest.mark.parametrize(
    ("files", "extra", "message"),
    [
        ({"a.txt": "one text\n", "b.txt": "two\nthree\n"}, [], "too few texts of class 'positive' (1)"),
        ({"a.txt": "one\n\nthree\n", "b.txt": "two\nfour\n"}, [], "a.txt, line 2: empty text"),
        ({"a.txt": "one\ntwo\n", "b.txt": "three\nfour\n"}, ["--layer", "9"], "layer"),
        ({"a.txt": "one\ntwo\n", "b.txt": "three\nfour\n"}, ["--estimator", "eraser"], "the eraser needs at least 3"),
        ({"a.txt": "1\n2\n3\n", "b.txt": "4\n5\n6\n"}, ["--estimator", "eraser", "--method", "addition"], "erase"),
        ({"rows.jsonl": '{"text": "x", "y": "1"}\n{"text": "z", "y": "1"}\n'}, [], "all 2 texts have the label '1'"),
        ({"rows.jsonl": '{"text": "x", "y": "1"}\n'}, ["--label-column", "nope"], "unknown column 'nope'"),
    ],
)
def test_bad_input_exits_2_with_a_message(tmp_path, capsys, files, extra, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    if "a.txt" in files:
        texts = ["--positive", str(tmp_path / "a.txt"), "--negative", str(tmp_path / "b.txt")]
    else:
        texts = ["--input", str(tmp_path / "rows.jsonl")] + (
            [] if "--label-column" in extra else ["--label-column", "y"]
        )
    layer = [] if "--layer" in extra else ["--layer", "1"]
    assert main(["derive", *texts, *layer, *extra, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
