"""How far merged outputs are from the hook's, on the embedded MiniLM BERT: the figures of README's "Merge and export".

For addition, ablate and clamp at every site where they merge, it fuses by hook, then merges, runs the
same padded batch and prints the largest absolute difference of any hidden state, on real tokens and
over all positions (padding included), and where it is.

    python benchmarks/bench_merge.py
"""

from __future__ import annotations

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
    batch = tokenizer(list(DEFAULT_TEXTS), return_tensors="pt", padding=True)
    real = batch["attention_mask"].bool()
    info = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    layers = model.config.num_hidden_layers
    print("| method | site | largest difference, real tokens | all positions |")
    print("|---|---|---|---|")
    for method, arguments in METHODS.items():
        sites = [("output", layer) for layer in range(layers + 1)] if method == "addition" else []
        sites += [(site, layer) for site in ("attention", "mlp") for layer in range(1, layers + 1)]
        worst: dict[str, tuple[float, int, float]] = {}
        for site, layer in sites:
            config = layerfuse.FusionConfig(method=method, arguments=arguments, layer=layer, site=site)
            with torch.no_grad():
                with layerfuse.fuse(model, info, config):
                    hooked = model(**batch, output_hidden_states=True).hidden_states
                with layerfuse.merge(model, info, config):
                    merged = model(**batch, output_hidden_states=True).hidden_states
            tokens, everywhere = largest(merged, hooked, real)
            before = worst.get(site, (-1.0, 0, 0.0))
            worst[site] = (*max(before[:2], (tokens, layer)), max(before[2], everywhere))
        for site, (tokens, layer, everywhere) in worst.items():
            print(f"| {method} | {site} (worst at layer {layer}) | {tokens:.1e} | {everywhere:.1e} |")


if __name__ == "__main__":
    main()
