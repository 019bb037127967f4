"""Merging a fusion into the weights: outputs as the hook's and the independent reference's, unmerge bitwise,
refusals before anything changes."""

from __future__ import annotations

import copy
import gc
import json
import subprocess
import sys
import warnings
import weakref

import pytest
import torch

import layerfuse
from architectures import build
from conftest import TINY, assert_unchanged, padded_batch, snapshot, tiny_bert
from layerfuse import FusionConfig, FusionStateError, MergeError
from reference import bert_forward, bert_forward_with_sublayer_edit, fixed_formula

H = TINY["hidden_size"]
ARGUMENTS = {
    "addition": {"alpha": 0.7},
    "scale": {"alpha": 1.5},
    "interpolate": {"alpha": 0.3},
    "clamp": {"value": 2.0},
}
DIAGONAL = ("addition", "multiplication", "scale", "replace", "interpolate")
MIXING = ("ablate", "clamp", "project", "erase")
SITES = {"embeddings": (0, "output"), "output": (2, "output"), "last": (3, "output"), "attention": (2, "attention")}
SITES["mlp"] = (2, "mlp")
LINEAR_SITES = ("attention", "mlp")


def info_for(method: str, size: int = H, seed: int = 3) -> torch.Tensor | None:
    generator = torch.Generator().manual_seed(seed)
    if method == "scale":
        return None
    if method == "project":
        return torch.randn(2, size, generator=generator)
    if method == "erase":  # [μ; B; Aᵀ] of a rank-1 map of norm about 1
        return torch.randn(3, size, generator=generator) / torch.tensor([[1.0], [size**0.5], [size**0.5]])
    return torch.randn(size, generator=generator)


def config_for(method: str, layer: int, site: str) -> FusionConfig:
    return FusionConfig(method=method, arguments=ARGUMENTS.get(method, {}), layer=layer, site=site)


def states(model, batch) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return model(**batch, output_hidden_states=True).hidden_states


def reference(model, batch, method: str, layer: int, site: str, info) -> list[torch.Tensor]:
    formula = fixed_formula(method, ARGUMENTS.get(method, {}))
    v = None if info is None else info.double() if method == "project" else info
    edit = lambda h: formula(h, v)
    with torch.no_grad():
        if site == "output":
            return bert_forward(model, batch, layer=layer, edit=edit)
        return bert_forward_with_sublayer_edit(model, batch, layer=layer, site=site, edit=edit)


def assert_close(merged, expected, atol: float = 1e-5, rtol: float = 0.0, where: torch.Tensor | None = None) -> None:
    for got, want in zip(merged, expected, strict=True):
        got, want = (got, want) if where is None else (got[where], want[where])
        torch.testing.assert_close(got, want.to(got.dtype), rtol=rtol, atol=atol)


MERGEABLE = [(m, s) for s in SITES for m in (DIAGONAL + MIXING if s in LINEAR_SITES else DIAGONAL)]


@pytest.mark.parametrize(("method", "where"), MERGEABLE)
def test_merged_bert_gives_the_hooks_outputs_and_the_references(tiny, batch, method, where):
    layer, site = SITES[where]
    config, info = config_for(method, layer, site), info_for(method)
    with layerfuse.fuse(tiny, info, config):
        hooked = states(tiny, batch)
    expected = reference(tiny, batch, method, layer, site, info)
    before = snapshot(tiny)
    merged = layerfuse.merge(tiny, info, config)
    during = snapshot(tiny)
    assert during["modules"] == before["modules"]  # no hook, no swapped class, no attribute: a plain model
    assert any(not torch.equal(during["state"][k], before["state"][k]) for k in merged.parameters)
    fused = states(tiny, batch)
    assert_close(fused, hooked)
    assert_close(fused, expected)
    merged.unmerge()
    merged.unmerge()
    assert_unchanged(tiny, before)
    assert not merged.active


@pytest.mark.parametrize(("method", "where"), MERGEABLE)
def test_in_float64_merging_is_exact_up_to_float64_rounding(batch, method, where):
    model = tiny_bert().double()
    layer, site = SITES[where]
    config, info = config_for(method, layer, site), info_for(method)
    with layerfuse.fuse(model, info, config):
        hooked = states(model, batch)
    with layerfuse.merge(model, info, config):
        assert_close(states(model, batch), hooked, atol=1e-12)


REFUSED = {
    "per-example info": (lambda: torch.randn(3, H), config_for("addition", 2, "output")),
    "per-token info": (lambda: torch.randn(3, 7, H), config_for("addition", 2, "attention")),
    "tokens": (lambda: torch.randn(H), config_for("addition", 2, "output").replace(positions="tokens")),
    "indices": (lambda: torch.randn(H), config_for("addition", 2, "mlp").replace(positions=[0])),
    "learned": (lambda: torch.randn(H), FusionConfig(method="film", layer=2)),
    "input": (lambda: torch.randn(H), config_for("addition", 2, "input")),
    "ablate at a LayerNorm": (lambda: torch.randn(H), config_for("ablate", 2, "output")),
    "project at the embeddings": (lambda: torch.randn(2, H), config_for("project", 0, "output")),
    "erase at a LayerNorm": (lambda: torch.randn(3, H), config_for("erase", 2, "output")),
    "erase per example": (lambda: torch.randn(3, 3, H), config_for("erase", 2, "attention")),
}


@pytest.mark.parametrize("case", REFUSED)
def test_what_cannot_merge_is_refused_before_anything_changes(tiny, case):
    info, config = REFUSED[case]
    before = snapshot(tiny)
    with pytest.raises(MergeError, match="cannot merge .*: .*fuse it by hook or custom layer instead"):
        layerfuse.merge(tiny, info(), config)
    assert_unchanged(tiny, before)


@pytest.mark.parametrize(
    ("name", "layer", "site", "why"),
    [
        ("albert", 2, "output", "shared by several layers"),
        ("llama", 2, "mlp", "has no bias"),
        ("modernbert", 2, "output", "no affine operation is known"),
        ("llama", 2, "output", "no affine operation is known"),
        ("deberta-v2", 0, "output", "no affine operation is known"),
        ("gpt2", 0, "output", "no affine operation is known"),
    ],
)
def test_architectures_without_a_foldable_producer_are_refused(name, layer, site, why):
    model = build(name)
    before = snapshot(model)
    with pytest.raises(MergeError, match=why):
        layerfuse.merge(model, torch.randn(H), config_for("addition", layer, site))
    assert_unchanged(model, before)


ARCHITECTURE_CASES = [
    ("roberta", 0, "output"),
    ("roberta", 3, "output"),
    ("xlm-roberta", 2, "mlp"),
    ("distilbert", 0, "output"),
    ("distilbert", 2, "output"),
    ("distilbert", 2, "attention"),
    ("distilbert", 2, "mlp"),
    ("electra", 0, "output"),  # embeddings_project: a Linear
    ("electra", 2, "output"),
    ("electra", 2, "attention"),
    ("deberta-v2", 2, "output"),
    ("deberta-v2", 2, "attention"),
    ("gpt2", 2, "attention"),
    ("gpt2", 2, "mlp"),
    ("gpt2", 3, "output"),  # ln_f
    ("albert", 0, "output"),  # embedding_hidden_mapping_in, a Linear called once
]


@pytest.mark.parametrize(("name", "layer", "site"), ARCHITECTURE_CASES)
def test_every_architecture_merges_where_an_affine_operation_produces_the_site(name, layer, site):
    model = build(name, head=True)
    batch = {key: padded_batch((6, 3, 5), vocab_size=90)[key] for key in ("input_ids", "attention_mask")}
    producer = layerfuse.merging.producer_of(model, config_for("addition", layer, site))
    methods = DIAGONAL if isinstance(producer, torch.nn.LayerNorm) else DIAGONAL + MIXING
    for method in methods:
        config, info = config_for(method, layer, site), info_for(method)
        with torch.no_grad(), layerfuse.fuse(model, info, config):
            hooked = model(**batch, output_hidden_states=True)
        before = snapshot(model)
        with layerfuse.merge(model, info, config), torch.no_grad():
            merged = model(**batch, output_hidden_states=True)
        assert_unchanged(model, before)
        assert_close(merged.hidden_states, hooked.hidden_states)
        assert_close(merged[0:1], hooked[0:1])


RESIDUAL_SUMS = {
    "gpt2": (lambda: build("gpt2", head=True), "h.1", "mlp.c_proj"),
    "gpt_neox": (lambda: build("gpt_neox", head=True), "layers.1", "mlp.dense_4h_to_h"),
}


@pytest.mark.parametrize("name", RESIDUAL_SUMS)
def test_an_addition_to_a_residual_sum_folds_into_the_bias_of_the_last_linear_writing_into_it(name):
    make, block_name, writer = RESIDUAL_SUMS[name]
    model = make()
    batch = {key: padded_batch((6, 3, 5), vocab_size=90)[key] for key in ("input_ids", "attention_mask")}
    block, steer = model.base_model.get_submodule(block_name), torch.randn(H)

    def add(module, args, output):  # the independent reference: a plain hook adding 0.7 * steer to the block's output
        if isinstance(output, tuple):
            return (output[0] + 0.7 * steer, *output[1:])
        return output + 0.7 * steer

    handle = block.register_forward_hook(add)
    with torch.no_grad():
        expected = model(**batch, output_hidden_states=True)
    handle.remove()
    before = snapshot(model)
    with layerfuse.merge(model, steer, config_for("addition", 2, "output")) as merged, torch.no_grad():
        bias = block.get_submodule(writer).bias
        assert [model.get_parameter(n) for n in merged.parameters] == [bias]
        got = model(**batch, output_hidden_states=True)
    assert_unchanged(model, before)
    assert_close(got.hidden_states, expected.hidden_states)
    assert_close(got[0:1], expected[0:1])
    with pytest.raises(MergeError, match="residual sum, and only an addition folds"):
        layerfuse.merge(model, torch.randn(H), config_for("multiplication", 2, "output"))
    assert_unchanged(model, before)


def test_merges_compose_in_order_and_unmerge_last_first(tiny, batch):
    first = (FusionConfig(layer=2, method="addition"), torch.randn(H))
    second = (FusionConfig(layer=2, method="multiplication"), torch.randn(H))
    third = (FusionConfig(layer=1, site="mlp", method="ablate"), torch.randn(H))
    with layerfuse.fuse_many(tiny, [first, second, third]):
        hooked = states(tiny, batch)
    with layerfuse.fuse(tiny, first[1], first[0]):
        hooked_first = states(tiny, batch)
    before = snapshot(tiny)
    handles = [layerfuse.merge(tiny, info, config) for config, info in (first, second, third)]
    assert layerfuse.merging.merged_configs(tiny) == [first[0], second[0], third[0]]
    assert_close(states(tiny, batch), hooked)
    with pytest.raises(FusionStateError, match="unmerge the later merges first"):
        handles[0].unmerge()
    assert_close(states(tiny, batch), hooked)
    handles[2].unmerge()  # no later merge changed its parameters
    handles[1].unmerge()
    assert_close(states(tiny, batch), hooked_first)
    handles[0].unmerge()
    assert_unchanged(tiny, before)
    assert layerfuse.merging.merged_configs(tiny) == []


def test_fusion_merge_detaches_the_fusion_and_keeps_its_outputs(tiny, batch):
    before = snapshot(tiny)
    fusion = layerfuse.fuse(tiny, torch.randn(H), layer=2, site="attention", method="clamp", value=1.5)
    hooked = states(tiny, batch)
    merged = fusion.merge()
    assert not fusion.active
    assert snapshot(tiny)["modules"] == before["modules"]
    assert_close(states(tiny, batch), hooked)
    merged.unmerge()
    assert_unchanged(tiny, before)


def test_a_refused_fusion_merge_leaves_the_fusion_attached(tiny, batch):
    fusion = layerfuse.fuse(tiny, torch.randn(3, H), layer=2)
    with pytest.raises(MergeError, match="batch dimension"):
        fusion.merge()
    assert fusion.active
    fusion.remove()


@pytest.mark.parametrize("attached", [True, False])
def test_a_fusion_whose_block_was_replaced_is_refused_a_merge_and_nothing_changes(tiny, attached):
    old, replacement = tiny.encoder.layer[1], copy.deepcopy(tiny.encoder.layer[1])
    fusion = layerfuse.fuse(tiny, torch.randn(H), layer=2)
    if not attached:
        fusion.remove()
    tiny.encoder.layer[1] = replacement
    before, old_before = snapshot(tiny), snapshot(old)
    with pytest.raises(FusionStateError, match="at encoder.layer.1 is not the one this fusion was made for"):
        fusion.merge()
    assert fusion.active is attached
    assert_unchanged(tiny, before)
    assert_unchanged(old, old_before)
    tiny.encoder.layer[1] = old
    fusion.remove()


def test_merge_in_half_precision_stays_within_its_rounding():
    model = tiny_bert().to(torch.bfloat16)
    batch = padded_batch()
    config, info = config_for("ablate", 2, "mlp"), info_for("ablate")
    with layerfuse.fuse(model, info, config):
        hooked = states(model, batch)
    before = snapshot(model)
    with layerfuse.merge(model, info, config):
        assert model.encoder.layer[1].output.dense.weight.dtype is torch.bfloat16
        assert_close(states(model, batch), hooked, atol=0.1)
    assert_unchanged(model, before)


@pytest.mark.parametrize("method", ["addition", "ablate", "clamp"])
def test_embedded_model_merges_within_1e_5_at_every_mergeable_site(minilm, method):
    """|merged - hook| <= 1e-5 + 1e-5 |hook| on real tokens: folding rounds once where the hook rounds twice.

    And merging costs no accuracy: against the fusion computed in float64, the merged float32 model
    is no farther off than the float32 hook itself is (within a third of it, plus an ulp of |h| ~ 10).
    """
    model, tokenizer = minilm
    exact = copy.deepcopy(model).double()
    batch = tokenizer(["a short text", "a longer text, so that the batch is padded"], return_tensors="pt", padding=True)
    real = batch["attention_mask"].bool()
    size = model.config.hidden_size
    info = torch.randn(size, generator=torch.Generator().manual_seed(0))
    sites = [(layer, site) for layer in range(1, 7) for site in ("attention", "mlp")]
    if method == "addition":
        sites += [(layer, "output") for layer in range(7)]
    error = lambda got, want: max(float((g.double() - w)[real].abs().max()) for g, w in zip(got, want, strict=True))
    for layer, site in sites:
        config = FusionConfig(method=method, layer=layer, site=site, arguments=ARGUMENTS.get(method, {}))
        with layerfuse.fuse(exact, info.double(), config):
            truth = states(exact, batch)
        with layerfuse.fuse(model, info, config):
            hooked = states(model, batch)
        with layerfuse.merge(model, info, config):
            merged = states(model, batch)
        assert_close(merged, hooked, rtol=1e-5, where=real)
        assert error(merged, truth) <= 1.34 * error(hooked, truth) + 1e-6, (layer, site)


PLAIN_LOAD = """
import json, sys, torch
from transformers import AutoModel
folder, inputs, outputs = sys.argv[1:4]
model = AutoModel.from_pretrained(folder).eval()
batch = torch.load(inputs)
with torch.no_grad():
    result = {"hidden_states": model(**batch, output_hidden_states=True).hidden_states}
if len(sys.argv) > 4:
    from sentence_transformers import SentenceTransformer
    result["embeddings"] = SentenceTransformer(folder, device="cpu").encode(json.loads(sys.argv[4]), convert_to_tensor=True)
assert "layerfuse" not in sys.modules, "the exported folder needed layerfuse"
torch.save(result, outputs)
"""


def load_without_layerfuse(folder, batch, tmp_path, texts=None) -> dict:
    """What a fresh process that never imports layerfuse computes from the folder: hidden states (and ST embeddings)."""
    torch.save(batch, tmp_path / "inputs.pt")
    command = [sys.executable, "-c", PLAIN_LOAD, str(folder), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")]
    subprocess.run(command + ([json.dumps(texts)] if texts else []), check=True, cwd=tmp_path)
    return torch.load(tmp_path / "out.pt")


def test_a_saved_merged_model_loads_with_plain_transformers_and_gives_the_fused_outputs(tiny, batch, tmp_path):
    configs = [(config_for("addition", 1, "output"), torch.randn(H)), (config_for("clamp", 2, "mlp"), torch.randn(H))]
    with layerfuse.fuse_many(tiny, configs):
        hooked = states(tiny, batch)
    before = snapshot(tiny)
    with pytest.raises(FusionStateError, match="no fusion is merged"):
        layerfuse.save_merged(tiny, tmp_path / "nothing")
    with (
        layerfuse.fuse(tiny, torch.randn(H), layer=1),
        pytest.raises(FusionStateError, match="by hook or custom layer"),
    ):
        layerfuse.save_merged(tiny, tmp_path / "attached")
    handles = [layerfuse.merge(tiny, info, config) for config, info in configs]
    folder = layerfuse.save_merged(tiny, tmp_path / "merged")
    for handle in reversed(handles):
        handle.unmerge()
    assert_unchanged(tiny, before)
    assert (folder / "model.safetensors").is_file()
    recorded = json.loads((folder / "config.json").read_text())["layerfuse"]["merged"]
    assert [FusionConfig.from_dict(entry) for entry in recorded] == [config for config, _ in configs]
    assert_close(load_without_layerfuse(folder, batch, tmp_path)["hidden_states"], hooked)


def test_the_merge_command_exports_a_sentence_transformers_folder(minilm, tmp_path):
    from sentence_transformers import SentenceTransformer

    from layerfuse.cli.main import main

    model, tokenizer = minilm
    steer = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    texts = ["a short text", "a longer text, so that the batch is padded"]
    with layerfuse.fuse(model, steer, layer=3, site="attention", method="addition", alpha=0.5) as fusion:
        fusion.save(tmp_path / "fusion")
    assert main(["merge", "--fusion", str(tmp_path / "fusion"), "--output", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "1_Pooling" / "config.json").is_file()
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    st = SentenceTransformer(layerfuse.models.embedded_model_path(), device="cpu")
    batch = dict(tokenizer(texts, return_tensors="pt", padding=True))
    with layerfuse.fuse(st[0].auto_model, steer, layer=3, site="attention", method="addition", alpha=0.5):
        expected = st.encode(texts, convert_to_tensor=True)
        with torch.no_grad():
            hooked = st[0].auto_model(**batch, output_hidden_states=True).hidden_states
    loaded = load_without_layerfuse(tmp_path / "merged", batch, tmp_path, texts)
    real = batch["attention_mask"].bool()
    assert_close(loaded["hidden_states"], hooked, rtol=1e-5, where=real)
    torch.testing.assert_close(loaded["embeddings"], expected, rtol=0, atol=1e-5)


def test_the_merge_command_refuses_with_exit_code_2_and_writes_nothing(minilm, tmp_path, capsys):
    from layerfuse.cli.main import main

    model, _ = minilm
    with layerfuse.fuse(model, torch.randn(model.config.hidden_size), layer=2, method="ablate") as fusion:
        fusion.save(tmp_path / "ablate")
    assert main(["merge", "--fusion", str(tmp_path / "ablate"), "--output", str(tmp_path / "out")]) == 2
    assert "cannot merge the ablate fusion: it mixes the hidden dimensions" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ablate"]
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    assert main(["merge", "--fusion", str(tmp_path / "ablate"), "--output", str(tmp_path / "taken")]) == 2
    assert "is not an empty folder" in capsys.readouterr().err


class LastHiddenState(torch.nn.Module):
    """The model called by keywords, for an exporter that passes inputs by position."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def run_in_onnx_runtime(model, batch, path) -> torch.Tensor:
    onnxruntime = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install onnxruntime)")
    pytest.importorskip("onnx", reason="onnx is not installed (pip install onnx)")
    inputs = (batch["input_ids"], batch["attention_mask"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python values it keeps as constants
        torch.onnx.export(
            LastHiddenState(model), inputs, path, input_names=["input_ids", "attention_mask"], dynamo=False
        )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {"input_ids": inputs[0].numpy(), "attention_mask": inputs[1].numpy()}
    return torch.from_numpy(session.run(None, feed)[0])


@pytest.mark.parametrize("where", ["merged", "hook", "layer"])
def test_onnx_runtime_gives_the_fused_outputs_merged_and_unmerged(batch, tmp_path, where):
    model = tiny_bert(attn_implementation="eager")
    config, info = config_for("clamp", 2, "mlp"), info_for("clamp")
    with layerfuse.fuse(model, info, config), torch.no_grad():
        expected = model(**batch).last_hidden_state
    fused = (
        layerfuse.merge(model, info, config)
        if where == "merged"
        else layerfuse.fuse(model, info, config.replace(approach=where))
    )
    with fused:
        got = run_in_onnx_runtime(model, batch, tmp_path / "model.onnx")
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_a_merged_model_deleted_is_freed_and_its_handle_then_does_nothing():
    model = tiny_bert()
    merged = layerfuse.merge(model, torch.ones(H), FusionConfig(layer=2))
    layerfuse.merge(model, torch.ones(H), FusionConfig(layer=1))  # a handle the caller does not keep
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None
    assert not merged.active
    merged.unmerge()
