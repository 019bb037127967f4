"""Models under accelerate's hooks (`cpu_offload`, `dispatch_model` offloading parts to disk): fusions give
bitwise the outputs of the same fusion on the plain model, and removing them leaves accelerate's hooks as
they were. Models without data (`init_empty_weights`) are refused at `fuse`, and fuse once loaded."""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate import cpu_offload, dispatch_model, init_empty_weights, load_checkpoint_and_dispatch
from transformers import BertConfig, BertModel

import layerfuse
from conftest import TINY, padded_batch, tiny_bert

H = TINY["hidden_size"]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DISK_MAP = {
    "embeddings": "disk",
    "encoder.layer.0": "cpu",
    "encoder.layer.1": "disk",
    "encoder.layer.2": "cpu",
    "pooler": "cpu",
}
"""Embeddings and the second block offloaded to disk (meta in the model until accelerate's hooks load them)."""
SITES = [
    pytest.param(dict(layer=0), id="embeddings"),
    pytest.param(dict(layer=2), id="output-of-an-offloaded-block"),
    pytest.param(dict(layer=2, site="mlp"), id="mlp-of-an-offloaded-block"),
]


def offloaded(kind: str, folder) -> BertModel:
    model = tiny_bert()
    if kind == "cpu_offload":
        return cpu_offload(model)
    return dispatch_model(model, device_map=DISK_MAP, main_device="cpu", offload_dir=str(folder))


def accelerate_state(model: torch.nn.Module) -> list:
    """Per module: its class, accelerate's hook, the forward set on the instance, and every hook."""
    return [
        (
            name,
            type(module),
            module.__dict__.get("_hf_hook"),
            module.__dict__.get("forward"),
            list(module._forward_hooks.items()),
            list(module._forward_pre_hooks.items()),
        )
        for name, module in model.named_modules()
    ]


def states(model, batch) -> list[torch.Tensor]:
    with torch.no_grad():
        output = model(**batch, output_hidden_states=True)
    return [*output.hidden_states, output.pooler_output]


def assert_equal(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(got) == len(expected)
    for index, (a, b) in enumerate(zip(got, expected)):
        assert a.device == b.device and torch.equal(a, b), index


@pytest.mark.parametrize("approach", ["hook", "layer"])
@pytest.mark.parametrize("where", SITES)
@pytest.mark.parametrize("kind", ["cpu_offload", "disk"])
def test_a_fusion_on_an_offloaded_model_is_bitwise_that_on_the_plain_model(tmp_path, kind, where, approach):
    batch = padded_batch()
    info = torch.randn(3, H, generator=torch.Generator().manual_seed(0))
    plain = tiny_bert()
    unfused = states(plain, batch)
    with layerfuse.fuse(plain, info, approach=approach, positions="tokens", **where):
        expected = states(plain, batch)
    model = offloaded(kind, tmp_path)
    assert any(p.is_meta for p in model.parameters())
    assert_equal(states(model, batch), unfused)  # and transformers installs its hidden-state capture
    before = accelerate_state(model)
    with layerfuse.fuse(model, info, approach=approach, positions="tokens", **where):
        assert_equal(states(model, batch), expected)
    assert accelerate_state(model) == before
    assert_equal(states(model, batch), unfused)
    assert not all(torch.equal(a, b) for a, b in zip(expected, unfused))


@pytest.mark.parametrize("approach", ["hook", "layer"])
def test_a_learned_fusion_on_an_offloaded_model_is_bitwise_that_on_the_plain_model(tmp_path, approach):
    batch = padded_batch()
    info = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    film = layerfuse.Film(hidden_size=H, info_size=5)
    torch.manual_seed(2)
    for parameter in film.parameters():
        torch.nn.init.normal_(parameter, std=0.1)
    plain = tiny_bert()
    with layerfuse.fuse(plain, info, layer=2, method=copy.deepcopy(film), approach=approach, positions="tokens"):
        expected = states(plain, batch)
    model = offloaded("disk", tmp_path)
    with layerfuse.fuse(model, info, layer=2, method=film, approach=approach, positions="tokens"):
        assert_equal(states(model, batch), expected)


def empty_model() -> BertModel:
    with init_empty_weights():
        return BertModel(BertConfig(**TINY)).eval()


def test_a_model_with_no_data_is_refused_at_fuse_and_left_as_it_was():
    model = empty_model()
    before = accelerate_state(model)
    with pytest.raises(layerfuse.ArgumentValueError, match="on the meta device with nothing to load them"):
        layerfuse.fuse(model, torch.ones(H), layer=1)
    assert accelerate_state(model) == before
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("approach", ["hook", "layer"])
def test_an_empty_model_fuses_once_accelerate_has_loaded_it(tmp_path, approach):
    batch = padded_batch()
    info = torch.randn(3, H, generator=torch.Generator().manual_seed(0))
    plain = tiny_bert()
    with layerfuse.fuse(plain, info, layer=2, approach=approach, positions="tokens"):
        expected = states(plain, batch)
    plain.save_pretrained(tmp_path / "weights")
    model = load_checkpoint_and_dispatch(
        empty_model(),
        str(tmp_path / "weights" / "model.safetensors"),
        device_map=DISK_MAP,
        offload_folder=str(tmp_path),
    )
    with layerfuse.fuse(model, info, layer=2, approach=approach, positions="tokens"):
        assert_equal(states(model, batch), expected)


@CUDA
@pytest.mark.parametrize("approach", ["hook", "layer"])
def test_info_on_the_cpu_moves_once_to_the_device_the_offloaded_model_runs_on(approach):
    batch = {key: value.cuda() for key, value in padded_batch().items()}
    info = torch.randn(3, H, generator=torch.Generator().manual_seed(0))
    plain = tiny_bert().cuda()
    with layerfuse.fuse(plain, info, layer=2, approach=approach, positions="tokens"):
        expected = states(plain, batch)
    model = cpu_offload(tiny_bert(), execution_device=torch.device("cuda"))
    with layerfuse.fuse(model, info, layer=2, approach=approach, positions="tokens") as fusion:
        assert_equal(states(model, batch), expected)
        moved = fusion.info.tensor
        assert moved.device.type == "cuda"
        assert_equal(states(model, batch), expected)
        assert fusion.info.tensor is moved
