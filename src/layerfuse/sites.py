"""Where a fusion goes: find a model's blocks and embeddings, and resolve a layer index to a module.

`layer=k` names the tensor that `output_hidden_states` reports as `hidden_states[k]`: 0 is the
embeddings' output, k the output of block k (counting from 1), and negatives count from the end.

>>> from transformers import BertConfig, BertModel
>>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37))
>>> resolve_layer(model, -1).name
'encoder.layer.1'
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .errors import ArchitectureError, ArgumentTypeError, LayerIndexError


@dataclass(frozen=True)
class Site:
    """A resolved place to fuse: `layer` as `hidden_states` counts it, and the module whose output it is."""

    layer: int
    name: str
    module: nn.Module


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return the dotted name and the `ModuleList` of the model's transformer blocks."""
    config = getattr(model, "config", None)
    count = getattr(config, "num_hidden_layers", None)
    if not isinstance(count, int) or count < 1:
        raise ArchitectureError(
            f"cannot locate the blocks of {type(model).__name__}: expected a Hugging Face transformers "
            "model whose config has num_hidden_layers, such as the one layerfuse.load_model() returns"
        )
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == count
    ]
    if len(found) != 1:
        names = ", ".join(name for name, _ in found) or "none"
        raise ArchitectureError(
            f"cannot locate the blocks of {type(model).__name__}: expected exactly one nn.ModuleList "
            f"of config.num_hidden_layers={count} blocks, found {names}"
        )
    return found[0]


def find_embeddings(model: nn.Module) -> tuple[str, nn.Module]:
    """Return the dotted name and the module whose output is `hidden_states[0]`."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "embeddings" and sum(1 for _ in module.children()) > 0:
            return name, module
    raise ArchitectureError(
        f"cannot locate the embeddings module of {type(model).__name__} for layer 0: "
        "fuse at layer 1 or later instead"
    )


def resolve_layer(model: nn.Module, layer: int) -> Site:
    """Resolve `layer` (0..N or -(N+1)..-1 for N blocks) to the module whose output it names."""
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ArgumentTypeError(f"layer must be an int, got {type(layer).__name__} {layer!r}")
    blocks_name, blocks = find_blocks(model)
    count = len(blocks)
    if not -(count + 1) <= layer <= count:
        raise LayerIndexError(
            f"layer {layer} is out of range for a {count}-block model: "
            f"use 0..{count} or -{count + 1}..-1"
        )
    index = layer % (count + 1)
    if index == 0:
        name, module = find_embeddings(model)
        return Site(layer=0, name=name, module=module)
    return Site(layer=index, name=f"{blocks_name}.{index - 1}", module=blocks[index - 1])
