"""`eraser`: the LEACE eraser of a concept, as info for the `erase` method; `inlp`, the iterative one.

LEACE (Belrose et al. 2023, "LEACE: Perfect linear concept erasure in closed form") is the affine
map r(x) = x − P(x − μ) that changes the activations least (in mean squared distance) among those
after which no linear classifier predicts the concept better than a constant (under any convex
loss): the erased activations' covariance with the one-hot labels is zero. Its closed form is

    P = W⁺ · Q Qᵀ · W,   W = (Σ_xx^½)⁺ the whitening,   Q an orthonormal basis of the columns of W Σ_xz,

with Σ_xx the activations' covariance and Σ_xz their cross-covariance with the one-hot labels
(C columns, rank ≤ C − 1). P has rank r ≤ C − 1, and is stored as P = A·B.

>>> x = torch.tensor([[0.0, 0.0], [1.0, 0.5], [4.0, 2.0], [5.0, 2.0]])
>>> info = eraser(x, [0, 0, 1, 1])
>>> info.shape  # [μ; B; Aᵀ] with r = 1
torch.Size([3, 2])
>>> erased = Erase()(x[None], info)[0]
>>> erased[:2].mean(dim=0), erased[2:].mean(dim=0)  # both classes' means are now μ
(tensor([2.5000, 1.1250]), tensor([2.5000, 1.1250]))
"""

from __future__ import annotations

import torch

from .errors import positive_int
from .estimators import Labels, checked_activations, class_indices, probe
from .methods import Erase

__all__ = ["Erase", "eraser", "inlp"]


def eraser(activations: torch.Tensor, labels: Labels) -> torch.Tensor:
    """The LEACE eraser of the concept `labels` name in `activations` (N, H), as (1 + 2r, H) info: rows [μ; B; Aᵀ].

    x ↦ x − A·B·(x − μ), with A·B = P of the module's docstring, computed in float64 from the
    sample covariances (no shrinkage, no trace constraint: the paper's closed form). Directions
    whose variance is below float64 precision (H·ε of the largest) count as absent, as in a
    pseudo-inverse. A and B are balanced, A = U S^½ and B = S^½ Vᵀ from P = U S Vᵀ, so that neither
    is large where the other is small, which rounds least in a model's dtype.
    `fuse(model, info, layer=k, method="erase")` applies it at layer k; labels are any two or more
    classes, two examples or more each.
    """
    rows = checked_activations(activations)
    index, classes = class_indices(labels, len(rows))
    one_hot = torch.nn.functional.one_hot(index, len(classes)).double()
    mean = rows.mean(dim=0)
    centred, labels_centred = rows - mean, one_hot - one_hot.mean(dim=0)
    covariance = centred.mT @ centred / len(rows)
    cross = centred.mT @ labels_centred / len(rows)
    variances, vectors = torch.linalg.eigh(covariance)
    kept = variances > variances.amax() * rows.shape[1] * torch.finfo(torch.float64).eps
    root = torch.where(kept, variances.clamp_min(0).sqrt(), 0)
    whitening = (vectors * torch.where(kept, 1 / root, 0)) @ vectors.mT
    unwhitening = (vectors * root) @ vectors.mT
    basis, singular, _ = torch.linalg.svd(whitening @ cross, full_matrices=False)
    basis = basis[:, singular > singular.amax() * max(cross.shape) * torch.finfo(torch.float64).eps]
    left_q, left_r = torch.linalg.qr(unwhitening @ basis)
    right_q, right_r = torch.linalg.qr((basis.mT @ whitening).mT)
    u, s, vh = torch.linalg.svd(left_r @ right_r.mT)
    left = left_q @ u * s.sqrt()
    right = (s.sqrt()[:, None] * vh) @ right_q.mT
    return torch.cat([mean[None], right, left.mT]).to(activations.dtype).to(activations.device)


def inlp(activations: torch.Tensor, labels: Labels, *, rounds: int = 10) -> torch.Tensor:
    """Iterative nullspace projection (INLP, Ravfogel et al. 2020) as eraser info (1 + 2r, H): rows [μ; Qᵀ; Qᵀ].

    Each round fits a `probe` to the activations erased so far and adds its weight rows, made
    orthonormal to those found before, to Q; the eraser x ↦ x − Q Qᵀ (x − μ) is the orthogonal
    projection onto the nullspace of every probe, centred on the mean (the paper's P·x on centred
    activations). `rounds` rounds, each removing C − 1 directions (a probe's C weight rows sum to
    zero), fewer where nothing is left; a direction below 1e-6 of a round's strongest counts as none.
    Unlike `eraser`, nothing is guaranteed after a given number of rounds, and it changes the
    activations more: check a fresh probe's accuracy on held-out data.

    >>> x = torch.tensor([[0.0, 0.0], [1.0, 0.5], [4.0, 2.0], [5.0, 2.0]])
    >>> inlp(x, [0, 0, 1, 1], rounds=1).shape  # one direction of a probe
    torch.Size([3, 2])
    """
    rounds = positive_int("rounds", rounds)
    rows = checked_activations(activations)
    class_indices(labels, len(rows))
    mean = rows.mean(dim=0)
    basis = rows.new_zeros(rows.shape[1], 0)
    for _ in range(rounds):
        if basis.shape[1] == rows.shape[1]:
            break
        erased = rows - (rows - mean) @ basis @ basis.mT
        weights = probe(erased, labels).double().reshape(-1, rows.shape[1])
        weights = weights - weights @ basis @ basis.mT
        q, r = torch.linalg.qr(weights.mT)
        found = q[:, r.diagonal().abs() > 1e-6 * r.diagonal().abs().amax()]
        if found.shape[1] == 0:
            break
        basis = torch.linalg.qr(torch.cat([basis, found], dim=1)).Q
    return torch.cat([mean[None], basis.mT, basis.mT]).to(activations.dtype).to(activations.device)
