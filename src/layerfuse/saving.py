"""Save a fusion to a folder and load it back onto a model, in the PEFT `save_pretrained` manner.

The folder holds `fusion_config.json` (format version, method and its arguments, layer, site, approach,
positions, the model's hidden size) and `fusion.safetensors` (the method's parameters, the info and
a positions mask if there is one). Loading checks everything before the model is touched.

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

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import FileFormatError, LayerfuseError
from .fusion import fuse
from .methods import METHODS

if TYPE_CHECKING:
    from .fusion import Fusion

FORMAT_VERSION = 1
CONFIG_NAME = "fusion_config.json"
WEIGHTS_NAME = "fusion.safetensors"


def save_fusion(fusion: Fusion, directory: str | os.PathLike[str]) -> Path:
    """Write `fusion` to `directory` (created if needed); return the folder."""
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
    config = {
        "format_version": FORMAT_VERSION,
        "method": name,
        "arguments": fusion.method.arguments(),
        "layer": fusion.layer,
        "site": fusion.site.name if fusion.site.kind == "module" else fusion.site.kind,
        "approach": fusion.approach,
        "positions": fusion.positions.to_json(),
        "hidden_size": fusion.model.config.hidden_size,
        "model_type": getattr(fusion.model.config, "model_type", None),
    }
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / WEIGHTS_NAME, metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def _read(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise FileFormatError(f"{folder} is not a saved fusion: {name} is missing")
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
        tensors = load_file(folder / WEIGHTS_NAME)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FileFormatError(f"{folder / CONFIG_NAME} is not valid JSON: {error}") from error
    except SafetensorError as error:
        raise FileFormatError(f"{folder / WEIGHTS_NAME} is not a valid safetensors file: {error}") from error
    if not isinstance(config, dict) or config.get("format_version") != FORMAT_VERSION:
        found = config.get("format_version") if isinstance(config, dict) else None
        raise FileFormatError(
            f"{folder / CONFIG_NAME} has format version {found!r}; this layerfuse reads version {FORMAT_VERSION}"
        )
    missing = [key for key in ("method", "arguments", "layer", "approach", "positions", "hidden_size") if key not in config]
    if missing:
        raise FileFormatError(f"{folder / CONFIG_NAME} lacks {', '.join(missing)}")
    return config, tensors


def load_fusion(
    directory: str | os.PathLike[str],
    model: nn.Module,
    *,
    approach: str | None = None,
    info: torch.Tensor | None = None,
) -> Fusion:
    """Rebuild the fusion saved in `directory` and attach it to `model`.

    `approach` overrides the saved one; `info` replaces the saved info (e.g. a new batch's).
    """
    folder = Path(directory)
    config, tensors = _read(folder)
    hidden_size = model.config.hidden_size
    if config["hidden_size"] != hidden_size:
        raise FileFormatError(
            f"the fusion in {folder} was saved for hidden size {config['hidden_size']}, "
            f"this model's is {hidden_size}"
        )
    cls = METHODS.get(config["method"])
    if cls is None:
        raise FileFormatError(
            f"the fusion in {folder} uses method {config['method']!r}, which is not registered: "
            f"register it first, or use one of {', '.join(METHODS)}"
        )
    try:
        method = cls(**config["arguments"])
        method.load_state_dict(
            {key.removeprefix("method."): value for key, value in tensors.items() if key.startswith("method.")}
        )
    except (TypeError, RuntimeError, LayerfuseError) as error:
        raise FileFormatError(f"the fusion in {folder} does not rebuild a {cls.__name__}: {error}") from error
    positions = tensors["positions"] if config["positions"] is None and "positions" in tensors else config["positions"]
    if positions is None:
        raise FileFormatError(f"{folder / WEIGHTS_NAME} lacks the positions mask its config refers to")
    if info is None:
        info = tensors.get("info")
        if info is None and method.info_layout != "none":
            raise FileFormatError(f"{folder / WEIGHTS_NAME} lacks the info tensor: pass info=")
    return fuse(
        model,
        info,
        layer=config["layer"],
        site=config.get("site", "output"),
        method=method,
        approach=approach or config["approach"],
        positions=positions,
    )
