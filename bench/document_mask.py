"""Training tokens/s with document masking on and off, on packed windows (sequence 2048 by default, CPU).

    python bench/document_mask.py [--seq-len 2048] [--pairs 7] [--device cpu|cuda] [--out PATH]

The model is configs/tiny-cpu.yaml (hidden 128, 4 layers, 4 query / 2 key-value heads, (8+4) experts) at the
benchmark's sequence length. Windows are cut from a stream of generated documents (random tokens, each document
followed by EOD), as the loader packs them, for two document-length cases: `web-like` (lognormal lengths, median
400 tokens, sigma 1.2, so a mean of about 830: several documents per window, as in web text) and `one-document`
(no EOD: every window lies inside one document, so masking saves no work and only its overhead shows).

Variants, each with its own model (same initial weights) and optimizer, trained by train.step.train_step on the
same batches: `off` (causal over the whole window), `on` (data.document_mask + reset_position_ids + eod_mask_loss
with the device's default kernel) and `on, dense mask` (the same with SDPA and a [B, 1, S, S] boolean mask, the
reference kernel). Every round runs one step of each variant back to back, in a rotating order, on one batch, so
all of them see the same machine load; the cost of masking is the ratio of the median step times minus one.
Prints the table and writes bench/results/document_mask_DEVICE.json. Never run by the tests at this size
(tests/test_document_mask.py runs it once at a tiny size).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from bench.report import add_out_argument, print_table, write_results

ROOT = Path(__file__).resolve().parents[1]
EOD = 2
CASES = ("web-like", "one-document")
VARIANTS = ("off", "on", "on, dense mask")


def packed_windows(case: str, rows: int, seq_len: int, vocab: int, rng: np.random.Generator) -> torch.Tensor:
    """[rows, seq_len + 1] windows cut back to back from a stream of documents (the last token of one window
    starts the next, as data/loader.py cuts them)."""
    need = rows * seq_len + 1
    if case == "one-document":
        return torch.from_numpy(_windows(rng.integers(EOD + 1, vocab, need), rows, seq_len))
    parts, total = [], 0
    while total < need:
        n = max(1, int(rng.lognormal(np.log(400), 1.2)))
        parts += [rng.integers(EOD + 1, vocab, n), [EOD]]
        total += n + 1
    return torch.from_numpy(_windows(np.concatenate(parts), rows, seq_len))


def _windows(stream: np.ndarray, rows: int, seq_len: int) -> np.ndarray:
    return np.stack([stream[i * seq_len : i * seq_len + seq_len + 1] for i in range(rows)]).astype(np.int64)


def measure_case(case: str, args: argparse.Namespace, device: torch.device) -> dict:
    from data.packing import DocumentPacking
    from model.transformer import Decoder
    from train.config_load import load_config
    from train.optim import build_optimizer
    from train.step import autocast_context, train_step

    cfg = load_config(
        ROOT / "configs/tiny-cpu.yaml",
        [f"data.seq_len={args.seq_len}", f"model.max_seq_len={args.seq_len}"],
    )
    packing = DocumentPacking(EOD, mask_attention=True, reset_positions=True, mask_loss=True)
    amp = autocast_context(device, cfg.train.dtype)
    runs = {}
    for variant in VARIANTS:
        torch.manual_seed(cfg.train.seed)
        model = Decoder(cfg.model, cfg.moe).to(device)
        model.document_kernel = "dense" if variant == "on, dense mask" else "auto"
        runs[variant] = (model, build_optimizer(model, cfg.optim), None if variant == "off" else packing)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rng = np.random.default_rng(0)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu_times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    docs_per_window = []
    for round_ in range(args.warmup + args.pairs):
        batch = packed_windows(case, args.batch, args.seq_len, cfg.model.vocab_size, rng)
        docs_per_window += (1 + (batch[:, :-1] == EOD).sum(1)).tolist()
        micro = [m.to(device) for m in batch.split(args.micro_batch)]
        order = VARIANTS[round_ % 3 :] + VARIANTS[: round_ % 3]
        for variant in order:
            model, optimizer, documents = runs[variant]
            sync()
            start, cpu_start = time.perf_counter(), time.process_time()
            train_step(model, optimizer, micro, cfg.optim.clip_grad, amp, documents=documents)
            sync()
            if round_ >= args.warmup:
                times[variant].append(time.perf_counter() - start)
                cpu_times[variant].append(time.process_time() - cpu_start)
    tokens = args.batch * args.seq_len
    off, cpu_off = statistics.median(times["off"]), statistics.median(cpu_times["off"])
    rows = []
    for variant in VARIANTS:
        median = statistics.median(times[variant])
        paired = [t / o for t, o in zip(times[variant], times["off"], strict=True)]
        rows.append(
            {
                "variant": variant,
                "step_s_median": median,
                "tokens_per_s": tokens / median,
                "ratio_of_medians": median / off,
                "median_of_paired_ratios": statistics.median(paired),
                "cpu_ratio_of_medians": statistics.median(cpu_times[variant]) / cpu_off,
                "step_s_all": times[variant],
                "cpu_s_all": cpu_times[variant],
            }
        )
    return {"case": case, "docs_per_window_mean": float(np.mean(docs_per_window)), "variants": rows}


def results_table(results: list[dict]) -> tuple[list[str], list[list[str]]]:
    rows = [
        [
            r["case"],
            f"{r['docs_per_window_mean']:.1f}",
            v["variant"],
            f"{v['step_s_median']:.3f}",
            f"{v['tokens_per_s']:,.0f}",
            f"{v['ratio_of_medians'] - 1:+.1%}",
            f"{v['median_of_paired_ratios'] - 1:+.1%}",
            f"{v['cpu_ratio_of_medians'] - 1:+.1%}",
        ]
        for r in results
        for v in r["variants"]
    ]
    headers = ["documents", "docs/window", "masking", "s/step", "tokens/s", "cost", "cost (paired)", "cost (CPU s)"]
    return headers, rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4, help="windows per step")
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--pairs", type=int, default=7, help="timed rounds (one step of every variant each)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    add_out_argument(p)
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    results = [measure_case(case, args, device) for case in args.cases]
    kernel = "flex_attention" if device.type == "cuda" else "per-document SDPA calls"
    title = (
        f"Document masking, sequence {args.seq_len}, {args.batch} windows per step, {args.pairs} rounds "
        f"(`on`: {kernel})"
    )
    print_table(title, *results_table(results))
    numbers = {
        "device": device.type,
        "load_average_at_start": load,
        "seq_len": args.seq_len,
        "windows_per_step": args.batch,
        "micro_batch": args.micro_batch,
        "rounds": args.pairs,
        "results": results,
    }
    write_results(f"document_mask_{device.type}", numbers, args.out)


if __name__ == "__main__":
    main()
