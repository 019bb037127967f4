"""Twins of a model: copies of its modules that share its weights, so plain and fused forwards can alternate.

Timing a fused forward against the plain one is fairest call by call, on the very same weights in the
very same memory, with nothing attached or removed between the calls: the fusion lives on a twin.

>>> import torch
>>> from transformers import BertConfig, BertModel
>>> from layerfuse import fuse
>>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)).eval()
>>> with side_by_side(model, {"hook": lambda twin: fuse(twin, torch.ones(32), layer=1)}) as networks:
...     fused = networks["hook"](torch.tensor([[1, 2]])).last_hidden_state
...     networks["plain"] is model, networks["hook"].pooler.dense.weight is model.pooler.dense.weight
(True, True)
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack, contextmanager

from torch import nn


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of `model`'s modules that holds the very same parameter and buffer tensors, not copies of them."""
    shared = {id(tensor): tensor for tensor in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, shared)


@contextmanager
def side_by_side(
    model: nn.Module, fusions: Mapping[str, Callable[[nn.Module], AbstractContextManager[object]]]
) -> Iterator[dict[str, nn.Module]]:
    """`{"plain": model, name: twin, ...}`, each twin with its fusion attached by `fusions[name](twin)`.

    `model` itself is never changed; each fusion is removed on leaving, also on an exception.
    """
    networks = {"plain": model}
    with ExitStack() as stack:
        for name, attach in fusions.items():
            twin = shared_copy(model)
            stack.enter_context(attach(twin))
            networks[name] = twin
        yield networks
