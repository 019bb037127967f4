"""Directions from activations: the mean difference, the first principal component of paired differences, a probe.

Activations are (N, H) tensors, one row per example (what a layer holds, pooled); labels are any
hashable classes that sort (str, int, bool). Each estimator returns info for `fuse` in the
activations' dtype and device (`addition`, `ablate`, `clamp`, ...), computed in float64.

>>> positive, negative = torch.tensor([[2.0, 1.0], [4.0, 1.0]]), torch.tensor([[0.0, 1.0], [0.0, 3.0]])
>>> mean_difference(positive, negative)
tensor([ 3., -1.])
>>> pca(positive, negative)
tensor([ 0.9239, -0.3827])
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Hashable, Sequence

import numpy
import torch

from .errors import ArgumentTypeError, ArgumentValueError, DataError, MeasurementError
from .info import FLOATS, check_tensor

Labels = Sequence[Hashable] | torch.Tensor | numpy.ndarray


def checked_activations(activations: object, what: str = "activations") -> torch.Tensor:
    """`activations` as float64 on the CPU, if they are a finite floating-point (N, H) tensor with N, H ≥ 1."""
    check_tensor(activations, what, ArgumentTypeError)
    if activations.dtype not in FLOATS:
        raise ArgumentTypeError(f"{what} must be a floating-point tensor, got {activations.dtype}: use .float()")
    if activations.ndim != 2 or 0 in activations.shape:
        raise DataError(
            f"{what} must be (N, H), one row of H values per example, got shape {tuple(activations.shape)}: "
            "pool token states per example first (or flatten (N, T, H) to (N·T, H))"
        )
    values = activations.detach().to("cpu", torch.float64)
    rows = (~torch.isfinite(values)).any(dim=1).nonzero().flatten().tolist()
    if rows:
        shown = ", ".join(map(str, rows[:5])) + (", ..." if len(rows) > 5 else "")
        raise DataError(
            f"{what} hold NaN or infinite values in {len(rows)} row(s) ({shown}): every value must be finite"
        )
    return values


def class_indices(labels: object, count: int) -> tuple[torch.Tensor, list[Hashable]]:
    """Each label's index (N,) into the sorted classes, and the classes; each class needs two examples."""
    if isinstance(labels, (torch.Tensor, numpy.ndarray)):
        if labels.ndim != 1:
            raise DataError(f"labels must be one per example, (N,), got shape {tuple(labels.shape)}")
        labels = labels.tolist()
    elif isinstance(labels, (str, bytes)) or not isinstance(labels, Sequence):
        raise ArgumentTypeError(f"labels must be a sequence or a 1-d tensor of classes, got {type(labels).__name__}")
    if len(labels) != count:
        raise DataError(f"there are {count} activations but {len(labels)} labels: give one label per row")
    try:
        counts = Counter(labels)
        classes = sorted(counts)
    except TypeError as error:
        raise ArgumentTypeError(
            f"labels must be hashable classes of one kind that sorts (str, int, ...): {error}"
        ) from None
    if any(label != label for label in classes):
        raise DataError("labels hold NaN, which equals no class: give every example a class")
    if len(classes) < 2:
        raise DataError(f"the labels have one class only ({classes[0]!r}): an estimator needs two or more")
    few = {label: n for label, n in counts.items() if n < 2}
    if few:
        raise DataError(f"every class needs two examples or more, got {few}")
    index = {label: i for i, label in enumerate(classes)}
    return torch.tensor([index[label] for label in labels]), classes


def _pair(positive: object, negative: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sets checked: each two rows or more, of the same width H."""
    positive, negative = checked_activations(positive, "positive"), checked_activations(negative, "negative")
    if positive.shape[1] != negative.shape[1]:
        raise DataError(
            f"positive has H = {positive.shape[1]} but negative has H = {negative.shape[1]}: use one layer's"
        )
    for what, rows in (("positive", positive), ("negative", negative)):
        if len(rows) < 2:
            raise DataError(f"{what} has {len(rows)} example: every class needs two examples or more")
    return positive, negative


def mean_difference(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """The difference of the classes' mean activations, (H,): v = mean_i positive[i] − mean_j negative[j].

    The steering vector of ActAdd (Turner et al. 2023, "Activation Addition") and of Contrastive
    Activation Addition (CAA, Rimsky et al. 2024); DiffMean in AxBench (Wu et al. 2025). In the
    activations' units: `fuse(model, v, layer=k, method="addition", alpha=1.0)` moves a state by the
    distance between the classes' means. The counts may differ.
    """
    positive_rows, negative_rows = _pair(positive, negative)
    return (positive_rows.mean(dim=0) - negative_rows.mean(dim=0)).to(positive.dtype).to(positive.device)


def pca(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """The first principal component of the paired differences d_i = positive[i] − negative[i], unit norm, (H,).

    v = argmax over ‖v‖ = 1 of Σ_i (d_i · v)², the first right singular vector of D = [d_1; ...; d_N],
    its sign chosen so that positives project higher on average: mean_i (d_i · v) > 0. As in RepE
    (Zou et al. 2023, its PCA reader on pairs in random order) and repeng (its `pca_center`), the
    differences are not centred: that is the component of the symmetric set {±d_i}; centring the
    one-sided differences would remove the very shift the direction is to capture. Unit norm, as
    both return it: scale it with the method's `alpha`, e.g. by the mean difference's length along
    it, `mean_difference(positive, negative) @ v`.

    positive[i] and negative[i] are a pair (the same prompt with the concept and without), so the
    counts must be equal, as both libraries take pairs; for unpaired sets, use `mean_difference`.
    """
    positive_rows, negative_rows = _pair(positive, negative)
    if len(positive_rows) != len(negative_rows):
        raise DataError(
            f"pca takes pairs, positive[i] with negative[i], but there are {len(positive_rows)} positives and "
            f"{len(negative_rows)} negatives: pair them one to one, or use mean_difference for unpaired sets"
        )
    differences = positive_rows - negative_rows
    direction = torch.linalg.svd(differences, full_matrices=False).Vh[0]
    shift = float((differences @ direction).mean())
    if shift == 0:
        raise DataError(
            "positives and negatives project equally on the first principal component of their differences, so "
            "no sign makes positives higher: the pairs hold no consistent difference"
        )
    return (direction if shift > 0 else -direction).to(positive.dtype).to(positive.device)


def probe(activations: torch.Tensor, labels: Labels) -> torch.Tensor:
    """The weights of a logistic-regression probe in the activations' units: (H,) for two classes, (C, H) for C > 2.

    scikit-learn's `LogisticRegression` (L2-regularised with C = 1, lbfgs; multinomial for C > 2; `pip
    install 'layerfuse[derive]'`), fitted on standardised activations z = (x − m) / s, so that
    dimensions of very different scales (the outlier dimensions of transformers) weigh alike, then
    mapped back: logit = w_z · z + b = (w_z / s) · x + b', so the result is w = w_z / s. For two
    classes w points to the second of the sorted classes (for labels 0/1, to 1); for more, row c
    is class c of the sorted classes. scikit-learn is a kept, well-tested solver: a torch loop would
    add an optimiser to maintain and to trust.

    >>> x = torch.tensor([[0.0, 1.0], [0.2, 1.5], [2.0, 1.2], [2.2, 1.1]])
    >>> probe(x, ["low", "low", "high", "high"])[0] < 0  # "low" is the second sorted class
    tensor(True)
    """
    try:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        raise ArgumentValueError("probe fits a scikit-learn probe: pip install 'layerfuse[derive]'") from None
    rows = checked_activations(activations)
    index, classes = class_indices(labels, len(rows))
    mean, scale = rows.mean(dim=0), rows.std(dim=0, correction=0)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        try:
            fitted = LogisticRegression(max_iter=1000).fit(((rows - mean) / scale).numpy(), index.numpy())
        except ConvergenceWarning as warning:
            raise MeasurementError(f"the probe did not converge ({warning}): its direction cannot be trusted") from None
    weights = torch.from_numpy(fitted.coef_) / scale
    weights = weights[0] if len(classes) == 2 else weights
    return weights.to(activations.dtype).to(activations.device)
