"""Both approaches against an independent reference, on padded batches: every layer, method and info shape."""

from __future__ import annotations

import pytest
import torch

import layerfuse
from conftest import TINY, padded_batch, tiny_bert
from reference import (
    FORMULAS,
    as_broadcast,
    bert_forward,
    bert_forward_with_sublayer_edit,
    chosen_positions,
    fixed_formula,
    learned_formula,
)

INFO_SHAPES = {"(H,)": lambda b, t, h: (h,), "(B,H)": lambda b, t, h: (b, h), "(B,T,H)": lambda b, t, h: (b, t, h)}
LAYERS = range(TINY["num_hidden_layers"] + 1)


def make_info(batch, hidden_size: int, shape: str, method: str) -> torch.Tensor:
    b, t = batch["input_ids"].shape
    info = torch.randn(INFO_SHAPES[shape](b, t, hidden_size), generator=torch.Generator().manual_seed(7))
    return info if method == "addition" else 1.0 + 0.5 * info


def fused_states(model, batch, info, **options):
    with torch.no_grad(), layerfuse.fuse(model, info, **options):
        out = model(**batch, output_hidden_states=True)
    return out.hidden_states, out.last_hidden_state


def assert_matches_reference(model, batch, info, layer, method):
    reference = bert_forward(model, batch, layer=layer, info=info, combine=FORMULAS[method])
    results = {a: fused_states(model, batch, info, layer=layer, method=method, approach=a) for a in ("hook", "layer")}
    (hook_states, hook_last), (layer_states, layer_last) = results["hook"], results["layer"]
    assert torch.equal(hook_last, layer_last)
    assert all(torch.equal(h, c) for h, c in zip(hook_states, layer_states, strict=True))
    for fused, expected in zip(hook_states, reference, strict=True):
        torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hook_last, reference[-1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("shape", INFO_SHAPES)
@pytest.mark.parametrize("method", FORMULAS)
@pytest.mark.parametrize("layer", LAYERS)
def test_tiny_bert_matches_reference(layer, method, shape, attn_implementation):
    model = tiny_bert(attn_implementation)
    batch = padded_batch()
    info = make_info(batch, TINY["hidden_size"], shape, method)
    assert_matches_reference(model, batch, info, layer, method)


@pytest.mark.parametrize("method", FORMULAS)
@pytest.mark.parametrize("layer", range(7))
def test_minilm_matches_reference(minilm, layer, method):
    model, tokenizer = minilm
    batch = dict(
        tokenizer(
            ["Hello, how are you?", "A longer sentence, so that the batch is padded."],
            return_tensors="pt",
            padding=True,
        )
    )
    assert not batch["attention_mask"].bool().all()
    info = make_info(batch, model.config.hidden_size, "(H,)", method)
    assert_matches_reference(model, batch, info, layer, method)


@pytest.mark.parametrize("approach", ["hook", "layer"])
@pytest.mark.parametrize("method", FORMULAS)
@pytest.mark.parametrize("layer", LAYERS)
def test_fused_layer_is_the_plain_one_combined(tiny, batch, layer, method, approach):
    """hidden_states[k] is exactly plain hidden_states[k] combined with the info; earlier ones are untouched."""
    info = make_info(batch, TINY["hidden_size"], "(B,T,H)", method)
    with torch.no_grad():
        plain = tiny(**batch, output_hidden_states=True).hidden_states
    fused, _ = fused_states(tiny, batch, info, layer=layer, method=method, approach=approach)
    assert all(torch.equal(p, f) for p, f in zip(plain[:layer], fused[:layer]))
    assert torch.equal(fused[layer], FORMULAS[method](plain[layer], as_broadcast(info, plain[layer])))
    assert all(not torch.equal(p, f) for p, f in zip(plain[layer:], fused[layer:]))


@pytest.mark.parametrize("approach", ["hook", "layer"])
def test_negative_layers_count_from_the_end(tiny, batch, approach):
    info = make_info(batch, TINY["hidden_size"], "(H,)", "addition")
    for layer in LAYERS:
        negative = layer - len(LAYERS)
        assert all(
            torch.equal(a, b)
            for a, b in zip(
                fused_states(tiny, batch, info, layer=layer, approach=approach)[0],
                fused_states(tiny, batch, info, layer=negative, approach=approach)[0],
            )
        )


@pytest.mark.parametrize("approach", ["hook", "layer"])
def test_padding_does_not_leak_into_real_tokens(tiny, approach):
    """Each example of a padded batch, fused with its own info, equals that example run alone."""
    lengths = (6, 3, 1)
    batch = padded_batch(lengths)
    info = make_info(batch, TINY["hidden_size"], "(B,H)", "addition")
    _, together = fused_states(tiny, batch, info, layer=1, approach=approach)
    for i, length in enumerate(lengths):
        alone = {key: value[i : i + 1, :length] for key, value in batch.items()}
        _, single = fused_states(tiny, alone, info[i : i + 1], layer=1, approach=approach)
        torch.testing.assert_close(together[i, :length], single[0], rtol=1e-5, atol=1e-5)


# Every method, every info shape it takes, every kind of positions: both approaches bitwise equal,
# and equal to the method's formula (tests/reference.py) applied by hand.

B, T, K, D = 3, 7, 3, 5
FIXED = {
    "addition": ("vector", {"alpha": 0.7}),
    "multiplication": ("vector", {}),
    "scale": ("none", {"alpha": 1.5}),
    "replace": ("vector", {}),
    "interpolate": ("vector", {"alpha": 0.3}),
    "ablate": ("vector", {}),
    "clamp": ("vector", {"value": 2.0}),
    "project": ("basis", {}),
    "erase": ("eraser", {}),
}
LEARNED = {"film": "vector", "gate": "vector", "concat": "vector", "cross_attention": "sequence"}
SHAPES = {
    "vector": [(D,), (B, D), (B, T, D)],
    "basis": [(K, D), (B, K, D)],
    "sequence": [(K, D), (B, K, D)],
    "eraser": [(2 * K + 1, D), (B, 2 * K + 1, D)],
    "none": [None],
}
POSITIONS = {
    "all": "all",
    "tokens": "tokens",
    "first": "first",
    "last": "last",
    "indices": [0, -1, 2],
    "mask": torch.tensor([[True, False] * 3 + [True], [False] * 7, [True] * 7]),
}


def method_cases():
    for name, (layout, args) in FIXED.items():
        for shape in SHAPES[layout]:
            yield pytest.param(name, shape, args, id=f"{name}-{shape}")
    for name, layout in LEARNED.items():
        for shape in SHAPES[layout]:
            yield pytest.param(name, shape, {}, id=f"{name}-{shape}")


def build_method(name, args, info_size):
    if name not in LEARNED:
        return name, args
    method = layerfuse.METHODS[name](hidden_size=TINY["hidden_size"], info_size=info_size, **args)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in method.parameters():
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    return method, {}


@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize(("name", "shape", "args"), list(method_cases()))
def test_every_method_matches_its_formula_at_every_kind_of_positions(name, shape, args, positions):
    model, batch = tiny_bert(), padded_batch((7, 4, 2))
    size = D if name in LEARNED else TINY["hidden_size"]
    info = None
    if shape is not None:
        info = torch.randn(*shape[:-1], size, generator=torch.Generator().manual_seed(5))
    method, args = build_method(name, args, size)
    formula = learned_formula(method) if name in LEARNED else fixed_formula(name, args)
    layout = FIXED[name][0] if name in FIXED else LEARNED[name]
    v = None if info is None else info[:, None, :] if (layout == "vector" and info.ndim == 2) else info
    chosen = chosen_positions(POSITIONS[positions], batch["attention_mask"])[..., None]

    def edit(h):
        return torch.where(chosen, formula(h, v), h)

    with torch.no_grad():
        reference = bert_forward(model, batch, layer=2, edit=edit)
    options = dict(layer=2, method=method, positions=POSITIONS[positions], **args)
    (hook_states, hook_last), (layer_states, layer_last) = (
        fused_states(model, batch, info, approach=approach, **options) for approach in ("hook", "layer")
    )
    assert torch.equal(hook_last, layer_last)
    assert all(torch.equal(h, c) for h, c in zip(hook_states, layer_states, strict=True))
    for fused, expected in zip(hook_states, reference, strict=True):
        torch.testing.assert_close(fused, expected, rtol=1e-4, atol=1e-4)
    plain = bert_forward(model, batch)[2]
    untouched = ~chosen.expand_as(plain)
    assert torch.equal(hook_states[2][untouched], plain[untouched])


@pytest.mark.parametrize("site", ["input", "attention", "mlp"])
@pytest.mark.parametrize("layer", [1, 2, 3])
def test_sites_within_a_block_match_a_hand_written_block(site, layer):
    model, batch = tiny_bert(), padded_batch()
    info = torch.randn(3, TINY["hidden_size"], generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        reference = bert_forward_with_sublayer_edit(
            model, batch, layer=layer, site=site, edit=lambda h: h + info[:, None, :]
        )
    results = [fused_states(model, batch, info, layer=layer, site=site, approach=a) for a in ("hook", "layer")]
    (hook_states, hook_last), (layer_states, layer_last) = results
    assert torch.equal(hook_last, layer_last)
    assert all(torch.equal(h, c) for h, c in zip(hook_states, layer_states, strict=True))
    for fused, expected in zip(hook_states[layer:], reference[layer:], strict=True):
        torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)
