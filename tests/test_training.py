"""Training a learned fusion with the model frozen, on a task only the info can solve."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F
from transformers import BertConfig, BertForSequenceClassification

import layerfuse
from conftest import TINY, padded_batch

INFO_SIZE = 8


def synthetic(count: int, seed: int):
    """Random token sequences whose label is carried only by a noisy info vector."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (count,), generator=generator)
    direction = torch.randn(INFO_SIZE, generator=torch.Generator().manual_seed(0))
    info = (2.0 * labels[:, None] - 1) * direction + 0.5 * torch.randn(count, INFO_SIZE, generator=generator)
    batch = padded_batch(tuple(int(n) for n in torch.randint(2, 12, (count,), generator=generator)), seed=seed)
    return batch, info, labels


def batches(data, size: int):
    batch, info, labels = data
    for start in range(0, len(labels), size):
        part = slice(start, start + size)
        yield {key: value[part] for key, value in batch.items()}, info[part], labels[part]


def accuracy(model, fusion, data) -> float:
    batch, info, labels = data
    fusion.set_info(info)
    with torch.no_grad():
        return float((model(**batch).logits.argmax(-1) == labels).float().mean())


@pytest.mark.parametrize("method", ["film", "gate"])
def test_a_learned_fusion_learns_what_only_the_info_carries(method):
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**TINY, num_labels=2)).eval()
    weights = {key: value.clone() for key, value in model.state_dict().items()}
    train_data, test_data = synthetic(256, seed=1), synthetic(256, seed=2)
    with layerfuse.fuse(model, train_data[1][:32], layer=-1, method=method, positions="first") as fusion:
        before = accuracy(model, fusion, test_data)
        losses = layerfuse.train(
            fusion,
            list(batches(train_data, 32)),
            loss=lambda out, target: F.cross_entropy(out.logits, target),
            epochs=15,
            lr=0.05,
        )
        after = accuracy(model, fusion, test_data)
    assert before < 0.65, "the frozen model alone should be near chance"
    assert after > 0.9, (before, after, losses[-5:])
    assert losses[-1] < losses[0]
    assert all(torch.equal(value, weights[key]) for key, value in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_fixed_methods_have_nothing_to_train(tiny, batch):
    with layerfuse.fuse(tiny, torch.ones(32), layer=1) as fusion:
        with pytest.raises(layerfuse.ArgumentValueError, match="no parameters to train"):
            layerfuse.train(fusion, [(batch, None, None)], loss=lambda out, y: out.last_hidden_state.sum())


def test_set_info_checks_like_fuse_and_keeps_the_old_info_on_error(tiny):
    with layerfuse.fuse(tiny, torch.ones(3, 5), layer=1, method="film") as fusion:
        old = fusion.info
        with pytest.raises(layerfuse.InfoShapeError, match="D = 5"):
            fusion.set_info(torch.ones(3, 6))
        assert fusion.info is old
        fusion.set_info(torch.zeros(4, 5, dtype=torch.float64))
        assert fusion.info.tensor.dtype == torch.float32 and fusion.info.batch_size == 4


def reference_adam(fusion, steps, loss, epochs: int, lr: float) -> list[float]:
    """Adam on the fusion's parameters alone, step by step over the batches in order: what `train` must do."""
    frozen = [(p, p.requires_grad) for p in fusion.model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    optimizer = torch.optim.Adam(fusion.method.parameters(), lr=lr)
    losses = []
    for _ in range(epochs):
        for inputs, info, target in steps:
            fusion.set_info(info)
            optimizer.zero_grad()
            value = loss(fusion.model(**inputs), target)
            value.backward()
            optimizer.step()
            losses.append(float(value.detach()))
    for p, requires_grad in frozen:
        p.requires_grad_(requires_grad)
    return losses


def test_train_is_adam_over_the_batches_in_order_every_epoch(capsys):
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**TINY, num_labels=2)).eval()
    data = synthetic(64, seed=1)
    cross_entropy = lambda out, target: F.cross_entropy(out.logits, target)
    with layerfuse.fuse(model, data[1][:16], layer=-1, method="film", positions="first") as fusion:
        losses = layerfuse.train(fusion, batches(data, 16), loss=cross_entropy, epochs=2, lr=0.05)
        trained = {key: value.clone() for key, value in fusion.method.state_dict().items()}
    with layerfuse.fuse(model, data[1][:16], layer=-1, method="film", positions="first") as fusion:
        expected = reference_adam(fusion, list(batches(data, 16)), cross_entropy, epochs=2, lr=0.05)
        reference = fusion.method.state_dict()
    assert capsys.readouterr().out == ""
    assert len(losses) == len(expected) == 8, "a generator of batches must serve every epoch"
    # The Trainer's AdamW without weight decay makes Adam's update; its kernels may round differently.
    assert losses == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert all(torch.allclose(value, reference[key], rtol=1e-5, atol=1e-6) for key, value in trained.items())


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"epochs": 1.5}, layerfuse.ArgumentTypeError, "epochs must be a positive int"),
        ({"epochs": 0}, layerfuse.ArgumentValueError, "epochs must be a positive int"),
        ({"lr": float("nan")}, layerfuse.ArgumentValueError, "lr must be a positive finite number"),
        ({"lr": 0.0}, layerfuse.ArgumentValueError, "lr must be a positive finite number"),
        ({"lr": True}, layerfuse.ArgumentTypeError, "lr must be a positive finite number"),
    ],
)
def test_bad_arguments_are_refused_before_training(tiny, batch, changes, error, match):
    with layerfuse.fuse(tiny, torch.ones(3, 5), layer=1, method="film") as fusion:
        before = {key: value.clone() for key, value in fusion.method.state_dict().items()}
        with pytest.raises(error, match=match):
            layerfuse.train(fusion, [(batch, None, None)], loss=lambda out, y: out.last_hidden_state.sum(), **changes)
        assert all(torch.equal(value, before[key]) for key, value in fusion.method.state_dict().items())
