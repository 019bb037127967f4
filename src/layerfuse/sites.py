"""Where a fusion goes: a layer index and a point in it, resolved to a module of any architecture.

`layer=k` names the tensor that `output_hidden_states` reports as `hidden_states[k]`: 0 is the
embeddings' output (the first block's input, for decoders whose embeddings may be bypassed by
`inputs_embeds`), k the output of block k, negatives count from the end.
Where a model normalises after its last block (GPT-2, Llama, ModernBERT on transformers 5),
`hidden_states[N]` and so `layer=N` is the normalised output. Sites within a block: "input" (the
block's input), "attention" and "mlp" (the sub-layer's output, before the residual add); "embeddings"
is layer 0; any module can also be named by its dotted path. ALBERT runs one shared block N times:
its layer k is the k-th call.

>>> from transformers import BertConfig, BertModel
>>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37))
>>> resolve_site(model, layer=-1, site="mlp").name
'encoder.layer.1.output.dense'
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from typing import Literal

import transformers
from torch import nn

from .errors import ArchitectureError, ArgumentTypeError, ArgumentValueError, LayerIndexError

Point = Literal["input", "output"]
SITES = ("output", "input", "attention", "mlp", "embeddings")


@dataclass(frozen=True)
class Layout:
    """Where an architecture keeps its blocks and sub-layers, as dotted paths."""

    blocks: str
    attention: str
    mlp: str
    final_norm: str | None = None
    embeddings: tuple[str, ...] = ()


_BERT = Layout(
    blocks="encoder.layer", attention="attention.output.dense", mlp="output.dense", embeddings=("embeddings",)
)
# ModernBERT normalises after its last block, and transformers 4.x reports the raw output as hidden_states[N].
_MODERNBERT_NORM = "final_norm" if int(transformers.__version__.split(".")[0]) >= 5 else None
_DECODER = Layout(blocks="layers", attention="self_attn", mlp="mlp", final_norm="norm")
LAYOUTS: dict[str, Layout] = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "electra": replace(_BERT, embeddings=("embeddings_project", "embeddings")),
    "deberta-v2": _BERT,
    "albert": Layout(
        blocks="encoder.albert_layer_groups",
        attention="attention.dense",
        mlp="ffn_output",
        embeddings=("encoder.embedding_hidden_mapping_in",),
    ),
    "distilbert": Layout(blocks="transformer.layer", attention="attention", mlp="ffn", embeddings=("embeddings",)),
    "modernbert": Layout(
        blocks="layers", attention="attn", mlp="mlp", final_norm=_MODERNBERT_NORM, embeddings=("embeddings",)
    ),
    "gpt2": Layout(blocks="h", attention="attn", mlp="mlp", final_norm="ln_f", embeddings=("drop",)),
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
}
_ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "ffn", "feed_forward")
_FINAL_NORM_NAMES = ("norm", "ln_f", "final_norm", "final_layer_norm", "final_layernorm")


@dataclass(frozen=True)
class Block:
    """One pass of the model's stack: the module that runs it and, for a shared module, which call."""

    name: str
    module: nn.Module
    call: int | None = None


@dataclass(frozen=True)
class Site:
    """A resolved place to fuse: a module, its input or output, and for a shared module which call."""

    layer: int | None
    kind: str
    name: str
    module: nn.Module
    point: Point = "output"
    call: int | None = None
    input_name: str = "hidden_states"


def _base(model: nn.Module) -> nn.Module:
    base = getattr(model, "base_model", model)
    return base if isinstance(base, nn.Module) else model


def _config(model: nn.Module):
    config = getattr(model, "config", None)
    if not isinstance(getattr(config, "num_hidden_layers", None), int) or config.num_hidden_layers < 1:
        raise ArchitectureError(
            f"cannot locate the blocks of {type(model).__name__}: expected a Hugging Face transformers "
            "model whose config has num_hidden_layers, such as the one layerfuse.load_model() returns"
        )
    return config


def _names(model: nn.Module) -> dict[int, str]:
    return {id(module): name for name, module in model.named_modules(remove_duplicate=False)}


def _get(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _albert_blocks(model: nn.Module, groups: nn.ModuleList, count: int) -> list[Block]:
    if any(len(group.albert_layers) != 1 for group in groups):
        raise ArchitectureError("ALBERT with inner_group_num > 1 is not supported: pass a module name as site")
    names, calls, blocks = _names(model), {}, []
    for i in range(count):
        module = groups[int(i / (count / len(groups)))].albert_layers[0]
        calls[id(module)] = calls.get(id(module), 0) + 1
        blocks.append(Block(names[id(module)], module, calls[id(module)]))
    return blocks


def find_blocks(model: nn.Module) -> list[Block]:
    """The model's N passes through its blocks, in order (for ALBERT, N calls of one shared block)."""
    config = _config(model)
    count, base = config.num_hidden_layers, _base(model)
    layout = LAYOUTS.get(getattr(config, "model_type", ""))
    if layout is not None and (stack := _get(base, layout.blocks)) is not None:
        if config.model_type == "albert":
            return _albert_blocks(model, stack, count)
        candidates = [stack]
    else:
        candidates = [m for m in base.modules() if isinstance(m, nn.ModuleList) and len(m) == count]
    names = _names(model)
    if len(candidates) != 1 or len(candidates[0]) != count:
        found = ", ".join(names[id(m)] for m in candidates) or "none"
        raise ArchitectureError(
            f"cannot locate the blocks of {type(model).__name__}: expected one nn.ModuleList of "
            f"config.num_hidden_layers={count} blocks, found {found}; "
            "name the module to fuse instead, e.g. site='encoder.layer.3'"
        )
    return [Block(names[id(block)], block) for block in candidates[0]]


def find_final_norm(model: nn.Module) -> nn.Module | None:
    """The norm a model applies after its last block (what `hidden_states[N]` reports), if any."""
    base, config = _base(model), _config(model)
    layout = LAYOUTS.get(getattr(config, "model_type", ""))
    if layout is not None:
        return _get(base, layout.final_norm) if layout.final_norm else None
    children = dict(base.named_children())
    return next((children[n] for n in _FINAL_NORM_NAMES if n in children), None)


def find_embeddings(model: nn.Module) -> nn.Module | None:
    """The module whose output is the first block's input (`hidden_states[0]`), where the layout names one."""
    layout = LAYOUTS.get(getattr(_config(model), "model_type", ""))
    base = _base(model)
    return next((m for path in (layout.embeddings if layout else ()) if (m := _get(base, path)) is not None), None)


def find_sublayer(model: nn.Module, block: Block, kind: str) -> nn.Module:
    """The attention or MLP sub-layer of `block`, whose output is added to the residual stream."""
    layout = LAYOUTS.get(getattr(model.config, "model_type", ""))
    paths = (getattr(layout, kind),) if layout else _ATTENTION_NAMES if kind == "attention" else _MLP_NAMES
    for path in paths:
        if (module := _get(block.module, path)) is not None:
            return module
    children = ", ".join(name for name, _ in block.module.named_children())
    raise ArchitectureError(
        f"cannot find the {kind} sub-layer of {block.name} ({type(block.module).__name__}, with "
        f"children {children}): name the module to fuse instead, e.g. site='{block.name}.<child>'"
    )


def _first_input(module: nn.Module) -> str:
    parameters = list(inspect.signature(type(module).forward).parameters)
    return parameters[1] if len(parameters) > 1 else "hidden_states"


def check_site(layer: int | None, site: str) -> int | None:
    """Check what can be checked of `layer` and `site` without the model; return the layer ("embeddings": 0).

    >>> check_site(None, "embeddings"), check_site(None, "encoder.layer.0")
    (0, None)
    """
    if not isinstance(site, str):
        raise ArgumentTypeError(f"site must be a string, got {type(site).__name__}")
    if site not in SITES:
        if layer is not None:
            raise ArgumentValueError(
                f"unknown site {site!r}: use one of {', '.join(SITES)} with a layer; "
                f"if {site!r} is a module name, it takes no layer (got layer={layer})"
            )
        return None
    if site == "embeddings":
        if layer not in (None, 0):
            raise ArgumentValueError(f"site 'embeddings' is layer 0, got layer={layer}")
        layer = 0
    if layer is None:
        raise ArgumentValueError(f"site {site!r} needs a layer")
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ArgumentTypeError(f"layer must be an int, got {type(layer).__name__} {layer!r}")
    return layer


def resolve_site(model: nn.Module, *, layer: int | None = None, site: str = "output") -> Site:
    """Resolve `layer` and `site` to the module and point that a fusion edits."""
    layer = check_site(layer, site)
    if site not in SITES:
        module = _get(model, site)
        if module is None:
            raise ArgumentValueError(
                f"unknown site {site!r}: use one of {', '.join(SITES)} with a layer, "
                "or the dotted name of a module of the model (see `layerfuse inspect`)"
            )
        return Site(layer=None, kind="module", name=site, module=module)
    blocks = find_blocks(model)
    count = len(blocks)
    if not -(count + 1) <= layer <= count:
        raise LayerIndexError(
            f"layer {layer} is out of range for a {count}-block model: use 0..{count} or -{count + 1}..-1"
        )
    index = layer % (count + 1)
    if index == 0:
        if site not in ("output", "embeddings"):
            raise ArgumentValueError(f"layer 0 is the embeddings' output, it has no {site!r}: use layers 1..{count}")
        embeddings = find_embeddings(model)
        if embeddings is not None:
            return Site(0, site, _names(model)[id(embeddings)], embeddings)
        first = blocks[0]
        return Site(0, site, first.name, first.module, "input", first.call, _first_input(first.module))
    block = blocks[index - 1]
    if site == "input":
        return Site(index, site, block.name, block.module, "input", block.call, _first_input(block.module))
    if site in ("attention", "mlp"):
        module = find_sublayer(model, block, site)
        return Site(index, site, _names(model)[id(module)], module, "output", block.call)
    if index == count and (norm := find_final_norm(model)) is not None:
        return Site(index, site, _names(model)[id(norm)], norm)
    return Site(index, site, block.name, block.module, "output", block.call)


def middle_layer(model: nn.Module) -> int:
    """The layer of the middle block, the default of the commands that fuse one layer."""
    return len(find_blocks(model)) // 2


def site_table(model: nn.Module) -> list[dict[str, str]]:
    """For each layer 0..N, the module each site resolves to ("-" where there is none).

    >>> from transformers import BertConfig, BertModel
    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37))
    >>> site_table(model)[1]["attention"]
    'encoder.layer.0.attention.output.dense'
    """
    rows = []
    for layer in range(len(find_blocks(model)) + 1):
        row = {"layer": str(layer)}
        for site in ("output", "input", "attention", "mlp"):
            try:
                found = resolve_site(model, layer=layer, site=site)
            except (ArchitectureError, ArgumentValueError):
                row[site] = "-"
                continue
            call = f" (call {found.call})" if found.call is not None else ""
            row[site] = f"{found.name}{' input' if found.point == 'input' and site == 'output' else ''}{call}"
        rows.append(row)
    return rows
