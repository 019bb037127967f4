"""Saved fusions and partial run folders, changed on disk in generated ways: every change gives the original
result, the result its new values say (checked against tests/reference.py), or a LayerfuseError that leaves
the model and the data as they were."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import layerfuse
from conftest import assert_unchanged, padded_batch, snapshot, tiny_bert
from layerfuse.fusion import prepare_fusion
from layerfuse.run import embed_corpus
from reference import bert_forward, bert_forward_with_sublayer_edit, chosen_positions, fixed_formula, learned_formula
from test_run import interrupt_after_shards, small, write_corpus  # noqa: F401  (small is a fixture)

MODEL = tiny_bert()
BATCH = padded_batch()
H = MODEL.config.hidden_size
ALIASES = {"add": "addition", "multiply": "multiplication"}


def learned_film(info_size: int) -> layerfuse.Method:
    """A FiLM fusion with random (not identity) parameters, so that a wrong load shows."""
    method = layerfuse.METHODS["film"](hidden_size=H, info_size=info_size)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in method.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return method


SAVED = {
    "addition, shared info, tokens": (
        layerfuse.FusionConfig(layer=2, arguments={"alpha": 0.5}, positions="tokens"),
        None,
    ),
    "interpolate, per-example info, a mask": (
        layerfuse.FusionConfig(
            method="interpolate",
            arguments={"alpha": 0.25},
            layer=1,
            approach="layer",
            positions=torch.tensor([[True, False] * 3 + [True], [False] * 7, [True] * 7]),
        ),
        None,
    ),
    "clamp at the mlp": (layerfuse.FusionConfig(method="clamp", arguments={"value": 2.0}, layer=2, site="mlp"), None),
    "film, last": (layerfuse.FusionConfig(method="film", layer=-1, positions="last"), learned_film(5)),
}


def save(name: str, folder: Path) -> None:
    config, method = SAVED[name]
    generator = torch.Generator().manual_seed(7)
    shape = (5,) if method is not None else (3, H) if config.method == "interpolate" else (H,)
    with prepare_fusion(MODEL, torch.randn(shape, generator=generator), config, method=method).attach() as fusion:
        fusion.save(folder)


def strictly_equal(a: Any, b: Any) -> bool:
    """Equal as JSON values, a bool never equal to a number."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(strictly_equal(a[key], b[key]) for key in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(strictly_equal, a, b))
    return type(a) is type(b) and a == b


def paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value inside a JSON value, the root's children first."""
    found = []
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    for key, child in children:
        found.append((*prefix, key))
        found += paths(child, (*prefix, key))
    return found


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=6)
    | st.sampled_from(
        ["add", "addition", "scale", "film", "layer", "hook", "tokens", "first", "mlp", "embeddings", "32"]
    ),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=4,
)


@st.composite
def mutations(draw, document: Any):
    """A JSON document with one value replaced, one key deleted or one key added."""
    document = json.loads(json.dumps(document))
    where = draw(st.sampled_from(paths(document)))
    *parents, last = where
    parent = document
    for key in parents:
        parent = parent[key]
    kind = draw(st.sampled_from(["replace", "nudge", "delete", "add"]))
    old = parent[last]
    if kind == "nudge" and isinstance(old, (int, float)) and not isinstance(old, bool):
        parent[last] = draw(st.sampled_from([old + 1, old - 1, -old, old * 1e40, float(old), int(old)]))
    elif kind == "delete" and isinstance(parent, dict):
        del parent[last]
    elif kind == "add" and isinstance(old, dict):
        old[draw(st.text(max_size=6))] = draw(JSON)
    else:
        parent[last] = draw(JSON)
    event(f"{kind} {'.'.join(map(str, where[:2]))}")
    return document


def reference_states(fusion: layerfuse.Fusion) -> list[torch.Tensor]:
    """tests/reference.py's forward with what `fusion` says it is: its config, info and (learned) parameters."""
    config = fusion.config
    info = fusion.info.source.to(torch.float32)
    if fusion.method.learned:
        formula = learned_formula(fusion.method)
    else:
        formula = fixed_formula(config.method, config.arguments)
    positions = list(config.positions) if isinstance(config.positions, tuple) else config.positions
    chosen = chosen_positions(positions, BATCH["attention_mask"])[..., None]

    def edit(hidden):
        value = info[:, None, :] if info.ndim == 2 else info
        return torch.where(chosen, formula(hidden, value), hidden)

    layer = config.layer % (MODEL.config.num_hidden_layers + 1)
    if config.site == "output":
        return bert_forward(MODEL, BATCH, layer=layer, edit=edit)
    return bert_forward_with_sublayer_edit(MODEL, BATCH, layer=layer, site=config.site, edit=edit)


FOLDERS = {name: Path(tempfile.mkdtemp(prefix="saved-")) / "fusion" for name in SAVED}
for _name, _folder in FOLDERS.items():
    save(_name, _folder)
with torch.no_grad():
    ORIGINAL = {name: None for name in SAVED}
    for _name, _folder in FOLDERS.items():
        with layerfuse.load_fusion(_folder, MODEL):
            ORIGINAL[_name] = MODEL(**BATCH, output_hidden_states=True).hidden_states


def check_load(folder: Path, name: str, changed: dict | None) -> None:
    """Loading `folder` gives a LayerfuseError and leaves the model as it was, or a fusion that is what the
    (changed) JSON says and computes what the reference computes for it."""
    before = snapshot(MODEL)
    try:
        fusion = layerfuse.load_fusion(folder, MODEL)
    except layerfuse.LayerfuseError as error:
        event(type(error).__name__)
        assert_unchanged(MODEL, before)
        return
    with fusion, torch.no_grad():
        states = MODEL(**BATCH, output_hidden_states=True).hidden_states
    assert_unchanged(MODEL, before)
    if changed is None:
        event("the original result")
        for got, want in zip(states, ORIGINAL[name]):
            assert torch.equal(got, want)
        return
    event("loaded")
    loaded = fusion.config.to_dict()
    for key, value in changed["fusion"].items():
        if key == "method":
            value = ALIASES.get(value, value)
        if key == "arguments" and isinstance(value, dict):
            # Arguments a config leaves out take the method's defaults; numbers are recorded as floats.
            value = {k: float(v) if type(v) is int and not fusion.method.learned else v for k, v in value.items()}
            loaded[key] = {k: v for k, v in loaded[key].items() if k in value}
        assert strictly_equal(value, loaded[key]), (key, value, loaded[key])
    assert strictly_equal(changed["model"]["hidden_size"], H)
    with torch.no_grad():
        expected = reference_states(fusion)
    for got, want in zip(states, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


TAMPER = settings(
    max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)


@pytest.mark.parametrize("name", SAVED)
@TAMPER
@given(data=st.data())
def test_a_changed_fusion_config_loads_as_it_says_or_is_refused(name, data):
    folder = Path(tempfile.mkdtemp()) / "fusion"
    shutil.copytree(FOLDERS[name], folder)
    document = json.loads((folder / "fusion_config.json").read_text())
    changed = data.draw(mutations(document))
    (folder / "fusion_config.json").write_text(json.dumps(changed))
    try:
        check_load(folder, name, changed)
    finally:
        shutil.rmtree(folder.parent)


@pytest.mark.parametrize("name", SAVED)
@TAMPER
@given(data=st.data())
def test_a_flipped_bit_in_the_tensors_gives_the_original_result_or_is_refused(name, data):
    folder = Path(tempfile.mkdtemp()) / "fusion"
    shutil.copytree(FOLDERS[name], folder)
    tensors = bytearray((folder / "fusion.safetensors").read_bytes())
    header = 8 + int.from_bytes(tensors[:8], "little")
    byte = data.draw(st.one_of(st.integers(header, len(tensors) - 1), st.integers(0, len(tensors) - 1)))
    tensors[byte] ^= 1 << data.draw(st.integers(0, 7))
    event("in the header" if byte < header else "in the data")
    (folder / "fusion.safetensors").write_bytes(bytes(tensors))
    try:
        check_load(folder, name, None)
    finally:
        shutil.rmtree(folder.parent)


# Partial run folders


@pytest.fixture(scope="module")
def interrupted(small, tmp_path_factory):  # noqa: F811
    """A corpus, its uninterrupted output and rejects, and a partial folder of a run stopped after 2 of 4 shards."""
    folder = tmp_path_factory.mktemp("interrupted")
    write_corpus(folder / "c.jsonl")
    whole = embed_corpus(folder / "c.jsonl", folder / "whole.parquet", model=small, shard_size=8)
    with pytest.MonkeyPatch.context() as patch:
        interrupt_after_shards(patch, folder / "c.jsonl", folder / "out.parquet", small, shards=2)
    return folder, whole


@settings(TAMPER, max_examples=30)
@given(data=st.data())
def test_a_changed_manifest_resumes_to_the_uninterrupted_output_or_is_refused(small, interrupted, data):  # noqa: F811
    interrupted, whole = interrupted
    run = Path(tempfile.mkdtemp())
    try:
        shutil.copytree(interrupted / "out.parquet.partial", run / "out.parquet.partial")
        manifest = run / "out.parquet.partial" / "manifest.json"
        changed = data.draw(mutations(json.loads(manifest.read_text())))
        written = json.dumps(changed)
        manifest.write_text(written)
        try:
            summary = embed_corpus(interrupted / "c.jsonl", run / "out.parquet", model=small, shard_size=8, resume=True)
        except layerfuse.LayerfuseError as error:
            event(type(error).__name__)
            assert not (run / "out.parquet").exists()
            assert manifest.read_text() == written  # as text: a drawn NaN is never equal to itself
        else:
            event("resumed")
            assert pq.read_table(run / "out.parquet").equals(pq.read_table(interrupted / "whole.parquet"))
            assert (run / "out.rejects.jsonl").read_bytes() == (interrupted / "whole.rejects.jsonl").read_bytes()
            assert (summary.written, summary.truncated, summary.rejected) == (
                whole.written,
                whole.truncated,
                whole.rejected,
            )
    finally:
        shutil.rmtree(run)
