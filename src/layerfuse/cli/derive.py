"""`layerfuse derive`: estimate a direction or an eraser from labelled texts at a layer, measure it held out, save it as a fusion.

Texts come from `--positive FILE --negative FILE` (one text a line) or from `--input FILE
--label-column NAME` (.jsonl, .csv, .parquet, read as `layerfuse run` reads them). A bad row (an empty
line, a missing label) is an error here: every text is part of what is estimated. With
`--layer all`, nothing is saved: the separation at every layer goes to `layers.csv` and `layers.png`.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

from ..errors import ArgumentValueError
from ..paths import check_writable
from .options import add_fusion_options, add_json_option, add_model_option, fusion_options

ESTIMATOR_CHOICES = ("mean_difference", "pca", "probe", "eraser")


def layer_argument(text: str) -> int | str:
    """`all` or a layer index.

    >>> layer_argument("all"), layer_argument("-1")
    ('all', -1)
    """
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a layer index nor 'all'") from None


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The `derive` command's parser."""
    parser = commands.add_parser(
        "derive",
        help="estimate a direction or an eraser from labelled texts and save it as a fusion",
        description="Read the activations of labelled texts at --layer, fit --estimator on a seeded split and "
        "measure it on the held-out part (ROC AUC of the projection, a probe's accuracy, or for the eraser a "
        "fresh probe's accuracy before and after erasure against the majority rate), then save the fusion to "
        "--output (load_fusion and 'layerfuse run --fusion' take it). --layer all measures every layer and "
        "writes layers.csv and layers.png to --output instead. Exit code 2 for bad input.",
    )
    texts = parser.add_argument_group("texts (either pair)")
    texts.add_argument("--positive", metavar="FILE", help="texts of the positive class, one a line")
    texts.add_argument("--negative", metavar="FILE", help="texts of the negative class, one a line")
    texts.add_argument("--input", metavar="FILE", help=".jsonl, .csv or .parquet with a text and a label column")
    texts.add_argument("--label-column", metavar="NAME", help="the labels' column of --input")
    texts.add_argument("--text-column", metavar="NAME", help="the texts' column of --input (default: text)")
    texts.add_argument(
        "--positive-label", metavar="LABEL", help="the class a direction points to (known for 0/1, false/true)"
    )
    add_model_option(parser)
    add_fusion_options(
        parser,
        layer="hidden_states index to read and fuse at, or 'all' to measure every layer",
        layer_type=layer_argument,
        positions="where the saved fusion fuses: all (default), tokens, first, last, or token indices",
    )
    parser.add_argument(
        "--estimator",
        action="append",
        choices=ESTIMATOR_CHOICES,
        help="mean_difference (default), pca, probe or eraser; with --layer all, repeat to compare several",
    )
    parser.add_argument(
        "--site", default="output", help="output (default), input, attention, mlp, embeddings, or a module's name"
    )
    parser.add_argument("--pooling", default="mean", choices=("mean", "first", "last"), help="over real tokens")
    parser.add_argument("--holdout", type=float, default=0.25, help="share of each class held out (default 0.25)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    parser.add_argument("--batch-size", type=int, default=32, help="texts a forward (default 32)")
    parser.add_argument("--output", "-o", required=True, metavar="DIR", help="the folder to write")
    add_json_option(parser)
    parser.set_defaults(execute=execute)


def _read_texts(path: str, *, text_column: str | None = None, label_column: str | None = None) -> list[Any]:
    """The rows of a corpus file, each a text (or a (text, label) pair): a bad row is an error."""
    from ..run.corpus import Corpus, Reject

    corpus = Corpus(path, text_column=text_column, id_column=label_column)
    rows = []
    for row in corpus.rows():
        if isinstance(row, Reject):
            where = f"line {row.row + 1}" if corpus.format == ".txt" else f"row {row.row}"
            detail = f" ({row.detail})" if row.detail else ""
            raise ArgumentValueError(f"{path}, {where}: {row.reason}{detail}; every row needs a text and its label")
        rows.append(row.text if label_column is None else (row.text, str(row.id)))
    return rows


def _labelled(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    pair, table = (args.positive, args.negative), (args.input, args.label_column)
    if (any(pair) and any(table)) or not (all(pair) or all(table)):
        raise ArgumentValueError(
            "give the texts as --positive FILE --negative FILE, or as --input FILE --label-column NAME"
        )
    if all(pair):
        positives, negatives = _read_texts(args.positive), _read_texts(args.negative)
        return positives + negatives, ["positive"] * len(positives) + ["negative"] * len(negatives)
    rows = _read_texts(args.input, text_column=args.text_column, label_column=args.label_column)
    return [text for text, _ in rows], [label for _, label in rows]


def execute(args: argparse.Namespace) -> int:
    """Derive (or measure every layer), write the folder, print the scores."""
    from ..deriving import derive, separation_by_layer
    from ..models import load_model

    fusion = fusion_options(args)
    estimators = args.estimator or ["mean_difference"]
    if args.layer is None:
        raise ArgumentValueError("--layer is needed: a layer index, or 'all' to measure every layer")
    if args.layer != "all" and len(estimators) > 1:
        raise ArgumentValueError("one --estimator a fusion; several compare only with --layer all")
    check_writable(args.output, "the output", folder=True)
    texts, labels = _labelled(args)
    model, tokenizer = load_model(args.model)
    common = dict(
        site=args.site, pooling=args.pooling, positive=args.positive_label, holdout=args.holdout, seed=args.seed
    )
    if args.layer == "all":
        if "method" in fusion or "arguments" in fusion or "positions" in fusion:
            raise ArgumentValueError(
                "--layer all measures and saves no fusion: leave out --method, its arguments and --positions"
            )
        rows = separation_by_layer(
            model, tokenizer, texts, labels, estimators=estimators, batch_size=args.batch_size, **common
        )
        written = _write_layers(rows, estimators, Path(args.output))
        print(
            json.dumps(rows)
            if args.json
            else _layers_table(rows, estimators) + f"\nwrote {', '.join(map(str, written))}"
        )
        return 0
    derived = derive(
        model,
        tokenizer,
        texts,
        labels,
        layer=args.layer,
        estimator=estimators[0],
        method=fusion.get("method"),
        arguments=fusion.get("arguments"),
        positions=fusion.get("positions", "all"),
        batch_size=args.batch_size,
        **common,
    )
    folder = derived.save(model, args.output)
    (folder / "derivation.json").write_text(json.dumps(derived.to_dict(), indent=2) + "\n")
    print(json.dumps({**derived.to_dict(), "output": str(folder)}) if args.json else _summary(derived, folder))
    return 0


def _summary(derived: Any, folder: Path) -> str:
    scores, counts, config = derived.scores, derived.counts, derived.config
    lines = [
        f"{derived.estimator} at layer {config.layer} ({config.site}), from {counts['train']} texts; "
        f"measured on {counts['held_out']} held out:"
    ]
    if "auc" in scores:
        lines.append(
            f"  ROC AUC of the projection on the direction: {scores['auc']:.3f} (towards {derived.classes[0]!r})"
        )
    if "erased_probe_accuracy" in scores:
        lines.append(
            f"  a fresh probe's accuracy: {scores['probe_accuracy']:.3f} before erasure, "
            f"{scores['erased_probe_accuracy']:.3f} after; the majority class: {scores['majority_rate']:.3f}"
        )
    elif "probe_accuracy" in scores:
        lines.append(f"  the probe's accuracy: {scores['probe_accuracy']:.3f}")
    if "direction_norm" in scores:
        ratio = scores["direction_norm"] / scores["hidden_norm"]
        lines.append(
            f"  direction norm {scores['direction_norm']:.3g}; the layer's median hidden-state norm "
            f"{scores['hidden_norm']:.3g} ({ratio:.2f} of it): alpha scales the direction"
        )
    lines.append(f"wrote {folder}: use it with layerfuse.load_fusion or 'layerfuse run --fusion {folder}'")
    return "\n".join(lines)


def _layers_table(rows: list[dict[str, Any]], estimators: list[str]) -> str:
    header = "| layer | " + " | ".join(estimators) + " |"
    lines = [header, "|---|" + "---|" * len(estimators)]
    lines += [f"| {row['layer']} | " + " | ".join(f"{row[e]['score']:.3f}" for e in estimators) + " |" for row in rows]
    return "\n".join(lines)


def _write_layers(rows: list[dict[str, Any]], estimators: list[str], folder: Path) -> list[Path]:
    """layers.csv (every score by layer and estimator) and layers.png (the headline scores by layer)."""
    from ..lab.bench.plot import require_matplotlib

    figure_class = require_matplotlib()
    folder.mkdir(parents=True, exist_ok=True)
    table = folder / "layers.csv"
    measures = sorted({m for row in rows for e in estimators for m in row[e] if m != "score"})
    with table.open("w", newline="") as file:
        writer = csv.DictWriter(file, ["layer", "estimator", "score", *measures])
        writer.writeheader()
        for row in rows:
            for estimator in estimators:
                writer.writerow({"layer": row["layer"], "estimator": estimator, **row[estimator]})
    figure = figure_class(figsize=(6, 3.8), layout="constrained")
    ax = figure.subplots()
    layers = [row["layer"] for row in rows]
    for estimator in estimators:
        measure = (
            "erased probe accuracy"
            if estimator == "eraser"
            else "AUC"
            if "auc" in rows[0][estimator]
            else "probe accuracy"
        )
        ax.plot(layers, [row[estimator]["score"] for row in rows], marker="o", label=f"{estimator} ({measure})")
    if "eraser" in estimators:
        ax.plot(
            layers,
            [row["eraser"]["majority_rate"] for row in rows],
            color="grey",
            linestyle="--",
            label="majority class",
        )
    ax.set_xlabel("layer")
    ax.set_ylabel("held-out score")
    ax.set_xticks(layers)
    ax.legend(fontsize="small")
    plot = folder / "layers.png"
    figure.savefig(plot, dpi=120)
    return [table, plot]
