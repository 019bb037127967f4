"""Directions and erasers from activations: against numpy, scikit-learn and concept-erasure, and fused into a tiny BERT."""

from __future__ import annotations

import sys
import warnings

import numpy
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import layerfuse
from conftest import TINY, assert_unchanged, snapshot, tiny_bert

H = TINY["hidden_size"]


def gaussian_classes(counts, size=6, seed=0, spread=3.0):
    """Examples of len(counts) classes around random centres, on dimensions of very different scales."""
    generator = torch.Generator().manual_seed(seed)
    centres = spread * torch.randn(len(counts), size, generator=generator)
    scales = torch.logspace(-1, 2, size)
    rows = [centres[c] + torch.randn(n, size, generator=generator) for c, n in enumerate(counts)]
    labels = [c for c, n in enumerate(counts) for _ in range(n)]
    return torch.cat(rows) * scales, labels


def cosine(a, b) -> float:
    a, b = numpy.asarray(a, dtype=numpy.float64), numpy.asarray(b, dtype=numpy.float64)
    return float(a @ b / numpy.linalg.norm(a) / numpy.linalg.norm(b))


def test_mean_difference_is_the_difference_of_the_means():
    generator = torch.Generator().manual_seed(1)
    positive, negative = torch.randn(7, H, generator=generator) + 2, torch.randn(4, H, generator=generator)
    direction = layerfuse.mean_difference(positive, negative)
    expected = positive.numpy().astype(numpy.float64).mean(axis=0) - negative.numpy().astype(numpy.float64).mean(axis=0)
    assert direction.shape == (H,) and direction.dtype == torch.float32
    numpy.testing.assert_allclose(direction.numpy(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_pca_is_the_first_eigenvector_of_the_differences_second_moment_with_positives_higher(sign):
    generator = torch.Generator().manual_seed(2)
    negative = torch.randn(12, H, generator=generator)
    shift = sign * torch.randn(H, generator=generator)
    positive = negative + shift * (1 + 0.3 * torch.rand(12, 1, generator=generator)) + 0.1 * torch.randn(12, H)
    direction = layerfuse.pca(positive, negative)
    differences = (positive - negative).numpy().astype(numpy.float64)
    values, vectors = numpy.linalg.eigh(differences.T @ differences)
    expected = vectors[:, numpy.argmax(values)]
    expected = expected if (differences @ expected).mean() > 0 else -expected
    assert direction.shape == (H,)
    numpy.testing.assert_allclose(direction.numpy(), expected, atol=1e-5)
    assert (positive @ direction).mean() > (negative @ direction).mean()
    assert cosine(direction, shift) > 0.99


@pytest.mark.parametrize("labels", [["no", "yes"], [0, 1], [False, True]])
def test_the_probe_is_scikit_learns_logistic_regression_in_the_activations_units(labels):
    x, index = gaussian_classes((30, 20), spread=1.0)
    named = [labels[i] for i in index]
    weights = layerfuse.probe(x, named)
    reference = make_pipeline(StandardScaler(), LogisticRegression()).fit(x.numpy().astype(numpy.float64), named)
    coefficients = reference[-1].coef_[0] / reference[0].scale_
    assert weights.shape == (x.shape[1],) and weights.dtype == torch.float32
    assert cosine(weights, coefficients) > 0.9999
    # The logit of the second sorted class, up to a constant: the weights are in the activations' units.
    offset = (
        reference.decision_function(x.numpy().astype(numpy.float64)) - x.double().numpy() @ weights.double().numpy()
    )
    assert offset.std() < 1e-4 * (x.double().numpy() @ weights.double().numpy()).std()


def test_the_probe_for_three_classes_has_a_row_per_sorted_class():
    x, index = gaussian_classes((25, 15, 20), spread=1.0)
    named = [["b", "c", "a"][i] for i in index]
    weights = layerfuse.probe(x, named)
    reference = make_pipeline(StandardScaler(), LogisticRegression()).fit(x.numpy().astype(numpy.float64), named)
    assert list(reference.classes_) == ["a", "b", "c"] and weights.shape == (3, x.shape[1])
    coefficients = reference[-1].coef_ / reference[0].scale_
    assert all(cosine(row, want) > 0.9999 for row, want in zip(weights, coefficients, strict=True))
    logits = x.double().numpy() @ weights.double().numpy().T
    offset = reference.decision_function(x.numpy().astype(numpy.float64)) - logits
    assert (offset.std(axis=0) < 1e-4 * logits.std(axis=0)).all()


def erase_by_hand(x: torch.Tensor, info: torch.Tensor) -> torch.Tensor:
    """x − (x − μ)(A·B)ᵀ from the rows [μ; B; Aᵀ], in float64."""
    info, x = info.double(), x.double()
    rank = info.shape[0] // 2
    return x - (x - info[0]) @ (info[1 + rank :].T @ info[1 : 1 + rank]).T


def leace(x: torch.Tensor, labels, classes: int):
    """concept-erasure's eraser: the paper's closed form (no shrinkage, no trace constraint), in float64."""
    with warnings.catch_warnings():  # it scripts a function with torch.jit, which torch 2.13 deprecates
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", DeprecationWarning)
        from concept_erasure import LeaceEraser
    one_hot = torch.nn.functional.one_hot(torch.tensor(labels), classes).double()
    return LeaceEraser.fit(x.double(), one_hot, shrinkage=False, constrain_cov_trace=False)


def probe_accuracy(x: torch.Tensor, labels) -> float:
    """A fresh scikit-learn probe's accuracy on the data it was trained on (standardised: lbfgs converges fast)."""
    rows = x.double().numpy()
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(rows, labels).score(rows, labels)


def majority(labels) -> float:
    return max(labels.count(c) for c in set(labels)) / len(labels)


@pytest.mark.parametrize(
    ("counts", "size"),
    [((120, 80), 8), ((70, 50, 30), 8), ((9, 6, 5), 40)],
    ids=["2 classes", "3 classes", "fewer examples than dimensions"],
)
def test_the_eraser_erases_as_concept_erasures_leace_and_leaves_a_probe_at_the_majority_rate(counts, size):
    x, labels = gaussian_classes(counts, size=size)
    info = layerfuse.eraser(x, labels)
    reference = leace(x, labels, len(counts))
    rank = len(counts) - 1
    assert info.shape == (1 + 2 * rank, size) and info.dtype == torch.float32
    assert reference.proj_left.shape[1] - int((reference.proj_left.abs().sum(0) == 0).sum()) == rank
    erased = erase_by_hand(x, info)
    torch.testing.assert_close(erased, reference(x.double()), rtol=0, atol=1e-4 * float(x.abs().max()))
    assert probe_accuracy(x, labels) > majority(labels) + 0.2
    assert probe_accuracy(erased, labels) <= majority(labels) + 0.02


def token_classes():
    """A padded batch of 24 texts of three classes, each class drawing its tokens from its own third of the vocabulary."""
    generator = torch.Generator().manual_seed(4)
    lengths = torch.randint(2, 8, (24,), generator=generator)
    classes = torch.arange(24) % 3
    third = TINY["vocab_size"] // 3
    ids = 1 + classes[:, None] * third + torch.randint(0, third - 1, (24, 7), generator=generator)
    mask = (torch.arange(7)[None, :] < lengths[:, None]).long()
    batch = {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    return batch, classes[:, None].expand(24, 7)[mask.bool()].tolist()


def states(model, batch):
    with torch.no_grad():
        return model(**batch, output_hidden_states=True).hidden_states


def test_erase_at_a_layer_of_a_bert_erases_the_concept_by_both_approaches_bitwise_and_saves_and_loads(tmp_path):
    model, (batch, labels) = tiny_bert(), token_classes()
    real = batch["attention_mask"].bool()
    plain = states(model, batch)
    activations = plain[2][real]
    info = layerfuse.eraser(activations, labels)
    before = snapshot(model)
    fused = {}
    for approach in ("hook", "layer"):
        with layerfuse.fuse(model, info, layer=2, method="erase", approach=approach) as fusion:
            fused[approach] = states(model, batch)
            if approach == "layer":
                fusion.save(tmp_path / "eraser")
    assert_unchanged(model, before)
    assert all(torch.equal(h, c) for h, c in zip(fused["hook"], fused["layer"], strict=True))
    assert all(torch.equal(p, f) for p, f in zip(plain[:2], fused["hook"][:2], strict=True))
    erased = fused["hook"][2][real]
    reference = leace(activations, labels, 3)
    torch.testing.assert_close(erased.double(), reference(activations.double()), rtol=0, atol=1e-4)
    assert probe_accuracy(activations, labels) > majority(labels) + 0.2
    assert probe_accuracy(erased, labels) <= majority(labels) + 0.02
    with layerfuse.load_fusion(tmp_path / "eraser", model) as loaded:
        assert loaded.config.method == "erase" and torch.equal(loaded.info.source, info)
        again = states(model, batch)
    assert all(torch.equal(h, c) for h, c in zip(fused["layer"], again, strict=True))
    assert_unchanged(model, before)


def inlp_by_hand(x: torch.Tensor, labels, rounds: int) -> numpy.ndarray:
    """INLP written out: each round a standardised scikit-learn probe on the projected data, its rows' span removed."""
    rows = x.double().numpy()
    mean, removed = rows.mean(axis=0), numpy.zeros((rows.shape[1], rows.shape[1]))
    for _ in range(rounds):
        fitted = make_pipeline(StandardScaler(), LogisticRegression()).fit(rows - (rows - mean) @ removed, labels)
        weights = (fitted[-1].coef_ / fitted[0].scale_).T
        weights -= removed @ weights
        vectors, values, _ = numpy.linalg.svd(weights, full_matrices=False)
        found = vectors[:, values > 1e-6 * values.max()]  # C rows summing to zero span C - 1 directions
        removed = removed + found @ found.T
    return removed


@pytest.mark.parametrize("counts", [(40, 30), (30, 25, 20)], ids=["2 classes", "3 classes"])
def test_inlp_removes_the_span_of_each_rounds_probe(counts):
    x, labels = gaussian_classes(counts, size=8)
    info = layerfuse.inlp(x, labels, rounds=2)
    directions = 2 * (len(counts) - 1)  # two rounds of C - 1
    assert info.shape == (1 + 2 * directions, 8)
    basis = info[1 : 1 + directions].double()
    assert torch.equal(info[1 : 1 + directions], info[1 + directions :])
    torch.testing.assert_close(basis @ basis.T, torch.eye(directions, dtype=torch.float64), rtol=0, atol=1e-6)
    numpy.testing.assert_allclose(basis.T.numpy() @ basis.numpy(), inlp_by_hand(x, labels, 2), atol=1e-6)
    erased = layerfuse.Erase()(x[None], info)[0].double()
    torch.testing.assert_close(
        (erased - x.double().mean(0)) @ basis.T, torch.zeros(len(x), directions, dtype=torch.float64), rtol=0, atol=1e-3
    )


def test_an_eraser_of_the_classes_with_one_mean_changes_nothing():
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    info = layerfuse.eraser(x, ["a", "a", "b", "b"])
    assert info.shape == (1, 2)
    assert torch.equal(layerfuse.Erase()(x[None], info)[0], x)


X = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
BAD = {
    "one example of a class": (
        lambda: layerfuse.eraser(X, [0, 0, 0, 1, 1, 2]),
        layerfuse.DataError,
        r"every class needs two examples or more, got \{2: 1\}",
    ),
    "one class only": (lambda: layerfuse.probe(X, ["a"] * 6), layerfuse.DataError, "one class only \\('a'\\)"),
    "mismatched lengths": (
        lambda: layerfuse.eraser(X, [0, 1] * 2),
        layerfuse.DataError,
        "6 activations but 4 labels: give one label per row",
    ),
    "NaN": (
        lambda: layerfuse.mean_difference(
            X, X.index_put((torch.tensor([3]), torch.tensor([1])), torch.tensor(torch.nan))
        ),
        layerfuse.DataError,
        r"negative hold NaN or infinite values in 1 row\(s\) \(3\)",
    ),
    "wrong ndim": (
        lambda: layerfuse.probe(X[None], [0, 1] * 3),
        layerfuse.DataError,
        r"activations must be \(N, H\).*got shape \(1, 6, 4\)",
    ),
    "one positive": (lambda: layerfuse.pca(X[:1], X[1:2]), layerfuse.DataError, "positive has 1 example"),
    "widths differ": (
        lambda: layerfuse.mean_difference(X, X[:, :3]),
        layerfuse.DataError,
        "H = 4 but negative has H = 3",
    ),
    "unpaired": (lambda: layerfuse.pca(X, X[:4]), layerfuse.DataError, "6 positives and 4 negatives: pair them"),
    "labels that do not sort": (
        lambda: layerfuse.eraser(X, [0, "a"] * 3),
        layerfuse.ArgumentTypeError,
        "classes of one kind that sorts",
    ),
    "NaN label": (lambda: layerfuse.probe(X, [float("nan"), 1.0] * 3), layerfuse.DataError, "labels hold NaN"),
    "labels as a string": (lambda: layerfuse.probe(X, "ababab"), layerfuse.ArgumentTypeError, "got str"),
    "labels (N, 1)": (lambda: layerfuse.eraser(X, torch.zeros(6, 1)), layerfuse.DataError, r"\(N,\), got shape"),
    "integer activations": (lambda: layerfuse.eraser(X.long(), [0, 1] * 3), layerfuse.ArgumentTypeError, "int64"),
    "not a tensor": (lambda: layerfuse.mean_difference(X.tolist(), X), layerfuse.ArgumentTypeError, "torch.Tensor"),
    "no rounds": (lambda: layerfuse.inlp(X, [0, 1] * 3, rounds=0), layerfuse.ArgumentValueError, "rounds must be"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_gets_a_clear_layerfuse_error(case):
    call, error, message = BAD[case]
    with pytest.raises(error, match=message):
        call()


def test_labels_as_tensors_and_arrays_give_what_lists_give():
    x, labels = gaussian_classes((10, 12), size=4)
    expected = layerfuse.eraser(x, labels)
    assert torch.equal(layerfuse.eraser(x, torch.tensor(labels)), expected)
    assert torch.equal(layerfuse.eraser(x, numpy.array(labels)), expected)


def test_without_scikit_learn_the_probe_names_the_extra(monkeypatch):
    for name in [name for name in sys.modules if name == "sklearn" or name.startswith("sklearn.")]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(layerfuse.ArgumentValueError, match=r"pip install 'layerfuse\[derive\]'"):
        layerfuse.probe(X, [0, 1] * 3)
