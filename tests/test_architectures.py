"""Every architecture x site x approach on tiny configs with padded batches: hook and custom layer agree
bitwise, hidden_states report the fused value, nothing before the site changes, ALBERT's shared block
is fused at one pass only, generate() keeps fusions across steps, and each stack of an encoder-decoder
is fused where a reference hook on the module named here fuses it."""

from __future__ import annotations

import pytest
import torch
import transformers

import layerfuse
from architectures import ARCHITECTURES, DECODERS, ENCODER_DECODERS, build, build_encoder_decoder
from conftest import assert_unchanged, padded_batch, snapshot
from layerfuse.sites import KINDS, resolve_site

SITES = ("output", "input", "attention", "mlp", "embeddings")
# transformers 4.x records these models' hidden_states inside forward, before any forward hook runs: there only
# the custom layer reports the fused value.
TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
RECORDED_INSIDE_FORWARD_IN_4X = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "esm")


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


@pytest.mark.parametrize("emptied", ["albert_layer_groups", "albert_layer_groups.0.albert_layers"])
def test_albert_with_a_group_or_its_block_set_to_none_gets_a_clear_error(emptied):
    model = build("albert")
    model.get_submodule(f"encoder.{emptied}")[0] = None
    before = snapshot(model)
    for approach in ("hook", "layer"):
        with pytest.raises(layerfuse.ArchitectureError, match=f"encoder.{emptied} holds None in place of block 0"):
            layerfuse.fuse(model, torch.ones(32), layer=2, approach=approach)
    assert_unchanged(model, before)


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
def test_inspect_lists_every_site_of_every_layer(name):
    model = build(name, head=True)
    sites = layerfuse.inspect(model)
    (stack,) = sites.stacks
    assert (stack.name, len(stack.blocks), len(stack.layers), sites.hidden_size) == (None, 3, 4, 32)
    assert all(layer[kind] is not None for layer in stack.layers[1:] for kind in KINDS)
    for k, layer in enumerate(stack.layers):
        assert layer["output"] == resolve_site(model, layer=k)
    rows = [line.split() for line in repr(sites).splitlines()[6:]]
    assert [row[0] for row in rows] == ["0", "1", "2", "3"]
    if name == "albert":
        assert "(call 3)" in repr(sites)
    if name in DECODERS:  # hidden_states[N] is the final norm's output
        assert rows[3][1].rsplit(".", 1)[-1] in ("norm", "ln_f", "final_layer_norm")
    if name in ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3"):  # inputs_embeds may bypass the embeddings
        assert rows[0][1:3] == [rows[1][1], "input"]


# The module each (stack, layer) is, named here by hand: (name without the base model's prefix, point).
REFERENCE_SITES = {
    "t5": {
        "encoder": {
            0: ("encoder.block.0", "input"),
            2: ("encoder.block.1", "output"),
            3: ("encoder.final_layer_norm", "output"),
        },
        "decoder": {
            0: ("decoder.block.0", "input"),
            1: ("decoder.block.0", "output"),
            2: ("decoder.final_layer_norm", "output"),
        },
    },
    "bart": {
        "encoder": {
            0: ("encoder.layers.0", "input"),
            2: ("encoder.layers.1", "output"),
            3: ("encoder.layers.2", "output"),
        },
        "decoder": {
            0: ("decoder.layers.0", "input"),
            1: ("decoder.layers.0", "output"),
            2: ("decoder.layers.1", "output"),
        },
    },
}


def seq2seq_batch(name: str) -> dict[str, torch.Tensor]:
    """A padded encoder batch (lengths 6, 3, 5) and a padded decoder batch (lengths 4, 4, 2), of other lengths."""
    encoder = padded_batch((6, 3, 5), vocab_size=90)
    decoder = padded_batch((4, 4, 2), vocab_size=90, seed=2)
    return {
        "input_ids": encoder["input_ids"],
        "attention_mask": encoder["attention_mask"],
        "decoder_input_ids": decoder["input_ids"],
        "decoder_attention_mask": decoder["attention_mask"],
    }


def reference_fusion(module, point, edit):
    """A hook written here: `edit` the hidden states entering or leaving `module`."""
    if point == "input":
        return module.register_forward_pre_hook(lambda _, args: (edit(args[0]), *args[1:]))

    def after(_, args, output):
        return edit(output) if isinstance(output, torch.Tensor) else (edit(output[0]), *output[1:])

    return module.register_forward_hook(after)


def seq2seq_outputs(model, batch):
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    main = out.logits if hasattr(out, "logits") else out.last_hidden_state
    return out, main


@pytest.mark.parametrize("positions", ["all", "tokens"])
@pytest.mark.parametrize("stack", ["encoder", "decoder"])
@pytest.mark.parametrize("head", [False, True], ids=["base", "head"])
@pytest.mark.parametrize("name", ENCODER_DECODERS)
def test_each_stack_of_an_encoder_decoder_is_fused_where_a_reference_hook_fuses_it(name, head, stack, positions):
    model = build_encoder_decoder(name, head)
    prefix = "model." if name == "bart" and head else ""
    batch = seq2seq_batch(name)
    mask = batch["attention_mask" if stack == "encoder" else "decoder_attention_mask"].bool().unsqueeze(-1)
    plain, plain_main = seq2seq_outputs(model, batch)
    before = snapshot(model)
    info = torch.randn(32, generator=torch.Generator().manual_seed(3))

    def edit(hidden):
        return hidden + info if positions == "all" else torch.where(mask, hidden + info, hidden)

    for layer, (module_name, point) in REFERENCE_SITES[name][stack].items():
        handle = reference_fusion(model.get_submodule(prefix + module_name), point, edit)
        _, want_main = seq2seq_outputs(model, batch)
        handle.remove()
        for approach in ("hook", "layer"):
            with layerfuse.fuse(
                model, info, layer=layer, stack=stack, approach=approach, positions=positions
            ) as fusion:
                got, got_main = seq2seq_outputs(model, batch)
            assert fusion.site.name == prefix + module_name and fusion.config.stack == stack
            assert torch.equal(got_main, want_main) and not torch.equal(got_main, plain_main)
            # transformers 4.x records hidden_states[0] before the first block runs, and so before its input is fused
            if TRANSFORMERS_5 or point == "output":
                states, plain_states = (getattr(out, f"{stack}_hidden_states") for out in (got, plain))
                assert torch.equal(states[layer], edit(plain_states[layer])), f"{stack}_hidden_states[{layer}]"
            if stack == "decoder":  # the encoder is not touched
                assert torch.equal(got.encoder_last_hidden_state, plain.encoder_last_hidden_state)
    assert_unchanged(model, before)


@pytest.mark.parametrize("name", ENCODER_DECODERS)
def test_the_decoder_stack_reads_the_decoder_attention_mask_and_without_one_fuses_every_position(name):
    """ "tokens" of the decoder stack are the decoder's real tokens: its mask, never the encoder's; a forward
    given none treats every decoder position as real, as the model itself does."""
    model = build_encoder_decoder(name)
    batch = seq2seq_batch(name)
    info = torch.randn(32, generator=torch.Generator().manual_seed(5))
    unmasked = {key: value for key, value in batch.items() if key != "decoder_attention_mask"}
    with torch.no_grad():
        with layerfuse.fuse(model, info, layer=1, stack="decoder", positions="tokens"):
            tokens = model(**unmasked).last_hidden_state
        with layerfuse.fuse(model, info, layer=1, stack="decoder"):
            every = model(**unmasked).last_hidden_state
        with layerfuse.fuse(model, info, layer=1, stack="decoder", positions="last"):
            last = model(**batch, output_hidden_states=True).decoder_hidden_states[1]
        plain = model(**batch, output_hidden_states=True).decoder_hidden_states[1]
    assert torch.equal(tokens, every)
    lengths = batch["decoder_attention_mask"].sum(1)
    changed = (last != plain).any(-1)
    assert changed.tolist() == [[t == n - 1 for t in range(4)] for n in lengths.tolist()]


@pytest.mark.parametrize("name", ENCODER_DECODERS)
def test_a_module_of_a_decoder_named_by_its_path_reads_the_decoder_attention_mask(name):
    model = build_encoder_decoder(name)
    module_name = REFERENCE_SITES[name]["decoder"][1][0]
    batch = seq2seq_batch(name)
    mask = batch["decoder_attention_mask"].bool().unsqueeze(-1)
    info = torch.randn(32, generator=torch.Generator().manual_seed(6))
    handle = reference_fusion(model.get_submodule(module_name), "output", lambda h: torch.where(mask, h + info, h))
    want, _ = seq2seq_outputs(model, batch)
    handle.remove()
    with layerfuse.fuse(model, info, site=module_name, positions="tokens") as fusion:
        got, _ = seq2seq_outputs(model, batch)
    assert fusion.site.stack == "decoder" and fusion.config.stack is None
    assert torch.equal(got.last_hidden_state, want.last_hidden_state)


def test_a_single_stack_encoder_needs_no_stack():
    torch.manual_seed(0)
    config_class, _, _, arguments = ENCODER_DECODERS["t5"]
    model = transformers.T5EncoderModel(config_class(**arguments)).eval()
    batch = seq2seq_batch("t5")
    batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    mask = batch["attention_mask"].bool().unsqueeze(-1)
    info = torch.randn(32, generator=torch.Generator().manual_seed(7))
    handle = reference_fusion(model.encoder.block[1], "output", lambda h: torch.where(mask, h + info, h))
    want, _ = seq2seq_outputs(model, batch)
    handle.remove()
    for approach in ("hook", "layer"):
        for stack in (None, "encoder"):
            with layerfuse.fuse(model, info, layer=2, stack=stack, approach=approach, positions="tokens") as fusion:
                got, _ = seq2seq_outputs(model, batch)
            assert torch.equal(got.last_hidden_state, want.last_hidden_state) and fusion.config.stack == "encoder"
    assert [stack.name for stack in layerfuse.inspect(model).stacks] == ["encoder"]


def test_generate_runs_the_encoder_outside_the_models_forward_so_a_mask_reading_fusion_there_refuses():
    model = build_encoder_decoder("t5", head=True)
    ids = torch.tensor([[5, 6, 7], [8, 9, 0]])
    options = dict(input_ids=ids, attention_mask=(ids != 0).long(), max_new_tokens=2, do_sample=False)
    options.update(decoder_start_token_id=0, pad_token_id=0)
    with layerfuse.fuse(model, torch.ones(32), layer=1, stack="encoder", positions="tokens"):
        with pytest.raises(layerfuse.FusionStateError, match="ran outside one"):
            model.generate(**options)
    plain = model.generate(**options)
    with layerfuse.fuse(model, 3 * torch.ones(32), layer=1, stack="encoder"):
        assert model.generate(**options).shape == plain.shape
