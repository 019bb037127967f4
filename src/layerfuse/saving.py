"""Save a fusion to a folder and load it back onto a model, in the PEFT `save_pretrained` manner.

The folder holds `fusion_config.json` — the format version, the fusion's `FusionConfig` (under
"fusion"), facts about the model it was made for (under "model": hidden size, model type) and the
SHA-256 digest of the tensors file (under "tensors_sha256") — and `fusion.safetensors` (the method's
parameters, the info and a positions mask if there is one). Loading checks everything before the
model is touched, the digest first: a damaged or changed tensors file is refused.

Format version 3 is the one written. Folders of versions 2 (the same, without a digest) and 1 (the
config's fields at the top level, no digest) load too, without the digest check.

>>> import tempfile, torch
>>> from layerfuse import fuse, load_fusion
>>> from transformers import BertConfig, BertModel
>>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37))
>>> folder = tempfile.mkdtemp()
>>> with fuse(model, torch.randn(5), layer=1, method="film") as fusion:
...     _ = fusion.save(folder)
>>> with load_fusion(folder, model) as loaded:
...     loaded.method.arguments()
{'hidden_size': 32, 'info_size': 5}
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import nn

from .config import FIELDS, FusionConfig
from .errors import ArgumentTypeError, ArgumentValueError, FileFormatError, LayerfuseError, UnknownNameError
from .fusion import prepare_fusion
from .methods import METHODS, canonical_name

if TYPE_CHECKING:
    from .fusion import Fusion

FORMAT_VERSION = 3
READS = (1, 2, 3)
CONFIG_NAME = "fusion_config.json"
WEIGHTS_NAME = "fusion.safetensors"
DIGEST = "tensors_sha256"
"""The key of `fusion_config.json` (format 3) that holds the SHA-256 hex digest of `fusion.safetensors`."""


def _folder(directory: str | os.PathLike[str]) -> Path:
    """`directory` as a `Path`, if it is a str or a path."""
    if not isinstance(directory, (str, os.PathLike)):
        raise ArgumentTypeError(
            f"a fusion is saved in a folder, named by a str or a path, got {type(directory).__name__}"
        )
    return Path(directory)


def _write(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path` and rename it into place, so `path` is never half-written."""
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as file:
        file.write(data)
    try:
        os.replace(file.name, path)
    except BaseException:
        os.unlink(file.name)
        raise


def save_fusion(fusion: Fusion, directory: str | os.PathLike[str]) -> Path:
    """Write `fusion` to `directory`, a folder created if needed; return the folder.

    A fusion saved in the folder before is replaced; other files there are left alone. The config,
    which records the digest of the tensors, is written first, so a save interrupted half-way leaves
    a folder that is refused as damaged, never a mix that loads.
    """
    name = fusion.method.method_name
    if METHODS.get(name) is not type(fusion.method):
        raise FileFormatError(
            f"cannot save a {type(fusion.method).__name__} fusion: register the method with "
            "layerfuse.register_method so that load_fusion can rebuild it"
        )
    tensors = {f"method.{key}": value.detach().contiguous() for key, value in fusion.method.state_dict().items()}
    if fusion.info.source is not None:
        tensors["info"] = fusion.info.source.detach().contiguous()
    if fusion.positions.mask is not None:
        tensors["positions"] = fusion.positions.mask.contiguous()
    data = save(tensors, metadata={"format": "pt"})
    config = {
        "format_version": FORMAT_VERSION,
        "fusion": fusion.config.to_dict(),
        "model": {
            "hidden_size": fusion.model.config.hidden_size,
            "model_type": getattr(fusion.model.config, "model_type", None),
        },
        DIGEST: hashlib.sha256(data).hexdigest(),
    }
    folder = _folder(directory)
    if folder.exists() and not folder.is_dir():
        raise ArgumentValueError(f"cannot save a fusion to {folder}: it is a file; give a folder (new or existing)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _write(folder / CONFIG_NAME, (json.dumps(config, indent=2) + "\n").encode())
        _write(folder / WEIGHTS_NAME, data)
    except OSError as error:
        raise ArgumentValueError(f"cannot save a fusion to {folder}: {error}") from error
    return folder


def _read(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise FileFormatError(f"{folder} is not a saved fusion: {name} is missing")
    try:
        text, raw = (folder / CONFIG_NAME).read_bytes(), (folder / WEIGHTS_NAME).read_bytes()
    except OSError as error:
        raise FileFormatError(f"cannot read the fusion saved in {folder}: {error}") from error
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FileFormatError(f"{folder / CONFIG_NAME} is not valid JSON: {error}") from error
    version = data.get("format_version") if isinstance(data, dict) else None
    if type(version) is not int or version not in READS:
        raise FileFormatError(
            f"{folder / CONFIG_NAME} has format version {version!r}; this layerfuse reads versions "
            f"{', '.join(map(str, READS[:-1]))} and {READS[-1]}"
        )
    if version >= 3:
        digest = data.get(DIGEST)
        if not (isinstance(digest, str) and re.fullmatch("[0-9a-f]{64}", digest)):
            raise FileFormatError(
                f"{folder / CONFIG_NAME} lacks the SHA-256 digest of {WEIGHTS_NAME} under {DIGEST!r}, "
                f"as a string of 64 hex digits; got {digest!r}"
            )
        if hashlib.sha256(raw).hexdigest() != digest:
            raise FileFormatError(
                f"{folder / WEIGHTS_NAME} does not match the SHA-256 digest that {CONFIG_NAME} records: the "
                "file was damaged or changed after it was saved; save the fusion again"
            )
    try:
        tensors = load(raw)
    except SafetensorError as error:
        raise FileFormatError(f"{folder / WEIGHTS_NAME} is not a valid safetensors file: {error}") from error
    if version == 1:
        data = {
            "fusion": {"site": "output", **{key: data[key] for key in FIELDS if key in data}},
            "model": {key: data[key] for key in ("hidden_size", "model_type") if key in data},
        }
    fusion, model = data.get("fusion"), data.get("model")
    if not isinstance(fusion, Mapping) or not isinstance(model, Mapping):
        raise FileFormatError(f"{folder / CONFIG_NAME} lacks its 'fusion' or 'model' object")
    missing = [key for key in FIELDS if key not in fusion and key not in ("site", "stack")]
    missing += [key for key in ("hidden_size",) if key not in model]
    if missing:
        raise FileFormatError(f"{folder / CONFIG_NAME} lacks {', '.join(missing)}")
    return data, tensors


def load_config(directory: str | os.PathLike[str]) -> FusionConfig:
    """The `FusionConfig` of the fusion saved in `directory`, checked; no model needed."""
    return _saved(_folder(directory))[0]


def read_fusion(directory: str | os.PathLike[str]) -> tuple[FusionConfig, torch.Tensor | None]:
    """The `FusionConfig` and the info (None if it has none) saved in `directory`; no model needed."""
    config, tensors, _ = _saved(_folder(directory))
    return config, tensors.get("info")


def _saved(folder: Path) -> tuple[FusionConfig, dict[str, torch.Tensor], Mapping[str, Any]]:
    data, tensors = _read(folder)
    fusion = data["fusion"]
    try:
        cls = METHODS[canonical_name(fusion["method"])]
    except (UnknownNameError, TypeError):
        raise FileFormatError(
            f"the fusion in {folder} uses method {fusion['method']!r}, which is not registered: "
            f"register it first, or use one of {', '.join(METHODS)}"
        ) from None
    try:
        config = FusionConfig.from_dict(fusion, mask=tensors.get("positions"))
    except (LayerfuseError, TypeError) as error:
        raise FileFormatError(f"the fusion in {folder} does not rebuild a {cls.__name__}: {error}") from error
    return config, tensors, data["model"]


def load_fusion(
    directory: str | os.PathLike[str],
    model: nn.Module,
    *,
    config: FusionConfig | None = None,
    info: torch.Tensor | None = None,
) -> Fusion:
    """Rebuild the fusion saved in `directory` and attach it to `model`.

    `config` takes the place of the saved one (the same method, e.g.
    `load_config(directory).replace(approach="layer")`); `info` replaces the saved info (e.g. a new batch's).
    """
    if not isinstance(model, nn.Module):
        raise ArgumentTypeError(
            f"load_fusion attaches the saved fusion to a torch.nn.Module, got {type(model).__name__}"
        )
    hidden_size = getattr(getattr(model, "config", None), "hidden_size", None)
    if hidden_size is None:
        raise ArgumentTypeError(
            f"load_fusion checks the saved hidden size against model.config.hidden_size, which this "
            f"{type(model).__name__} lacks: load the fusion onto a Hugging Face transformers model"
        )
    folder = _folder(directory)
    saved, tensors, facts = _saved(folder)
    if facts["hidden_size"] != hidden_size:
        raise FileFormatError(
            f"the fusion in {folder} was saved for hidden size {facts['hidden_size']!r}, this model's is {hidden_size}"
        )
    config = saved if config is None else config
    if config.method != saved.method or dict(config.arguments) != dict(saved.arguments):
        raise FileFormatError(
            f"the fusion in {folder} is {saved.method} with {dict(saved.arguments)}: a config that replaces "
            f"its config must keep that method and those arguments, got {config.method} with {dict(config.arguments)}"
        )
    cls = METHODS[config.method]
    broken = sorted(key for key, value in tensors.items() if value.is_floating_point() and not value.isfinite().all())
    if broken:
        raise FileFormatError(f"{folder / WEIGHTS_NAME} holds NaN or infinite values in {', '.join(broken)}")
    try:
        method = cls(**config.arguments)
        method.load_state_dict(
            {key.removeprefix("method."): value for key, value in tensors.items() if key.startswith("method.")}
        )
    except (TypeError, RuntimeError, LayerfuseError) as error:
        raise FileFormatError(f"the fusion in {folder} does not rebuild a {cls.__name__}: {error}") from error
    if info is None:
        info = tensors.get("info")
        if info is None and method.info_layout != "none":
            raise FileFormatError(f"{folder / WEIGHTS_NAME} lacks the info tensor: pass info=")
    return prepare_fusion(model, info, config, method=method).attach()
