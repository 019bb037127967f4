"""generate with per-example info: each prompt of a padded batch gets the sequences it gets alone, with its row.

The reference generates each prompt alone, unpadded, with its info row given as one (H,) vector (no
batch dimension, so nothing is expanded); the batch is left-padded, with (B, H) info, and generate
runs every prompt num_beams or num_return_sequences times.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import layerfuse
from architectures import build
from conftest import assert_unchanged, snapshot

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
NEW = 5
MODES = {
    "greedy": dict(),
    "sample-returning-3": dict(do_sample=True, top_k=1, num_return_sequences=3),
    "beam-4-returning-2": dict(num_beams=4, num_return_sequences=2),
}


def left_padded(prompts):
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    return ids, (ids != 0).long()


def info_rows(seed: int = 3) -> torch.Tensor:
    return 4.0 * torch.randn(len(PROMPTS), 32, generator=torch.Generator().manual_seed(seed))


def generate(model, ids, mask, **mode):
    with torch.no_grad():
        return model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0, **mode
        )


def alone(model, info, mode, layer, positions):
    """Each prompt generated alone, its row of `info` fused as a vector for every example."""
    results = []
    for prompt, row in zip(PROMPTS, info):
        ids = torch.tensor([prompt])
        with layerfuse.fuse(model, row, layer=layer, positions=positions):
            results.append(generate(model, ids, torch.ones_like(ids), **mode))
    return results


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_each_prompt_gets_what_it_gets_alone(name, mode):
    model = build(name, head=True)
    ids, mask = left_padded(PROMPTS)
    info = info_rows()
    layer, positions = (2, "all") if name == "gpt2" else (1, "last")
    expected = alone(model, info, MODES[mode], layer, positions)
    runs = MODES[mode].get("num_return_sequences", 1)
    before = snapshot(model)
    with layerfuse.fuse(model, info, layer=layer, positions=positions) as fusion:
        batched = generate(model, ids, mask, **MODES[mode])
        assert fusion.info.batch_size == len(PROMPTS)  # put back after the call
    assert_unchanged(model, before)
    assert batched.shape[0] == len(PROMPTS) * runs
    for i, prompt in enumerate(PROMPTS):
        padding = ids.shape[1] - len(prompt)
        assert torch.equal(batched[i * runs : (i + 1) * runs, padding:], expected[i].expand(runs, -1)), i


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_the_rows_of_the_info_matter(name):
    """Each prompt generates something else with another prompt's row, so the test above sees a misplaced row."""
    model = build(name, head=True)
    layer, positions = (2, "all") if name == "gpt2" else (1, "last")
    info = info_rows()
    mode = MODES["beam-4-returning-2"]
    expected, swapped = (
        alone(model, info, mode, layer, positions),
        alone(model, info[[1, 2, 0]], mode, layer, positions),
    )
    assert all(not torch.equal(a, b) for a, b in zip(expected, swapped))


def test_info_given_one_row_per_run_is_used_as_it_is():
    model = build("gpt2", head=True)
    ids, mask = left_padded(PROMPTS)
    info = info_rows()
    with layerfuse.fuse(model, info, layer=2):
        expected = generate(model, ids, mask, num_beams=3, num_return_sequences=2)
    with layerfuse.fuse(model, info.repeat_interleave(3, dim=0), layer=2):
        assert torch.equal(generate(model, ids, mask, num_beams=3, num_return_sequences=2), expected)


def test_info_that_fits_neither_the_prompts_nor_the_runs_is_refused_and_put_back():
    model = build("gpt2", head=True)
    ids, mask = left_padded(PROMPTS[:2])
    before = snapshot(model)
    with layerfuse.fuse(model, info_rows(), layer=2) as fusion:
        with pytest.raises(layerfuse.InfoShapeError, match=r"3 rows, but generate was given 2 prompts, each run 4"):
            generate(model, ids, mask, num_beams=4)
        assert fusion.info.batch_size == 3 and "_expand_inputs_for_generation" not in model.__dict__
    assert_unchanged(model, before)


def test_an_error_inside_generate_puts_the_info_back():
    model = build("llama", head=True)
    ids, mask = left_padded(PROMPTS)

    def fail(input_ids, scores):
        raise KeyboardInterrupt

    with layerfuse.fuse(model, info_rows(), layer=1) as fusion:
        with pytest.raises(KeyboardInterrupt):
            generate(model, ids, mask, num_beams=2, logits_processor=[fail])
        assert fusion.info.batch_size == 3 and "_expand_inputs_for_generation" not in model.__dict__
        with torch.no_grad():  # a forward after the failed call takes the info as given again
            model(input_ids=ids, attention_mask=mask)


def test_per_token_info_is_refused_by_a_decoder_only_generate():
    model = build("gpt2", head=True)
    ids, mask = left_padded(PROMPTS)
    before = snapshot(model)
    with layerfuse.fuse(model, torch.randn(3, ids.shape[1], 32), layer=2):
        with pytest.raises(layerfuse.InfoShapeError, match=r"per-token info \(3, 5, D\) covers the 5 tokens of one"):
            generate(model, ids, mask)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)  # one forward of those tokens takes it
    assert_unchanged(model, before)


def encoder_decoder(name: str):
    """A tiny BART or T5, and the module names of one encoder block and one decoder block."""
    torch.manual_seed(0)
    if name == "bart":
        config = transformers.BartConfig(
            vocab_size=99,
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=37,
            decoder_ffn_dim=37,
            max_position_embeddings=64,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=2,
            forced_eos_token_id=None,
        )
        return (
            transformers.BartForConditionalGeneration(config).eval(),
            "model.encoder.layers.1",
            "model.decoder.layers.0",
        )
    config = transformers.T5Config(
        vocab_size=99,
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return transformers.T5ForConditionalGeneration(config).eval(), "encoder.block.1", "decoder.block.0"


@pytest.mark.parametrize("stack", ["encoder", "decoder"])
@pytest.mark.parametrize("name", ["bart", "t5"])
def test_encoder_decoders_expand_the_info_for_the_decoder(name, stack):
    """generate runs the encoder on the B prompts, then the decoder on B·n rows: either stack's fusion fits."""
    model, encoder_site, decoder_site = encoder_decoder(name)
    site = encoder_site if stack == "encoder" else decoder_site
    width = max(map(len, PROMPTS))
    ids = torch.tensor([p + [0] * (width - len(p)) for p in PROMPTS])  # an encoder pads on the right
    info = info_rows()
    mode = MODES["beam-4-returning-2"]
    expected = []
    for prompt, row in zip(PROMPTS, info):
        with layerfuse.fuse(model, row, site=site):
            expected.append(generate(model, torch.tensor([prompt]), None, **mode))
    before = snapshot(model)
    with layerfuse.fuse(model, info, site=site):
        batched = generate(model, ids, (ids != 0).long(), **mode)
    assert_unchanged(model, before)
    assert torch.equal(batched, torch.cat(expected))
    with layerfuse.fuse(model, info[[1, 2, 0]], site=site):
        assert not torch.equal(generate(model, ids, (ids != 0).long(), **mode), batched)


def test_per_token_info_fuses_the_encoder_of_an_encoder_decoder():
    """The encoder runs once, on the prompts' tokens: per-token info fits it, with beams too."""
    model, site, _ = encoder_decoder("bart")
    width = max(map(len, PROMPTS))
    ids = torch.tensor([p + [0] * (width - len(p)) for p in PROMPTS])
    info = 4.0 * torch.randn(len(PROMPTS), width, 32, generator=torch.Generator().manual_seed(4))
    mode = MODES["beam-4-returning-2"]
    expected = []
    for i, prompt in enumerate(PROMPTS):
        with layerfuse.fuse(model, info[i : i + 1, : len(prompt)], site=site):
            expected.append(generate(model, torch.tensor([prompt]), None, **mode))
    with layerfuse.fuse(model, info, site=site):
        fused = generate(model, ids, (ids != 0).long(), **mode)
    assert torch.equal(fused, torch.cat(expected))
    assert not torch.equal(fused, generate(model, ids, (ids != 0).long(), **mode))
