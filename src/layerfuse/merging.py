"""`merge`: fold a fixed, affine fusion into the parameters of the operation that produces the fused tensor.

A fusion that is the same for every example and position (`positions="all"`, info without a batch
dimension) and affine, h ↦ A·h + c, folds exactly into an affine operation just before it:

- a LayerNorm (the block output of BERT, RoBERTa, XLM-R, ELECTRA, DeBERTa-v2, DistilBERT; the
  embeddings' output; a final norm), for diagonal A (addition, multiplication, scale, interpolate,
  replace): γ' = a⊙γ, β' = a⊙β + c;
- a Linear or GPT-2 Conv1D with a bias (the "attention" and "mlp" sites), for every fixed affine
  method (also ablate, clamp, project, erase): W' = A·W, b' = A·b + c;
- a residual sum (the block output of GPT-2 and GPT-NeoX), for additions only (A = I): the last
  Linear that writes into the sum takes c into its bias, b' = b + c, and the residual passes as it was.

The merged model is a plain model: no hooks, no swapped class. Everything is checked before a
parameter changes; `unmerge()` copies the original values back, bit for bit.

>>> import torch
>>> from layerfuse import fuse
>>> from transformers import BertConfig, BertModel
>>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)).eval()
>>> ids, steer = torch.tensor([[1, 2, 3]]), torch.randn(32)
>>> config = FusionConfig(layer=1, method="addition")
>>> with fuse(model, steer, config):
...     hooked = model(ids).last_hidden_state
>>> with merge(model, steer, config) as merged:
...     merged.parameters, torch.allclose(model(ids).last_hidden_state, hooked, atol=1e-5)
(['encoder.layer.0.output.LayerNorm.weight', 'encoder.layer.0.output.LayerNorm.bias'], True)
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import FusionConfig, config_or_keywords
from .errors import FusionStateError, MergeError
from .fusion import Fusion, prepare_fusion
from .methods import Ablate, Addition, Clamp, Erase, Interpolate, Method, Multiplication, Project, Replace, Scale
from .sites import Site, resolve_site

Affine = tuple[torch.Tensor, torch.Tensor]
"""h ↦ A·h + c as (A, c) in float64: A a (H, H) matrix, or its diagonal (H,) where A is diagonal."""


def _eye(n: int) -> torch.Tensor:
    return torch.eye(n, dtype=torch.float64)


def _ones(n: int) -> torch.Tensor:
    return torch.ones(n, dtype=torch.float64)


def _zeros(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.float64)


def _erasure(info: torch.Tensor, n: int) -> Affine:
    """h − A·B·(h − μ) as (I − A·B, A·B·μ), from the rows [μ; B; Aᵀ]."""
    rank = info.shape[0] // 2
    mean, right, left = info[0], info[1 : 1 + rank], info[1 + rank :]
    erased = left.mT @ right
    return _eye(n) - erased, erased @ mean


AFFINE: dict[type[Method], Callable[[Any, torch.Tensor | None, int], Affine]] = {
    Addition: lambda m, v, n: (_ones(n), m.alpha * v),
    Multiplication: lambda m, v, n: (v, _zeros(n)),
    Scale: lambda m, v, n: (m.alpha * _ones(n), _zeros(n)),
    Replace: lambda m, v, n: (_zeros(n), v),
    Interpolate: lambda m, v, n: ((1 - m.alpha) * _ones(n), m.alpha * v),
    Ablate: lambda m, v, n: (_eye(n) - torch.outer(v, v), _zeros(n)),
    Clamp: lambda m, v, n: (_eye(n) - torch.outer(v, v), m.value * v),
    Project: lambda m, v, n: (v.mT @ v, _zeros(n)),
    Erase: lambda m, v, n: _erasure(v, n),
}
"""The fixed methods that are affine, each as (method, prepared info in float64, H) -> (A, c)."""

PRODUCERS: dict[tuple[str, str], str] = {
    **{(kind, "output"): "output.LayerNorm" for kind in ("bert", "roberta", "xlm-roberta", "electra", "deberta-v2")},
    **{(kind, "embeddings"): "LayerNorm" for kind in ("bert", "roberta", "xlm-roberta", "electra", "distilbert")},
    ("distilbert", "output"): "output_layer_norm",
    ("distilbert", "attention"): "out_lin",
    ("distilbert", "mlp"): "lin2",
    ("gpt2", "attention"): "c_proj",
    ("gpt2", "mlp"): "c_proj",
    **{(kind, "attention"): "o_proj" for kind in ("llama", "mistral", "qwen2")},
    **{(kind, "mlp"): "down_proj" for kind in ("llama", "mistral", "qwen2")},
}
"""(model type, site) -> the module, under the site's module, whose output is the site's output."""

RESIDUAL_WRITERS: dict[str, str] = {"gpt2": "mlp.c_proj", "gpt_neox": "mlp.dense_4h_to_h"}
"""Model type -> the Linear, under a block, whose output the block adds last to its residual stream."""

INSTEAD = "fuse it by hook or custom layer instead (layerfuse.fuse)"

_MERGED: weakref.WeakKeyDictionary[nn.Module, list[Merged]] = weakref.WeakKeyDictionary()


class Merged:
    """A fusion folded into a model's parameters; `unmerge()` restores them bitwise. A context manager.

    It holds the model weakly: the record of the merges into a model, kept per model, must not keep it alive.
    """

    def __init__(
        self, model: nn.Module, config: FusionConfig, originals: dict[str, tuple[nn.Parameter, torch.Tensor]]
    ) -> None:
        self._model = weakref.ref(model)
        self.config = config
        self._originals = originals

    @property
    def model(self) -> nn.Module | None:
        """The model merged into (None once it is deleted)."""
        return self._model()

    @property
    def parameters(self) -> list[str]:
        """The names of the parameters the merge changed."""
        return list(self._originals)

    @property
    def active(self) -> bool:
        """Whether the fusion is still merged."""
        model = self.model
        return model is not None and self in _MERGED.get(model, ())

    def unmerge(self) -> None:
        """Copy the parameters' original values back; calling it again does nothing.

        Refused while a later merge changed one of the same parameters: unmerge that one first.
        """
        model = self.model
        stack = [] if model is None else _MERGED.get(model, [])
        if self not in stack:
            return
        later = stack[stack.index(self) + 1 :]
        shared = [name for other in later for name in other._originals if name in self._originals]
        if shared:
            raise FusionStateError(
                f"cannot unmerge this fusion while a later merge also changed {', '.join(sorted(set(shared)))}: "
                "unmerge the later merges first (last merged, first unmerged)"
            )
        with torch.no_grad():
            for parameter, original in self._originals.values():
                parameter.copy_(original)
        stack.remove(self)

    def __enter__(self) -> Merged:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unmerge()

    def __repr__(self) -> str:
        state = "merged" if self.active else "unmerged"
        return f"Merged({self.config.method!r} into {', '.join(self.parameters)}, {state})"


def merged_configs(model: nn.Module) -> list[FusionConfig]:
    """The configs of the fusions merged into `model` and not unmerged, in the order they were merged."""
    return [merged.config for merged in _MERGED.get(model, ())]


def _refuse(method: str, why: str) -> MergeError:
    return MergeError(f"cannot merge the {method} fusion: {why}")


def _name(method: Method) -> str:
    return method.method_name or type(method).__name__


def _affine(fusion: Fusion) -> Affine:
    method, size = fusion.method, fusion.model.config.hidden_size
    name = _name(method)
    if method.learned:
        raise _refuse(name, f"it is learned (its output is not an affine map of h); {INSTEAD}")
    if type(method) not in AFFINE:
        names = ", ".join(cls.method_name for cls in AFFINE)
        raise _refuse(name, f"only the fixed affine methods merge ({names}); {INSTEAD}")
    if not (isinstance(fusion.positions.value, str) and fusion.positions.value == "all"):
        raise _refuse(
            name,
            f"positions {fusion.positions.value!r} differ by example or token, and weights are the same for "
            f"all; merge with positions='all' or {INSTEAD}",
        )
    if fusion.info.batch_size is not None:
        raise _refuse(
            name,
            f"its info has a batch dimension ({tuple(fusion.info.source.shape)}), and weights are the same for "
            f"every example; merge info for all examples or {INSTEAD}",
        )
    info = None if fusion.info.source is None else method.prepare(fusion.info.source.detach().double())
    return AFFINE[type(method)](method, info, size)


def _producer(model: nn.Module, site: Site, method: str) -> tuple[nn.Module, bool]:
    """The module whose parameters take the fusion, and whether it writes into a residual sum."""
    if site.point != "output":
        raise _refuse(method, f"it fuses the input of {site.name}, which no parameter produces; {INSTEAD}")
    if site.call is not None:
        raise _refuse(
            method,
            f"{site.name} is one module shared by several layers (call {site.call} of it), and its parameters "
            f"serve every call; {INSTEAD}",
        )
    if isinstance(site.module, (nn.LayerNorm, nn.Linear, Conv1D)):
        return site.module, False
    model_type = getattr(model.config, "model_type", "")
    kind = "embeddings" if site.layer == 0 else site.kind
    path = PRODUCERS.get((model_type, kind))
    residual = path is None and kind == "output" and model_type in RESIDUAL_WRITERS
    path = RESIDUAL_WRITERS[model_type] if residual else path
    if path is None or not _has(site.module, path):
        raise _refuse(
            method,
            f"no affine operation is known to produce the {kind} of a {model_type or type(model).__name__} "
            f"model ({site.name}, a {type(site.module).__name__}); {INSTEAD}",
        )
    return site.module.get_submodule(path), residual


def producer_of(model: nn.Module, config: FusionConfig) -> nn.Module:
    """The module whose parameters a merge of `config` would change (refused as `merge` refuses).

    >>> from transformers import BertConfig, BertModel
    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37))
    >>> producer_of(model, FusionConfig(layer=2)) is model.encoder.layer[1].output.LayerNorm
    True
    """
    site = resolve_site(model, layer=config.layer, site=config.site)
    return _producer(model, site, config.method)[0]


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def _folded(
    method: str, producer: nn.Module, scale: torch.Tensor, shift: torch.Tensor, residual: bool
) -> dict[str, torch.Tensor]:
    """The producer's new parameter values (float64), by their names on the producer."""
    name = type(producer).__name__
    weight, bias = getattr(producer, "weight", None), getattr(producer, "bias", None)
    if weight is None or bias is None:
        missing = "bias" if weight is not None else "weight"
        raise _refuse(method, f"the {name} that produces the fused tensor has no {missing} to take A·h + c; {INSTEAD}")
    diagonal = scale.ndim == 1
    if residual:
        if not (diagonal and bool((scale == 1).all())):
            raise _refuse(
                method,
                "the fused tensor is a residual sum, and only an addition folds into the Linear that writes "
                f"into it (the residual passes unchanged); {INSTEAD}",
            )
        return {"bias": bias.detach().double() + shift}
    weight, bias = weight.detach().double(), bias.detach().double()
    if isinstance(producer, nn.LayerNorm):
        if not diagonal:
            raise _refuse(
                method,
                "it mixes the hidden dimensions, and a LayerNorm scales each one alone (only addition, "
                f"multiplication, scale, interpolate and replace merge there); {INSTEAD}",
            )
        return {"weight": scale * weight, "bias": scale * bias + shift}
    on_rows = isinstance(producer, nn.Linear)  # Linear: (out, in); Conv1D: (in, out)
    if diagonal:
        new_weight = scale[:, None] * weight if on_rows else weight * scale[None, :]
        new_bias = scale * bias
    else:
        new_weight = scale @ weight if on_rows else weight @ scale.mT
        new_bias = scale @ bias
    return {"weight": new_weight, "bias": new_bias + shift}


def merge_fusion(fusion: Fusion) -> Merged:
    """Fold `fusion` into its model's parameters (detaching it if it is attached); see the module's docstring."""
    model = fusion.model
    if not fusion.site.held_by(model):
        raise FusionStateError(
            f"the model's module at {fusion.site.name} is not the one this fusion was made for (replaced or removed "
            "since), so merging into it would change nothing the model runs: fuse the model again"
        )
    scale, shift = _affine(fusion)
    producer, residual = _producer(model, fusion.site, _name(fusion.method))
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    uses: dict[int, int] = {}
    for _, parameter in model.named_parameters(remove_duplicate=False):
        uses[id(parameter)] = uses.get(id(parameter), 0) + 1
    new = _folded(_name(fusion.method), producer, scale, shift, residual)
    plan: dict[str, tuple[nn.Parameter, torch.Tensor]] = {}
    for key, value in new.items():
        parameter = getattr(producer, key)
        full_name = names[id(parameter)]
        if uses[id(parameter)] > 1:
            raise _refuse(
                _name(fusion.method), f"{full_name} is shared with another module, which would change too; {INSTEAD}"
            )
        cast = value.to(parameter.dtype)
        if not bool(torch.isfinite(cast).all()):
            raise _refuse(_name(fusion.method), f"the merged {full_name} overflows {parameter.dtype}; {INSTEAD}")
        plan[full_name] = (parameter, cast)
    fusion.remove()
    originals = {name: (parameter, parameter.detach().clone()) for name, (parameter, _) in plan.items()}
    with torch.no_grad():
        for parameter, value in plan.values():
            parameter.copy_(value)
    merged = Merged(model, fusion.config, originals)
    _MERGED.setdefault(model, []).append(merged)
    return merged


def merge(
    model: nn.Module, info: torch.Tensor | None = None, config: FusionConfig | None = None, **fields: Any
) -> Merged:
    """Fold the fusion that `fuse(model, info, config)` would attach into the model's parameters, in place.

    Takes what `fuse` takes (a config, or its fields as keywords). Refused with a `MergeError`, before
    anything changes, where the fusion is not one affine map for every example and position, or no
    affine operation with a bias produces the fused tensor. Returns the `Merged` handle.
    """
    config, instance = config_or_keywords(config, **fields)
    return merge_fusion(prepare_fusion(model, info, config, method=instance))
