"""Per-example info through `generate`: expanded as `generate` expands the batch, for the duration of the call.

`generate` with `num_beams` or `num_return_sequences` runs each prompt n times, n = the larger of
the two, as n contiguous rows (`repeat_interleave`): prompt i's rows are i·n .. i·n + n − 1, and beam
search reorders beams only within them. While a fusion with per-example info is attached, the
model's `generate` is wrapped on the instance: when `generate` expands its inputs, the info's rows
are expanded the same way, and the info is put back when the call ends, also on an error. Info
already given one row per run (B·n rows) is used as it is. An encoder-decoder runs its encoder on
the B prompts before the expansion and its decoder on the B·n rows after it, so a fusion at either
gets the rows it needs. Per-token info covers the T tokens of one forward, and a decoder-only
model's `generate` runs more forwards, of new tokens: it is refused there.

>>> import torch, layerfuse
>>> from transformers import GPT2Config, GPT2LMHeadModel
>>> model = GPT2LMHeadModel(GPT2Config(n_embd=8, n_layer=1, n_head=2, vocab_size=20, eos_token_id=1)).eval()
>>> prompts = torch.tensor([[3, 4], [5, 6]])
>>> with layerfuse.fuse(model, torch.randn(2, 8), layer=1):
...     out = model.generate(prompts, num_beams=3, num_return_sequences=2, max_new_tokens=2, pad_token_id=0)
>>> out.shape
torch.Size([4, 4])
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import FusionStateError, InfoShapeError
from .stand_ins import StandIn

if TYPE_CHECKING:
    from .fusion import Fusion

_NONE = object()
_EXPAND = "_expand_inputs_for_generation"
"""The method through which `generate` expands its inputs."""


class WatchedGenerate(StandIn):
    """A model's `generate`, put in its place on the instance: it fits the per-example info of the fusions on the model to each call."""

    method = "generate"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.model = model
        self.fusions: list[Fusion] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        batched = [fusion for fusion in self.fusions if fusion.info.batch_size is not None]
        if not batched:
            return self.inner(*args, **kwargs)
        per_token = [fusion for fusion in batched if fusion.info.seq_len is not None]
        if per_token and not self.model.config.is_encoder_decoder:
            info = per_token[0].info
            raise InfoShapeError(
                f"per-token info ({info.batch_size}, {info.seq_len}, D) covers the {info.seq_len} tokens of one "
                "forward, and generate runs the prompt and then a forward for every new token: give (D,) or (B, D) "
                "info to generate with, or fuse per-token info for a single forward, model(...)"
            )
        model = self.model
        infos = {fusion: fusion.info for fusion in batched}
        previous = model.__dict__.get(_EXPAND, _NONE)
        expand = getattr(model, _EXPAND)
        parameters = inspect.signature(expand)

        def expanding(*expand_args: Any, **expand_kwargs: Any) -> Any:
            given = parameters.bind(*expand_args, **expand_kwargs)
            given.apply_defaults()
            runs, input_ids = given.arguments["expand_size"], given.arguments["input_ids"]
            if runs != 1:
                prompts = input_ids.shape[0] if isinstance(input_ids, torch.Tensor) else None
                for fusion, info in infos.items():
                    _expand(fusion, info, prompts, runs)
            return expand(*expand_args, **expand_kwargs)

        model.__dict__[_EXPAND] = expanding
        try:
            return self.inner(*args, **kwargs)
        finally:
            if previous is _NONE:
                del model.__dict__[_EXPAND]
            else:
                model.__dict__[_EXPAND] = previous
            for fusion, info in infos.items():
                fusion.info = info

    def __reduce_ex__(self, protocol: int) -> Any:
        raise FusionStateError(
            "cannot pickle or deep-copy a model while a layerfuse fusion with per-example info watches its generate: "
            "remove the fusion first (fusion.remove(), or leave its with-block), or save model.state_dict() instead"
        )

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return self.__reduce_ex__(4)


def _expand(fusion: Fusion, info: Any, prompts: int | None, runs: int) -> None:
    """Give `fusion` one row of `info` per run of each of `prompts` prompts, as `generate` repeats them."""
    rows = info.batch_size
    if prompts is None or rows == prompts * runs:
        return
    if rows != prompts:
        raise InfoShapeError(
            f"per-example info has {rows} rows, but generate was given {prompts} prompts, each run {runs} times "
            f"(num_beams / num_return_sequences): give one row per prompt ({prompts}) or per run ({prompts * runs})"
        )
    fusion.set_info(info.source.repeat_interleave(runs, dim=0))


def watch_generate(model: nn.Module, fusion: Fusion) -> Callable[[], None] | None:
    """Fit `fusion`'s per-example info to every `generate` of `model` until the returned function is called.

    None, and nothing done, for a model that does not generate as transformers' `GenerationMixin` does.
    """
    if not (callable(getattr(model, "generate", None)) and callable(getattr(model, _EXPAND, None))):
        return None
    watched = WatchedGenerate.on(model)
    watched.fusions.append(fusion)

    def remove() -> None:
        watched.fusions.remove(fusion)
        if not watched.fusions:
            watched.take_off(model)

    return remove
