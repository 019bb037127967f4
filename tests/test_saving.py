"""Saving a fusion and loading it back: bitwise round trips, and clear errors for bad files."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import layerfuse
from conftest import TINY, assert_unchanged, snapshot, tiny_bert
from layerfuse.saving import read_fusion

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
    assert config["format_version"] == 3 and config["fusion"]["layer"] == 2 and config["model"]["hidden_size"] == H
    assert config["tensors_sha256"] == hashlib.sha256((tmp_path / "fusion.safetensors").read_bytes()).hexdigest()
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
    """Change keys of the saved config: the format version, the digest, the fusion's fields or the model's facts."""
    path = folder / "fusion_config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        top = key in ("format_version", "tensors_sha256")
        part = config if top else config["model"] if key == "hidden_size" else config["fusion"]
        part[key] = value
    path.write_text(json.dumps(config))


def replace_tensors(folder, tensors):
    """Save other tensors in the folder, with their digest: a well-formed folder that holds them."""
    save_file(tensors, folder / "fusion.safetensors")
    edit_config(folder, tensors_sha256=hashlib.sha256((folder / "fusion.safetensors").read_bytes()).hexdigest())


def flip_a_bit(path, offset=-1):
    """Flip the lowest bit of one byte of the file (by default the last: the last tensor's data)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 1
    path.write_bytes(bytes(data))


def as_format_2(folder):
    """The saved folder as format version 2 wrote it: the same, without the digest."""
    path = folder / "fusion_config.json"
    config = json.loads(path.read_text())
    del config["tensors_sha256"]
    path.write_text(json.dumps({**config, "format_version": 2}))


BAD_FILES = {
    "no config": (lambda f: (f / "fusion_config.json").unlink(), "fusion_config.json is missing"),
    "no tensors": (lambda f: (f / "fusion.safetensors").unlink(), "fusion.safetensors is missing"),
    "config not JSON": (lambda f: (f / "fusion_config.json").write_text("{oops"), "not valid JSON"),
    "tensors corrupt": (
        lambda f: replace_bytes(f, b"\x00" * 16),
        "not a valid safetensors file",
    ),
    "a flipped bit": (
        lambda f: flip_a_bit(f / "fusion.safetensors"),
        "does not match the SHA-256 digest that fusion_config.json records: the file was damaged or changed",
    ),
    "a flipped bit in the header": (
        lambda f: flip_a_bit(f / "fusion.safetensors", offset=12),
        "does not match the SHA-256 digest",
    ),
    "no digest": (lambda f: edit_config_drop_top(f, "tensors_sha256"), "lacks the SHA-256 digest"),
    "digest not a string": (lambda f: edit_config(f, tensors_sha256=123), "lacks the SHA-256 digest .* got 123"),
    "newer format": (
        lambda f: edit_config(f, format_version=4),
        "format version 4; this layerfuse reads versions 1, 2 and 3",
    ),
    "unknown method": (lambda f: edit_config(f, method="telepathy"), "'telepathy', which is not registered"),
    "other hidden size": (lambda f: edit_config(f, hidden_size=64), "saved for hidden size 64, this model's is 32"),
    "bad arguments": (lambda f: edit_config(f, arguments={"beta": 1}), "does not rebuild a Addition"),
    "missing key": (lambda f: edit_config(f, layer=None) or edit_config_drop(f, "layer"), "lacks layer"),
    "missing info": (lambda f: replace_tensors(f, {}), "lacks the info tensor"),
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
        lambda f: replace_tensors(f, {"info": torch.full((H,), float("nan"))}),
        "holds NaN or infinite values in info",
    ),
}


def edit_config_drop(folder, key):
    path = folder / "fusion_config.json"
    config = json.loads(path.read_text())
    del config["fusion"][key]
    path.write_text(json.dumps(config))


def edit_config_drop_top(folder, key):
    path = folder / "fusion_config.json"
    config = json.loads(path.read_text())
    del config[key]
    path.write_text(json.dumps(config))


def replace_bytes(folder, data):
    """Write `data` as the tensors file, with its digest: a folder whose tensors file is not safetensors."""
    (folder / "fusion.safetensors").write_bytes(data)
    edit_config(folder, tensors_sha256=hashlib.sha256(data).hexdigest())


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
    replace_tensors(tmp_path, tensors)
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


def test_a_flipped_bit_is_refused_by_every_reader(tmp_path, tiny):
    folder = save_addition(tmp_path, tiny)
    flip_a_bit(folder / "fusion.safetensors")
    before = snapshot(tiny)
    for read in (layerfuse.load_config, read_fusion, lambda f: layerfuse.load_fusion(f, tiny)):
        with pytest.raises(layerfuse.FileFormatError, match="does not match the SHA-256 digest"):
            read(folder)
    assert_unchanged(tiny, before)


@pytest.mark.parametrize("approach", ["hook", "layer"])
def test_a_folder_of_format_version_2_without_a_digest_loads(tmp_path, tiny, batch, approach):
    method = randomised(layerfuse.Film(hidden_size=H, info_size=5))
    info = torch.randn(3, 5)
    with torch.no_grad():
        with layerfuse.fuse(tiny, info, layer=2, method=method, approach=approach, positions="tokens") as fusion:
            want = tiny(**batch).last_hidden_state
            fusion.save(tmp_path)
        as_format_2(tmp_path)
        with layerfuse.load_fusion(tmp_path, tiny) as loaded:
            assert loaded.approach == approach and loaded.config == fusion.config
            assert torch.equal(tiny(**batch).last_hidden_state, want)
    assert torch.equal(read_fusion(tmp_path)[1], info)


def test_save_replaces_a_fusion_saved_before_and_leaves_other_files(tmp_path, tiny, batch):
    (tmp_path / "notes.txt").write_text("kept")
    save_addition(tmp_path, tiny)
    with torch.no_grad(), layerfuse.fuse(tiny, None, layer=1, method="scale", alpha=3.0) as fusion:
        want = tiny(**batch).last_hidden_state
        fusion.save(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["fusion.safetensors", "fusion_config.json", "notes.txt"]
    assert (tmp_path / "notes.txt").read_text() == "kept"
    with torch.no_grad(), layerfuse.load_fusion(tmp_path, tiny) as loaded:
        assert loaded.config.method == "scale" and torch.equal(tiny(**batch).last_hidden_state, want)


BAD_SAVES = {
    "a file": (lambda root: root / "fusion_config.json", layerfuse.ArgumentValueError, "it is a file; give a folder"),
    "a file's child": (
        lambda root: root / "fusion_config.json" / "inner",
        layerfuse.ArgumentValueError,
        "cannot save a fusion to .*inner",
    ),
    "not a path": (lambda root: None, layerfuse.ArgumentTypeError, "named by a str or a path, got NoneType"),
}


@pytest.mark.parametrize("case", BAD_SAVES)
def test_save_to_a_bad_path_is_refused_and_writes_nothing(tmp_path, tiny, case):
    root = save_addition(tmp_path / "saved", tiny)
    files = {path: path.read_bytes() for path in root.iterdir()}
    where, kind, message = BAD_SAVES[case]
    with layerfuse.fuse(tiny, torch.ones(H), layer=1) as fusion, pytest.raises(kind, match=message):
        fusion.save(where(root))
    assert {path: path.read_bytes() for path in root.iterdir()} == files


@pytest.mark.parametrize(
    "model, message",
    [
        (None, "attaches the saved fusion to a torch.nn.Module, got NoneType"),
        (torch.nn.Linear(H, H), "model.config.hidden_size, which this Linear lacks"),
    ],
)
def test_load_fusion_refuses_what_is_not_a_model(tmp_path, tiny, model, message):
    folder = save_addition(tmp_path, tiny)
    with pytest.raises(layerfuse.ArgumentTypeError, match=message):
        layerfuse.load_fusion(folder, model)
