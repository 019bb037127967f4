"""Split a module's output into its hidden-state tensor and a function that rebuilds the output.

A transformers block returns a tensor (5.x), a tuple whose first item is the hidden states (4.x), or a
`ModelOutput` whose first field is. This is the one place that knows.

>>> import torch
>>> hidden, rebuild = split_output((torch.zeros(2), "cache"))
>>> rebuild(hidden + 1)
(tensor([1., 1.]), 'cache')
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from transformers.utils import ModelOutput

from .errors import ArchitectureError

Rebuild = Callable[[torch.Tensor], Any]


def _same(hidden: torch.Tensor) -> torch.Tensor:
    return hidden


def split_output(output: Any) -> tuple[torch.Tensor, Rebuild]:
    """Return `(hidden, rebuild)`: the hidden-state tensor and how to put a new one in its place."""
    if isinstance(output, torch.Tensor):
        return output, _same
    if isinstance(output, ModelOutput):
        first = next(iter(output.keys()), None)
        hidden = output[first] if first is not None else None
        if isinstance(hidden, torch.Tensor):
            return hidden, lambda new: dataclasses.replace(output, **{first: new})
    elif isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        rest = output[1:]
        return output[0], lambda new: (new, *rest)
    raise ArchitectureError(
        "cannot find the hidden states in a module output of type "
        f"{type(output).__name__}: expected a tensor, a tuple starting with one, or a ModelOutput"
    )
