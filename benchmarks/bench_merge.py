"""How far merged outputs are from the hook's, on the embedded MiniLM BERT: the figures of README's "Merge and export".

For addition, ablate and clamp at every site where they merge, it fuses by hook, then merges, runs the
same padded batch and prints the largest absolute difference of any hidden state, on real tokens and
over all positions (padding included), and where it is. Beside it, how far each float32 result is
from the same fusion computed in float64 (a float64 copy of the model, by hook), on real tokens:
the rounding error of float32 itself, which merging should not grow.

    python benchmarks/bench_merge.py
"""

from __future__ import annotations

import copy

import torch

import layerfuse
from layerfuse.models import DEFAULT_TEXTS

METHODS = {"addition": {"alpha": 1.0}, "ablate": {}, "clamp": {"value": 2.0}}


def largest(merged, hooked, real: torch.Tensor) -> tuple[float, float]:
    """The largest |merged - hooked| over every hidden state: on real tokens, and over all positions."""
    tokens = everywhere = 0.0
    for got, want in zip(merged, hooked, strict=True):
        difference = (got - want).abs()
        tokens = max(tokens, float(difference[real].max()))
        everywhere = max(everywhere, float(difference.max()))
    return tokens, everywhere


def main() -> None:
    model, tokenizer = layerfuse.load_model()
    exact = copy.deepcopy(model).double()
    batch = tokenizer(list(DEFAULT_TEXTS), return_tensors="pt", padding=True)
    real = batch["attention_mask"].bool()
    info = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    layers = model.config.num_hidden_layers
    print("| method | site | merged − hook, real tokens | all positions | hook − float64 | merged − float64 |")
    print("|---|---|---|---|---|---|")
    for method, arguments in METHODS.items():
        sites = [("output", layer) for layer in range(layers + 1)] if method == "addition" else []
        sites += [(site, layer) for site in ("attention", "mlp") for layer in range(1, layers + 1)]
        worst: dict[str, tuple[float, int, float, float, float]] = {}
        for site, layer in sites:
            config = layerfuse.FusionConfig(method=method, arguments=arguments, layer=layer, site=site)
            with torch.no_grad():
                with layerfuse.fuse(exact, info.double(), config):
                    truth = exact(**batch, output_hidden_states=True).hidden_states
                with layerfuse.fuse(model, info, config):
                    hooked = model(**batch, output_hidden_states=True).hidden_states
                with layerfuse.merge(model, info, config):
                    merged = model(**batch, output_hidden_states=True).hidden_states
            tokens, everywhere = largest(merged, hooked, real)
            hook_error = largest([h.double() for h in hooked], truth, real)[0]
            merged_error = largest([m.double() for m in merged], truth, real)[0]
            before = worst.get(site, (-1.0, 0, 0.0, 0.0, 0.0))
            worst[site] = (
                *max(before[:2], (tokens, layer)),
                max(before[2], everywhere),
                max(before[3], hook_error),
                max(before[4], merged_error),
            )
        for site, (tokens, layer, everywhere, hook_error, merged_error) in worst.items():
            print(
                f"| {method} | {site} (worst at layer {layer}) | {tokens:.1e} | {everywhere:.1e} "
                f"| {hook_error:.1e} | {merged_error:.1e} |"
            )


if __name__ == "__main__":
    main()
