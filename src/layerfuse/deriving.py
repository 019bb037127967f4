"""`derive`: texts with labels in, a fusion out — a direction or an eraser estimated at a layer, with its held-out scores.

The texts are split, class by class and seeded, into a training part and a held-out part; the site's
activations (`capture`, pooled per text) are read for both; the estimator is fitted on the training
part; the held-out part measures it: for a direction, the ROC AUC of the held-out texts' projections
on it (and, for `probe`, a fresh probe's accuracy); for the eraser, a fresh scikit-learn probe's
accuracy before and after erasure against the majority-class rate. `separation_by_layer` measures
the same at every layer, to see where a concept lives before choosing one.

>>> import layerfuse
>>> model, tokenizer = layerfuse.load_model()
>>> texts = ["a sunny day", "a lovely walk", "a great meal", "a happy child",
...          "a rainy day", "a dreadful walk", "an awful meal", "a sad child"]
>>> derived = derive(model, tokenizer, texts, ["positive"] * 4 + ["negative"] * 4, layer=3)
>>> derived.config.method, tuple(derived.info.shape), sorted(derived.scores)
('addition', (384,), ['auc', 'direction_norm', 'hidden_norm'])
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .capture import capture
from .config import FusionConfig
from .erasure import eraser
from .errors import ArgumentTypeError, ArgumentValueError
from .estimators import mean_difference, pca, probe
from .fusion import fuse
from .methods import METHODS, canonical_name, make_method
from .sites import find_blocks

ESTIMATORS = ("mean_difference", "pca", "probe", "eraser")
DIRECTIONS = ("mean_difference", "pca", "probe")
POSITIVE_NAMES = ({0, 1}, {"0", "1"}, {False, True}, {"false", "true"}, {"negative", "positive"})
"""Label pairs whose positive class is known without being named: the second of each."""


@dataclass(frozen=True)
class Derived:
    """A derived fusion: its config and info, and what measured it on the held-out texts.

    `scores`: `auc` (directions of two classes), `probe_accuracy`, `erased_probe_accuracy` and
    `majority_rate` (the eraser, a probe), `direction_norm` and `hidden_norm` (the median norm of the
    layer's hidden states over real tokens, the scale to choose `alpha` by).
    """

    config: FusionConfig
    info: torch.Tensor
    estimator: str
    classes: tuple[Hashable, ...]
    counts: dict[str, int]
    scores: dict[str, float]

    def save(self, model: nn.Module, directory: str | os.PathLike[str]) -> Path:
        """Write the fusion (as `Fusion.save` does) for `model`; `load_fusion` and `layerfuse run --fusion` take it."""
        with fuse(model, self.info, self.config) as fusion:
            return fusion.save(directory)

    def to_dict(self) -> dict[str, Any]:
        """The derivation as JSON-ready data (the info left out)."""
        return {
            "estimator": self.estimator,
            "fusion": self.config.to_dict(),
            "classes": [str(c) for c in self.classes],
            "counts": self.counts,
            "scores": self.scores,
        }


def _check_labels(texts: Sequence[str], labels: Sequence[Hashable], estimators: Sequence[str]) -> list[Hashable]:
    if isinstance(texts, str) or not all(isinstance(text, str) for text in texts):
        raise ArgumentTypeError("texts must be a sequence of strings")
    labels = labels.tolist() if isinstance(labels, torch.Tensor) else list(labels)
    if len(labels) != len(texts):
        raise ArgumentValueError(f"{len(texts)} texts and {len(labels)} labels: give one label a text")
    empty = next((i for i, text in enumerate(texts) if not text.strip()), None)
    if empty is not None:
        raise ArgumentValueError(f"text {empty} is empty: every text needs words to be measured")
    counts: dict[Hashable, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    if len(counts) < 2:
        raise ArgumentValueError(
            f"all {len(labels)} texts have the label {labels[0]!r}: give texts of two classes or more"
        )
    fitted = [e for e in estimators if e in ("probe", "eraser")]
    needed = 3 if fitted else 2
    few = {label: n for label, n in counts.items() if n < needed}
    if few:
        who = f"the {fitted[0]} needs" if fitted else "give"
        raise ArgumentValueError(
            f"too few texts of class {', '.join(map(repr, few))} ({', '.join(map(str, few.values()))}): "
            f"{who} at least {needed} a class, {needed - 1} to fit and one to measure on"
        )
    return labels


def positive_class(classes: Sequence[Hashable], positive: Hashable | None) -> Hashable:
    """The class that a direction points to: `positive` if given, else the known one of a pair such as 0/1.

    >>> positive_class(["negative", "positive"], None), positive_class(["cat", "dog"], "cat")
    ('positive', 'cat')
    """
    if len(classes) != 2:
        raise ArgumentValueError(
            f"a direction separates two classes, and the labels hold {len(classes)} "
            f"({', '.join(map(repr, classes))}): use the probe or the eraser for more"
        )
    if positive is not None:
        if positive not in classes:
            raise ArgumentValueError(
                f"positive class {positive!r} is not a label: use one of {', '.join(map(repr, classes))}"
            )
        return positive
    found = set(classes)
    for pair in POSITIVE_NAMES:
        if found == pair:
            return next(c for c in classes if c in (1, "1", True, "true", "positive"))
    raise ArgumentValueError(
        f"which of {classes[0]!r} and {classes[1]!r} is the positive class? Name it (positive=..., --positive-label)"
    )


def split(labels: Sequence[Hashable], holdout: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of the training and held-out texts: per class, a seeded shuffle, `holdout` of it (at least one) held out.

    Classes of one size are shuffled alike, so that the i-th texts of two classes — a contrastive
    pair, as `pca` takes them — fall on the same side, and stay in order there.

    >>> split(["a", "a", "b", "b", "b", "b"], 0.25, seed=0)
    ([1, 3, 4, 5], [0, 2])
    """
    if not 0 < holdout < 1:
        raise ArgumentValueError(f"holdout is the share of texts held out, between 0 and 1, got {holdout}")
    train, held = [], []
    for label in dict.fromkeys(labels):
        members = [i for i, other in enumerate(labels) if other == label]
        order = torch.randperm(len(members), generator=torch.Generator().manual_seed(seed)).tolist()
        count = min(len(members) - 1, max(1, round(holdout * len(members))))
        held += [members[i] for i in order[:count]]
        train += [members[i] for i in order[count:]]
    return sorted(train), sorted(held)


def _pooled(tokens: list[torch.Tensor], pooling: str) -> torch.Tensor:
    pick = {"mean": lambda t: t.mean(0), "first": lambda t: t[0], "last": lambda t: t[-1]}
    if pooling not in pick:
        raise ArgumentValueError(f"unknown pooling {pooling!r}: use one of {', '.join(pick)}")
    return torch.stack([pick[pooling](t) for t in tokens])


def _probe_accuracy(fit: torch.Tensor, fit_labels: list[Any], held: torch.Tensor, held_labels: list[Any]) -> float:
    """The held-out accuracy of a fresh scikit-learn logistic-regression probe fitted on `fit`."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    classifier.fit(fit.double().numpy(), [str(label) for label in fit_labels])
    return float(classifier.score(held.double().numpy(), [str(label) for label in held_labels]))


def _auc(held: torch.Tensor, held_labels: list[Hashable], direction: torch.Tensor, positive: Hashable) -> float:
    """The ROC AUC of the held-out projections on `direction`, `positive` the class it points to."""
    from sklearn.metrics import roc_auc_score

    projections = (held.double() @ direction.double()).numpy()
    return float(roc_auc_score([label == positive for label in held_labels], projections))


def _estimate(
    estimator: str,
    activations: torch.Tensor,
    labels: list[Hashable],
    train: list[int],
    held: list[int],
    positive: Hashable,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Fit `estimator` on the `train` rows, measure it on the `held` rows: its info and its scores."""
    fit, measure = activations[train], activations[held]
    fit_labels, held_labels = [labels[i] for i in train], [labels[i] for i in held]
    scores: dict[str, float] = {}
    if estimator == "eraser":
        info = eraser(fit, fit_labels)
        erase = make_method("erase")
        prepared = erase.prepare(info)
        erased_fit, erased_held = (erase(x[None], prepared)[0] for x in (fit, measure))
        scores["probe_accuracy"] = _probe_accuracy(fit, fit_labels, measure, held_labels)
        scores["erased_probe_accuracy"] = _probe_accuracy(erased_fit, fit_labels, erased_held, held_labels)
        scores["majority_rate"] = max(held_labels.count(c) for c in set(held_labels)) / len(held_labels)
        return info, scores
    if estimator == "probe":
        info = probe(fit, fit_labels)
        if info.ndim == 1 and positive != sorted(set(fit_labels))[1]:
            info = -info  # a two-class probe points to the second of the sorted classes
        scores["probe_accuracy"] = _probe_accuracy(fit, fit_labels, measure, held_labels)
    else:
        chosen = torch.tensor([label == positive for label in fit_labels])
        info = (mean_difference if estimator == "mean_difference" else pca)(fit[chosen], fit[~chosen])
    if info.ndim == 1:
        scores["auc"] = _auc(measure, held_labels, info, positive)
        scores["direction_norm"] = float(info.double().norm())
    return info, scores


def _method_for(estimator: str, method: str | None, shape: tuple[int, ...]) -> str:
    if estimator == "eraser":
        if method not in (None, "erase"):
            raise ArgumentValueError(f"the eraser is info for the erase method, not {method!r}: leave the method out")
        return "erase"
    name = canonical_name(method or "addition")
    cls = METHODS[name]
    if cls.learned:
        raise ArgumentValueError(f"method {name!r} is learned: derive gives fixed info; train it with layerfuse.train")
    wanted = "basis" if len(shape) == 2 else "vector"
    if name == "erase" or cls.info_layout != wanted:
        use = "project" if wanted == "basis" else "addition, ablate, clamp or another vector method"
        raise ArgumentValueError(
            f"method {name!r} takes {cls.info_layout} info, and the {estimator} gives a {wanted} {shape}: use {use}"
        )
    return name


def _prepared(
    texts: Sequence[str], labels: Sequence[Hashable], estimators: Sequence[str], positive: Hashable | None
) -> tuple[list[Hashable], Hashable | None]:
    """The labels as a list, after the checks, and the class a direction points to (None for a probe of more)."""
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise ArgumentValueError("derive measures with scikit-learn: pip install 'layerfuse[derive]'") from None
    unknown = [e for e in estimators if e not in ESTIMATORS]
    if unknown or not estimators:
        raise ArgumentValueError(
            f"unknown estimator {unknown[0] if unknown else None!r}: use one of {', '.join(ESTIMATORS)}"
        )
    labels = _check_labels(texts, labels, estimators)
    classes = tuple(dict.fromkeys(labels))
    directions = [e for e in estimators if e in ("mean_difference", "pca") or (e == "probe" and len(classes) == 2)]
    return labels, positive_class(classes, positive) if directions else None


def derive(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    labels: Sequence[Hashable],
    *,
    layer: int,
    estimator: str = "mean_difference",
    method: str | None = None,
    arguments: dict[str, Any] | None = None,
    site: str = "output",
    positions: Any = "all",
    pooling: str = "mean",
    positive: Hashable | None = None,
    holdout: float = 0.25,
    seed: int = 0,
    batch_size: int = 32,
) -> Derived:
    """Estimate `estimator` from the activations of `texts` at `layer` and `site`, and measure it held out.

    The directions (`mean_difference`, `pca`, a two-class `probe`) default to the `addition` method
    (`arguments`, e.g. {"alpha": 4.0}); `positive` names the class they point to (known for pairs such
    as 0/1 or negative/positive). A probe of more classes gives a (C, H) basis for `project`. The
    `eraser` gives info for the `erase` method. `positions` is the fusion's; activations are pooled
    over real tokens by `pooling` (mean, first, last).
    """
    labels, point_to = _prepared(texts, labels, [estimator], positive)
    train, held = split(labels, holdout, seed)
    tokens = capture(
        model, list(texts), tokenizer=tokenizer, layer=layer, site=site, pooling="none", batch_size=batch_size
    )
    info, scores = _estimate(estimator, _pooled(tokens, pooling), labels, train, held, point_to)
    scores["hidden_norm"] = float(torch.cat(tokens).double().norm(dim=-1).median())
    name = _method_for(estimator, method, tuple(info.shape))
    config = FusionConfig(method=name, arguments=arguments or {}, layer=layer, site=site, positions=positions)
    classes = tuple(dict.fromkeys(labels))
    ordered = classes if point_to is None else (point_to, *(c for c in classes if c != point_to))
    return Derived(config, info, estimator, ordered, {"train": len(train), "held_out": len(held)}, scores)


HEADLINE = {"eraser": "erased_probe_accuracy"}


def separation_by_layer(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    labels: Sequence[Hashable],
    *,
    estimators: Sequence[str] = ("mean_difference",),
    layers: Sequence[int] | None = None,
    site: str = "output",
    pooling: str = "mean",
    positive: Hashable | None = None,
    holdout: float = 0.25,
    seed: int = 0,
    batch_size: int = 32,
) -> list[dict[str, Any]]:
    """At each of `layers` (default: every one, 0..N), each estimator's held-out scores, one forward per batch for all.

    Each row: `layer`, and per estimator its scores (as `Derived.scores`, without the norms of the
    hidden states); `score` is its headline: the AUC of a direction, a probe's accuracy for more
    classes, the probe accuracy left after erasure for the eraser.
    """
    labels, point_to = _prepared(texts, labels, estimators, positive)
    layers = list(range(len(find_blocks(model)) + 1)) if layers is None else list(layers)
    train, held = split(labels, holdout, seed)
    captured = capture(
        model, list(texts), tokenizer=tokenizer, layer=layers, site=site, pooling=pooling, batch_size=batch_size
    )
    rows = []
    for layer in layers:
        activations = captured[layer]
        row: dict[str, Any] = {"layer": layer}
        for estimator in estimators:
            scores = _estimate(estimator, activations, labels, train, held, point_to)[1]
            headline = HEADLINE.get(estimator, "auc" if "auc" in scores else "probe_accuracy")
            row[estimator] = {**scores, "score": scores[headline]}
        rows.append(row)
    return rows
