"""Every architecture x site x approach on tiny configs with padded batches: hook and custom layer agree
bitwise, hidden_states report the fused value, nothing before the site changes, ALBERT's shared block
is fused at one pass only, and generate() keeps fusions across steps."""

from __future__ import annotations

import pytest
import torch
import transformers

import layerfuse
from architectures import ARCHITECTURES, DECODERS, build
from conftest import assert_unchanged, padded_batch, snapshot
from layerfuse.cli.inspect_model import inspect_report

SITES = ("output", "input", "attention", "mlp", "embeddings")
# transformers 4.x records these models' hidden_states inside forward, before any forward hook runs: there only
# the custom layer reports the fused value.
TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
RECORDED_INSIDE_FORWARD_IN_4X = ("llama", "mistral", "qwen2")


def outputs(model, batch):
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    main = out.logits if hasattr(out, "logits") else out.last_hidden_state
    return out.hidden_states, main


def site_layer(site: str) -> int | None:
    return None if site == "embeddings" else 0 if site == "output" else 2


@pytest.mark.parametrize("head", [False, True], ids=["base", "head"])
@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_every_site_of_every_architecture(name, site, head):
    model = build(name, head)
    batch = {key: padded_batch((6, 3, 5), vocab_size=90)[key] for key in ("input_ids", "attention_mask")}
    plain_states, plain_main = outputs(model, batch)
    before = snapshot(model)
    info = torch.randn(32, generator=torch.Generator().manual_seed(4))
    layers = [0, 1, 2, 3, -1] if site == "output" else [site_layer(site)]
    for layer in layers:
        results = {}
        for approach in ("hook", "layer"):
            with layerfuse.fuse(model, info, layer=layer, site=site, approach=approach) as fusion:
                results[approach] = outputs(model, batch)
        (hook_states, hook_main), (layer_states, layer_main) = results["hook"], results["layer"]
        assert torch.equal(hook_main, layer_main)
        assert not torch.equal(hook_main, plain_main)
        if TRANSFORMERS_5 or name not in RECORDED_INSIDE_FORWARD_IN_4X:
            assert all(torch.equal(h, c) for h, c in zip(hook_states, layer_states, strict=True))
        k = fusion.layer
        unchanged = k if site in ("output", "embeddings") else k - 1
        assert all(torch.equal(p, f) for p, f in zip(plain_states[:unchanged], layer_states[:unchanged]))
        if site in ("output", "embeddings"):
            assert torch.equal(layer_states[k], plain_states[k] + info), f"hidden_states[{k}] is not the fused value"
    assert_unchanged(model, before)


def test_albert_fuses_only_the_chosen_pass_of_its_shared_block():
    model = build("albert")
    batch = padded_batch((6, 3), vocab_size=90)
    plain, _ = outputs(model, batch)
    info = torch.randn(32)
    for approach in ("hook", "layer"):
        for layer in (1, 2, 3):
            with layerfuse.fuse(model, info, layer=layer, approach=approach):
                fused, _ = outputs(model, batch)
                again, _ = outputs(model, batch)  # the pass count starts afresh with each forward
            assert all(torch.equal(p, f) for p, f in zip(plain[:layer], fused[:layer]))
            assert torch.equal(fused[layer], plain[layer] + info)
            assert all(torch.equal(a, b) for a, b in zip(fused, again))
    for site in ("input", "attention", "mlp"):
        with layerfuse.fuse(model, info, layer=2, site=site):
            fused, _ = outputs(model, batch)
        assert torch.equal(fused[1], plain[1]) and not torch.equal(fused[2], plain[2])


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_generate_keeps_the_fusion_across_cached_steps(name):
    model = build(name, head=True)
    prompt = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    info = 3.0 * torch.randn(32, generator=torch.Generator().manual_seed(1))
    steps = 5

    def generate():
        with torch.no_grad():
            return model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=steps,
                do_sample=False,
                pad_token_id=0,
                return_dict_in_generate=True,
                output_logits=True,
            )

    plain = generate()
    results = {}
    for approach in ("hook", "layer"):
        with layerfuse.fuse(model, info, layer=2, approach=approach):
            results[approach] = generate()
    hook = results["hook"]
    assert torch.equal(hook.sequences, results["layer"].sequences)
    assert all(torch.equal(a, b) for a, b in zip(hook.logits, results["layer"].logits))
    assert not torch.allclose(hook.logits[0], plain.logits[0])
    # Without a cache, every step re-runs the whole sequence with the fusion at every position:
    # the cached generation, which fused each token at its own step, must give the same logits.
    with layerfuse.fuse(model, info, layer=2), torch.no_grad():
        for step in range(steps):
            logits = model(input_ids=hook.sequences[:, : prompt.shape[1] + step], use_cache=False).logits[:, -1]
            torch.testing.assert_close(logits, hook.logits[step], rtol=1e-4, atol=1e-4)


def test_last_position_in_generation_fuses_the_newest_token_at_every_step():
    """With a cache, "last" fuses the last real prompt token, then each new token as it is produced:
    a full recompute that fuses exactly those positions (given as a mask) gives the same logits."""
    model = build("llama", head=True)
    prompt = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])  # left-padded
    mask = (prompt != 0).long()
    info = 3.0 * torch.randn(32, generator=torch.Generator().manual_seed(2))
    steps = 4
    with layerfuse.fuse(model, info, layer=1, positions="last"), torch.no_grad():
        cached = model.generate(
            input_ids=prompt,
            attention_mask=mask,
            max_new_tokens=steps,
            do_sample=False,
            pad_token_id=0,
            return_dict_in_generate=True,
            output_logits=True,
        )
    sequence = cached.sequences
    for step in range(steps):
        length = prompt.shape[1] + step
        fused_positions = torch.zeros(2, length, dtype=torch.bool)
        fused_positions[:, prompt.shape[1] - 1 :] = True
        attention = torch.cat([mask, torch.ones(2, step, dtype=torch.long)], dim=1)
        with layerfuse.fuse(model, info, layer=1, positions=fused_positions), torch.no_grad():
            logits = model(input_ids=sequence[:, :length], attention_mask=attention, use_cache=False).logits[:, -1]
        torch.testing.assert_close(logits, cached.logits[step], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_inspect_shows_every_site_of_every_layer(name):
    report = inspect_report(build(name, head=True))
    rows = [line.split() for line in report.splitlines()[5:]]
    assert [row[0] for row in rows] == ["0", "1", "2", "3"]
    assert all("-" not in row for row in rows[1:])
    if name == "albert":
        assert "(call 3)" in report
    if name in DECODERS:  # hidden_states[N] is the final norm's output
        assert rows[3][1].rsplit(".", 1)[-1] in ("norm", "ln_f")
    if name in ("llama", "mistral", "qwen2"):  # embeddings may be bypassed by inputs_embeds: the first block's input
        assert rows[0][1:3] == [rows[1][1], "input"]
