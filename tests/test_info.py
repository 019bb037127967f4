"""Info, positions masks and method arguments that cannot run: refused clearly at `fuse`, the model untouched."""

from __future__ import annotations

import numpy
import pytest
import torch

import layerfuse
from conftest import TINY, assert_unchanged, padded_batch, snapshot, tiny_bert
from layerfuse.info import read_info

H = TINY["hidden_size"]


def not_plain(make):
    return pytest.param(make, id=make.__name__)


def meta():
    return torch.ones(H, device="meta")


def sparse_coo():
    return torch.ones(3, H).to_sparse()


def sparse_csr():
    return torch.ones(3, H).to_sparse_csr()


def nested():
    return torch.nested.nested_tensor([torch.ones(2, H), torch.ones(3, H)])


def float8_e4m3fn():
    return torch.ones(H).to(torch.float8_e4m3fn)


def float8_e5m2():
    return torch.ones(H).to(torch.float8_e5m2)


def complex64():
    return torch.ones(H, dtype=torch.complex64)


def boolean():
    return torch.ones(H, dtype=torch.bool)


def int64():
    return torch.ones(H, dtype=torch.int64)


NOT_PLAIN = {
    meta: "dense tensor with data, got a meta tensor",
    sparse_coo: "dense tensor, got a sparse_coo tensor: use .to_dense()",
    sparse_csr: "dense tensor, got a sparse_csr tensor: use .to_dense()",
    nested: "dense tensor, got a nested tensor",
    float8_e4m3fn: "float16, bfloat16, float32 or float64, got torch.float8_e4m3fn",
    float8_e5m2: "float16, bfloat16, float32 or float64, got torch.float8_e5m2",
    complex64: "float16, bfloat16, float32 or float64, got torch.complex64",
    boolean: "float16, bfloat16, float32 or float64, got torch.bool",
    int64: "float16, bfloat16, float32 or float64, got torch.int64",
}


@pytest.mark.filterwarnings("ignore:.*(beta|prototype):UserWarning")
@pytest.mark.parametrize("make", [not_plain(make) for make in NOT_PLAIN])
def test_info_that_is_not_a_dense_floating_tensor_with_data_is_refused_by_fuse_and_set_info(tiny, make):
    before = snapshot(tiny)
    with pytest.raises(layerfuse.InfoTypeError, match=f"^info must be a .*{NOT_PLAIN[make]}"):
        layerfuse.fuse(tiny, make(), layer=1)
    assert_unchanged(tiny, before)
    batch, info = padded_batch(), torch.randn(H, generator=torch.Generator().manual_seed(0))
    with layerfuse.fuse(tiny, info, layer=1, approach="layer") as fusion:
        expected = tiny(**batch).last_hidden_state
        with pytest.raises(layerfuse.InfoTypeError, match=NOT_PLAIN[make]):
            fusion.set_info(make())
        assert torch.equal(tiny(**batch).last_hidden_state, expected)
    assert_unchanged(tiny, before)


def meta_mask():
    return torch.ones(3, 7, dtype=torch.bool, device="meta")


def sparse_mask():
    return torch.ones(3, 7, dtype=torch.bool).to_sparse()


@pytest.mark.parametrize(
    ("make", "message"),
    [(meta_mask, "dense tensor with data, got a meta tensor"), (sparse_mask, "dense tensor, got a sparse_coo")],
)
def test_a_positions_mask_that_is_not_dense_with_data_is_refused_at_fuse(tiny, make, message):
    before = snapshot(tiny)
    with pytest.raises(layerfuse.ArgumentTypeError, match=f"^a positions mask must be a {message}"):
        layerfuse.fuse(tiny, torch.ones(H), layer=1, positions=make())
    assert_unchanged(tiny, before)


@pytest.mark.parametrize("suffix", [".pt", ".npy", ".safetensors"])
def test_an_empty_info_file_is_refused_as_empty(tmp_path, suffix):
    path = tmp_path / f"info{suffix}"
    path.touch()
    with pytest.raises(layerfuse.FileFormatError, match="the file is empty"):
        read_info(path)


@pytest.mark.parametrize("suffix", [".pt", ".npy"])
def test_a_truncated_info_file_is_refused(tmp_path, suffix):
    whole = tmp_path / f"whole{suffix}"
    if suffix == ".pt":
        torch.save(torch.ones(H), whole)
    else:
        numpy.save(whole, numpy.ones(H, dtype=numpy.float32))
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(whole.read_bytes()[:20])
    with pytest.raises(layerfuse.FileFormatError, match="cannot read info from"):
        read_info(cut)


OVERFLOWING = [
    pytest.param("addition", {"alpha": 1e39}, "alpha=1e\\+39", id="addition-1e39"),
    pytest.param("addition", {"alpha": -1e39}, "alpha=-1e\\+39", id="addition-minus-1e39"),
    pytest.param("scale", {"alpha": 1e39}, "alpha=1e\\+39", id="scale-1e39"),
    pytest.param("interpolate", {"alpha": 4e38}, "alpha=4e\\+38", id="interpolate-4e38"),
    pytest.param("clamp", {"value": 1e300}, "value=1e\\+300", id="clamp-1e300"),
    pytest.param("addition", {"alpha": 10**39}, "alpha=1e\\+39", id="addition-int-10**39"),
]


@pytest.mark.parametrize("approach", ["hook", "layer"])
@pytest.mark.parametrize(("method", "arguments", "shown"), OVERFLOWING)
def test_an_argument_beyond_float32_is_refused_at_fuse(tiny, method, arguments, shown, approach):
    before = snapshot(tiny)
    info = None if method == "scale" else torch.ones(H)
    with pytest.raises(
        layerfuse.ArgumentValueError, match=f"^{shown} overflows the dtype the fusion runs in, torch.float32"
    ):
        layerfuse.fuse(tiny, info, layer=1, method=method, approach=approach, **arguments)
    assert_unchanged(tiny, before)


@pytest.mark.parametrize("method", ["addition", "scale", "interpolate", "clamp"])
def test_an_int_beyond_the_float_range_is_refused(tiny, method):
    key = "value" if method == "clamp" else "alpha"
    before = snapshot(tiny)
    with pytest.raises(layerfuse.ArgumentValueError, match=f"^{key} must be finite, got an int beyond the float"):
        layerfuse.fuse(tiny, None if method == "scale" else torch.ones(H), layer=1, method=method, **{key: 10**400})
    assert_unchanged(tiny, before)


@pytest.mark.parametrize(("dtype", "fits", "overflows"), [(torch.float16, 6e4, 7e4), (torch.bfloat16, 3.38e38, 3.4e38)])
def test_arguments_are_checked_against_the_models_own_dtype(dtype, fits, overflows):
    model, batch = tiny_bert().to(dtype), padded_batch()
    before = snapshot(model)
    with pytest.raises(layerfuse.ArgumentValueError, match=f"overflows the dtype the fusion runs in, {dtype}"):
        layerfuse.fuse(model, None, layer=1, method="scale", alpha=overflows)
    assert_unchanged(model, before)
    with layerfuse.fuse(model, torch.zeros(H), layer=1, method="addition", alpha=fits), torch.no_grad():
        fused = model(**batch, output_hidden_states=True).hidden_states[1]
    assert torch.equal(fused, model(**batch, output_hidden_states=True).hidden_states[1])


def test_info_that_overflows_the_models_dtype_is_refused_at_fuse_and_at_set_info(tiny):
    before = snapshot(tiny)
    big = torch.full((H,), 1e300, dtype=torch.float64)
    with pytest.raises(
        layerfuse.InfoValueError, match="of the torch.float64 info overflow the model's dtype torch.float32"
    ):
        layerfuse.fuse(tiny, big, layer=1)
    assert_unchanged(tiny, before)
    with layerfuse.fuse(tiny, torch.ones(H, dtype=torch.float64), layer=1) as fusion:
        with pytest.raises(layerfuse.InfoValueError, match="overflow the model's dtype torch.float32"):
            fusion.set_info(big)
        assert torch.equal(fusion.info.source, torch.ones(H, dtype=torch.float64))


def test_info_that_overflows_a_dtype_the_model_moves_to_is_refused_at_the_forward():
    model, batch = tiny_bert(), padded_batch()
    with layerfuse.fuse(model, torch.full((H,), 1e5), layer=1):
        model.half()
        with pytest.raises(layerfuse.InfoValueError, match="overflow the model's dtype torch.float16"):
            model(**batch)
