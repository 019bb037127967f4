"""The method registry and the formulas of the core methods."""

from __future__ import annotations

import pytest
import torch

import layerfuse
from layerfuse.methods import METHODS, make_method, method_names, register_method

HIDDEN = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
INFO = torch.randn(4, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(("name", "cls"), [("addition", layerfuse.Addition), ("add", layerfuse.Addition),
                                           ("multiplication", layerfuse.Multiplication), ("multiply", layerfuse.Multiplication)])
def test_names_and_aliases_make_their_method(name, cls):
    assert type(make_method(name)) is cls


def test_formulas():
    assert torch.equal(layerfuse.Addition()(HIDDEN, INFO), HIDDEN + INFO)
    torch.testing.assert_close(layerfuse.Addition(alpha=-0.5)(HIDDEN, INFO), HIDDEN - 0.5 * INFO)
    assert torch.equal(layerfuse.Multiplication()(HIDDEN, INFO), HIDDEN * INFO)


def test_a_method_instance_is_used_as_it_is():
    method = layerfuse.Addition(alpha=2.0)
    assert make_method(method) is method


def test_unknown_names_list_the_registered_ones():
    with pytest.raises(layerfuse.UnknownNameError, match=r"unknown method 'film': use one of addition \(add\)"):
        make_method("film")


def test_a_user_method_plugs_into_both_approaches(tiny, batch):
    @register_method("subtract_test")
    class Subtract(layerfuse.Method):
        formula = "h - v"

        def forward(self, hidden, info):
            return hidden - info

    try:
        assert "subtract_test" in method_names()
        with torch.no_grad():
            plain = tiny(**batch, output_hidden_states=True).hidden_states[2]
            for approach in ("hook", "layer"):
                with layerfuse.fuse(tiny, torch.ones(32), layer=2, method="subtract_test", approach=approach):
                    assert torch.equal(tiny(**batch, output_hidden_states=True).hidden_states[2], plain - 1)
    finally:
        del METHODS["subtract_test"]


def test_names_cannot_be_registered_twice():
    with pytest.raises(ValueError, match="'add' is already registered"):
        register_method("add")(layerfuse.Addition)
