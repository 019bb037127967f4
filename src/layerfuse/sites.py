"""Where a fusion goes: a layer index and a point in it, resolved to a module of any architecture.

`layer=k` names the tensor that `output_hidden_states` reports as `hidden_states[k]`: 0 is the
embeddings' output (the first block's input, for decoders whose embeddings may be bypassed by
`inputs_embeds`), k the output of block k, negatives count from the end.
Where a model normalises after its last block (GPT-2, Llama, ModernBERT on transformers 5),
`hidden_states[N]` and so `layer=N` is the normalised output. Sites within a block: "input" (the
block's input), "attention" and "mlp" (the sub-layer's output, before the residual add); "embeddings"
is layer 0; any module can also be named by its dotted path. ALBERT runs one shared block N times:
its layer k is the k-th call. An encoder-decoder (T5, BART) has two stacks of blocks: `stack="encoder"`
or `"decoder"` chooses one, and its layer k is what it reports as `encoder_hidden_states[k]` or
`decoder_hidden_states[k]`; a model of one stack (T5EncoderModel) needs no choice. `inspect(model)`
lists every site.

>>> from transformers import BertConfig, BertModel
>>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37))
>>> resolve_site(model, layer=-1, site="mlp").name
'encoder.layer.1.output.dense'
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from inspect import signature
from typing import Literal

import torch
import transformers
from torch import nn

from .errors import ArchitectureError, ArgumentTypeError, ArgumentValueError, FusionStateError, LayerIndexError
from .lookups import attribute, length, remembered, submodule, unrecorded

Point = Literal["input", "output"]
SITES = ("output", "input", "attention", "mlp", "embeddings")
STACKS = ("encoder", "decoder")


@dataclass(frozen=True)
class Layout:
    """Where an architecture keeps its blocks and sub-layers, as dotted paths."""

    blocks: str
    attention: str
    mlp: str
    final_norm: str | None = None
    embeddings: tuple[str, ...] = ()
    attention_mask: str = "attention_mask"
    """The argument of the model's forward that holds this stack's attention mask."""


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
    "mpnet": replace(_BERT, attention="attention.attn"),
    "esm": replace(_BERT, final_norm="encoder.emb_layer_norm_after"),
    "gpt_neox": Layout(
        blocks="layers", attention="attention", mlp="mlp", final_norm="final_layer_norm", embeddings=("emb_dropout",)
    ),
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "qwen3": _DECODER,
    "gemma": _DECODER,
    "phi3": _DECODER,
}
# Encoder-decoders: a layout for each stack, in the model or in its base model. Layer 0 is the first block's
# input: the embeddings module is shared by both stacks.
_T5 = {
    "encoder": Layout("encoder.block", "layer.0.SelfAttention", "layer.1.DenseReluDense", "encoder.final_layer_norm"),
    "decoder": Layout(
        "decoder.block",
        "layer.0.SelfAttention",
        "layer.2.DenseReluDense",
        "decoder.final_layer_norm",
        attention_mask="decoder_attention_mask",
    ),
}
STACKED_LAYOUTS: dict[str, dict[str, Layout]] = {
    "t5": _T5,
    "bart": {
        "encoder": Layout("encoder.layers", "self_attn", "fc2"),
        "decoder": Layout("decoder.layers", "self_attn", "fc2", attention_mask="decoder_attention_mask"),
    },
}
UNSUPPORTED = {"xlnet": "its blocks hold the hidden states as (tokens, batch, hidden), not (batch, tokens, hidden)"}
_ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "ffn", "feed_forward")
_FINAL_NORM_NAMES = ("norm", "ln_f", "final_norm", "final_layer_norm", "final_layernorm")


@dataclass(frozen=True)
class Block:
    """One pass of the model's stack: the module that runs it and, for a shared module, which call."""

    name: str
    module: nn.Module = field(repr=False)
    call: int | None = None


@dataclass(frozen=True, init=False)
class Site:
    """A resolved place to fuse: a module, its input or output, for a shared module which call, and its stack.

    `attention_mask` names the argument of the model's forward that holds the mask of the positions
    this site sees (None where the model has several and none is this site's). The module is held
    weakly: a site remembered for a model (`lookups`) must not keep the model's modules, and with them
    the fusions attached to them and their model, alive.
    """

    layer: int | None
    kind: str
    name: str
    point: Point
    call: int | None
    input_name: str
    stack: str | None
    attention_mask: str | None
    path: tuple[str, ...] = field(repr=False)
    """`name` split at its dots: the names of the `_modules` entries from the model down to the module."""
    _module: weakref.ReferenceType[nn.Module] = field(repr=False)

    def __init__(
        self,
        layer: int | None,
        kind: str,
        name: str,
        module: nn.Module,
        point: Point = "output",
        call: int | None = None,
        input_name: str = "hidden_states",
        stack: str | None = None,
        attention_mask: str | None = "attention_mask",
    ) -> None:
        fields = {"layer": layer, "kind": kind, "name": name, "point": point, "call": call}
        fields |= {"input_name": input_name, "stack": stack, "attention_mask": attention_mask}
        fields["path"] = tuple(name.split(".")) if name else ()
        fields["_module"] = weakref.ref(module)
        for key, value in fields.items():
            object.__setattr__(self, key, value)

    def held_by(self, model: nn.Module) -> bool:
        """Whether `model` still holds this site's module at its name, as `submodule` finds it (recorded)."""
        module = self._module()
        return module is not None and submodule(model, self.name) is module

    @property
    def module(self) -> nn.Module:
        """The module fused: the model's, for as long as the model holds it."""
        module = self._module()
        if module is None:
            raise FusionStateError(
                f"the module at {self.name} is gone: the model no longer holds it (replaced, or the model deleted), "
                "so nothing fuses there: fuse the model again"
            )
        return module


def _base(model: nn.Module) -> nn.Module:
    """The transformers base model of `model` (itself for a base model), found by the child its `base_model_prefix` names."""
    base = getattr(model, "base_model", model)
    if not isinstance(base, nn.Module):
        return model
    prefix = attribute(model, "base_model_prefix")
    if not (isinstance(prefix, str) and submodule(model, prefix) is (None if base is model else base)):
        unrecorded()
    return base


def _config(model: nn.Module):
    config = attribute(model, "config")
    layers = attribute(config, "num_hidden_layers")
    attribute(config, "model_type")
    if not isinstance(layers, int) or layers < 1:
        raise ArchitectureError(
            f"cannot locate the blocks of {type(model).__name__}: expected a Hugging Face transformers "
            "model whose config has num_hidden_layers, such as the one layerfuse.load_model() returns; "
            "or name the module to fuse, e.g. site='encoder.layer.3'"
        )
    return config


def _names(model: nn.Module) -> dict[int, str]:
    return {id(module): name for name, module in model.named_modules(remove_duplicate=False)}


def stacks(model: nn.Module) -> tuple[str, ...]:
    """The names of the model's stacks of blocks that `stack=` chooses from; () for a model of one unnamed stack.

    >>> from transformers import T5Config, T5EncoderModel
    >>> stacks(T5EncoderModel(T5Config(d_model=32, d_ff=37, d_kv=8, num_layers=1, num_heads=4, vocab_size=99)))
    ('encoder',)
    """
    layouts = STACKED_LAYOUTS.get(getattr(getattr(model, "config", None), "model_type", ""), {})
    base = _base(model)
    return tuple(name for name, layout in layouts.items() if submodule(base, layout.blocks) is not None)


def _choices(names: tuple[str, ...]) -> str:
    return " or ".join(f"stack={name!r}" for name in names)


def _layout(model: nn.Module, stack: str | None) -> tuple[str | None, Layout | None]:
    """The stack that `stack` chooses (its name, None for a model of one unnamed stack) and its layout, if known."""
    model_type = getattr(_config(model), "model_type", "")
    if model_type in UNSUPPORTED:
        raise ArchitectureError(f"layers of {type(model).__name__} cannot be fused: {UNSUPPORTED[model_type]}")
    named = stacks(model)
    if not named:
        if stack is not None:
            raise ArgumentValueError(
                f"{type(model).__name__} has one stack of blocks, not named: leave stack unset (got stack={stack!r})"
            )
        return None, LAYOUTS.get(model_type)
    if stack is None and len(named) == 1:
        stack = named[0]
    if stack is None:
        raise ArgumentValueError(
            f"{type(model).__name__} has {len(named)} stacks of blocks, {' and '.join(named)}: "
            f"choose one with {_choices(named)}"
        )
    if stack not in named:
        raise ArgumentValueError(f"{type(model).__name__} has no {stack} stack: use {_choices(named)}")
    return stack, STACKED_LAYOUTS[model_type][stack]


def _albert_blocks(model: nn.Module, groups: nn.ModuleList, count: int) -> list[Block]:
    _refuse_none(model, groups)
    for group in groups:
        _refuse_none(model, group.albert_layers)
    if any(len(group.albert_layers) != 1 for group in groups):
        raise ArchitectureError("ALBERT with inner_group_num > 1 is not supported: pass a module name as site")
    length(groups)
    names, calls, blocks = _names(model), {}, []
    for i in range(count):
        module = groups[int(i / (count / len(groups)))].albert_layers[0]
        calls[id(module)] = calls.get(id(module), 0) + 1
        blocks.append(Block(names[id(module)], module, calls[id(module)]))
    return blocks


def find_blocks(model: nn.Module, stack: str | None = None) -> list[Block]:
    """The model's N passes through the blocks of its (chosen) stack, in order (for ALBERT, N calls of one shared block)."""
    config = _config(model)
    name, layout = _layout(model, stack)
    count, base = config.num_hidden_layers, _base(model)
    if layout is not None and (blocks := submodule(base, layout.blocks)) is not None:
        if config.model_type == "albert":
            return _albert_blocks(model, blocks, count)
        count = length(blocks) if name is not None else count
        candidates = [blocks]
    else:
        unrecorded()  # a walk of every module: its result may change with any of them
        candidates = [m for m in base.modules() if isinstance(m, nn.ModuleList) and len(m) == count]
    names = _names(model)
    if len(candidates) != 1 or length(candidates[0]) != count:
        found = ", ".join(names[id(m)] for m in candidates) or "none"
        raise ArchitectureError(
            f"cannot locate the blocks of {type(model).__name__}: expected one nn.ModuleList of "
            f"config.num_hidden_layers={count} blocks, found {found}; "
            "name the module to fuse instead, e.g. site='encoder.layer.3'"
        )
    _refuse_none(model, candidates[0])
    return [Block(names[id(block)], block) for block in candidates[0]]


def _refuse_none(model: nn.Module, blocks: nn.Module) -> None:
    """Refuse a list of blocks holding None in place of one (a block set to None): the model cannot run."""
    empty = [name for name, block in blocks._modules.items() if block is None]
    if empty:
        raise ArchitectureError(
            f"cannot locate the blocks of {type(model).__name__}: {_names(model)[id(blocks)]} holds None in place "
            f"of block {', '.join(empty)} (a block set to None), so the model cannot run: put a block back there, "
            "or name the module to fuse instead"
        )


def find_final_norm(model: nn.Module, stack: str | None = None) -> nn.Module | None:
    """The norm a model applies after the last block of its (chosen) stack (what `hidden_states[N]` reports), if any."""
    base, (_, layout) = _base(model), _layout(model, stack)
    if layout is not None:
        return submodule(base, layout.final_norm) if layout.final_norm else None
    unrecorded()
    children = dict(base.named_children())
    return next((children[n] for n in _FINAL_NORM_NAMES if n in children), None)


def find_embeddings(model: nn.Module, stack: str | None = None) -> nn.Module | None:
    """The module whose output is the first block's input (`hidden_states[0]`), where the layout names one."""
    base, (_, layout) = _base(model), _layout(model, stack)
    return next((m for path in (layout.embeddings if layout else ()) if (m := submodule(base, path)) is not None), None)


def find_sublayer(model: nn.Module, block: Block, kind: str, stack: str | None = None) -> nn.Module:
    """The attention or MLP sub-layer of `block`, whose output is added to the residual stream."""
    _, layout = _layout(model, stack)
    paths = (getattr(layout, kind),) if layout else _ATTENTION_NAMES if kind == "attention" else _MLP_NAMES
    for path in paths:
        if (module := submodule(block.module, path)) is not None:
            return module
    children = ", ".join(name for name, _ in block.module.named_children())
    raise ArchitectureError(
        f"cannot find the {kind} sub-layer of {block.name} ({type(block.module).__name__}, with "
        f"children {children}): name the module to fuse instead, e.g. site='{block.name}.<child>'"
    )


def _first_input(module: nn.Module) -> str:
    return _first_parameter(attribute(module, "__class__"))


@functools.lru_cache(maxsize=256)  # bounded: some libraries make a class per instance
def _first_parameter(cls: type[nn.Module]) -> str:
    parameters = list(signature(cls.forward).parameters)
    return parameters[1] if len(parameters) > 1 else "hidden_states"


def check_site(layer: int | None, site: str, stack: str | None = None) -> int | None:
    """Check what can be checked of `layer`, `site` and `stack` without the model; return the layer ("embeddings": 0).

    >>> check_site(None, "embeddings"), check_site(None, "encoder.layer.0"), check_site(2, "mlp", "decoder")
    (0, None, 2)
    """
    if not isinstance(site, str):
        raise ArgumentTypeError(f"site must be a string, got {type(site).__name__}")
    if stack is not None and (not isinstance(stack, str) or stack not in STACKS):
        raise ArgumentValueError(f"unknown stack {stack!r}: use {_choices(STACKS)}, or None for a model of one stack")
    if site not in SITES:
        if layer is not None:
            raise ArgumentValueError(
                f"unknown site {site!r}: use one of {', '.join(SITES)} with a layer; "
                f"if {site!r} is a module name, it takes no layer (got layer={layer})"
            )
        if stack is not None:
            raise ArgumentValueError(
                f"site {site!r} is a module name, whose path says where it is: it takes no stack (got stack={stack!r})"
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


def _named_module(model: nn.Module, site: str) -> Site:
    """The site of the module named `site`, refused where a fusion there could never run."""
    module = submodule(model, site)
    if module is None:
        raise ArgumentValueError(
            f"unknown site {site!r}: use one of {', '.join(SITES)} with a layer, "
            "or the dotted name of a module of the model (see layerfuse.inspect(model) or `layerfuse inspect`)"
        )
    attribute(module, "__class__")
    if isinstance(module, torch.jit.ScriptModule):
        raise ArchitectureError(
            f"site {site!r} is a TorchScript module, whose compiled forward runs no Python hooks: "
            "fuse the model before tracing or scripting it"
        )
    if type(module).forward is nn.Module.forward:
        child = next((name for name, _ in module.named_children()), "<child>")
        raise ArgumentValueError(
            f"site {site!r} is a {type(module).__name__}, which has no forward of its own and so is never "
            f"called: name one of its modules, e.g. site='{site}.{child}'"
        )
    return Site(layer=None, kind="module", name=site, module=module, **_stack_of(model, module))


def _stack_of(model: nn.Module, module: nn.Module) -> dict[str, str | None]:
    """The one stack that holds `module`, and the argument of the model's forward with the mask of its positions
    (None: a model of several stacks, and the module is in none or several of them)."""
    named = stacks(model)
    if not named:
        return {"stack": None, "attention_mask": "attention_mask"}
    unrecorded()  # which stacks hold the module is found by walking them
    layouts = STACKED_LAYOUTS[model.config.model_type]
    roots = {name: _base(model).get_submodule(layouts[name].blocks.rpartition(".")[0]) for name in named}
    inside = [name for name, root in roots.items() if any(inner is module for inner in root.modules())]
    if len(inside) == 1:  # a module of one stack only (the embeddings may be shared by both)
        return {"stack": inside[0], "attention_mask": layouts[inside[0]].attention_mask}
    return {"stack": None, "attention_mask": layouts[named[0]].attention_mask if len(named) == 1 else None}


def resolve_site(model: nn.Module, *, layer: int | None = None, site: str = "output", stack: str | None = None) -> Site:
    """Resolve `layer` and `site` (of the `stack` it chooses, in an encoder-decoder) to the module and point that a fusion edits.

    The site is remembered per model while the modules and attributes it was found by stay as they were
    (see `lookups`): the next call costs a few dictionary look-ups.
    """
    layer = check_site(layer, site, stack)
    return remembered(model, ("site", layer, site, stack), lambda: _found_by_path(model, layer, site, stack))


def _found_by_path(model: nn.Module, layer: int | None, site: str, stack: str | None) -> Site:
    """The site, after a look-up of its module by its name from the model itself, so that a module replaced
    anywhere along that path (a block, its list, the base model) is seen by `remembered`'s check."""
    found = _resolve(model, layer, site, stack)
    if not found.held_by(model):
        unrecorded()
    return found


def _resolve(model: nn.Module, layer: int | None, site: str, stack: str | None) -> Site:
    if site not in SITES:
        return _named_module(model, site)
    stack, layout = _layout(model, stack)
    blocks = find_blocks(model, stack)
    count = len(blocks)
    if not -(count + 1) <= layer <= count:
        raise LayerIndexError(
            f"layer {layer} is out of range for a {count}-block {f'{stack} stack' if stack else 'model'}: "
            f"use 0..{count} or -{count + 1}..-1"
        )
    index = layer % (count + 1)
    common = {"stack": stack, "attention_mask": layout.attention_mask if layout else "attention_mask"}
    if index == 0:
        if site not in ("output", "embeddings"):
            raise ArgumentValueError(f"layer 0 is the embeddings' output, it has no {site!r}: use layers 1..{count}")
        embeddings = find_embeddings(model, stack)
        if embeddings is not None:
            return Site(0, site, _names(model)[id(embeddings)], embeddings, **common)
        first = blocks[0]
        return Site(0, site, first.name, first.module, "input", first.call, _first_input(first.module), **common)
    block = blocks[index - 1]
    if site == "input":
        return Site(index, site, block.name, block.module, "input", block.call, _first_input(block.module), **common)
    if site in ("attention", "mlp"):
        module = find_sublayer(model, block, site, stack)
        return Site(index, site, _names(model)[id(module)], module, "output", block.call, **common)
    if index == count and (norm := find_final_norm(model, stack)) is not None:
        return Site(index, site, _names(model)[id(norm)], norm, **common)
    return Site(index, site, block.name, block.module, "output", block.call, **common)


def hidden_size_at(model: nn.Module, site: Site) -> int:
    """The width of the hidden states at `site`: the `config.hidden_size` of the innermost transformers model
    that holds it, else (a module in an `nn.Sequential`, say) the output width its type states.

    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
    >>> hidden_size_at(model, resolve_site(model, site="0"))
    6
    """
    return remembered(model, ("width", site.name), lambda: _width(model, site))


def _width(model: nn.Module, site: Site) -> int:
    parts = site.name.split(".")
    if not site.held_by(model):
        unrecorded()  # a site of a module no longer at its name: its width is not the name's
    for end in range(len(parts), -1, -1):
        holder = submodule(model, ".".join(parts[:end]))
        size = attribute(attribute(holder, "config"), "hidden_size")
        if isinstance(size, int) and not isinstance(size, bool):
            return size
    module = site.module
    attribute(module, "__class__")
    if isinstance(module, nn.Linear):
        return attribute(module, "out_features")
    if isinstance(module, nn.Embedding):
        return attribute(module, "embedding_dim")
    if isinstance(module, nn.LayerNorm) and attribute(module, "normalized_shape"):
        return module.normalized_shape[-1]
    raise ArchitectureError(
        f"cannot tell the hidden size at site {site.name!r} ({type(module).__name__}): it is in no transformers "
        f"model with config.hidden_size, and a {type(module).__name__} does not state its output width; "
        "name a module of a transformers model, or an nn.Linear, nn.Embedding or nn.LayerNorm"
    )


def middle_layer(model: nn.Module) -> int:
    """The layer of the middle block, the default of the commands that fuse one layer."""
    return len(find_blocks(model)) // 2


KINDS = ("output", "input", "attention", "mlp")
"""The sites of each layer that `inspect` lists ("embeddings" is layer 0's output)."""


@dataclass(frozen=True)
class StackSites:
    """One stack of blocks: its name (None in a model of one stack), its blocks, and for each layer 0..N the
    site each of `KINDS` resolves to (None where the layer has none)."""

    name: str | None
    blocks: tuple[Block, ...]
    layers: tuple[Mapping[str, Site | None], ...]


@dataclass(frozen=True, repr=False)
class ModelSites:
    """The sites of a model, as `inspect` finds them; its repr is the table that `layerfuse inspect` prints."""

    model: str
    model_type: str
    hidden_size: int
    stacks: tuple[StackSites, ...]

    def __repr__(self) -> str:
        lines = [
            f"{self.model} (model_type {self.model_type}), hidden size {self.hidden_size}",
            "layer=k is hidden_states[k] (of its stack); sites: output (default), input, attention, mlp, "
            "embeddings (= layer 0),",
            "or any module by its dotted name. Both approaches (hook, layer) apply at every site.",
        ]
        for stack in self.stacks:
            first, last = stack.blocks[0].name, stack.blocks[-1].name
            blocks = f"1 block: {first}" if len(stack.blocks) == 1 else f"{len(stack.blocks)} blocks: {first} .. {last}"
            if stack.name is not None:
                blocks = f"stack={stack.name!r}: {blocks}"
            if len(self.stacks) > 1:
                blocks += f", layer k is {stack.name}_hidden_states[k]"
            lines += ["", blocks]
            rows = [
                {"layer": str(k), **{kind: _cell(layer[kind]) for kind in KINDS}}
                for k, layer in enumerate(stack.layers)
            ]
            widths = {key: max(len(key), *(len(row[key]) for row in rows)) for key in rows[0]}
            lines.append("  ".join(key.ljust(width) for key, width in widths.items()).rstrip())
            lines += ["  ".join(row[key].ljust(width) for key, width in widths.items()).rstrip() for row in rows]
        return "\n".join(lines)


def _cell(site: Site | None) -> str:
    if site is None:
        return "-"
    call = f" (call {site.call})" if site.call is not None else ""
    return f"{site.name}{' input' if site.point == 'input' and site.kind == 'output' else ''}{call}"


def inspect(model: nn.Module) -> ModelSites:
    """The model's stacks, and for each layer the module that each site resolves to.

    >>> from transformers import BertConfig, BertModel, T5Config, T5Model
    >>> inspect(BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)))
    BertModel (model_type bert), hidden size 32
    layer=k is hidden_states[k] (of its stack); sites: output (default), input, attention, mlp, embeddings (= layer 0),
    or any module by its dotted name. Both approaches (hook, layer) apply at every site.
    <BLANKLINE>
    1 block: encoder.layer.0
    layer  output           input            attention                               mlp
    0      embeddings       -                -                                       -
    1      encoder.layer.0  encoder.layer.0  encoder.layer.0.attention.output.dense  encoder.layer.0.output.dense
    >>> t5 = inspect(T5Model(T5Config(d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4, vocab_size=99)))
    >>> [stack.name for stack in t5.stacks], t5.stacks[1].layers[2]["mlp"].name
    (['encoder', 'decoder'], 'decoder.block.1.layer.2.DenseReluDense')
    """
    config = _config(model)
    found = []
    for name in stacks(model) or (None,):
        blocks = tuple(find_blocks(model, name))
        layers = []
        for layer in range(len(blocks) + 1):
            sites: dict[str, Site | None] = {}
            for kind in KINDS:
                try:
                    sites[kind] = resolve_site(model, layer=layer, site=kind, stack=name)
                except (ArchitectureError, ArgumentValueError):
                    sites[kind] = None
            layers.append(sites)
        found.append(StackSites(name, blocks, tuple(layers)))
    return ModelSites(type(model).__name__, getattr(config, "model_type", ""), config.hidden_size, tuple(found))
