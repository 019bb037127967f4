"""`sweep`: the model's output for each of K infos fused at one layer, running the layers before it once.

A sweep at layer k of an N-block model runs the embeddings and blocks 1..k once, on the batch as
given, and keeps the hidden state at layer k. It then runs the model again on the batch repeated
for a chunk of infos, with every module up to layer k replaying that hidden state instead of
computing, so that only the fusion and the blocks after it do work: about (k + K·(N−k)) / (K·N) of
the cost of K fused forwards. The model itself prepares the attention mask of the repeated batch,
as in any forward, and applies whatever follows the blocks (a final norm, a pooler).

>>> import torch
>>> from transformers import BertConfig, BertModel
>>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)).eval()
>>> ids = torch.tensor([[1, 2, 3]])
>>> infos = torch.randn(4, 32)
>>> swept = sweep(model, {"input_ids": ids}, infos, layer=1)
>>> swept.shape
torch.Size([4, 1, 3, 32])
>>> from layerfuse import fuse
>>> with torch.no_grad(), fuse(model, infos[2], layer=1):
...     torch.allclose(swept[2], model(ids).last_hidden_state, atol=1e-5)
True
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .config import FusionConfig, config_or_keywords
from .errors import (
    ArchitectureError,
    ArgumentTypeError,
    ArgumentValueError,
    InfoShapeError,
    positive_int,
)
from .fusion import Fusion, prepare_fusion
from .info import LAYOUTS
from .methods import Method, make_method
from .outputs import Rebuild, split_output
from .positions import PositionsLike
from .sites import find_blocks, find_embeddings, resolve_site

CHUNK_TOKENS = {"cpu": 2048, "cuda": 32768}
"""Tokens per tail pass when `chunk_size` is not given, by device type: infos per pass is
max(1, tokens // (B·T)). A CPU runs fastest with passes that stay in its caches, a GPU with large ones."""

_MISSING = object()


class _PrefixDone(Exception):
    """Raised by the fused layer in the prefix pass, once its hidden state is kept."""


def sweep(
    model: nn.Module,
    inputs: Mapping[str, Any],
    infos: torch.Tensor | Sequence[torch.Tensor],
    config: FusionConfig | None = None,
    *,
    layer: int | None = None,
    method: str | Method | None = None,
    positions: PositionsLike | None = None,
    chunk_size: int | None = None,
    **method_arguments: Any,
) -> torch.Tensor:
    """The model's first output (`last_hidden_state` for a base model) with each info fused as `config` says.

    The fusion is a `FusionConfig` at a layer's output, or its fields as keywords, as `fuse` takes
    them. `inputs` are the keyword arguments of one forward (a tokenizer's output), every tensor with the
    batch B first. `infos` is a tensor (K, ...) or a sequence of K tensors, each of a shape that
    `fuse(model, info, config)` takes, such as (H,), (B, H) or (B, T, H).
    Returns a tensor (K, B, ...): item i is what `model(**inputs)` gives under that fusion with
    `infos[i]`, computed without gradients. `chunk_size` caps the infos run together in one pass
    (default: as many as fit in `CHUNK_TOKENS` for the model's device). Everything is checked before the model runs;
    the model is left as it was.
    """
    config, instance = config_or_keywords(config, layer=layer, method=method, positions=positions, **method_arguments)
    if config.site not in ("output", "embeddings"):
        raise ArgumentValueError(
            f"sweep fuses the output of a layer (site 'output'), not site {config.site!r}: "
            "run a fused forward per info with layerfuse.fuse instead"
        )
    site = resolve_site(model, layer=config.layer, site=config.site)
    if site.call is not None:
        raise ArchitectureError(
            f"sweep cannot replay {site.name}: it is one block shared by several layers; "
            "run a fused forward per info with layerfuse.fuse instead"
        )
    batch, tokens = _batch_shape(inputs)
    stacked = _stack(infos)
    hidden_size = model.config.hidden_size
    fusion_method = instance or make_method(
        config.method, config.arguments, hidden_size=hidden_size, info_size=stacked.shape[-1]
    )
    if fusion_method.info_layout == "none":
        name = fusion_method.method_name or type(fusion_method).__name__
        raise ArgumentValueError(
            f"method {name!r} takes no info, so there is nothing to sweep: use a method that takes info"
        )
    per_example = _per_example(stacked, fusion_method.info_layout, fusion_method.info_dim(hidden_size), batch, tokens)
    mask = config.positions if isinstance(config.positions, torch.Tensor) else None
    if mask is not None and tuple(mask.shape) != (batch, tokens):
        raise InfoShapeError(f"the positions mask is {tuple(mask.shape)} but inputs are ({batch}, {tokens})")
    size = chunk_size_for(model, chunk_size, len(stacked), batch * tokens)
    starts = range(0, len(stacked), size)
    fusions = [
        prepare_fusion(
            model,
            per_example(stacked[start : start + size]),
            config if mask is None else config.replace(positions=mask.repeat(min(size, len(stacked) - start), 1)),
            method=fusion_method,
        )
        for start in starts
    ]
    replayed = _replayed_modules(model, site.layer, site.module)
    inputs = {**inputs, **_no_cache(model, inputs)}
    result: torch.Tensor | None = None
    with torch.no_grad():
        hidden, rebuilds = _prefix(model, inputs, replayed) if replayed else (None, [])
        for start, fusion in zip(starts, fusions):
            count = min(size, len(stacked) - start)
            output = _tail(model, inputs, fusion, count, batch, hidden, replayed, rebuilds)
            if count == len(stacked):
                return output
            if result is None:
                result = output.new_empty((len(stacked), *output.shape[1:]))
            result[start : start + count] = output
    return result


def cost_bound(layer: int, count: int, blocks: int) -> float:
    """The least work of a sweep of `count` infos at `layer` of `blocks` blocks, over `count` fused forwards.

    >>> cost_bound(3, 8, 6)
    0.5625
    """
    return (layer + count * (blocks - layer)) / (count * blocks)


def _batch_shape(inputs: Mapping[str, Any]) -> tuple[int, int]:
    if not isinstance(inputs, Mapping):
        raise ArgumentTypeError(
            f"inputs must be a mapping of the forward's keyword arguments (a tokenizer's output), "
            f"got {type(inputs).__name__}"
        )
    tensors = {key: value for key, value in inputs.items() if isinstance(value, torch.Tensor)}
    if not tensors or any(value.ndim == 0 for value in tensors.values()):
        raise ArgumentValueError("inputs must hold tensors with the batch first, such as input_ids (B, T)")
    sizes = {key: value.shape[0] for key, value in tensors.items()}
    if len(set(sizes.values())) != 1:
        raise ArgumentValueError(f"every tensor of inputs must have the same batch size first, got {sizes}")
    first = next(iter(tensors.values()))
    return first.shape[0], first.shape[1] if first.ndim > 1 else 1


def _stack(infos: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    if isinstance(infos, torch.Tensor):
        stacked = infos
    elif isinstance(infos, Sequence) and infos and all(isinstance(info, torch.Tensor) for info in infos):
        shapes = {tuple(info.shape) for info in infos}
        if len(shapes) != 1:
            raise InfoShapeError(f"the infos of a sweep must all have one shape, got {sorted(shapes)}")
        stacked = torch.stack(list(infos))
    else:
        raise ArgumentTypeError(
            f"infos must be a tensor (K, ...) or a non-empty sequence of tensors, got {type(infos).__name__}"
        )
    if stacked.ndim < 2 or len(stacked) == 0:
        raise InfoShapeError(
            f"infos must be K >= 1 infos stacked along a first dimension, got shape {tuple(stacked.shape)}"
        )
    return stacked


def _per_example(
    stacked: torch.Tensor, layout: str, size: int, batch: int, tokens: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Check the shape of each info; return how a chunk of C infos becomes one info for the batch repeated C times."""
    shapes, shape = LAYOUTS[layout], tuple(stacked.shape[1:])
    shapes.check(shape, size, what=f"each info (of infos {tuple(stacked.shape)})")
    if shapes.is_batched(len(shape)) and shape[0] != batch:
        raise InfoShapeError(
            f"each info is for a batch of {shape[0]} but inputs have {batch} examples: "
            "give each info without a batch dimension to use it for every example"
        )
    if shapes.is_per_token(len(shape)) and shape[1] != tokens:
        raise InfoShapeError(f"each info is for {shape[1]} tokens but inputs have {tokens}")
    return lambda chunk: shapes.stacked_per_example(chunk, batch)


def chunk_size_for(model: nn.Module, chunk_size: int | None, count: int, batch_tokens: int) -> int:
    """Infos per pass for `count` infos on batches of `batch_tokens`: `chunk_size`, or what fits in `CHUNK_TOKENS`."""
    if chunk_size is None:
        weight = next(model.parameters(), None)
        tokens = CHUNK_TOKENS.get("cpu" if weight is None else weight.device.type, CHUNK_TOKENS["cuda"])
        return min(count, max(1, tokens // batch_tokens))
    return min(positive_int("chunk_size (infos per pass)", chunk_size), count)


def _replayed_modules(model: nn.Module, layer: int, site: nn.Module) -> list[nn.Module]:
    """The embeddings and blocks that compute layer `layer`, the fused site last; none for layer 0."""
    if layer == 0:
        return []
    embeddings = find_embeddings(model)
    modules = [*([] if embeddings is None else [embeddings]), *(block.module for block in find_blocks(model)[:layer])]
    return modules if site is modules[-1] else [*modules, site]


def _no_cache(model: nn.Module, inputs: Mapping[str, Any]) -> dict[str, Any]:
    accepts = "use_cache" in inspect.signature(model.forward).parameters
    return {"use_cache": False} if accepts and "use_cache" not in inputs else {}


@contextmanager
def _forwards(modules: Sequence[nn.Module], forwards: Sequence[Callable[..., Any]]) -> Iterator[None]:
    saved = [module.__dict__.get("forward", _MISSING) for module in modules]
    try:
        for module, forward in zip(modules, forwards):
            module.forward = forward
        yield
    finally:
        for module, previous in zip(modules, saved):
            if previous is _MISSING:
                del module.forward
            else:
                module.forward = previous


def _only_hidden(output: Any) -> bool:
    if isinstance(output, torch.Tensor):
        return True
    rest = list(output.values())[1:] if isinstance(output, Mapping) else list(output[1:])
    return all(value is None for value in rest)


def _prefix(
    model: nn.Module, inputs: Mapping[str, Any], modules: Sequence[nn.Module]
) -> tuple[torch.Tensor, list[Rebuild]]:
    """Run the model up to the last of `modules`; return its hidden state and how each module's output is built."""
    rebuilds: list[Rebuild | None] = [None] * len(modules)
    kept: list[torch.Tensor] = []

    def recording(index: int, module: nn.Module) -> Callable[..., Any]:
        forward = module.forward

        def record(*args: Any, **kwargs: Any) -> Any:
            output = forward(*args, **kwargs)
            hidden, rebuilds[index] = split_output(output)
            if not _only_hidden(output):
                raise ArchitectureError(
                    f"sweep replays the output of {type(module).__name__}, but it returns more than its "
                    "hidden states (attentions or a cache): call without output_attentions or use_cache"
                )
            if index == len(modules) - 1:
                kept.append(hidden)
                raise _PrefixDone
            return output

        return record

    with _forwards(modules, [recording(i, module) for i, module in enumerate(modules)]):
        try:
            model(**inputs)
        except _PrefixDone:
            pass
    if not kept or any(rebuild is None for rebuild in rebuilds):
        raise ArchitectureError(
            f"sweep expected {type(model).__name__}'s forward to run each of its blocks up to the fused "
            "layer, and it did not"
        )
    return kept[0], rebuilds


def _tail(
    model: nn.Module,
    inputs: Mapping[str, Any],
    fusion: Fusion,
    count: int,
    batch: int,
    hidden: torch.Tensor | None,
    modules: Sequence[nn.Module],
    rebuilds: Sequence[Rebuild],
) -> torch.Tensor:
    """One pass for `count` infos: the batch repeated `count` times, `modules` replaying `hidden`."""

    def repeat(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.repeat(count, *([1] * (tensor.ndim - 1)))

    repeated = {key: repeat(value) if isinstance(value, torch.Tensor) else value for key, value in inputs.items()}
    replay = None if hidden is None else repeat(hidden)
    forwards = [lambda *args, rebuild=rebuild, **kwargs: rebuild(replay) for rebuild in rebuilds]
    with _forwards(modules, forwards), fusion.attach():
        output, _ = split_output(model(**repeated))
    if output.ndim == 0 or output.shape[0] != count * batch:
        raise ArchitectureError(
            f"cannot split {type(model).__name__}'s output of shape {tuple(output.shape)} into "
            f"{count} infos of {batch} examples: sweep needs a model whose first output is batch-first"
        )
    return output.unflatten(0, (count, batch))
