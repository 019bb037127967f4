"""Saving a fusion and loading it back: bitwise round trips, and clear errors for bad files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import layerfuse
from conftest import TINY, assert_unchanged, snapshot, tiny_bert

H = TINY["hidden_size"]


def randomised(method):
    with torch.no_grad():
        for parameter in method.parameters():
            parameter.normal_(0, 0.3)
    return method


CASES = {
    "addition": dict(info=torch.randn(H), method="addition", alpha=0.5),
    "clamp-tokens": dict(info=torch.randn(3, H), method="clamp", value=1.5, positions="tokens"),
    "project-indices": dict(info=torch.randn(2, H), method="project", positions=[0, -1]),
    "scale-mask": dict(
        info=None,
        method="scale",
        alpha=2.0,
        positions=torch.tensor([[True] * 7, [False] * 7, [True, False] * 3 + [True]]),
    ),
    "film": dict(info=torch.randn(3, 5), method=randomised(layerfuse.Film(hidden_size=H, info_size=5))),
    "gate": dict(info=torch.randn(3, 7, 5), method=randomised(layerfuse.Gate(hidden_size=H, info_size=5, beta=0.5))),
    "cross_attention": dict(
        info=torch.randn(4, 6),
        method=randomised(layerfuse.CrossAttention(hidden_size=H, info_size=6, heads=2)),
        positions="last",
    ),
}


@pytest.mark.parametrize("approach", ["hook", "layer"])
@pytest.mark.parametrize("case", CASES)
def test_save_then_load_round_trips_bitwise(tmp_path, tiny, batch, case, approach):
    options = dict(CASES[case])
    info = options.pop("info")
    with torch.no_grad():
        with layerfuse.fuse(tiny, info, layer=2, approach=approach, **options) as fusion:
            expected = tiny(**batch).last_hidden_state
            fusion.save(tmp_path)
        before = snapshot(tiny)
        fresh = tiny_bert()
        fresh.load_state_dict(tiny.state_dict())
        with layerfuse.load_fusion(tmp_path, fresh) as loaded:
            assert loaded.approach == approach and loaded.layer == 2
            assert torch.equal(fresh(**batch).last_hidden_state, expected)
    assert_unchanged(tiny, before)
    config = json.loads((tmp_path / "fusion_config.json").read_text())
    assert config["format_version"] == 2 and config["fusion"]["layer"] == 2 and config["model"]["hidden_size"] == H
    assert load_file(tmp_path / "fusion.safetensors").keys() >= {f"method.{k}" for k in loaded.method.state_dict()}


def test_load_can_change_approach_and_info(tmp_path, tiny, batch):
    with layerfuse.fuse(tiny, torch.randn(H), layer=1) as fusion:
        fusion.save(tmp_path)
    with layerfuse.load_fusion(
        tmp_path, tiny, config=layerfuse.load_config(tmp_path).replace(approach="layer"), info=torch.ones(H)
    ) as loaded:
        assert loaded.approach == "layer" and torch.equal(loaded.info.source, torch.ones(H))


def save_addition(tmp_path, tiny):
    with layerfuse.fuse(tiny, torch.randn(H), layer=1) as fusion:
        fusion.save(tmp_path)
    return tmp_path


def edit_config(folder, **changes):
    """Change keys of the saved config: the format version, the fusion's fields or the model's facts."""
    path = folder / "fusion_config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        part = config if key == "format_version" else config["model"] if key == "hidden_size" else config["fusion"]
        part[key] = value
    path.write_text(json.dumps(config))


BAD_FILES = {
    "no config": (lambda f: (f / "fusion_config.json").unlink(), "fusion_config.json is missing"),
    "no tensors": (lambda f: (f / "fusion.safetensors").unlink(), "fusion.safetensors is missing"),
    "config not JSON": (lambda f: (f / "fusion_config.json").write_text("{oops"), "not valid JSON"),
    "tensors corrupt": (lambda f: (f / "fusion.safetensors").write_bytes(b"\x00" * 16), "not a valid safetensors file"),
    "newer format": (
        lambda f: edit_config(f, format_version=3),
        "format version 3; this layerfuse reads versions 1 and 2",
    ),
    "unknown method": (lambda f: edit_config(f, method="telepathy"), "'telepathy', which is not registered"),
    "other hidden size": (lambda f: edit_config(f, hidden_size=64), "saved for hidden size 64, this model's is 32"),
    "bad arguments": (lambda f: edit_config(f, arguments={"beta": 1}), "does not rebuild a Addition"),
    "missing key": (lambda f: edit_config(f, layer=None) or edit_config_drop(f, "layer"), "lacks layer"),
    "missing info": (lambda f: save_file({}, f / "fusion.safetensors"), "lacks the info tensor"),
    "method not a name": (
        lambda f: edit_config(f, method=["addition"]),
        r"uses method \['addition'\], which is not registered",
    ),
    "format version true": (lambda f: edit_config(f, format_version=True), "format version True; this layerfuse reads"),
    "hidden size a string": (
        lambda f: edit_config(f, hidden_size="32"),
        "saved for hidden size '32', this model's is 32",
    ),
    "non-finite info": (
        lambda f: save_file({"info": torch.full((H,), float("nan"))}, f / "fusion.safetensors"),
        "holds NaN or infinite values in info",
    ),
}


def edit_config_drop(folder, key):
    path = folder / "fusion_config.json"
    config = json.loads(path.read_text())
    del config["fusion"][key]
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_files_get_clear_errors_and_touch_nothing(tmp_path, tiny, case):
    spoil, message = BAD_FILES[case]
    folder = save_addition(tmp_path, tiny)
    spoil(folder)
    before = snapshot(tiny)
    with pytest.raises(layerfuse.FileFormatError, match=message):
        layerfuse.load_fusion(folder, tiny)
    assert_unchanged(tiny, before)


def test_a_learned_fusion_missing_a_tensor_is_refused(tmp_path, tiny):
    with layerfuse.fuse(tiny, torch.randn(5), layer=1, method="film") as fusion:
        fusion.save(tmp_path)
    tensors = load_file(tmp_path / "fusion.safetensors")
    del tensors["method.beta.bias"]
    save_file(tensors, tmp_path / "fusion.safetensors")
    with pytest.raises(layerfuse.FileFormatError, match="Missing key.*beta.bias"):
        layerfuse.load_fusion(tmp_path, tiny)


def test_an_unregistered_method_cannot_be_saved(tmp_path, tiny):
    class Halve(layerfuse.Method):
        def forward(self, hidden, info):
            return hidden / 2

    with layerfuse.fuse(tiny, torch.ones(H), layer=1, method=Halve()) as fusion:
        with pytest.raises(layerfuse.FileFormatError, match="register the method"):
            fusion.save(tmp_path)


def test_a_folder_of_format_version_1_loads(tmp_path, tiny, batch):
    """A folder as format version 1 wrote it: the config's fields and the model's facts side by side."""
    generator = torch.Generator().manual_seed(8)
    info, mask = torch.randn(H, generator=generator), torch.rand(3, 7, generator=generator) > 0.5
    save_file({"info": info, "positions": mask}, tmp_path / "fusion.safetensors", metadata={"format": "pt"})
    (tmp_path / "fusion_config.json").write_text(
        json.dumps(
            {
                "format_version": 1,
                "method": "clamp",
                "arguments": {"value": 1.5},
                "layer": 2,
                "site": "output",
                "approach": "layer",
                "positions": None,
                "hidden_size": H,
                "model_type": "bert",
            }
        )
    )
    with torch.no_grad():
        with layerfuse.load_fusion(tmp_path, tiny) as loaded:
            assert loaded.approach == "layer" and loaded.config.arguments == {"value": 1.5}
            got = tiny(**batch).last_hidden_state
        with layerfuse.fuse(tiny, info, layer=2, method="clamp", value=1.5, positions=mask):
            want = tiny(**batch).last_hidden_state
        assert torch.equal(got, want) and not torch.equal(got, tiny(**batch).last_hidden_state)


def test_an_alias_in_a_saved_config_names_its_method(tmp_path, tiny, batch):
    folder = save_addition(tmp_path, tiny)
    edit_config(folder, method="add")
    with torch.no_grad(), layerfuse.load_fusion(folder, tiny) as loaded:
        assert loaded.config.method == "addition"
