"""`save_merged` / `export_merged`: a model folder with fusions merged into its weights, that runs without layerfuse.

The folder is what `save_pretrained` writes (safetensors), with the tokenizer; `AutoModel.from_pretrained`
loads it with plain transformers. Its `config.json` records the merged fusions under "layerfuse".
A sentence-transformers folder (with `modules.json`) keeps its other modules (pooling, normalisation),
so `SentenceTransformer(folder)` loads it too.

>>> import json, tempfile, torch
>>> from transformers import BertConfig, BertModel
>>> from layerfuse import merge
>>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37))
>>> with merge(model, torch.ones(32), layer=1), tempfile.TemporaryDirectory() as folder:
...     path = save_merged(model, f"{folder}/out")
...     json.loads((path / "config.json").read_text())["layerfuse"]["merged"][0]["method"]
'addition'
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from .errors import ArgumentValueError, FusionStateError
from .fusion import prepare_fusion
from .merging import merge_fusion, merged_configs
from .models import embedded_model_path, load_model
from .saving import read_fusion

ENTRY = "layerfuse"
"""The key of config.json that records the merged fusions: {"merged": [FusionConfig.to_dict(), ...]}."""
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "config_sentence_transformers.json")


def _check_output(directory: Path) -> None:
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise ArgumentValueError(f"{directory} exists and is not an empty folder: choose a new output folder")


def save_merged(model: nn.Module, directory: str | os.PathLike[str], *, tokenizer: Any = None) -> Path:
    """Write `model`, whose fusions are merged (`layerfuse.merge`), as a plain model folder; return its path.

    Refused while a fusion is attached by hook or custom layer (it would not be saved: merge it or
    remove it) or when nothing is merged.
    """
    directory = Path(directory)
    attached = [
        name for name, module in model.named_modules() if {"_layerfuse_hook", "_layerfuse_layer"} & set(vars(module))
    ]
    if attached:
        raise FusionStateError(
            f"a fusion is attached to {attached[0]} by hook or custom layer, and a saved model would not have it: "
            "merge it (fusion.merge()) or remove it before saving"
        )
    configs = merged_configs(model)
    if not configs:
        raise FusionStateError("no fusion is merged into the model: merge one first (layerfuse.merge)")
    _check_output(directory)
    model.save_pretrained(directory, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    config_file = directory / "config.json"
    config = json.loads(config_file.read_text())
    config[ENTRY] = {"merged": [merged.to_dict() for merged in configs]}
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory


def _transformer_path(source: Path) -> str | None:
    """Where a sentence-transformers folder keeps its transformer module ("" for the folder itself); None if not one."""
    modules = source / "modules.json"
    if not modules.is_file():
        return None
    entries = json.loads(modules.read_text())
    paths = [entry["path"] for entry in entries if entry.get("type", "").endswith(".Transformer")]
    if len(paths) != 1:
        raise ArgumentValueError(f"{modules} names {len(paths)} Transformer modules: expected one")
    return paths[0]


def _copy_sentence_transformers(source: Path, output: Path, transformer: str) -> None:
    """Copy every module of a sentence-transformers folder but the transformer's weights, which are written anew."""
    for name in SENTENCE_TRANSFORMERS_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, output / name)
    if (source / transformer / "sentence_bert_config.json").is_file():
        shutil.copy2(
            source / transformer / "sentence_bert_config.json", output / transformer / "sentence_bert_config.json"
        )
    for entry in json.loads((source / "modules.json").read_text()):
        path = entry["path"]
        if path != transformer and path and (source / path).is_dir():
            shutil.copytree(source / path, output / path)


def export_merged(
    model: str | os.PathLike[str] | None, fusions: Sequence[str | os.PathLike[str]], output: str | os.PathLike[str]
) -> Path:
    """Load `model` (None: the embedded MiniLM), merge the saved fusion folders in order, write the folder `output`.

    Every fusion is checked and merged before anything is written; the folder appears whole or not at all.
    """
    output = Path(output)
    _check_output(output)
    if not fusions:
        raise ArgumentValueError("give at least one saved fusion folder to merge")
    loaded, tokenizer = load_model(model)
    for folder in fusions:
        config, info = read_fusion(folder)
        merge_fusion(prepare_fusion(loaded, info, config))
    source = Path(embedded_model_path() if model is None else model).expanduser()
    transformer = _transformer_path(source) if source.is_dir() else None
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        save_merged(loaded, staging / (transformer or ""), tokenizer=tokenizer)
        if transformer is not None:
            _copy_sentence_transformers(source, staging, transformer)
        if output.exists():
            output.rmdir()
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output
