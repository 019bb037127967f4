"""`fuse`: combine info into the output of a layer, by a chosen method and approach, until removed.

>>> import torch
>>> from transformers import BertConfig, BertModel
>>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)).eval()
>>> ids = torch.tensor([[1, 2, 3]])
>>> with fuse(model, torch.ones(32), FusionConfig(layer=1, method="add")) as fusion:
...     fused = model(ids, output_hidden_states=True).hidden_states[1]
>>> plain = model(ids, output_hidden_states=True).hidden_states[1]
>>> torch.equal(fused, plain + 1)
True
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from itertools import chain
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .approaches import APPROACHES, Arguments, Detach
from .config import FusionConfig, config_or_keywords
from .errors import ArchitectureError, ArgumentTypeError, ArgumentValueError, FusionStateError
from .generation import watch_generate
from .info import Info, check_tensor
from .lookups import recording, remembered_first_parameter
from .methods import METHODS, Method, make_method
from .models import transformer_of
from .outputs import split_output
from .positions import Positions, PositionsLike
from .repeats import call_key, keep, kept
from .save_guard import guard, unguard
from .sites import Site, hidden_size_at, resolve_site
from .watch import ForwardWatch, attention_mask_index

if TYPE_CHECKING:
    from .merging import Merged

ForwardState = tuple[bool, "torch.Tensor | None"]


class Fusion:
    """A fusion: `method` combines `info` into `site` of `model`, by `approach`, at `positions`.

    Made and attached by `fuse` (or `fuse_many`, `load_fusion`). A context manager; `remove()`
    detaches it and may be called any number of times.
    """

    def __init__(
        self, model: nn.Module, site: Site, method: Method, info: Info, approach: str, positions: Positions
    ) -> None:
        self.model = model
        self.site = site
        self._module = site.module  # the site holds it weakly, for the caches; a fusion keeps what it fuses
        self.method = method
        self.info = info
        self.approach = approach
        self.positions = positions
        self._watch: ForwardWatch | None = None
        self._generate: Detach | None = None
        self._detach: Detach | None = None

    @property
    def layer(self) -> int | None:
        """The index that `hidden_states` gives the fused tensor (None for a site named by module)."""
        return self.site.layer

    @property
    def config(self) -> FusionConfig:
        """The `FusionConfig` that rebuilds this fusion (with its info and, for a learned method, its parameters)."""
        name = self.method.method_name
        if METHODS.get(name) is not type(self.method):
            raise ArgumentValueError(
                f"a {type(self.method).__name__} fusion has no config: register the method with "
                "layerfuse.register_method so that a config can name it"
            )
        named = self.site.kind == "module"
        return FusionConfig(
            method=name,
            arguments=self.method.arguments(),
            layer=None if named else self.site.layer,
            site=self.site.name if named else self.site.kind,
            stack=None if named else self.site.stack,
            approach=self.approach,
            positions=self.positions.mask if self.positions.mask is not None else self.positions.value,
        )

    @property
    def active(self) -> bool:
        """Whether the fusion is attached to the model."""
        return self._detach is not None

    def attach(self) -> Fusion:
        """Attach the fusion to the model (done by `fuse`); return it.

        Refused where the model no longer holds the fused module at its name (a block replaced since
        `remove()`), whose fusion would change nothing the model runs.
        """
        if self._detach is None:
            if not self._holds_its_module():
                raise FusionStateError(
                    f"the model no longer holds the module this fusion was made for at {self.site.name} (replaced "
                    "or removed since), so attached it would change nothing the model runs: fuse the model again"
                )
            self._watch_if_needed()
            try:
                self._detach = APPROACHES[self.approach](self._module, self)
            except BaseException:
                self.remove()
                raise
            guard(self)
        return self

    def remove(self) -> None:
        """Detach the fusion, leaving the model as it was; calling it again does nothing.

        Where the model no longer holds the fused module at its name (a block replaced while the fusion
        was attached), the forwards since ran that name unfused: the fusion is detached, then says so
        with a `FusionStateError`.
        """
        unguard(self)
        detach, self._detach = self._detach, None
        if detach is not None:
            detach()
        if self._watch is not None:
            self._watch.remove()
            self._watch = None
        if self._generate is not None:
            self._generate()
            self._generate = None
        if detach is not None and not self._holds_its_module():
            raise FusionStateError(
                f"the model's module at {self.site.name} was replaced or removed while this fusion was attached "
                "to it, so the forwards since then ran without the fusion: it is removed now; replace modules "
                "before fusing, or fuse the model again after"
            )

    def _holds_its_module(self) -> bool:
        """Whether the model still holds the fused module at the site's name: seen through the `_modules` entries
        along its path (asked by every `fuse` and `remove`, so without `submodule`'s `getattr`s), or else as
        `Site.held_by` finds it."""
        found: Any = self.model
        for name in self.site.path:
            found = found._modules.get(name) if isinstance(found, nn.Module) else None
        return found is self._module or self.site.held_by(self.model)

    def set_info(self, info: torch.Tensor | None) -> None:
        """Replace the info, checked as `fuse` checks it (e.g. a new batch's per-example info)."""
        hidden_size = hidden_size_at(self.model, self.site)
        new = Info(info, layout=self.info.layout, size=self.method.info_dim(hidden_size), prepare=self.method.prepare)
        if self.info.tensor is not None:
            new.to(self.info.tensor.dtype, self.info.tensor.device)
        self.info = new
        if self.active:
            self._watch_if_needed()

    @contextmanager
    def examples_in_order(self) -> Iterator[None]:
        """Within the block, every forward holds its examples in the order of the info's rows, however it is called.

        For a caller that calls `model.forward(...)` itself and keeps the order (`layerfuse.encode` does);
        without it, per-example info refuses a direct `model.forward(...)` call, whose order it cannot know.
        """
        if self._watch is None:
            yield
            return
        self._watch.in_order += 1
        try:
            yield
        finally:
            self._watch.in_order -= 1

    def _watch_if_needed(self) -> None:
        """Watch the model's forwards if the fusion needs to know them: their mask, calls or examples' order;
        and, for per-example info, its `generate`, which repeats the examples."""
        per_example = self.info.batch_size is not None
        needed = self.positions.needs_attention_mask or self.site.call is not None or per_example
        if needed and self._watch is None:
            self._watch = ForwardWatch(
                self.model,
                needs_mask=self.positions.needs_attention_mask,
                mask_name=self.site.attention_mask,
                needs_order=per_example,
            )
        elif per_example:
            self._watch.watch_order()
        if per_example and self._generate is None:
            self._generate = watch_generate(self.model, self)

    def merge(self) -> Merged:
        """Fold the fusion into the model's parameters and detach it; `unmerge()` of the result restores them.

        See `layerfuse.merge` for what merges where.
        """
        from .merging import merge_fusion

        return merge_fusion(self)

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the fusion to `directory` (config JSON + safetensors); `load_fusion` reads it back.

        The folder is created if needed; in an existing one, a fusion saved there before is replaced and
        other files are left alone. A path that is a file is refused.
        """
        from .saving import save_fusion

        return save_fusion(self, directory)

    def apply(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Combine the info into `hidden` (B, T, H) at the chosen positions: what both approaches run.

        `attention_mask` is the current forward's, for positions that read it. The method's `forward`
        is called as a function, without `nn.Module.__call__`'s hook handling: inside a forward on CPU
        that saves 5-10 us a call.
        """
        fused = self.method.forward(hidden, self.info.for_hidden(hidden))
        chosen = self.positions.select(hidden, attention_mask)
        return fused if chosen is None else torch.where(chosen, fused, hidden)

    def forward_state(self) -> ForwardState:
        """What this call of the site needs to know of the model's current forward: whether it is the
        fused call (a shared block runs several) and, for positions that read it, the attention mask.

        A module recomputed by gradient checkpointing runs after its forward has ended; the custom
        layer hands it the state of the call it recomputes.
        """
        if self.site.call is not None:
            self._watch.calls += 1
            if self._watch.calls != self.site.call:
                return False, None
        if self.info.batch_size is not None:
            self._watch.check_rows(self.info.batch_size)
        if not self.positions.needs_attention_mask:
            return True, None
        return True, self._watch.current_mask(self.positions.value)

    def fuse_output(self, output: Any, state: ForwardState | None = None) -> Any:
        """`output` of the site's module with the fusion applied to its hidden states."""
        this_call, mask = self.forward_state() if state is None else state
        if not this_call:
            return output
        hidden, rebuild = split_output(output)
        return rebuild(self.apply(hidden, mask))

    def fuse_input(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Arguments:
        """The site's module's arguments with the fusion applied to its hidden-state input."""
        this_call, mask = self.forward_state()
        if not this_call:
            return args, kwargs
        if args:
            return (self.apply(args[0], mask), *args[1:]), kwargs
        name = self.site.input_name
        if name not in kwargs:
            raise ArchitectureError(f"cannot find the hidden states among the inputs of {self.site.name}")
        return args, {**kwargs, name: self.apply(kwargs[name], mask)}

    def __enter__(self) -> Fusion:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        shape = None if self.info.source is None else tuple(self.info.source.shape)
        stack = f"stack={self.site.stack!r}, " if self.site.stack and self.site.kind != "module" else ""
        where = f"{stack}layer={self.layer}, site={self.site.kind!r} ({self.site.name})"
        return (
            f"Fusion({where}, method={self.method!r}, info={shape}, "
            f"positions={self.positions.value!r}, approach={self.approach!r}, {state})"
        )


_LOADED: weakref.WeakSet[nn.Module] = weakref.WeakSet()
"""Models found with no weight on "meta": looked through again only once their first weight is there."""


def _first_weight(model: nn.Module) -> torch.Tensor | None:
    """The model's first parameter, after refusing weights on "meta" that no accelerate hook loads at the forward."""
    weight = remembered_first_parameter(model)
    if model in _LOADED and not (weight is not None and weight.is_meta):
        return weight
    _check_loaded(model)
    return weight


def _check_loaded(model: nn.Module) -> None:
    hooked = [name for name, module in model.named_modules() if hasattr(module, "_hf_hook")]
    for name, tensor in chain(model.named_parameters(), model.named_buffers()):
        if tensor.is_meta and not any(not prefix or name.startswith(f"{prefix}.") for prefix in hooked):
            raise ArgumentValueError(
                f"the model's weights are on the meta device with nothing to load them ({name} has no data, as "
                "under accelerate's init_empty_weights): load them first, e.g. with accelerate's "
                "load_checkpoint_and_dispatch, or model.to_empty(device=...) and load_state_dict"
            )
    if not hooked and not any(tensor.is_meta for tensor in chain(model.parameters(), model.buffers())):
        _LOADED.add(model)


def prepare_fusion(
    model: nn.Module, info: torch.Tensor | None, config: FusionConfig, *, method: Method | None = None
) -> Fusion:
    """Check everything and build the `Fusion` that `fuse` attaches; the model is not touched.

    `method`, an instance, takes the place of the one the config names (a trained or loaded one).
    A sentence-transformers model is fused in its transformer (`transformer_of`).
    """
    model = transformer_of(model)
    where = resolve_site(model, layer=config.layer, site=config.site, stack=config.stack)
    hidden_size = hidden_size_at(model, where)
    if isinstance(info, torch.Tensor):
        check_tensor(info, "info")
    info_size = info.shape[-1] if isinstance(info, torch.Tensor) and info.ndim else None
    fusion_method = method or make_method(config.method, config.arguments, hidden_size=hidden_size, info_size=info_size)
    fusion_info = Info(
        info, layout=fusion_method.info_layout, size=fusion_method.info_dim(hidden_size), prepare=fusion_method.prepare
    )
    fusion_positions = Positions(config.positions)
    if fusion_positions.needs_attention_mask:
        attention_mask_index(model, where.attention_mask)
    weight = _first_weight(model)
    fusion_method.check_dtype(weight.dtype if weight is not None and weight.is_floating_point() else torch.float32)
    if weight is not None:
        # Weights offloaded by accelerate are on "meta" until its hooks move them in: the forward moves the info.
        device = None if weight.is_meta else weight.device
        if (
            fusion_method._parameters or fusion_method._buffers or fusion_method._modules
        ):  # else `to` has nothing to move
            fusion_method.to(device=device, dtype=weight.dtype)
        fusion_info.to(weight.dtype, device)
    return Fusion(model, where, fusion_method, fusion_info, config.approach, fusion_positions)


def fuse(
    model: nn.Module,
    info: torch.Tensor | None = None,
    config: FusionConfig | None = None,
    *,
    layer: int | None = None,
    site: str | None = None,
    stack: str | None = None,
    method: str | Method | None = None,
    approach: str | None = None,
    positions: PositionsLike | None = None,
    **method_arguments: Any,
) -> Fusion:
    """Combine `info` into a layer of `model` in every forward, as `config` says, until removed.

    `model` is a Hugging Face model, or a sentence-transformers model: then its transformer is fused.

    The keywords are a shortcut for a `FusionConfig` of the same fields (give one or the other):
    `layer=k` is what `output_hidden_states` reports as `hidden_states[k]` (0: embeddings, -1: the
    last); `site` is "output" (default: that tensor), "input", "attention" or "mlp" of block k,
    "embeddings", or a module's dotted name (then no layer); `stack` is "encoder" or "decoder", the
    stack of an encoder-decoder (T5, BART) whose layer k it is; `method` is a registered name (default
    "addition"; see `layerfuse.METHODS`) with its arguments as keywords (`alpha=0.5`), or a `Method`
    instance; `approach` is "hook" (default) or "layer"; `positions` is "all" (default), "tokens",
    "first", "last", token indices or a (B, T) mask. `info` has the shapes the method takes: for
    most, (H,), (B, H) or (B, T, H). Everything is checked before the model is touched.
    """
    model = transformer_of(model)
    key = call_key(config, (method, layer, site, stack, approach, positions), method_arguments)
    found = None if key is None else kept(model, key, info)
    if found is not None:
        return Fusion(model, found.site, found.method, found.info, found.approach, found.positions).attach()
    config, instance = config_or_keywords(
        config,
        layer=layer,
        site=site,
        stack=stack,
        method=method,
        approach=approach,
        positions=positions,
        **method_arguments,
    )
    with recording(model) as reads:
        fusion = prepare_fusion(model, info, config, method=instance)
    if key is not None and instance is None:
        keep(model, key, fusion, reads, info)
    return fusion.attach()


class FusionGroup(Sequence[Fusion]):
    """Several fusions attached together, in order; a context manager that removes them all."""

    def __init__(self, fusions: Sequence[Fusion]) -> None:
        self._fusions = list(fusions)

    def __getitem__(self, index: int) -> Fusion:  # type: ignore[override]
        return self._fusions[index]

    def __len__(self) -> int:
        return len(self._fusions)

    def __iter__(self) -> Iterator[Fusion]:
        return iter(self._fusions)

    def remove(self) -> None:
        """Remove every fusion, last first; calling it again does nothing. A fusion whose module was
        replaced while attached (see `Fusion.remove`) is reported once all are removed."""
        replaced = []
        for fusion in reversed(self._fusions):
            try:
                fusion.remove()
            except FusionStateError as error:
                replaced.append(error)
        if replaced:
            raise replaced[0]

    def __enter__(self) -> FusionGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def fuse_many(model: nn.Module, fusions: Sequence[tuple[FusionConfig, torch.Tensor | None]]) -> FusionGroup:
    """Attach several fusions at once, each a `(config, info)` pair; all are checked before any is attached.

    On one module they apply in the order given.

    >>> import torch
    >>> from transformers import BertConfig, BertModel
    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37))
    >>> pairs = [(FusionConfig(layer=1), torch.ones(32)), (FusionConfig(layer=2, method="scale", arguments={"alpha": 0.5}), None)]
    >>> with fuse_many(model, pairs) as group:
    ...     len(group)
    2
    """
    if isinstance(fusions, (str, bytes, Mapping)) or not isinstance(fusions, Iterable):
        raise ArgumentTypeError(f"fuse_many takes a list of (FusionConfig, info) pairs, got a {type(fusions).__name__}")
    pairs = list(fusions)
    for pair in pairs:
        if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], FusionConfig)):
            raise ArgumentTypeError(f"fuse_many takes (FusionConfig, info) pairs, got a {type(pair).__name__}")
    prepared = [prepare_fusion(model, info, config) for config, info in pairs]
    return FusionGroup([fusion.attach() for fusion in prepared])
