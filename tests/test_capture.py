"""capture: what a site holds, checked against `output_hidden_states` and plain forward hooks pooled by hand.

`by_hand` pools each example on its own, token by token, from the attention mask: it shares no code
with `layerfuse.capture`.
"""

from __future__ import annotations

import sys
import threading

import pytest
import torch
from transformers import AutoTokenizer

import layerfuse
from architectures import build, build_encoder_decoder
from conftest import assert_unchanged, padded_batch, snapshot, tiny_bert
from layerfuse.models import embedded_model_path

COMBINATIONS = [
    (positions, pooling)
    for positions in ("tokens", "all", "first", "last")
    for pooling in ("mean", "first", "last", "none")
    if not (positions in ("first", "last") and pooling in ("first", "last"))
]
TOKENIZER = object()
"""Stands for the embedded model's tokenizer in parameters (the fixture is not there yet)."""
TEXTS = [
    "A short one.",
    "This sentence is quite a lot longer than the others, so it is padded least.",
    "Mid size here.",
]


def by_hand(hidden: torch.Tensor, mask: torch.Tensor, positions: str = "tokens", pooling: str = "mean"):
    """Each example's chosen positions of `hidden` (B, T, H), pooled, from its row of `mask` (B, T)."""
    pooled = []
    for states, row in zip(hidden, mask.tolist()):
        real = [t for t, flag in enumerate(row) if flag]
        chosen = {"all": list(range(len(row))), "tokens": real, "first": real[:1], "last": real[-1:]}[positions]
        tokens = torch.stack([states[t].float() for t in chosen])
        pooled.append({"none": tokens, "mean": tokens.mean(0), "first": tokens[0], "last": tokens[-1]}[pooling])
    return pooled if pooling == "none" else torch.stack(pooled)


def assert_close(got, expected, atol: float = 1e-5) -> None:
    if isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected)
        for one, other in zip(got, expected):
            assert one.dtype == torch.float32 and one.shape == other.shape
            torch.testing.assert_close(one, other, atol=atol, rtol=1e-5)
    else:
        assert got.dtype == torch.float32 and got.device.type == "cpu"
        torch.testing.assert_close(got, expected, atol=atol, rtol=1e-5)


def concatenated(parts: list) -> list | torch.Tensor:
    return [one for part in parts for one in part] if isinstance(parts[0], list) else torch.cat(parts)


@pytest.mark.parametrize(("positions", "pooling"), COMBINATIONS)
def test_every_layer_of_two_padded_batches_is_what_output_hidden_states_gives(positions, pooling):
    model = tiny_bert()
    batches = [padded_batch(), padded_batch((3, 5), seed=2)]
    got = layerfuse.capture(model, batches, layer=range(4), positions=positions, pooling=pooling)
    with torch.no_grad():
        states = [model(**batch, output_hidden_states=True).hidden_states for batch in batches]
    assert sorted(got) == [0, 1, 2, 3]
    for layer in range(4):
        expected = [
            by_hand(hidden[layer], batch["attention_mask"], positions, pooling)
            for hidden, batch in zip(states, batches)
        ]
        assert_close(got[layer], concatenated(expected))


def test_one_layer_gives_its_result_alone_and_the_forward_stops_after_it(tiny, batch):
    later = []
    tiny.encoder.layer[2].register_forward_hook(lambda *_: later.append(1))
    got = layerfuse.capture(tiny, batch, layer=-3, pooling="first")
    assert later == []
    with torch.no_grad():
        hidden = tiny(**batch, output_hidden_states=True).hidden_states[1]
    assert_close(got, by_hand(hidden, batch["attention_mask"], pooling="first"))


@pytest.mark.parametrize("side", ["right", "left"])
def test_texts_batched_give_what_each_text_alone_gives(minilm, monkeypatch, side):
    model, tokenizer = minilm
    monkeypatch.setattr(tokenizer, "padding_side", side)
    got = layerfuse.capture(model, TEXTS, layer=[3, -1], tokenizer=tokenizer, batch_size=2)
    tokens = layerfuse.capture(model, TEXTS, layer=3, tokenizer=tokenizer, batch_size=3, pooling="none")
    for index, text in enumerate(TEXTS):
        alone = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**alone, output_hidden_states=True).hidden_states
        for layer in (3, -1):
            assert_close(got[layer][index : index + 1], by_hand(hidden[layer], alone["attention_mask"]))
        assert_close(tokens[index : index + 1], by_hand(hidden[3], alone["attention_mask"], pooling="none"))


def test_texts_are_truncated_at_max_length(minilm):
    model, tokenizer = minilm
    got = layerfuse.capture(model, TEXTS, layer=2, tokenizer=tokenizer, max_length=6, pooling="none")
    assert [len(tokens) for tokens in got] == [min(6, len(tokenizer(text)["input_ids"])) for text in TEXTS]
    alone = tokenizer(TEXTS[1], truncation=True, max_length=6, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**alone, output_hidden_states=True).hidden_states[2]
    assert_close(got[1:2], by_hand(hidden, alone["attention_mask"], pooling="none"))


@pytest.mark.parametrize("side", ["right", "left"])
def test_a_decoder_batch_padded_on_either_side_gives_what_each_example_alone_gives(side):
    model = build("gpt2")
    examples = [torch.tensor([5, 9, 14, 3, 7]), torch.tensor([8, 2]), torch.tensor([11, 4, 6])]
    width = max(len(ids) for ids in examples)
    rows = []
    for ids in examples:
        pad = [0] * (width - len(ids))
        real = [1] * len(ids)
        rows.append((pad + ids.tolist(), pad + real) if side == "left" else (ids.tolist() + pad, real + pad))
    ids, mask = torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows])
    batch = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(1) - 1).clamp(min=0)}
    with torch.no_grad():
        alone = [model(example[None], output_hidden_states=True).hidden_states for example in examples]
    for positions, pooling in [("last", "mean"), ("tokens", "mean"), ("tokens", "none"), ("first", "none")]:
        got = layerfuse.capture(model, batch, layer=[1, 3], positions=positions, pooling=pooling)
        for layer in (1, 3):
            expected = [
                by_hand(hidden[layer], torch.ones(1, len(ex)), positions, pooling)
                for hidden, ex in zip(alone, examples)
            ]
            assert_close(got[layer], concatenated(expected))


@pytest.mark.parametrize("approach", ["hook", "layer"])
def test_a_fusion_attached_earlier_is_in_what_is_captured(approach):
    model, batch = tiny_bert(), padded_batch()
    with layerfuse.fuse(model, torch.randn(32), layer=1, approach=approach, positions="tokens", alpha=3.0):
        got = layerfuse.capture(model, batch, layer=[1, 2, 3], positions="all", pooling="none")
        with torch.no_grad():
            fused = model(**batch, output_hidden_states=True).hidden_states
    with torch.no_grad():
        plain = model(**batch, output_hidden_states=True).hidden_states
    for layer in (1, 2, 3):
        assert_close(got[layer], by_hand(fused[layer], batch["attention_mask"], "all", "none"))
        assert not torch.allclose(fused[layer], plain[layer])


def read_by_hook(model, module, batch, point="output") -> torch.Tensor:
    kept = []
    if point == "input":
        handle = module.register_forward_pre_hook(
            lambda _, args, kwargs: kept.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True
        )
    else:
        handle = module.register_forward_hook(lambda _, args, output: kept.append(output))
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        handle.remove()
    (hidden,) = kept
    return hidden[0] if isinstance(hidden, tuple) else hidden


@pytest.mark.parametrize(
    ("site", "path", "point"),
    [
        ("attention", "encoder.layer.1.attention.output.dense", "output"),
        ("mlp", "encoder.layer.1.output.dense", "output"),
        ("input", "encoder.layer.1", "input"),
    ],
)
def test_sub_layer_sites_hold_what_a_plain_hook_reads(site, path, point):
    model, batch = tiny_bert(), padded_batch()
    expected = by_hand(read_by_hook(model, model.get_submodule(path), batch, point), batch["attention_mask"])
    assert_close(layerfuse.capture(model, batch, layer=2, site=site), expected)


def test_a_module_named_as_site_holds_what_a_plain_hook_reads():
    model, batch = tiny_bert(), padded_batch()
    hidden = read_by_hook(model, model.encoder.layer[0].intermediate, batch)
    got = layerfuse.capture(model, batch, layer=None, site="encoder.layer.0.intermediate", pooling="last")
    assert_close(got, by_hand(hidden, batch["attention_mask"], pooling="last"))


def test_a_shared_block_is_read_at_each_of_its_calls():
    model, batch = build("albert"), padded_batch()
    got = layerfuse.capture(model, batch, layer=range(4))
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states
    for layer in range(4):
        assert_close(got[layer], by_hand(hidden[layer], batch["attention_mask"]))


def test_the_encoder_stack_of_an_encoder_decoder_needs_no_decoder_inputs():
    model, batch = build_encoder_decoder("t5"), padded_batch()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    got = layerfuse.capture(model, inputs, layer=range(4), stack="encoder")
    with torch.no_grad():
        hidden = model.encoder(**inputs, output_hidden_states=True).hidden_states
    for layer in range(4):
        assert_close(got[layer], by_hand(hidden[layer], batch["attention_mask"]))


def test_the_decoder_stack_reads_the_decoder_inputs_and_its_mask():
    model = build_encoder_decoder("t5")
    encoder, decoder = padded_batch(), padded_batch((2, 5, 3), seed=3)
    inputs = {
        "input_ids": encoder["input_ids"],
        "attention_mask": encoder["attention_mask"],
        "decoder_input_ids": decoder["input_ids"],
        "decoder_attention_mask": decoder["attention_mask"],
    }
    got = layerfuse.capture(model, inputs, layer=range(3), stack="decoder", pooling="last")
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).decoder_hidden_states
    for layer in range(3):
        assert_close(got[layer], by_hand(hidden[layer], decoder["attention_mask"], pooling="last"))
    with pytest.raises(layerfuse.ArgumentValueError, match="give ready batches with the inputs of its stack"):
        layerfuse.capture(model, ["a text"], layer=1, stack="decoder", tokenizer=object())


def test_forwards_in_another_thread_meanwhile_pass_the_hooks_by(tiny, batch):
    other, outputs = padded_batch((5, 6), seed=4), []

    def forward_in_another_thread(*_):
        if threading.current_thread() is threading.main_thread():
            thread = threading.Thread(target=lambda: outputs.append(tiny(**other).last_hidden_state))
            thread.start()
            thread.join()

    handle = tiny.embeddings.register_forward_hook(forward_in_another_thread)
    got = layerfuse.capture(tiny, batch, layer=1)
    handle.remove()
    with torch.no_grad():
        assert torch.equal(outputs[0], tiny(**other).last_hidden_state)
        expected = by_hand(tiny(**batch, output_hidden_states=True).hidden_states[1], batch["attention_mask"])
    assert_close(got, expected)


def test_a_model_in_training_mode_is_read_in_eval_mode_and_left_in_training_mode(batch):
    model = tiny_bert()
    with torch.no_grad():
        expected = by_hand(model(**batch, output_hidden_states=True).hidden_states[3], batch["attention_mask"])
    model.train()
    model.encoder.layer[0].eval()
    modes = [module.training for module in model.modules()]
    assert_close(layerfuse.capture(model, batch, layer=3), expected)
    assert [module.training for module in model.modules()] == modes


def test_results_are_usable_with_autograd_and_no_hook_is_left(tiny, batch):
    before = snapshot(tiny)
    got = layerfuse.capture(tiny, [batch, batch], layer=[0, 3], pooling="none")
    assert_unchanged(tiny, before)
    assert not any(tokens.is_inference() for tokens in got[3])
    (got[3][0] * torch.ones(32, requires_grad=True)).sum().backward()


def test_an_error_in_the_forward_leaves_the_model_as_it_was(tiny, batch):
    def fail(*_):
        raise RuntimeError("the forward failed")

    handle = tiny.embeddings.register_forward_hook(fail)
    tiny.train()
    before = snapshot(tiny)
    with pytest.raises(RuntimeError, match="the forward failed"):
        layerfuse.capture(tiny, batch, layer=[1, 2], site="mlp")
    assert_unchanged(tiny, before)
    assert all(module.training for module in tiny.modules())
    handle.remove()


def test_progress_shows_a_bar_on_stderr_when_asked_or_for_long_inputs_on_a_terminal(tiny, batch, capsys, monkeypatch):
    monkeypatch.setattr(sys.modules["layerfuse.capture"], "PROGRESS_BATCHES", 2)
    layerfuse.capture(tiny, [batch] * 2, layer=1, progress=True)
    assert "2/2" in capsys.readouterr().err
    layerfuse.capture(tiny, [batch] * 3, layer=1, progress=False)
    layerfuse.capture(tiny, [batch] * 3, layer=1)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    layerfuse.capture(tiny, [batch] * 2, layer=1)
    assert capsys.readouterr().err == ""
    layerfuse.capture(tiny, [batch] * 3, layer=1)
    assert "3/3" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("inputs", "options", "error", "message"),
    [
        ([], {}, layerfuse.ArgumentValueError, "inputs is empty"),
        ("one text", {"tokenizer": TOKENIZER}, layerfuse.ArgumentTypeError, "one string"),
        (["a text", 3], {"tokenizer": TOKENIZER}, layerfuse.ArgumentTypeError, r"inputs\[1\] is a int, not a str"),
        (["a text"], {}, layerfuse.ArgumentValueError, "texts need the model's tokenizer"),
        (["a text"], {"tokenizer": "a name"}, layerfuse.ArgumentTypeError, "Hugging Face tokenizer, got str"),
        (
            ["a text"],
            {"tokenizer": TOKENIZER, "max_length": 2},
            layerfuse.ArgumentValueError,
            "from 3 to this model's 64",
        ),
        (["a text"], {"tokenizer": TOKENIZER, "max_length": 65}, layerfuse.ArgumentValueError, "got 65"),
        (None, {"max_length": 8}, layerfuse.ArgumentValueError, "ready batches run as they are"),
        (None, {"layer": 5}, layerfuse.LayerIndexError, r"use 0..3 or -4..-1"),
        (None, {"layer": [1, 9]}, layerfuse.LayerIndexError, "layer 9 is out of range"),
        (None, {"layer": []}, layerfuse.ArgumentValueError, "empty sequence"),
        (None, {"layer": "all"}, layerfuse.ArgumentTypeError, "layer must be an int"),
        (None, {"layer": 0, "site": "mlp"}, layerfuse.ArgumentValueError, "no 'mlp'"),
        (
            None,
            {"pooling": "max"},
            layerfuse.ArgumentValueError,
            "unknown pooling 'max': use one of mean, first, last, none",
        ),
        (None, {"positions": [0, 1]}, layerfuse.ArgumentValueError, "unknown positions"),
        (None, {"positions": "last", "pooling": "first"}, layerfuse.ArgumentValueError, "nothing to choose from"),
        (None, {"batch_size": 0}, layerfuse.ArgumentValueError, "batch size must be a positive int"),
        (None, {"progress": "yes"}, layerfuse.ArgumentTypeError, "progress must be True, False or None"),
        ([{"input_ids": [[1, 2]]}], {}, layerfuse.ArgumentTypeError, "batch 0 is a dict"),
        ([padded_batch(), "a text"], {}, layerfuse.ArgumentTypeError, "batch 1 is a str"),
        (
            [{"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 0], [0, 0, 0]])}],
            {},
            layerfuse.ArgumentValueError,
            r"rows \[1\] of batch 0 have no real token",
        ),
    ],
)
def test_bad_input_is_refused_before_any_forward(minilm, inputs, options, error, message):
    model = tiny_bert()
    if options.get("tokenizer") is TOKENIZER:
        options = {**options, "tokenizer": minilm[1]}
    forwards = []
    model.register_forward_pre_hook(lambda *_: forwards.append(1))
    before = snapshot(model)
    with pytest.raises(error, match=message):
        layerfuse.capture(model, padded_batch() if inputs is None else inputs, **{"layer": 1, **options})
    assert forwards == []
    assert_unchanged(model, before)


def test_texts_without_a_padding_token_are_refused_unless_one_at_a_time(minilm):
    model, tokenizer = minilm[0], AutoTokenizer.from_pretrained(embedded_model_path())
    tokenizer.pad_token = None
    with pytest.raises(layerfuse.ArgumentValueError, match="no padding token"):
        layerfuse.capture(model, TEXTS, layer=1, tokenizer=tokenizer)
    assert len(layerfuse.capture(model, TEXTS, layer=1, tokenizer=tokenizer, batch_size=1)) == 3
