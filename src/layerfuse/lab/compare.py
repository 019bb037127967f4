"""`compare`: fuse by hook and by custom layer on one padded batch; check they agree and time them.

>>> result = compare(layer=3, repeats=1)
>>> result.identical, result.max_abs_diff, result.fusion_change > 0
(True, 0.0, True)
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from layerfuse.approaches import APPROACHES
from layerfuse.config import FusionConfig, config_or_keywords
from layerfuse.errors import ArgumentValueError, positive_int
from layerfuse.fusion import Fusion, fuse
from layerfuse.info import example_info
from layerfuse.methods import METHODS, canonical_name
from layerfuse.models import DEFAULT_TEXTS, load_model, model_label
from layerfuse.sites import middle_layer, resolve_site

from .timing import Interleaved, time_calls
from .twins import side_by_side


@dataclass(frozen=True)
class Comparison(Interleaved):
    """What `compare` found: agreement of the approaches, the fusion's effect and median timings."""

    model: str
    layer: int
    method: str
    batch_shape: tuple[int, int]
    identical: bool
    max_abs_diff: float
    fusion_change: float
    seconds: dict[str, list[float]]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: the fields, plus median seconds and ratio to plain per variant."""
        data = asdict(self)
        data["repeats"] = self.rounds
        data["timings"] = {
            name: {"median_s": t.median, "q1_s": t.q1, "q3_s": t.q3, "ratio_to_plain": self.ratio(name).median}
            for name, t in self.timings.items()
        }
        return data

    def table(self) -> str:
        """A short human-readable report."""
        batch, tokens = self.batch_shape
        lines = [
            f"model   {self.model}",
            f"fusion  {self.method} at layer {self.layer}, padded batch of {batch} x {tokens} tokens",
            f"hook vs layer: {'identical' if self.identical else 'DIFFERENT'} (max abs diff {self.max_abs_diff:.3g})",
            f"fusion changed the output by up to {self.fusion_change:.3g} (real tokens)",
            "",
            f"{'variant':<8} {'median':>10} {'vs plain':>9}   ({self.rounds} interleaved runs)",
        ]
        lines += [
            f"{name:<8} {t.median * 1e3:>8.2f}ms {self.ratio(name).median:>8.3f}x" for name, t in self.timings.items()
        ]
        return "\n".join(lines)


def fused_batch(
    model: str | os.PathLike[str] | None, config: FusionConfig | None, texts: Sequence[str], fields: dict[str, Any]
) -> tuple[nn.Module, FusionConfig, int, dict[str, torch.Tensor]]:
    """What `compare` and `sweep_report` start from: the model loaded, its fusion's config (at the middle
    block if no layer is given), the layer that names, and the padded batch of `texts`."""
    if not texts:
        raise ArgumentValueError("texts must hold at least one text")
    network, tokenizer = load_model(model)
    if config is None and fields.get("layer") is None:
        fields = {**fields, "layer": middle_layer(network)}
    config, _ = config_or_keywords(config, **fields)
    layer = resolve_site(network, layer=config.layer, site=config.site).layer
    return network, config, layer, dict(tokenizer(list(texts), return_tensors="pt", padding=True))


def random_info(method: str, hidden_size: int, seed: int) -> torch.Tensor | None:
    """Seeded standard-normal info of the example shape of `method`'s layout with D = H: (H,), or (2, H) for a basis."""
    return example_info(METHODS[canonical_name(method)].info_layout, hidden_size, seed=seed)


def compare(
    model: str | os.PathLike[str] | None = None,
    config: FusionConfig | None = None,
    *,
    info: torch.Tensor | None = None,
    texts: Sequence[str] = DEFAULT_TEXTS,
    repeats: int = 20,
    seed: int = 0,
    **fields: Any,
) -> Comparison:
    """Run the plain forward, the hook and the custom layer on one padded batch of `texts`.

    The fusion is `config` (its approach aside), or its fields as `fuse` takes them as keywords
    (`layer=`, `method=`, `positions=`, the method's arguments); `layer` defaults to the middle
    block, `method` to addition. `info` defaults to `random_info(method, H, seed)`.
    """
    positive_int("repeats", repeats)
    network, config, layer, batch = fused_batch(model, config, texts, fields)
    if info is None:
        info = random_info(config.method, network.config.hidden_size, seed)

    def forward(**options: Any) -> Any:
        return network(**batch, **options)

    def fused(model: nn.Module, approach: str) -> Fusion:
        return fuse(model, info, config.replace(approach=approach))

    with torch.inference_mode():
        plain = forward().last_hidden_state
        states = {}
        for approach in APPROACHES:
            with fused(network, approach):
                out = forward(output_hidden_states=True)
                states[approach] = torch.stack([*out.hidden_states, out.last_hidden_state])
        hook, custom = states["hook"], states["layer"]
        real = batch["attention_mask"].bool()
        twins = {a: functools.partial(fused, approach=a) for a in APPROACHES}
        with side_by_side(network, twins) as networks:
            times = time_calls(
                {name: functools.partial(net, **batch) for name, net in networks.items()}, repeats=repeats
            )
    return Comparison(
        model=model_label(model),
        layer=layer,
        method=config.method,
        batch_shape=tuple(batch["input_ids"].shape),
        identical=torch.equal(hook, custom),
        max_abs_diff=float((hook - custom).abs().max()),
        fusion_change=float((hook[-1] - plain)[real].abs().max()),
        seconds=times,
    )
