"""`read_st_folder`: how a sentence-transformers model folder embeds, from its `modules.json` and module configs.

`Embedder` reproduces `SentenceTransformer(folder).encode(texts)` for a folder of a Transformer, a
Pooling and optionally a Normalize module: the Transformer's folder is the model, its
`max_seq_length` (else its tokenizer's limit) the max length, the Pooling's mode the pooling, and
Normalize the L2 normalisation. Whatever else would change the embeddings — another module (Dense,
LayerNorm, a Router, ...), several pooling modes, a default prompt, a truncated dimension, lower-casing,
other tokenizer or model arguments — is refused, naming it.

>>> from layerfuse.models import embedded_model_path
>>> folder = read_st_folder(embedded_model_path())
>>> folder.pooling, folder.normalize, folder.max_length
('mean', True, 256)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ArchitectureError, FileFormatError
from ..paths import check_readable
from .pooling import POOLINGS

TRANSFORMER_CONFIGS = tuple(
    f"sentence_{name}_config.json"
    for name in ("bert", "roberta", "distilbert", "camembert", "albert", "xlm-roberta", "xlnet")
)
"""The names sentence-transformers looks for a Transformer module's settings under, in its order."""

TRANSFORMER_AS_REPRODUCED: dict[str, Any] = {
    "do_lower_case": False,
    "transformer_task": "feature-extraction",
    "modality_config": {"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
    "module_output_name": "token_embeddings",
    "backend": "torch",
    **{
        key: {}
        for key in ("model_args", "tokenizer_args", "config_args", "model_kwargs", "processor_kwargs", "config_kwargs")
    },
    "processing_kwargs": {},
}
"""The Transformer settings besides `max_seq_length` that the run reproduces, at the values it reproduces."""

LEGACY_POOLING_MODES = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
"""The flags of older Pooling configs, in the order sentence-transformers reads them."""

REPRODUCED = "layerfuse run reproduces a Transformer, a Pooling and an optional Normalize module"


@dataclass(frozen=True)
class SentenceTransformerFolder:
    """What a sentence-transformers folder's modules do: the transformer's folder, its pooling, whether the
    pooled embedding is L2-normalised, and the max length in tokens (None: its tokenizer's limit)."""

    transformer: Path
    pooling: str
    normalize: bool
    max_length: int | None


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FileFormatError(f"cannot read the sentence-transformers file {path}: {error}") from error


def _config(path: Path) -> dict[str, Any]:
    config = _read(path) if path.is_file() else {}
    if not isinstance(config, dict):
        raise FileFormatError(f"{path} must hold a JSON object, not {type(config).__name__}")
    return config


def _refuse(path: Path, key: str, value: object) -> ArchitectureError:
    return ArchitectureError(
        f"{path} sets {key} = {json.dumps(value)}, which layerfuse run does not reproduce: "
        "embed with sentence-transformers itself, or give a plain Hugging Face model folder"
    )


def _max_length(folder: Path) -> int | None:
    path = next((folder / name for name in TRANSFORMER_CONFIGS if (folder / name).is_file()), None)
    if path is None:
        return None
    config = _config(path)
    for key, value in config.items():
        if key != "max_seq_length" and (
            key not in TRANSFORMER_AS_REPRODUCED or TRANSFORMER_AS_REPRODUCED[key] != value
        ):
            raise _refuse(path, key, value)
    length = config.get("max_seq_length")
    if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 1):
        raise FileFormatError(f"{path}: max_seq_length must be a positive int or null, got {json.dumps(length)}")
    return length


def _pooling(path: Path) -> str:
    config = _config(path)
    legacy = [mode for key, mode in LEGACY_POOLING_MODES.items() if config.get(key)]
    modes = config.get("pooling_mode", legacy or "mean")
    modes = [modes] if isinstance(modes, str) else modes
    known = {"embedding_dimension", "word_embedding_dimension", "pooling_mode", "include_prompt", *LEGACY_POOLING_MODES}
    for key in config:
        if key not in known:
            raise _refuse(path, key, config[key])
    if not isinstance(modes, list) or len(modes) != 1 or modes[0] not in POOLINGS:
        raise _refuse(path, "pooling_mode", modes)
    return modes[0]


def _normalizes(path: Path) -> bool:
    config = _config(path)
    for key, value in config.items():
        if key not in ("module_input_name", "module_output_name") or value != "sentence_embedding":
            raise _refuse(path, key, value)
    return True


def read_st_folder(folder: str | os.PathLike[str]) -> SentenceTransformerFolder | None:
    """The settings that reproduce the sentence-transformers model in `folder`; None if it has no `modules.json`.

    Raises `ArchitectureError` for a folder whose embeddings the run cannot reproduce, saying why.
    """
    folder = Path(folder)
    if folder.is_dir():
        check_readable(folder, "the model folder")
    if not (folder / "modules.json").is_file():
        return None
    modules = _read(folder / "modules.json")
    if not (isinstance(modules, list) and all(isinstance(m, dict) and {"type", "path"} <= set(m) for m in modules)):
        raise FileFormatError(f"{folder / 'modules.json'} must be a list of modules, each with a type and a path")
    modules = sorted(modules, key=lambda module: module.get("idx", 0))
    kinds = [str(module["type"]).rsplit(".", 1)[-1] for module in modules]
    library = all(str(module["type"]).startswith("sentence_transformers.") for module in modules)
    if not library or kinds[:2] != ["Transformer", "Pooling"] or kinds[2:] not in ([], ["Normalize"]):
        raise ArchitectureError(
            f"{folder} holds the modules {', '.join(str(module['type']) for module in modules)}: {REPRODUCED}, "
            "in this order; embed with sentence-transformers itself, or give a plain Hugging Face model folder"
        )
    model = _config(folder / "config_sentence_transformers.json")
    for key in ("default_prompt_name", "truncate_dim"):
        if model.get(key) is not None:
            raise _refuse(folder / "config_sentence_transformers.json", key, model[key])
    if model.get("model_type", "SentenceTransformer") != "SentenceTransformer":
        raise _refuse(folder / "config_sentence_transformers.json", "model_type", model["model_type"])
    transformer = folder / modules[0]["path"]
    return SentenceTransformerFolder(
        transformer=transformer,
        pooling=_pooling(folder / modules[1]["path"] / "config.json"),
        normalize=len(modules) == 3 and _normalizes(folder / modules[2]["path"] / "config.json"),
        max_length=_max_length(transformer),
    )
