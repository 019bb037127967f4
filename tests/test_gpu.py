"""Half precision (float16, bfloat16) on the CPU and, where there is one, on a CUDA device; skipped cleanly without one."""

from __future__ import annotations

import pytest
import torch

import layerfuse
from conftest import TINY, padded_batch, tiny_bert
from layerfuse.lab.bench import bench

H = TINY["hidden_size"]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=CUDA)]
DTYPES = [pytest.param(torch.float16, id="float16"), pytest.param(torch.bfloat16, id="bfloat16")]
GENERATOR = torch.Generator().manual_seed(11)
FIXED = {
    "addition": (torch.randn(H, generator=GENERATOR), {}),
    "multiplication": (1 + torch.randn(3, H, generator=GENERATOR) / 4, {}),
    "scale": (None, {"alpha": 0.5}),
    "replace": (torch.randn(H, generator=GENERATOR), {}),
    "interpolate": (torch.randn(H, generator=GENERATOR), {}),
    "ablate": (torch.randn(H, generator=GENERATOR), {}),
    "clamp": (torch.randn(H, generator=GENERATOR), {"value": 2.0}),
    "project": (torch.randn(2, H, generator=GENERATOR), {}),
    "erase": (torch.randn(3, H, generator=GENERATOR) / H**0.5, {}),
}


def setup(device: str, dtype: torch.dtype):
    model = tiny_bert().to(device=device, dtype=dtype)
    batch = {key: value.to(device) for key, value in padded_batch().items()}
    return model, batch


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_info_is_cast_once_and_fused_exactly(device, dtype):
    model, batch = setup(device, dtype)
    info = torch.randn(H, generator=torch.Generator().manual_seed(0))  # float32, on the CPU
    with torch.no_grad():
        plain = model(**batch, output_hidden_states=True).hidden_states
        outputs = {}
        for approach in ("hook", "layer"):
            with layerfuse.fuse(model, info, layer=2, approach=approach) as fusion:
                cast = fusion.info.tensor
                assert cast.dtype == dtype and cast.device.type == device
                outputs[approach] = [model(**batch, output_hidden_states=True) for _ in range(2)]
                assert fusion.info.tensor is cast  # cast when fused, not in each forward
    hook, layer = outputs["hook"][0], outputs["layer"][1]
    assert torch.equal(hook.hidden_states[2], plain[2] + info.to(device=device, dtype=dtype))
    assert all(torch.equal(h, c) for h, c in zip(hook.hidden_states, layer.hidden_states, strict=True))
    assert hook.last_hidden_state.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_every_fixed_method_runs(device, dtype):
    model, batch = setup(device, dtype)
    with torch.no_grad():
        plain = model(**batch).last_hidden_state
        for method, (info, arguments) in FIXED.items():
            results = []
            for approach in ("hook", "layer"):
                with layerfuse.fuse(model, info, layer=2, method=method, approach=approach, **arguments):
                    results.append(model(**batch).last_hidden_state)
            assert torch.equal(*results), method
            assert torch.isfinite(results[0]).all() and not torch.equal(results[0], plain), method


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_sweep(device, dtype):
    model, batch = setup(device, dtype)
    infos = torch.randn(4, H, generator=torch.Generator().manual_seed(1))
    swept = layerfuse.sweep(model, batch, infos, layer=2, method="clamp", value=1.0)
    assert swept.dtype == dtype and swept.device.type == device
    for info, output in zip(infos, swept):
        with torch.no_grad(), layerfuse.fuse(model, info, layer=2, method="clamp", value=1.0):
            expected = model(**batch).last_hidden_state
        torch.testing.assert_close(output, expected, rtol=2e-2, atol=2e-2)


@CUDA
@pytest.mark.parametrize("method", ["ablate", "clamp", "scale"])
def test_compile_on_cuda(method):
    model, batch = setup("cuda", torch.float16)
    info, arguments = FIXED[method]
    with torch.no_grad(), layerfuse.fuse(model, info, layer=2, method=method, approach="layer", **arguments):
        eager = model(**batch).last_hidden_state
        compiled = torch.compile(model, fullgraph=True)(**batch).last_hidden_state
    torch.testing.assert_close(compiled, eager, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_bench_in_half_precision(device):
    report = bench(
        device=device,
        dtype="bfloat16",
        shapes=((1, 4),),
        threads=(1,),
        methods=("addition",),
        rounds=1,
        memory=device == "cuda",
    )
    assert report.device.startswith(device) and report.dtype == "bfloat16"
    assert sorted(report.points[0].timings) == ["hook", "layer", "merged", "plain"]
    if device == "cuda":
        assert report.memory.peak["plain"] > 0
