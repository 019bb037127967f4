"""split_output finds the hidden states in every form a block returns and rebuilds that form."""

from __future__ import annotations

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutput

from layerfuse.errors import ArchitectureError
from layerfuse.outputs import split_output

HIDDEN = torch.arange(6.0).reshape(1, 2, 3)


def test_tensor_form():
    hidden, rebuild = split_output(HIDDEN)
    assert hidden is HIDDEN
    new = HIDDEN + 1
    assert rebuild(new) is new


def test_tuple_form_keeps_the_other_items():
    attention, cache = torch.ones(1, 1, 2, 2), object()
    hidden, rebuild = split_output((HIDDEN, attention, cache))
    assert hidden is HIDDEN
    new = HIDDEN * 2
    rebuilt = rebuild(new)
    assert type(rebuilt) is tuple and rebuilt[0] is new and rebuilt[1] is attention and rebuilt[2] is cache


def test_model_output_form_keeps_class_and_fields():
    attentions = (torch.ones(1, 1, 2, 2),)
    output = BaseModelOutput(last_hidden_state=HIDDEN, attentions=attentions)
    hidden, rebuild = split_output(output)
    assert hidden is HIDDEN
    new = HIDDEN - 1
    rebuilt = rebuild(new)
    assert type(rebuilt) is BaseModelOutput
    assert rebuilt.last_hidden_state is new and rebuilt[0] is new and rebuilt.attentions is attentions
    assert list(rebuilt.keys()) == list(output.keys())
    assert output.last_hidden_state is HIDDEN


@pytest.mark.parametrize("output", [None, (), ("text",), {"a": HIDDEN}, BaseModelOutput()])
def test_unknown_forms_get_a_clear_error(output):
    with pytest.raises(ArchitectureError, match="cannot find the hidden states"):
        split_output(output)
