"""`capture`: what a site of a model holds for a set of texts or batches, pooled per example or token by token.

The site is the one `fuse` resolves (`layer`, `site`, `stack`), read by a forward hook that the call
removes again, with the model in eval mode and under inference mode; fusions attached to the model
stay active, so a site after a fused layer (or the fused site itself) holds the fused value, as
`output_hidden_states` reports it. Several layers are read in one forward per batch, and the forward
stops once the last of them has been read.

`positions` chooses, by the attention mask of each batch, "tokens" (the real tokens), "first" or
"last" (the first or last real token), or "all" (every position of the batch, padding included);
`pooling` makes of them one float32 vector per example ("mean", "first", "last"), or keeps them
("none": one (T_i, H) tensor per example). Texts are tokenized in batches padded on the right, so
that each gives what it gives alone (within float tolerance).

>>> import torch
>>> from transformers import BertConfig, BertModel
>>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37))
>>> batch = {"input_ids": torch.tensor([[5, 6, 7], [8, 9, 0]]), "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}
>>> capture(model, [batch], layer=1).shape
torch.Size([2, 32])
>>> {layer: tuple(states.shape) for layer, states in capture(model, [batch], layer=range(3), pooling="last").items()}
{0: (2, 32), 1: (2, 32), 2: (2, 32)}
>>> [tuple(tokens.shape) for tokens in capture(model, [batch], layer=-1, pooling="none")]
[(3, 32), (2, 32)]
"""

from __future__ import annotations

import inspect
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from .errors import ArchitectureError, ArgumentTypeError, ArgumentValueError, positive_int
from .models import transformer_of
from .outputs import split_output
from .positions import Positions
from .sites import Site, resolve_site

POSITIONS = ("tokens", "all", "first", "last")
POOLINGS = ("mean", "first", "last", "none")
PROGRESS_BATCHES = 10
"""With `progress=None`, a bar is shown for more batches than this, when stderr is a terminal."""

Captured = torch.Tensor | list[torch.Tensor]
Batch = Mapping[str, Any]


class _Enough(Exception):
    """Raised by the last hook a forward needs, so that the rest of the model does not run."""


def capture(
    model: nn.Module,
    inputs: Sequence[str] | Iterable[Batch] | Batch,
    *,
    layer: int | Sequence[int] | None,
    site: str = "output",
    stack: str | None = None,
    positions: str = "tokens",
    pooling: str = "mean",
    tokenizer: PreTrainedTokenizerBase | None = None,
    batch_size: int = 32,
    max_length: int | None = None,
    progress: bool | None = None,
) -> Captured | dict[int, Captured]:
    """What `site` of `layer` holds for each example of `inputs`, on the CPU in float32.

    `inputs` is a list of texts (with their `tokenizer`: batches of `batch_size`, padded on the
    right and truncated at `max_length`, default the model's limit), or ready batches, each a
    mapping of the forward's keyword arguments as a tokenizer returns them (one such mapping is one
    batch). `layer`, `site` and `stack` are those of `fuse`; a sequence of layers (`range(L + 1)`)
    reads all of them in each forward and gives `{layer: result}`. `pooling` "mean", "first" or
    "last" of the chosen `positions` gives an (N, H) tensor, "none" a list of N (T_i, H) tensors.
    `progress`: a tqdm bar on stderr (None: for more than `PROGRESS_BATCHES` batches, on a terminal).
    Everything is checked before the first forward; the model is left as it was.
    """
    outer, model = model, transformer_of(model)
    many = not isinstance(layer, int) and layer is not None
    layers = _layers(layer)
    sites = {key: resolve_site(model, layer=key, site=site, stack=stack) for key in layers}
    _check_choice(positions, pooling)
    mask_name = next(iter(sites.values())).attention_mask
    if positions in ("tokens", "first", "last") and mask_name is None:
        raise ArchitectureError(
            f"positions {positions!r} read the attention mask, and site {site!r} is in none or both of the stacks "
            f"of {type(model).__name__}, each with a mask of its own: use positions='all'"
        )
    positive_int("batch size", batch_size)
    if progress is not None and not isinstance(progress, bool):
        raise ArgumentTypeError(f"progress must be True, False or None, got {type(progress).__name__}")
    count, batches = _batches(model, inputs, tokenizer, batch_size, max_length, mask_name, pooling != "none")
    terminal = sys.stderr is not None and sys.stderr.isatty()
    show = progress if progress is not None else count > PROGRESS_BATCHES and terminal
    device = next((weight.device for weight in model.parameters() if not weight.is_meta), None)
    extra = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    results: dict[int | None, list[Captured]] = {key: [] for key in sites}
    modes = [(module, module.training) for module in outer.modules()]
    outer.eval()
    try:
        with torch.inference_mode(), tqdm(total=count, unit="batch", disable=not show, dynamic_ncols=True) as bar:
            for batch in batches:
                batch = {key: _to(value, device) for key, value in batch.items()}
                mask = batch.get(mask_name) if mask_name is not None else None
                reduce = _reducer(Positions(positions), pooling, mask)
                for key, result in _read(model, sites, {**extra, **batch}, reduce).items():
                    results[key].append(result)
                bar.update(1)
    finally:
        for module, training in modes:
            module.training = training
    joined = {key: _join(parts, pooling) for key, parts in results.items()}
    return joined if many else joined[layers[0]]


def _layers(layer: object) -> list[int | None]:
    if layer is None or isinstance(layer, int):
        return [layer]
    if isinstance(layer, (str, bytes)) or not isinstance(layer, Sequence):
        raise ArgumentTypeError(
            f"layer must be an int, a sequence of ints (such as range(L + 1)), or None for a module site, "
            f"got {type(layer).__name__} {layer!r}"
        )
    if not layer:
        raise ArgumentValueError("layer is an empty sequence: give at least one layer")
    if any(isinstance(key, bool) or not isinstance(key, int) for key in layer):
        raise ArgumentTypeError(f"a sequence of layers must hold ints only, got {list(layer)!r}")
    return list(dict.fromkeys(layer))


def _check_choice(positions: object, pooling: object) -> None:
    if positions not in POSITIONS:
        raise ArgumentValueError(f"unknown positions {positions!r}: use one of {', '.join(POSITIONS)}")
    if pooling not in POOLINGS:
        raise ArgumentValueError(f"unknown pooling {pooling!r}: use one of {', '.join(POOLINGS)}")
    if positions in ("first", "last") and pooling in ("first", "last"):
        raise ArgumentValueError(
            f"positions {positions!r} choose one token of each example, so pooling {pooling!r} has nothing to "
            f"choose from: keep pooling='mean' (the token itself), or use positions='tokens', pooling={positions!r}"
        )


def _batches(
    model: nn.Module,
    inputs: object,
    tokenizer: PreTrainedTokenizerBase | None,
    batch_size: int,
    max_length: int | None,
    mask_name: str | None,
    pooled: bool,
) -> tuple[int, Iterator[Batch]]:
    """How many batches `inputs` make, and the batches, every one checked before the first is given."""
    if isinstance(inputs, str):
        raise ArgumentTypeError("inputs is one string: give a list of texts, e.g. [text]")
    if isinstance(inputs, Mapping):
        inputs = [inputs]
    if not isinstance(inputs, Iterable):
        raise ArgumentTypeError(
            f"inputs must be a list of texts or an iterable of batches, got {type(inputs).__name__}"
        )
    items = list(inputs)
    if not items:
        raise ArgumentValueError("inputs is empty: give at least one text or batch")
    if isinstance(items[0], Mapping):
        if max_length is not None:
            raise ArgumentValueError(
                f"max_length={max_length} truncates texts, and ready batches run as they are: truncate them "
                "when tokenizing, or give the texts"
            )
        for index, batch in enumerate(items):
            _check_batch(index, batch, mask_name, pooled)
        return len(items), iter(items)
    for index, text in enumerate(items):
        if not isinstance(text, str):
            raise ArgumentTypeError(
                f"inputs[{index}] is a {type(text).__name__}, not a str: give texts only, or batches only"
            )
    if mask_name != "attention_mask":
        raise ArgumentValueError(
            "texts are tokenized as the input of the model's encoder, and this site is not in it: give ready "
            "batches with the inputs of its stack (decoder_input_ids, decoder_attention_mask)"
        )
    tokenize = _tokenizer(model, tokenizer, max_length, many=len(items) > 1 and batch_size > 1)
    starts = range(0, len(items), batch_size)
    return len(starts), (tokenize(items[start : start + batch_size]) for start in starts)


def _check_batch(index: int, batch: object, mask_name: str | None, pooled: bool) -> None:
    if not isinstance(batch, Mapping) or not any(isinstance(value, torch.Tensor) for value in batch.values()):
        raise ArgumentTypeError(
            f"batch {index} is a {type(batch).__name__}: a batch is a mapping of the forward's keyword arguments "
            "with tensors (input_ids, attention_mask), as a tokenizer returns them; give texts only, or batches only"
        )
    mask = batch.get(mask_name) if mask_name is not None else None
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2:
        raise ArgumentValueError(f"{mask_name} of batch {index} must be a (B, T) tensor, got {mask!r:.80}")
    if pooled and not mask.bool().any(dim=1).all():
        rows = torch.nonzero(~mask.bool().any(dim=1)).flatten().tolist()
        raise ArgumentValueError(
            f"rows {rows} of batch {index} have no real token ({mask_name} all 0), so there is nothing to pool: "
            "drop them, or use pooling='none'"
        )


def _tokenizer(
    model: nn.Module, tokenizer: object, max_length: int | None, *, many: bool
) -> Callable[[list[str]], Batch]:
    """The function that makes a batch of texts into the model's inputs, right-padded and truncated."""
    if tokenizer is None:
        raise ArgumentValueError("texts need the model's tokenizer: pass tokenizer=..., or give ready batches")
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise ArgumentTypeError(f"tokenizer must be a Hugging Face tokenizer, got {type(tokenizer).__name__}")
    if many and tokenizer.pad_token is None:
        raise ArgumentValueError(
            f"{type(tokenizer).__name__} has no padding token, which batches of texts need: set one "
            "(tokenizer.pad_token = tokenizer.eos_token), or pass batch_size=1"
        )
    limits = (tokenizer.model_max_length, getattr(model.config, "max_position_embeddings", None))
    limit = min(value for value in limits if value)
    if max_length is not None:
        shortest = tokenizer.num_special_tokens_to_add() + 1
        if positive_int("max length", max_length) < shortest or max_length > limit:
            raise ArgumentValueError(
                f"max length must be from {shortest} to this model's {limit} tokens, got {max_length}"
            )
        limit = max_length

    def tokenize(texts: list[str]) -> Batch:
        return tokenizer(
            texts, padding=len(texts) > 1, padding_side="right", truncation=True, max_length=limit, return_tensors="pt"
        )

    return tokenize


def _to(value: object, device: torch.device | None) -> object:
    return value.to(device) if isinstance(value, torch.Tensor) and device is not None else value


def _reducer(positions: Positions, pooling: str, mask: torch.Tensor | None) -> Callable[[Site, torch.Tensor], Captured]:
    """What is kept of a site's hidden states (B, T, H) in this batch: its examples pooled, or their chosen tokens."""

    def reduce(site: Site, hidden: torch.Tensor) -> Captured:
        if hidden.ndim != 3 or (mask is not None and tuple(mask.shape) != tuple(hidden.shape[:2])):
            covered = "" if mask is None else f", which the batch's attention mask {tuple(mask.shape)} does not cover"
            raise ArchitectureError(
                f"site {site.name} holds a tensor of shape {tuple(hidden.shape)}{covered}: capture reads sites "
                "whose hidden states are (batch, tokens, hidden)"
            )
        hidden = hidden.float()
        chosen = positions.select(hidden, mask)
        chosen = torch.ones_like(hidden[..., :1], dtype=torch.bool) if chosen is None else chosen
        chosen = chosen.expand(*hidden.shape[:2], 1)
        if pooling == "none":
            return [states[rows[:, 0]] for states, rows in zip(hidden, chosen)]
        if pooling == "mean":
            return hidden.masked_fill(~chosen, 0).sum(dim=1) / chosen.sum(dim=1)
        flags = chosen[..., 0].int()
        index = flags.argmax(dim=1) if pooling == "first" else hidden.shape[1] - 1 - flags.flip(1).argmax(dim=1)
        return hidden[torch.arange(len(hidden), device=hidden.device), index]

    return reduce


def _read(
    model: nn.Module,
    sites: Mapping[int | None, Site],
    batch: Batch,
    reduce: Callable[[Site, torch.Tensor], Captured],
) -> dict[int | None, Captured]:
    """One forward of `batch`, reading every site with a hook that is removed again, also on an error.

    The forward stops once every site is read; with a module named as the site (which may run more than
    once), it runs to the end, and a module that runs again is refused. Forwards of the model in other
    threads meanwhile pass the hooks by.
    """
    read: dict[int | None, Captured] = {}
    wanted: dict[tuple[int, str], list[tuple[int | None, Site]]] = {}
    for key, where in sites.items():
        wanted.setdefault((id(where.module), where.point), []).append((key, where))
    calls = dict.fromkeys(wanted, 0)
    stop_early = all(where.kind != "module" for where in sites.values())
    thread = threading.get_ident()

    def record(point: str, module: nn.Module, hidden: torch.Tensor | None) -> None:
        calls[id(module), point] += 1
        for key, where in wanted[id(module), point]:
            if where.call is None and calls[id(module), point] > 1:
                raise ArchitectureError(
                    f"module {where.name} runs more than once in a forward of {type(model).__name__}, so which of "
                    "its calls to read is not known: name a module that runs once"
                )
            if where.call in (None, calls[id(module), point]):
                if hidden is None:
                    raise ArchitectureError(f"cannot find the hidden states among the inputs of {where.name}")
                read[key] = reduce(where, hidden)
        if stop_early and len(read) == len(sites):
            raise _Enough

    def on_input(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if threading.get_ident() == thread:
            first = wanted[id(module), "input"][0][1]
            record("input", module, args[0] if args else kwargs.get(first.input_name))

    def on_output(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if threading.get_ident() == thread:
            record("output", module, split_output(output)[0])

    handles = []
    try:
        for (_, point), ((_, where), *_) in wanted.items():
            if point == "input":
                handles.append(where.module.register_forward_pre_hook(on_input, with_kwargs=True))
            else:
                handles.append(where.module.register_forward_hook(on_output))
        model(**batch)
    except _Enough:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [where.name for key, where in sites.items() if key not in read]
    if missing:
        raise ArchitectureError(
            f"a forward of {type(model).__name__} did not run {', '.join(missing)}, so there is nothing to read there"
        )
    return read


def _join(parts: list[Captured], pooling: str) -> Captured:
    """The batches' results as one result, on the CPU and outside inference mode (usable with autograd)."""
    if pooling == "none":
        return [tokens.cpu().clone() for part in parts for tokens in part]
    return torch.cat([part.cpu() for part in parts])
