"""Resolving layers, sites and stacks to the modules whose inputs or outputs a fusion edits; module sites on
models without a config; sites that could never run refused."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

import layerfuse
from architectures import build_encoder_decoder
from conftest import TINY, assert_unchanged, padded_batch, snapshot
from layerfuse import FusionConfig
from layerfuse.sites import find_blocks, resolve_site


def test_layer_zero_is_the_first_blocks_input_and_k_the_kth_blocks_output(tiny):
    zero = resolve_site(tiny, layer=0)
    assert zero.module is tiny.embeddings and zero.point == "output"
    embeddings = resolve_site(tiny, site="embeddings")
    assert (embeddings.layer, embeddings.module, embeddings.point) == (0, tiny.embeddings, "output")
    for k in range(1, 4):
        site = resolve_site(tiny, layer=k)
        assert site.module is tiny.encoder.layer[k - 1] and site.name == f"encoder.layer.{k - 1}"
        assert site.point == "output" and site.call is None
    assert resolve_site(tiny, layer=-1).layer == 3 and resolve_site(tiny, layer=-4).layer == 0


def test_sites_within_a_block(tiny):
    block = tiny.encoder.layer[1]
    assert resolve_site(tiny, layer=2, site="input").module is block
    assert resolve_site(tiny, layer=2, site="input").point == "input"
    assert resolve_site(tiny, layer=2, site="attention").module is block.attention.output.dense
    assert resolve_site(tiny, layer=2, site="mlp").module is block.output.dense
    named = resolve_site(tiny, site="encoder.layer.1.intermediate")
    assert named.module is block.intermediate and named.layer is None and named.kind == "module"


def test_models_with_heads_are_resolved_through_their_base_model(batch):
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**TINY)).eval()
    assert [block.name for block in find_blocks(model)] == [f"bert.encoder.layer.{i}" for i in range(3)]
    assert resolve_site(model, layer=3, site="mlp").name == "bert.encoder.layer.2.output.dense"
    with torch.no_grad():
        plain = model(**batch).logits
        with layerfuse.fuse(model, torch.ones(TINY["hidden_size"]), layer=2, approach="layer"):
            fused = model(**batch).logits
    assert not torch.equal(plain, fused)


class NoBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = BertConfig(**TINY)
        self.linear = nn.Linear(32, 32)


class TwoStacks(NoBlocks):
    def __init__(self) -> None:
        super().__init__()
        self.config.model_type = "two-stacks"
        self.encoder = nn.ModuleList(nn.Linear(32, 32) for _ in range(3))
        self.decoder = nn.ModuleList(nn.Linear(32, 32) for _ in range(3))


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (nn.Linear(4, 4), "cannot locate the blocks of Linear: expected a Hugging Face transformers model"),
        (NoBlocks(), "num_hidden_layers=3 blocks, found none; name the module to fuse instead"),
        (TwoStacks(), "found encoder, decoder"),
    ],
)
def test_architectures_without_findable_blocks_get_a_clear_error(model, message):
    with pytest.raises(layerfuse.ArchitectureError, match=message):
        layerfuse.fuse(model, torch.ones(32), layer=1)


@pytest.mark.parametrize("approach", ["hook", "layer"])
def test_a_list_of_blocks_holding_none_gets_a_clear_error_and_the_model_stays_as_it_was(tiny, approach):
    tiny.encoder.layer[1] = None
    before = snapshot(tiny)
    for layer in (1, 2, 3):  # before, at and after the missing block
        with pytest.raises(layerfuse.ArchitectureError, match="encoder.layer holds None in place of block 1"):
            layerfuse.fuse(tiny, torch.ones(32), layer=layer, approach=approach)
    assert_unchanged(tiny, before)


def test_a_named_module_works_where_blocks_cannot_be_found():
    model = TwoStacks()
    with layerfuse.fuse(model, torch.ones(32), site="decoder.1") as fusion:
        with torch.no_grad():
            torch.testing.assert_close(model.decoder[1](torch.zeros(1, 32)), model.decoder[1].bias[None] + 1)
    assert fusion.layer is None


BAD_SITES = {
    "unknown site": (
        dict(layer=1, site="ffn"),
        layerfuse.ArgumentValueError,
        "unknown site 'ffn': use one of output, input, attention, mlp, embeddings",
    ),
    "module and layer": (
        dict(layer=1, site="encoder.layer.0"),
        layerfuse.ArgumentValueError,
        "if 'encoder.layer.0' is a module name, it takes no layer",
    ),
    "no layer": (dict(site="mlp"), layerfuse.ArgumentValueError, "site 'mlp' needs a layer"),
    "embeddings at 2": (dict(layer=2, site="embeddings"), layerfuse.ArgumentValueError, "site 'embeddings' is layer 0"),
    "input of layer 0": (
        dict(layer=0, site="input"),
        layerfuse.ArgumentValueError,
        "layer 0 is the embeddings' output, it has no 'input'",
    ),
    "site not a string": (dict(layer=1, site=3), layerfuse.ArgumentTypeError, "site must be a string"),
    "a module list": (
        dict(site="encoder.layer"),
        layerfuse.ArgumentValueError,
        r"site 'encoder.layer' is a ModuleList, which has no forward of its own and so is never called: "
        r"name one of its modules, e.g. site='encoder.layer.0'",
    ),
    "a stack of a model of one": (
        dict(layer=1, stack="encoder"),
        layerfuse.ArgumentValueError,
        "BertModel has one stack of blocks, not named: leave stack unset",
    ),
    "unknown stack": (dict(layer=1, stack="middle"), layerfuse.ArgumentValueError, "unknown stack 'middle': use"),
    "module and stack": (
        dict(site="encoder.layer.0", stack="encoder"),
        layerfuse.ArgumentValueError,
        "is a module name, whose path says where it is: it takes no stack",
    ),
}


@pytest.mark.parametrize("case", BAD_SITES)
def test_bad_sites_get_clear_errors_and_touch_nothing(tiny, case):
    options, error, message = BAD_SITES[case]
    before = snapshot(tiny)
    with pytest.raises(error, match=message):
        layerfuse.fuse(tiny, torch.ones(32), **options)
    assert_unchanged(tiny, before)


def test_positions_that_need_the_attention_mask_refuse_a_model_without_one():
    model = TwoStacks()
    before = snapshot(model)
    with pytest.raises(
        layerfuse.ArchitectureError, match="forward takes no attention_mask: give token indices or a boolean mask"
    ):
        layerfuse.fuse_many(
            model,
            [
                (FusionConfig(site="decoder.0"), torch.ones(32)),
                (FusionConfig(site="decoder.1", positions="tokens"), torch.ones(32)),
            ],
        )
    assert_unchanged(model, before)


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_an_encoder_decoder_refuses_to_guess_the_stack(name):
    model = build_encoder_decoder(name, head=True)
    before = snapshot(model)
    with pytest.raises(
        layerfuse.ArgumentValueError,
        match="has 2 stacks of blocks, encoder and decoder: choose one with stack='encoder' or stack='decoder'",
    ):
        layerfuse.fuse(model, torch.ones(32), layer=1)
    with pytest.raises(layerfuse.LayerIndexError, match="out of range for a 2-block decoder stack: use 0..2"):
        layerfuse.fuse(model, torch.ones(32), layer=3, stack="decoder")
    assert_unchanged(model, before)


def test_a_model_of_one_named_stack_has_no_other():
    model = build_encoder_decoder("t5").encoder
    encoder_only = transformers.T5EncoderModel(model.config)
    with pytest.raises(layerfuse.ArgumentValueError, match="T5EncoderModel has no decoder stack: use stack='encoder'"):
        layerfuse.fuse(encoder_only, torch.ones(32), layer=1, stack="decoder")


def test_a_module_in_neither_stack_refuses_positions_that_read_a_mask():
    """The shared embeddings run in both stacks, each with a mask of its own: which one is this site's is not known."""
    model = build_encoder_decoder("t5")
    before = snapshot(model)
    with pytest.raises(layerfuse.ArchitectureError, match="in none or both of the stacks of T5Model"):
        layerfuse.fuse(model, torch.ones(32), site="shared", positions="tokens")
    assert_unchanged(model, before)


def test_the_stack_is_part_of_the_config_and_of_a_saved_fusion(tmp_path):
    config = FusionConfig(layer=1, stack="decoder", positions="tokens")
    assert config.to_dict()["stack"] == "decoder" and FusionConfig.from_dict(config.to_dict()) == config
    older = {key: value for key, value in config.to_dict().items() if key != "stack"}
    assert FusionConfig.from_dict(older).stack is None
    model = build_encoder_decoder("bart", head=True)
    ids = padded_batch((5, 3), vocab_size=90)
    batch = {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"]}
    info = torch.randn(32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with layerfuse.fuse(model, info, config) as fusion:
            fused = model(**batch).logits
            assert fusion.config == config
            fusion.save(tmp_path / "saved")
        assert layerfuse.load_config(tmp_path / "saved") == config
        with layerfuse.load_fusion(tmp_path / "saved", model):
            loaded = model(**batch).logits
    assert torch.equal(fused, loaded)


def test_a_module_of_a_model_without_a_config_takes_its_width_from_its_type():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x, info = torch.randn(3, 5, 8), torch.randn(16)
    with torch.no_grad():
        want = model[2](model[1](model[0](x) + info))
        for approach in ("hook", "layer"):
            with layerfuse.fuse(model, info, site="0", approach=approach):
                assert torch.equal(model(x), want)


def test_a_wrapped_transformers_model_is_fused_by_the_path_of_its_module(tiny, batch):
    """DataParallel, or an nn.Sequential holding the model: the hidden size is that of the model the site is in."""
    wrapped = nn.DataParallel(tiny)
    info = torch.randn(32, generator=torch.Generator().manual_seed(2))

    def add(_, args, output):  # a tensor on transformers 5, a tuple on 4
        return output + info if isinstance(output, torch.Tensor) else (output[0] + info, *output[1:])

    handle = tiny.encoder.layer[1].register_forward_hook(add)
    with torch.no_grad():
        want = tiny(**batch).last_hidden_state
    handle.remove()
    before = snapshot(tiny)
    for approach in ("hook", "layer"):
        with layerfuse.fuse(wrapped, info, site="module.encoder.layer.1", approach=approach), torch.no_grad():
            assert torch.equal(wrapped(**batch).last_hidden_state, want)
    assert_unchanged(tiny, before)


def test_a_module_whose_width_cannot_be_known_gets_a_clear_error():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
    before = snapshot(model)
    with pytest.raises(layerfuse.ArchitectureError, match=r"cannot tell the hidden size at site '1' \(ReLU\)"):
        layerfuse.fuse(model, torch.ones(16), site="1")
    assert_unchanged(model, before)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.trace_method` is deprecated:DeprecationWarning")
def test_a_traced_module_is_refused_since_its_compiled_forward_runs_no_hooks():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
    traced = torch.jit.trace(model, torch.randn(2, 8))
    with pytest.raises(layerfuse.ArchitectureError, match="TorchScript module, whose compiled forward runs no"):
        layerfuse.fuse(traced, torch.ones(16), site="0")


class ReturnsNoHiddenStates(nn.Module):
    def forward(self, hidden):
        return {"norm": hidden.norm()}


def test_a_module_that_returns_no_hidden_states_is_refused_at_its_forward():
    model = nn.Sequential(nn.Linear(8, 8), ReturnsNoHiddenStates())
    model[1].config = BertConfig(hidden_size=8)
    for approach in ("hook", "layer"):
        with layerfuse.fuse(model, torch.ones(8), site="1", approach=approach):
            with pytest.raises(layerfuse.ArchitectureError, match="cannot find the hidden states in a module output"):
                model(torch.randn(2, 3, 8))


def test_xlnet_layers_are_refused_since_its_hidden_states_are_tokens_first():
    torch.manual_seed(0)
    config = transformers.XLNetConfig(vocab_size=99, d_model=32, n_layer=2, n_head=4, d_inner=37)
    model = transformers.XLNetModel(config).eval()
    before = snapshot(model)
    with pytest.raises(layerfuse.ArchitectureError, match=r"\(tokens, batch, hidden\), not \(batch, tokens, hidden\)"):
        layerfuse.fuse(model, torch.ones(32), layer=1)
    assert_unchanged(model, before)
