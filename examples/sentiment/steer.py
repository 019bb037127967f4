"""Derive a sentiment direction on the embedded MiniLM and add it to neutral sentences: README's worked example.

The direction is the mean difference of positive.txt and negative.txt at layer 3 (`layerfuse derive`);
added at alpha 0 (plain), 1, 2 and 4 to the sentences of neutral.txt, it moves their sentence
embeddings (mean pooling, normalised, as the model's sentence-transformers folder does) towards the
positive texts' centroid and away from the negative ones'; with the sign flipped, the other way.

    python examples/sentiment/steer.py
"""

from __future__ import annotations

from pathlib import Path

import torch

import layerfuse
from layerfuse.deriving import derive

HERE = Path(__file__).parent
LAYER = 3


def read(name: str) -> list[str]:
    return (HERE / name).read_text().splitlines()


def embed(model, tokenizer, texts: list[str]) -> torch.Tensor:
    """Mean over real tokens of the last hidden state, normalised: the sentence embedding."""
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None]
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def main() -> None:
    model, tokenizer = layerfuse.load_model()
    positive, negative, neutral = read("positive.txt"), read("negative.txt"), read("neutral.txt")
    derived = derive(model, tokenizer, positive + negative, ["positive"] * 40 + ["negative"] * 40, layer=LAYER)
    scores = derived.scores
    print(
        f"mean difference at layer {LAYER}: held-out ROC AUC {scores['auc']:.3f}; norm {scores['direction_norm']:.2f}, "
        f"the layer's median hidden-state norm {scores['hidden_norm']:.2f}"
    )
    centroids = {
        name: embed(model, tokenizer, texts).mean(0) for name, texts in (("positive", positive), ("negative", negative))
    }
    print("| alpha | cosine to the positive centroid | cosine to the negative centroid | positive − negative |")
    print("|---|---|---|---|")
    for alpha in (0.0, 1.0, 2.0, 4.0, -4.0):
        with layerfuse.fuse(model, derived.info, derived.config.replace(arguments={"alpha": alpha})):
            embeddings = embed(model, tokenizer, neutral)
        cosines = {
            name: float(torch.nn.functional.cosine_similarity(embeddings, c[None]).mean())
            for name, c in centroids.items()
        }
        gap = cosines["positive"] - cosines["negative"]
        print(f"| {alpha:g} | {cosines['positive']:.3f} | {cosines['negative']:.3f} | {gap:+.3f} |")


if __name__ == "__main__":
    main()
