"""`layerfuse.sweep` against K separate fused forwards, and against its bound, on the embedded MiniLM BERT.

A sweep of K infos at layer k of N blocks needs the first k blocks once: at best (k + K·(N−k)) / (K·N)
of the time of K fused forwards. For K = 8 and 32 at layers N/2 and N−1, on a padded batch, this
times both (interleaved, medians), reports the measured ratio over that bound, and checks that the
outputs agree (bit for bit, or the largest difference).

    python benchmarks/bench_sweep.py
    python benchmarks/bench_sweep.py --device cuda --dtype float16
"""

from __future__ import annotations

import argparse
import platform

import torch
import transformers

import layerfuse
from layerfuse.lab.bench import DTYPES, parse_device
from layerfuse.lab.timing import Summary, time_calls
from layerfuse.sweep import cost_bound


def padded_batch(batch: int, tokens: int, vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(tokens // 2, tokens + 1, (batch,), generator=generator)
    lengths[0] = tokens
    mask = (torch.arange(tokens)[None, :] < lengths[:, None]).long()
    ids = torch.randint(vocab // 2, vocab, (batch, tokens), generator=generator) * mask
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="8,32", help="numbers of infos K (default: 8,32)")
    parser.add_argument("--shape", default="8x64", help="batch x tokens of the padded batch (default: 8x64)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (default: 5)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="float32 (default), float16 or bfloat16")
    args = parser.parse_args()

    transformers.utils.logging.disable_progress_bar()
    device, dtype = parse_device(args.device, args.dtype)
    torch.set_num_threads(args.threads)
    model = layerfuse.load_model()[0].to(device=device, dtype=dtype)
    blocks = model.config.num_hidden_layers
    batch_size, tokens = (int(n) for n in args.shape.split("x"))
    inputs = padded_batch(batch_size, tokens, model.config.vocab_size, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {platform.machine()}, "
        f"{args.threads} threads, {args.dtype} on {device}"
    )
    print(
        f"embedded MiniLM BERT ({blocks} blocks), addition, padded batch of {batch_size} x {tokens}, "
        f"{args.rounds} interleaved rounds\n"
    )
    print("| K | layer | K fused forwards | sweep | sweep / fused | bound | over bound | outputs |")
    print("|---|---|---|---|---|---|---|---|")
    for count in (int(k) for k in args.counts.split(",")):
        infos = torch.randn(count, model.config.hidden_size, generator=torch.Generator().manual_seed(count))
        for layer in (blocks // 2, blocks - 1):

            def separate() -> torch.Tensor:
                outputs = []
                for info in infos:
                    with layerfuse.fuse(model, info, layer=layer):
                        outputs.append(model(**inputs).last_hidden_state)
                sync()
                return torch.stack(outputs)

            def swept() -> torch.Tensor:
                outputs = layerfuse.sweep(model, inputs, infos, layer=layer)
                sync()
                return outputs

            with torch.inference_mode():
                expected, got = separate(), swept()
                times = time_calls({"separate": separate, "sweep": swept}, repeats=args.rounds, warmup=1)
            difference = float((got - expected).abs().max())
            agreement = "bitwise" if torch.equal(got, expected) else f"max diff {difference:.1e}"
            fused, sweep = (Summary.of(times[name]).median for name in ("separate", "sweep"))
            ratio, bound = sweep / fused, cost_bound(layer, count, blocks)
            print(
                f"| {count} | {layer} | {fused * 1e3:.0f} ms | {sweep * 1e3:.0f} ms | {ratio:.3f} | {bound:.3f} | "
                f"{ratio / bound:.3f}x | {agreement} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
