"""Robustness of the core: generated calls give the reference result or a LayerfuseError and leave the model
unchanged; a thousand fuse/forward/remove cycles, most ending in an exception, leave nothing behind."""

from __future__ import annotations

import copy
import gc
import pickle
import sys
import threading
import tracemalloc
import weakref
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch.utils.hooks import RemovableHandle

import layerfuse
from conftest import POSITIONS, TINY, assert_unchanged, padded_batch, snapshot, tiny_bert
from layerfuse.methods import METHODS, method_names, register_method
from reference import bert_forward, bert_forward_with_sublayer_edit, chosen_positions, fixed_formula

H = TINY["hidden_size"]
BLOCKS = TINY["num_hidden_layers"]


def warm_bert():
    """A tiny BERT whose `hidden_states` capture hooks are installed (transformers adds them at the first use)."""
    model = tiny_bert()
    with torch.no_grad():
        model(**padded_batch(), output_hidden_states=True)
    return model


MODEL = warm_bert()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and a busy machine does not stall them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.bool, torch.complex64]
METHOD_ARGUMENTS = {"addition": ["alpha"], "multiplication": [], "interpolate": ["alpha"], "clamp": ["value"]}
MODULE_SITES = {
    f"encoder.layer.{BLOCKS - 1}": ("output", BLOCKS),
    "encoder.layer.0.output.LayerNorm": ("output", 1),
    "encoder.layer.1.output.dense": ("mlp", 2),
    "encoder.layer.0.attention.output.dense": ("attention", 1),
    "encoder.layer": None,
    "encoder": None,
    "no.such.module": None,
}
"""Modules a site may name, with the block site each one is (None: not a site that holds hidden states)."""
KINDS = ["dense", "dense", "dense", "non-contiguous", "sparse", "meta", "float8", "requires grad"]
ARGUMENTS = st.one_of(
    st.floats(-2, 2), st.sampled_from([1e39, -1e39, 10**400, float("nan"), float("inf"), True, "1", None])
)


def info_of_kind(info: torch.Tensor, kind: str) -> torch.Tensor:
    """`info` as another kind of tensor with the same values (where the kind can hold them)."""
    if kind == "non-contiguous":
        return info.mT.contiguous().mT if info.ndim >= 2 else info.repeat(2)[::2]
    if kind == "sparse":
        return info.to_sparse()
    if kind == "meta":
        return info.to("meta")
    if kind == "float8":
        return info.to(torch.float8_e4m3fn) if info.is_floating_point() else info
    if kind == "requires grad":
        return info.clone().requires_grad_(info.is_floating_point())
    return info


@st.composite
def calls(draw):
    lengths = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=3)))
    batch, width = len(lengths), max(lengths)
    sizes = st.sampled_from([H, H - 1, batch, batch + 1, width, width + 1, 1])
    shape = draw(
        st.one_of(
            st.sampled_from([(H,), (batch, H), (batch, width, H)]),
            st.lists(sizes, max_size=4).map(tuple),
        )
    )
    dtype = draw(st.sampled_from(DTYPES))
    info = torch.randn(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16)))).to(dtype)
    if info.numel() and info.is_floating_point() and draw(st.booleans()) and draw(st.booleans()):
        info.view(-1)[draw(st.integers(0, info.numel() - 1))] = draw(st.sampled_from([float("nan"), float("inf")]))
    positions = draw(
        st.one_of(
            st.sampled_from(["all", "tokens", "first", "last", "middle"]),
            st.lists(st.integers(-8, 8), min_size=1, max_size=3),
            st.tuples(st.integers(1, 4), st.integers(1, 7)).map(
                lambda size: torch.rand(size, generator=torch.Generator().manual_seed(sum(size))) > 0.5
            ),
        )
    )
    method = draw(st.sampled_from(sorted(METHOD_ARGUMENTS)))
    arguments = {name: draw(st.floats(-2, 2) | ARGUMENTS) for name in METHOD_ARGUMENTS[method]}
    site = draw(st.sampled_from(["output"] * 6 + ["input", "attention", "mlp", "embeddings", *MODULE_SITES]))
    layer = draw(st.integers(-BLOCKS - 2, BLOCKS + 1))
    kind = draw(st.sampled_from(KINDS))
    event(f"info {kind}")
    return {
        "batch": padded_batch(lengths, seed=draw(st.integers(0, 100))),
        "info": info,
        "given": info_of_kind(info, kind),
        "layer": None if site in MODULE_SITES else 0 if site == "embeddings" else layer,
        "site": site,
        "method": method,
        "arguments": arguments,
        "approach": draw(st.sampled_from(["hook", "layer"])),
        "positions": positions,
    }


def expected_states(call):
    """tests/reference.py's forward with the method's formula at the chosen positions, at the call's site."""
    formula = fixed_formula(call["method"], call["arguments"])
    chosen = chosen_positions(call["positions"], call["batch"]["attention_mask"])[..., None]

    def edit(hidden):
        info = call["info"].to(hidden.dtype)
        info = info[:, None, :] if info.ndim == 2 else info
        return torch.where(chosen, formula(hidden, info), hidden)

    site, layer = call["site"], call["layer"]
    if site in MODULE_SITES:
        site, layer = MODULE_SITES[site]
    if site in ("output", "embeddings"):
        return bert_forward(MODEL, call["batch"], layer=layer % (BLOCKS + 1), edit=edit)
    return bert_forward_with_sublayer_edit(MODEL, call["batch"], layer=layer % (BLOCKS + 1), site=site, edit=edit)


@settings(
    max_examples=300, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(calls())
def test_every_call_gives_the_reference_result_or_a_layerfuse_error(call):
    before = snapshot(MODEL)
    try:
        with (
            torch.no_grad(),
            layerfuse.fuse(
                MODEL,
                call["given"],
                layer=call["layer"],
                site=call["site"],
                method=call["method"],
                approach=call["approach"],
                positions=call["positions"],
                **call["arguments"],
            ),
        ):
            states = MODEL(**call["batch"], output_hidden_states=True).hidden_states
    except layerfuse.LayerfuseError as error:
        event(type(error).__name__)
    else:
        event("reference result")
        assert MODULE_SITES.get(call["site"], ()) is not None, f"site {call['site']!r} holds no hidden states"
        with torch.no_grad():
            expected = expected_states(call)
        # hidden_states reports a block's input as the state before it, fused or not: compare from the block on.
        start = call["layer"] % (BLOCKS + 1) if call["site"] == "input" else 0
        for got, want in zip(states[start:], expected[start:]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert_unchanged(MODEL, before)


class UserError(Exception):
    pass


def cycle(model, batch, index):
    """Fuse, run a forward, and leave the with-block by one of three ways; return the fusion."""
    approach = ("hook", "layer")[index % 2]
    positions = ("all", "tokens", "last")[index % 3]
    fusion = layerfuse.fuse(model, torch.ones(H), layer=index % (BLOCKS + 1), approach=approach, positions=positions)
    ending = index % 4
    try:
        with fusion:
            model(**batch, output_hidden_states=True)
            if ending == 1:
                raise UserError(index)
            if ending == 2:
                fusion.set_info(torch.ones(5, H))
                model(**batch)
            if ending == 3:
                raise KeyboardInterrupt
    except (UserError, layerfuse.InfoShapeError, KeyboardInterrupt):
        pass
    return fusion


def live_objects() -> Counter:
    """Live objects of layerfuse's classes, tensors and hook handles, by type."""
    counts: Counter = Counter()
    for thing in gc.get_objects():
        kind = type(thing)
        module = getattr(kind, "__module__", None)
        if (isinstance(module, str) and module.startswith("layerfuse")) or issubclass(
            kind, (torch.Tensor, RemovableHandle)
        ):
            counts[kind.__name__] += 1
    return counts


def test_a_thousand_cycles_with_exceptions_leave_no_hook_no_class_change_and_no_memory_growth():
    model, batch = warm_bert(), padded_batch()
    before = snapshot(model)
    ours = [tracemalloc.Filter(True, str(Path(layerfuse.__file__).parent / "*"))]
    with torch.no_grad():
        for index in range(100):
            cycle(model, batch, index)
        gc.collect()
        objects = live_objects()
        tracemalloc.start()
        try:
            # Compared between two points of the traced run, so that what a cache holds steadily (made
            # again in the traced part, replacing what it held before) is in both.
            fusions = [weakref.ref(cycle(model, batch, index)) for index in range(100, 550)]
            gc.collect()
            middle = tracemalloc.take_snapshot().filter_traces(ours)
            fusions += [weakref.ref(cycle(model, batch, index)) for index in range(550, 1000)]
            gc.collect()
            growth = tracemalloc.take_snapshot().filter_traces(ours).compare_to(middle, "lineno")
        finally:
            tracemalloc.stop()
    assert_unchanged(model, before)
    assert all(ref() is None for ref in fusions), "fusions are kept alive after their with-block"
    assert live_objects() == objects
    # One object kept per cycle would be at least 56 bytes a cycle (25 KB over 450); a one-time
    # allocation of a few KB (a dict growing) is not a leak.
    assert sum(stat.size_diff for stat in growth) < 24 * 450, [str(stat) for stat in growth[:3]]


@pytest.mark.parametrize("approach", ["hook", "layer"])
def test_after_the_cycles_the_model_computes_as_before(approach):
    model, batch = warm_bert(), padded_batch()
    with torch.no_grad():
        plain = model(**batch).last_hidden_state
        for index in range(50):
            cycle(model, batch, index)
        assert torch.equal(model(**batch).last_hidden_state, plain)


INFOS = {"shared": torch.ones(H), "per-example": torch.ones(3, H)}


def structure(model):
    """Each module's name, class, instance attributes and numbers of hooks: what a copy must have of the original."""
    return [
        (name, type(module), sorted(module.__dict__), len(module._forward_hooks), len(module._forward_pre_hooks))
        for name, module in model.named_modules()
    ]


@pytest.mark.parametrize("positions, info", [(name, "shared") for name in POSITIONS] + [("all", "per-example")])
@pytest.mark.parametrize("approach", ["hook", "layer"])
def test_a_fused_model_refuses_copies_and_copies_as_plain_once_removed(batch, approach, positions, info):
    # Not run with output_hidden_states: transformers' capture hooks, installed then, are local functions,
    # which no model pickles with.
    tiny = tiny_bert()
    before, plain_structure = snapshot(tiny), structure(tiny)
    with torch.no_grad():
        plain = tiny(**batch).last_hidden_state
        with layerfuse.fuse(tiny, INFOS[info], layer=2, approach=approach, positions=POSITIONS[positions]):
            fused = tiny(**batch).last_hidden_state
            for copy_of in (copy.deepcopy, pickle.dumps):
                for what in (tiny, tiny.encoder.layer[1]):
                    with pytest.raises(
                        layerfuse.FusionStateError, match=r"remove the fusion first.*model\.state_dict\(\)"
                    ):
                        copy_of(what)
            assert torch.equal(tiny(**batch).last_hidden_state, fused)
        assert not torch.equal(fused, plain)
        assert_unchanged(tiny, before)
        for twin in (copy.deepcopy(tiny), pickle.loads(pickle.dumps(tiny))):
            assert structure(twin) == plain_structure
            assert torch.equal(twin(**batch).last_hidden_state, plain)
            with layerfuse.fuse(twin, INFOS[info], layer=2, approach=approach, positions=POSITIONS[positions]):
                assert torch.equal(twin(**batch).last_hidden_state, fused)
            assert torch.equal(twin(**batch).last_hidden_state, plain)


def race(works):
    """Run each function in a thread of its own, all started at once and switching often; return what they raised."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(works))

    def run(work):
        barrier.wait()
        try:
            work()
        except BaseException as error:  # reported by the caller's assertion
            errors.append(error)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=run, args=(work,)) for work in works]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    return errors


def test_fusing_and_removing_from_several_threads_on_one_block_is_safe(tiny, batch):
    """Threads attach and remove fusions of both approaches on one block, with and without a forward running."""
    before = snapshot(tiny)
    with torch.no_grad():
        plain = tiny(**batch).last_hidden_state

    def fuse_and_remove(index, kinds):
        def work():
            for step in range(100):
                approach, positions = ("hook", "layer")[(index + step) % 2], kinds[step % len(kinds)]
                layerfuse.fuse(tiny, torch.zeros(H), layer=2, approach=approach, positions=positions).remove()

        return work

    def forwards():
        with torch.no_grad():
            for _ in range(20):
                assert torch.equal(tiny(**batch).last_hidden_state, plain)

    assert race([fuse_and_remove(index, ["all", "tokens", "last"]) for index in range(3)]) == []
    assert race([fuse_and_remove(index, ["all", [0, -1]]) for index in range(3)] + [forwards]) == []
    assert_unchanged(tiny, before)


class Shift(layerfuse.Method):
    def forward(self, hidden, info):
        return hidden + info


BAD_CALLS = {
    "a name that is no string": (
        lambda model: register_method(3)(Shift),
        layerfuse.ArgumentTypeError,
        "takes a name and a tuple of aliases, non-empty distinct strings, got 3",
    ),
    "aliases as one string": (
        lambda model: register_method("shift_test", aliases="sh")(Shift),
        layerfuse.ArgumentTypeError,
        "got 'shift_test' and 'sh'",
    ),
    "an empty name": (lambda model: register_method("")(Shift), layerfuse.ArgumentTypeError, "non-empty"),
    "a name twice": (
        lambda model: register_method("shift_test", aliases=("shift_test",))(Shift),
        layerfuse.ArgumentTypeError,
        "distinct",
    ),
    "a class registered twice": (
        lambda model: register_method("add_again")(layerfuse.Addition),
        layerfuse.ArgumentValueError,
        "Addition is already registered as 'addition': give it aliases there, or register a subclass",
    ),
    "an info_layout that is no string": (
        lambda model: register_method("shift_test")(type("Listed", (Shift,), {"info_layout": ["vector"]})),
        layerfuse.ArgumentValueError,
        r"Listed.info_layout is \['vector'\]: use one of 'vector'",
    ),
    "fuse_many of a number": (
        lambda model: layerfuse.fuse_many(model, 5),
        layerfuse.ArgumentTypeError,
        r"fuse_many takes a list of \(FusionConfig, info\) pairs, got a int",
    ),
    "fuse_many of a mapping": (
        lambda model: layerfuse.fuse_many(model, {layerfuse.FusionConfig(layer=1): torch.ones(H)}),
        layerfuse.ArgumentTypeError,
        "pairs, got a dict",
    ),
    "fuse_many of a string": (
        lambda model: layerfuse.fuse_many(model, "layer=1"),
        layerfuse.ArgumentTypeError,
        "got a str",
    ),
    "train for 1.5 epochs": (
        lambda model: train_film(model, epochs=1.5),
        layerfuse.ArgumentTypeError,
        "epochs must be a positive int, got float 1.5",
    ),
    "train at lr nan": (
        lambda model: train_film(model, lr=float("nan")),
        layerfuse.ArgumentValueError,
        "lr must be a positive finite number, got nan",
    ),
    "train at a negative lr": (
        lambda model: train_film(model, lr=-0.1),
        layerfuse.ArgumentValueError,
        "lr must be a positive finite number, got -0.1",
    ),
    "train at lr zero": (lambda model: train_film(model, lr=0), layerfuse.ArgumentValueError, "got 0"),
    "train at a string lr": (
        lambda model: train_film(model, lr="0.1"),
        layerfuse.ArgumentTypeError,
        "lr must be a positive finite number, got str '0.1'",
    ),
}


def train_film(model, **arguments):
    """Train a fresh film fusion of `model` with `arguments`; the fusion is removed after, whatever happens."""
    with layerfuse.fuse(model, torch.randn(5), layer=1, method="film") as fusion:
        batches = [(padded_batch(), None, None)]
        return layerfuse.train(fusion, batches, loss=lambda out, _: out.last_hidden_state.sum(), **arguments)


@pytest.mark.parametrize("case", BAD_CALLS)
def test_bad_arguments_to_the_api_get_a_layerfuse_error_and_change_nothing(tiny, case):
    call, kind, message = BAD_CALLS[case]
    before, methods = snapshot(tiny), dict(METHODS)
    with pytest.raises(kind, match=message):
        call(tiny)
    assert METHODS == methods and "shift_test" not in method_names()
    assert_unchanged(tiny, before)


@pytest.mark.parametrize("approach", ["hook", "layer"])
def test_forwards_in_several_threads_each_see_their_own_attention_mask(tiny, approach):
    """Each thread's forward fuses the real tokens of its own batch, while the others run theirs."""
    batches = [padded_batch(lengths, seed=index) for index, lengths in enumerate([(7, 4, 2), (2, 7, 5), (3, 3, 7)])]
    with torch.no_grad(), layerfuse.fuse(tiny, torch.ones(H), layer=2, approach=approach, positions="tokens"):
        wanted = [tiny(**batch).last_hidden_state for batch in batches]

        def forwards(batch, want):
            def work():
                with torch.no_grad():
                    for _ in range(15):
                        assert torch.equal(tiny(**batch).last_hidden_state, want)

            return work

        assert race([forwards(batch, want) for batch, want in zip(batches, wanted)]) == []
