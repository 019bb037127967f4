"""A learned fusion trained by the Hugging Face Trainer (`FusionTrainer`), and `save_pretrained` of a fused model."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

import layerfuse
from conftest import TINY, assert_unchanged, padded_batch, snapshot, tiny_bert
from layerfuse.trainer import FusionTrainer

INFO_SIZE = 8
ROWS = 32
STEPS = 6
CHECKPOINT = 3


def classifier() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(**TINY, num_labels=2)).eval()


def dataset() -> list[dict[str, torch.Tensor]]:
    """Padded rows whose label only their info carries; row k's first token is k + 1, so a row is known by it."""
    generator = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 2, (ROWS,), generator=generator)
    info = (2.0 * labels[:, None] - 1) + 0.3 * torch.randn(ROWS, INFO_SIZE, generator=generator)
    batch = padded_batch(tuple(int(n) for n in torch.randint(2, 9, (ROWS,), generator=generator)), seed=4)
    batch["input_ids"][:, 0] = torch.arange(1, ROWS + 1)
    return [
        {**{key: value[k] for key, value in batch.items()}, "info": info[k], "labels": labels[k]} for k in range(ROWS)
    ]


def arguments(folder, **changes) -> TrainingArguments:
    settings = dict(
        max_steps=STEPS,
        per_device_train_batch_size=8,
        learning_rate=0.05,
        logging_steps=1,
        save_steps=CHECKPOINT,
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    return TrainingArguments(str(folder), **{**settings, **changes})


def fused(model, method: str) -> layerfuse.Fusion:
    torch.manual_seed(1)
    fusion = layerfuse.fuse(model, torch.zeros(INFO_SIZE), layer=-1, method=method, positions="first")
    # Per-example info, as every training batch gives it: from then on the fusion also watches whether a forward
    # holds the examples in the info's order (a pre-hook of its own), so a snapshot taken next is the model that
    # training finds.
    fusion.set_info(torch.zeros(1, INFO_SIZE))
    return fusion


def parameters(fusion) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in fusion.method.state_dict().items()}


@pytest.fixture(scope="module", params=["film", "gate"])
def trained(request, tmp_path_factory):
    """One uninterrupted run, with what it saw: the model before, each batch's rows and info, the optimizer."""
    folder = tmp_path_factory.mktemp(request.param)
    model = classifier()
    fusion = fused(model, request.param)
    seen = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((kwargs["input_ids"][:, 0].clone(), fusion.info.source.clone())),
        with_kwargs=True,
    )
    before, initial = snapshot(model), parameters(fusion)
    trainer = FusionTrainer(fusion, arguments(folder), train_dataset=dataset())
    trainer.train()
    return dict(
        method=request.param,
        model=model,
        fusion=fusion,
        trainer=trainer,
        before=before,
        initial=initial,
        seen=seen,
        folder=folder,
    )


def test_the_optimizer_holds_exactly_the_fusions_parameters(trained):
    held = [p for group in trained["trainer"].optimizer.param_groups for p in group["params"]]
    assert sorted(map(id, held)) == sorted(id(p) for p in trained["fusion"].method.parameters())
    assert len(held) == len(list(trained["fusion"].method.parameters()))


def test_evaluation_runs_the_fused_model_with_each_rows_info(trained):
    metrics = trained["trainer"].evaluate(eval_dataset=dataset())
    assert metrics["eval_loss"] > 0 and torch.isfinite(torch.tensor(metrics["eval_loss"]))


def test_only_the_fusion_trains_and_the_model_stays_bitwise_the_same(trained):
    assert_unchanged(trained["model"], trained["before"])
    assert all(p.requires_grad for p in trained["model"].parameters())
    assert not trained["model"].training
    changed = [
        key for key, value in parameters(trained["fusion"]).items() if not torch.equal(value, trained["initial"][key])
    ]
    assert changed, "the fusion's parameters did not change"
    steps = [entry for entry in trained["trainer"].state.log_history if "grad_norm" in entry]
    assert len(steps) == STEPS
    assert all(entry["grad_norm"] > 0 for entry in steps)
    assert steps[-1]["loss"] < steps[0]["loss"]


def test_each_batch_gets_its_own_rows_info_though_the_trainer_shuffles(trained):
    rows = dataset()
    order = torch.cat([first for first, _ in trained["seen"]])
    assert not torch.equal(order, torch.arange(1, len(order) + 1)), "the batches were not shuffled"
    for first, info in trained["seen"]:
        assert torch.equal(info, torch.stack([rows[int(k) - 1]["info"] for k in first]))


def test_a_checkpoint_is_a_saved_fusion_that_gives_the_trained_outputs(trained, tmp_path):
    model, fusion = trained["model"], trained["fusion"]
    batch, info = padded_batch(), torch.randn(3, INFO_SIZE)
    fusion.set_info(info)
    with torch.no_grad():
        expected = model(**batch).logits
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trained["trainer"].save_model(str(tmp_path))
    fusion.remove()
    try:
        for folder in (trained["folder"] / f"checkpoint-{STEPS}", tmp_path):
            with layerfuse.load_fusion(folder, model, info=info) as loaded:
                assert loaded.method.method_name == trained["method"]
                with torch.no_grad():
                    assert torch.equal(model(**batch).logits, expected)
        with torch.no_grad():
            assert not torch.equal(model(**batch).logits, expected)
    finally:
        fusion.attach()


def test_resuming_from_a_checkpoint_ends_where_the_uninterrupted_run_ends(trained, tmp_path):
    model = classifier()
    fusion = fused(model, trained["method"])
    before = snapshot(model)
    trainer = FusionTrainer(fusion, arguments(tmp_path), train_dataset=dataset())
    trainer.train(resume_from_checkpoint=str(trained["folder"] / f"checkpoint-{CHECKPOINT}"))
    assert trainer.state.global_step == STEPS
    final = parameters(trained["fusion"])
    assert parameters(fusion).keys() == final.keys()
    assert all(torch.equal(value, final[key]) for key, value in parameters(fusion).items())
    assert_unchanged(model, before)
    fusion.remove()


class Unregistered(layerfuse.Method):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(TINY["hidden_size"], INFO_SIZE))

    def info_dim(self, hidden_size: int) -> int:
        return INFO_SIZE

    def forward(self, hidden, info):
        return hidden + info @ self.weight.T


def test_a_fusion_that_cannot_train_is_refused_before_anything_is_touched(tmp_path):
    model = classifier()
    before = snapshot(model)
    with layerfuse.fuse(model, torch.ones(TINY["hidden_size"]), layer=1) as fixed:
        with pytest.raises(layerfuse.ArgumentValueError, match="no parameters to train"):
            FusionTrainer(fixed, arguments(tmp_path))
    learned = fused(model, "film")
    with pytest.raises(layerfuse.ArgumentTypeError, match="pass no model="):
        FusionTrainer(learned, arguments(tmp_path), model=model)
    learned.remove()
    with pytest.raises(layerfuse.FusionStateError, match="removed"):
        FusionTrainer(learned, arguments(tmp_path))
    with pytest.raises(layerfuse.ArgumentTypeError, match="takes a Fusion"):
        FusionTrainer(model, arguments(tmp_path))
    with layerfuse.fuse(model, torch.ones(INFO_SIZE), layer=1, method=Unregistered()) as unregistered:
        with pytest.raises(layerfuse.ArgumentValueError, match="register_method"):
            FusionTrainer(unregistered, arguments(tmp_path))
    assert_unchanged(model, before)


def test_several_gpus_by_data_parallel_are_refused(tmp_path, monkeypatch):
    model = classifier()
    args = arguments(tmp_path)
    monkeypatch.setattr(TrainingArguments, "n_gpu", property(lambda self: 2))
    with layerfuse.fuse(model, torch.zeros(INFO_SIZE), layer=-1, method="film") as fusion:
        with pytest.raises(layerfuse.ArgumentValueError, match="torchrun"):
            FusionTrainer(fusion, args)


@pytest.mark.parametrize("approach", ["hook", "layer"])
def test_save_pretrained_of_a_fused_model_warns_that_the_fusion_is_not_saved(tmp_path, approach):
    model = tiny_bert()
    before = snapshot(model)
    with layerfuse.fuse(model, torch.ones(TINY["hidden_size"]), layer=2, approach=approach, method="add"):
        with pytest.warns(
            UserWarning, match=r"without the attached fusion\(s\) addition at encoder\.layer\.1.*fusion\.save"
        ):
            model.save_pretrained(tmp_path / "fused")
        with pytest.raises(layerfuse.FusionStateError, match="remove the fusion first"):
            copy.deepcopy(model)
    assert (tmp_path / "fused" / "model.safetensors").is_file()
    assert_unchanged(model, before)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.save_pretrained(tmp_path / "plain")


def test_a_trainer_saving_a_fused_model_warns_too(tmp_path):
    model = classifier()
    with layerfuse.fuse(model, torch.zeros(INFO_SIZE), layer=-1, method="film"):
        trainer = Trainer(model=model, args=arguments(tmp_path))
        with pytest.warns(UserWarning, match="film at bert.encoder.layer.2"):
            trainer.save_model(str(tmp_path / "saved"))


def test_save_pretrained_names_every_attached_fusion_and_is_restored_when_the_last_goes(tmp_path):
    model = tiny_bert()
    own = model.save_pretrained
    model.save_pretrained = own
    before = snapshot(model)
    first = layerfuse.fuse(model, torch.ones(TINY["hidden_size"]), layer=1)
    second = layerfuse.fuse(model, None, layer=3, method="scale", alpha=2.0, approach="layer")
    with pytest.warns(UserWarning, match="addition at encoder.layer.0; scale at encoder.layer.2"):
        model.save_pretrained(tmp_path / "both")
    first.remove()
    with pytest.warns(UserWarning, match="fusion\\(s\\) scale at encoder.layer.2:"):
        model.save_pretrained(tmp_path / "one")
    second.remove()
    second.remove()
    assert model.__dict__["save_pretrained"] is own
    assert_unchanged(model, before)


def test_import_layerfuse_imports_no_trainer_until_asked():
    probe = "import sys, layerfuse\nprint('transformers.trainer' in sys.modules, 'layerfuse.trainer' in sys.modules)\n"
    probe += "layerfuse.FusionTrainer\nprint('layerfuse.trainer' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False", "True"]


ACCELERATE_MISSING = """
import importlib.util
find = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a, **k: None if name.split(".")[0] == "accelerate" else find(name, *a, **k)
import layerfuse
try:
    layerfuse.FusionTrainer
except layerfuse.ArgumentValueError as error:
    print(error)
"""
"""A process in which accelerate cannot be found, asking for FusionTrainer."""


def test_without_accelerate_the_trainer_says_which_extra_to_install():
    result = subprocess.run([sys.executable, "-c", ACCELERATE_MISSING], capture_output=True, text=True, check=True)
    assert "needs accelerate: pip install 'layerfuse[train]'" in result.stdout, result.stderr


def test_the_readme_trainer_example_runs_and_saves_the_trained_fusion(tmp_path, monkeypatch):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    code = re.search(r"### Saving and training.*?```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    trained = namespace["trainer"].fusion.method.state_dict()
    loaded = namespace["fusion"]
    assert loaded.active and (tmp_path / "fusion-run" / "checkpoint-4" / "fusion_config.json").is_file()
    assert all(torch.equal(value, trained[key]) for key, value in loaded.method.state_dict().items())
    assert any(value.abs().sum() > 0 for key, value in trained.items() if key.startswith("gamma"))
    loaded.remove()
