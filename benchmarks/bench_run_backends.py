"""Fused embeddings of a corpus: `layerfuse run` (torch and onnx backends) against what users would pick instead.

Every pipeline embeds the same generated sentences (bench_run.py's) with the embedded MiniLM fused by
addition at layer 3 (a seeded random info), in batches of texts sorted by length, mean-pooled and
L2-normalised, tokenising included:

- `layerfuse run`: its `Embedder`, backend torch; and `--backend onnx` (the fusion merged, exported
  once, BERT-optimised, ONNX Runtime);
- `SentenceTransformer.encode` on the fused SentenceTransformer;
- a plain sorted-batch transformers loop on the fused model;
- ONNX Runtime on the model exported (TorchScript exporter, eager attention) with the fusion
  attached by hook: a default session, and the graph through onnxruntime's BERT optimizer; that
  graph again with the threads of `--backend onnx`'s session, which sleep between runs rather than
  spin, and with ONNX Runtime's default number of threads (every core, whatever torch's setting);
- OpenVINO with the f32 precision hint on that export, if `openvino` is installed (pip install openvino).

It needs `pip install 'layerfuse[test]'` (onnxruntime, sentence-transformers).

sentence-transformers' own ONNX backend needs optimum, whose releases pin transformers < 4.58: it
cannot be measured next to transformers 5. The corpus goes through every pipeline in chunks,
interleaved chunk by chunk with the order rotating, so drift in the machine's speed falls on each
alike; at each thread count the table gives rows/s, the ratio to `layerfuse run` (torch) over the
whole corpus and its median over chunks, and the agreement of each pipeline's embeddings with
`layerfuse run`'s (torch): the largest absolute difference and the smallest cosine.

    python benchmarks/bench_run_backends.py                       # 2000 texts, 1 and 2 threads: docs/bench_run_backends.{json,md}
    python benchmarks/bench_run_backends.py --rows 96 --chunk 48 --output /tmp/smoke   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy
import onnxruntime
import pyarrow as pa
import sentence_transformers
import torch
import torch.nn.functional as F
import transformers
from onnxruntime.transformers import optimizer
from sentence_transformers import SentenceTransformer

import layerfuse
from bench_run import sentences
from layerfuse import FusionConfig
from layerfuse.models import embedded_model_path
from layerfuse.run import Embedder
from layerfuse.run.onnx_backend import NOT_SPINNING

Pipeline = Callable[[list[str]], numpy.ndarray]
REFERENCE = "layerfuse run"
NOT_MEASURABLE = (
    "sentence-transformers' ONNX backend (`backend='onnx'`) needs optimum, whose releases pin "
    "transformers < 4.58: not measurable next to transformers 5."
)


class Wrapped(torch.nn.Module):
    """The model called by keywords, returning the last hidden state: what the exported graph computes."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return out.last_hidden_state


def export_fused(model, tokenizer, info, config, folder: Path) -> tuple[Path, Path]:
    """The model exported with the fusion attached by hook, and that graph through the BERT optimizer."""
    names = ["input_ids", "attention_mask", "token_type_ids"]
    example = tokenizer(["an example", "a longer example text"], padding=True, return_tensors="pt")
    path = folder / "fused.onnx"
    attention = model.config._attn_implementation
    model.set_attn_implementation("eager")
    with layerfuse.fuse(model, info, config), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Wrapped(model).eval(),
            tuple(example[name] for name in names),
            str(path),
            input_names=names,
            output_names=["last_hidden_state"],
            dynamic_axes={name: {0: "batch", 1: "tokens"} for name in [*names, "last_hidden_state"]},
            opset_version=17,
            dynamo=False,
        )
    model.set_attn_implementation(attention)
    heads, hidden = model.config.num_attention_heads, model.config.hidden_size
    optimized = optimizer.optimize_model(str(path), model_type="bert", num_heads=heads, hidden_size=hidden, opt_level=0)
    optimized.save_model_to_file(str(folder / "fused-optimized.onnx"))
    return path, folder / "fused-optimized.onnx"


def sorted_loop(tokenizer, forward: Callable[[dict], torch.Tensor], batch_size: int) -> Pipeline:
    """Texts sorted by length, tokenised and run batch by batch, mean-pooled and normalised, back in order."""

    def embed(texts: list[str]) -> numpy.ndarray:
        order = sorted(range(len(texts)), key=lambda i: len(tokenizer(texts[i], truncation=True, max_length=256)[0]))
        out = numpy.empty((len(texts), 384), numpy.float32)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = tokenizer(
                [texts[i] for i in rows], padding=True, truncation=True, max_length=256, return_tensors="pt"
            )
            hidden = forward(batch)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[rows] = F.normalize(pooled, dim=-1).numpy()
        return out

    return embed


def ort_forward(path: Path, threads: int | None, spinning: bool = True) -> Callable[[dict], torch.Tensor]:
    """A session on `threads` threads (None: ONNX Runtime's default, a thread per core), spinning or not between runs."""
    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    if not spinning:
        for key, value in NOT_SPINNING.items():
            options.add_session_config_entry(key, value)
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [given.name for given in session.get_inputs()]
    return lambda batch: torch.from_numpy(session.run(None, {name: batch[name].numpy() for name in names})[0])


def openvino_forward(path: Path, threads: int) -> Callable[[dict], torch.Tensor] | None:
    try:
        import openvino
    except ImportError:
        return None
    compiled = openvino.Core().compile_model(
        str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads}
    )
    names = [port.any_name for port in compiled.inputs]
    output = compiled.output(0)
    return lambda batch: torch.from_numpy(compiled({name: batch[name].numpy() for name in names})[output])


def embedder_pipeline(embedder: Embedder) -> Pipeline:
    def embed(texts: list[str]) -> numpy.ndarray:
        column = embedder(pa.table({"row": range(len(texts)), "text": texts}))["embedding"].combine_chunks()
        return column.flatten().to_numpy().reshape(len(texts), -1)

    return embed


def pipelines(threads: int, batch_size: int, info, config, exported: tuple[Path, Path]) -> dict[str, Pipeline]:
    """Every pipeline, built for `threads` threads."""
    torch.set_num_threads(threads)
    model, tokenizer = layerfuse.load_model()
    st = SentenceTransformer(embedded_model_path(), device="cpu")
    layerfuse.fuse(model, info, config)
    layerfuse.fuse(st, info, config)
    settings = {"fusion": config, "info": info, "batch_size": batch_size}

    def torch_forward(batch: dict) -> torch.Tensor:
        with torch.inference_mode():
            return model(**batch).last_hidden_state

    found = {
        REFERENCE: embedder_pipeline(Embedder.load(**settings)),
        "layerfuse run --backend onnx": embedder_pipeline(Embedder.load(**settings, backend="onnx")),
        "SentenceTransformer.encode": lambda texts: st.encode(texts, batch_size=batch_size, convert_to_numpy=True),
        "transformers, sorted batches": sorted_loop(tokenizer, torch_forward, batch_size),
        "ONNX Runtime, fused export": sorted_loop(tokenizer, ort_forward(exported[0], threads), batch_size),
        "ONNX Runtime, fused export, BERT-optimised": sorted_loop(
            tokenizer, ort_forward(exported[1], threads), batch_size
        ),
        "ONNX Runtime, BERT-optimised, threads not spinning": sorted_loop(
            tokenizer, ort_forward(exported[1], threads, spinning=False), batch_size
        ),
        "ONNX Runtime, BERT-optimised, default threads (all cores)": sorted_loop(
            tokenizer, ort_forward(exported[1], None), batch_size
        ),
    }
    openvino = openvino_forward(exported[0], threads)
    if openvino is not None:
        found["OpenVINO f32, fused export"] = sorted_loop(tokenizer, openvino, batch_size)
    return found


def measure(found: dict[str, Pipeline], texts: list[str], chunk: int) -> dict[str, dict]:
    """Each pipeline's seconds per chunk, interleaved with the order rotating, and its embeddings."""
    names = list(found)
    for name in names:  # warm-up
        found[name](texts[: min(64, len(texts))])
    seconds = {name: [] for name in names}
    outputs = {name: [] for name in names}
    for index, first in enumerate(range(0, len(texts), chunk)):
        part = texts[first : first + chunk]
        for name in names[index % len(names) :] + names[: index % len(names)]:
            start = time.perf_counter()
            outputs[name].append(found[name](part))
            seconds[name].append(time.perf_counter() - start)
    reference = numpy.concatenate(outputs[REFERENCE])
    results = {}
    for name in names:
        got = numpy.concatenate(outputs[name])
        cosine = (got * reference).sum(1) / (numpy.linalg.norm(got, axis=1) * numpy.linalg.norm(reference, axis=1))
        ratios = [mine and theirs / mine for mine, theirs in zip(seconds[name], seconds[REFERENCE])]
        results[name] = {
            "seconds": seconds[name],
            "rows_per_s": len(texts) / sum(seconds[name]),
            "ratio": sum(seconds[REFERENCE]) / sum(seconds[name]),
            "median_chunk_ratio": statistics.median(ratios),
            "max_abs": float(numpy.abs(got - reference).max()),
            "min_cosine": float(cosine.min()),
        }
    return results


def markdown(report: dict) -> str:
    lines = [
        f"{report['rows']} texts, batch {report['batch_size']}, chunks of {report['chunk']}; {report['setting']}",
        "",
        "| pipeline | threads | rows/s | × `layerfuse run` | median over chunks | max abs | min cosine |",
        "|---|---|---|---|---|---|---|",
    ]
    for threads, results in report["threads"].items():
        for name, result in results.items():
            lines.append(
                f"| {name} | {threads} | {result['rows_per_s']:.1f} | {result['ratio']:.2f} | "
                f"{result['median_chunk_ratio']:.2f} | {result['max_abs']:.1e} | {result['min_cosine']:.7f} |"
            )
    return "\n".join([*lines, "", NOT_MEASURABLE, ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000, help="sentences (default: 2000)")
    parser.add_argument("--chunk", type=int, default=250, help="rows per interleaved chunk (default: 250)")
    parser.add_argument("--batch-size", type=int, default=32, help="texts per forward (default: 32)")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts (default: 1,2)")
    parser.add_argument("--output", type=Path, default=Path("docs"), help="folder of the JSON and Markdown (docs)")
    args = parser.parse_args()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    texts = sentences(args.rows, seed=1)
    info = torch.randn(384, generator=torch.Generator().manual_seed(0))
    config = FusionConfig(layer=3, method="addition")
    versions = (
        f"torch {torch.__version__}, transformers {transformers.__version__}, sentence-transformers "
        f"{sentence_transformers.__version__}, onnxruntime {onnxruntime.__version__}"
    )
    report = {
        "rows": args.rows,
        "batch_size": args.batch_size,
        "chunk": args.chunk,
        "setting": f"{versions}, {platform.machine()}; embedded MiniLM, addition at layer 3",
        "threads": {},
    }
    with tempfile.TemporaryDirectory() as folder:
        model, tokenizer = layerfuse.load_model()
        exported = export_fused(model, tokenizer, info, config, Path(folder))
        for threads in (int(count) for count in args.threads.split(",")):
            report["threads"][threads] = measure(
                pipelines(threads, args.batch_size, info, config, exported), texts, args.chunk
            )
            print(f"{threads} thread(s) done", flush=True)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "bench_run_backends.json").write_text(json.dumps(report, indent=1) + "\n")
    table = markdown(report)
    (args.output / "bench_run_backends.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
