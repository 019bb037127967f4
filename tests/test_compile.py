"""torch.compile(model, fullgraph=True) traces fused models with no graph break, matches eager, and recompiles when it must."""

from __future__ import annotations

import pytest
import torch

import layerfuse
from conftest import TINY, padded_batch, tiny_bert
from layerfuse import FusionConfig

H = TINY["hidden_size"]
B, T = 3, 7
GENERATOR = torch.Generator().manual_seed(5)
# Every fixed method, each with its own info shape and positions, at layers 0..3.
FIXED = [
    (FusionConfig(method="addition", layer=0, positions="tokens"), torch.randn(H, generator=GENERATOR)),
    (FusionConfig(method="multiplication", layer=1), 1 + torch.randn(B, H, generator=GENERATOR) / 4),
    (FusionConfig(method="scale", arguments={"alpha": 0.5}, layer=1, positions="first"), None),
    (FusionConfig(method="replace", layer=2, positions="last"), torch.randn(B, T, H, generator=GENERATOR)),
    (
        FusionConfig(method="interpolate", arguments={"alpha": 0.3}, layer=2, positions=[0, -1]),
        torch.randn(H, generator=GENERATOR),
    ),
    (
        FusionConfig(method="ablate", layer=3, positions=torch.rand(B, T, generator=GENERATOR) > 0.5),
        torch.randn(H, generator=GENERATOR),
    ),
    (FusionConfig(method="clamp", arguments={"value": 1.5}, layer=3), torch.randn(B, H, generator=GENERATOR)),
    (FusionConfig(method="project", layer=3), torch.randn(2, H, generator=GENERATOR)),
    (FusionConfig(method="erase", layer=3, positions="tokens"), torch.randn(B, 3, H, generator=GENERATOR) / H**0.5),
]


class CountingBackend:
    """A torch.compile backend that runs the traced graph as it is and counts the graphs it was given."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs += 1
        return graph.forward


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def last_hidden(model, batch):
    with torch.no_grad():
        return model(**batch).last_hidden_state


def test_every_fixed_method_by_both_approaches_compiles_in_one_graph_and_matches_eager():
    model, batch = tiny_bert(), padded_batch()
    plain = last_hidden(model, batch)
    with layerfuse.fuse_many(
        model, [(config.replace(approach=a), info) for config, info in FIXED for a in ("hook", "layer")]
    ):
        eager = last_hidden(model, batch)
        compiled = last_hidden(torch.compile(model, fullgraph=True), batch)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(eager, plain, atol=1e-3)


@pytest.mark.parametrize("approach", ["hook", "layer"])
def test_no_graph_break(approach):
    model, batch = tiny_bert(), padded_batch()
    with layerfuse.fuse_many(model, [(config.replace(approach=approach), info) for config, info in FIXED]):
        explanation = torch._dynamo.explain(model)(**batch)
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


def test_layer_approach_recompiles_when_a_fusion_is_attached_changed_or_removed():
    model, batch = tiny_bert(), padded_batch()
    backend = CountingBackend()
    compiled = torch.compile(model, fullgraph=True, backend=backend)

    def check() -> None:
        assert torch.equal(last_hidden(compiled, batch), last_hidden(model, batch))

    check()
    fusion = layerfuse.fuse(model, torch.randn(H), layer=2, approach="layer")
    check()
    graphs = backend.graphs
    fusion.set_info(torch.randn(H))
    check()
    assert backend.graphs == graphs  # new values of the same shape: the same graph
    fusion.set_info(torch.randn(B, H))
    check()
    fusion.method.alpha = 2.0
    check()
    second = layerfuse.fuse(model, torch.randn(H), layer=2, method="ablate", approach="layer")
    check()
    second.remove()
    fusion.remove()
    check()
    assert backend.graphs > graphs


def test_hook_approach_fused_before_compiling_follows_changes():
    model, batch = tiny_bert(), padded_batch()
    fusion = layerfuse.fuse(model, torch.randn(H), layer=2, approach="hook")
    backend = CountingBackend()
    compiled = torch.compile(model, fullgraph=True, backend=backend)

    def check() -> None:
        assert torch.equal(last_hidden(compiled, batch), last_hidden(model, batch))

    check()
    graphs = backend.graphs
    fusion.set_info(torch.randn(H))
    check()
    assert backend.graphs == graphs
    second = layerfuse.fuse(model, torch.randn(H), layer=2, method="clamp", value=1.0, approach="hook")
    check()
    second.remove()
    fusion.remove()
    check()


def test_hook_approach_attached_after_compiling_with_hook_guards():
    """torch skips guards on module hooks by default; with them on, a hook attached later is seen."""
    model, batch = tiny_bert(), padded_batch()
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False):
        compiled = torch.compile(model, fullgraph=True, backend=CountingBackend())
        last_hidden(compiled, batch)
        with layerfuse.fuse(model, torch.randn(H), layer=2, approach="hook"):
            assert torch.equal(last_hidden(compiled, batch), last_hidden(model, batch))
        assert torch.equal(last_hidden(compiled, batch), last_hidden(model, batch))
