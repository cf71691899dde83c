"""End-to-end training-step throughput: tokens/s, model TFLOP/s (FLOPs from bench/flops.py, with the FFN experts
each layer actually used), MFU against the device's dense bf16 peak on a GPU, and peak memory. Prints a table and
writes bench/results/train_throughput_DEVICE.json. The FLOP formula is train/flops.py's (docs/benchmarks.md).

    python bench/train_throughput.py [--presets tiny-cpu moepp-0.6b-2layer moe-0.6b-2layer] [--steps 3] [--out PATH]

Presets: `tiny-cpu` (configs/tiny-cpu.yaml as is) and `moepp-0.6b-2layer` (configs/moepp-0.6b.yaml with 2 of its 12
layers, sequences of 256, 4 sequences per step: the paper's 0.6B/(8+4)E layer shapes at a CPU-sized step), and
`moe-0.6b-2layer`, its vanilla twin. On a GPU, `moepp-0.6b` (the full preset, micro-batch 4) is the one the MFU
target refers to; `moe-0.6b` is its vanilla twin. `--compile` adds a compiled run of each preset (train.compile).
Each preset runs in its own process so that peak memory is its own. Steps use the training code itself
(train.step.train_step on the synthetic corpus); the first steps warm up and are not timed.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.flops import flops_per_token, peak_tflops
from bench.report import add_out_argument, print_table, write_results

ROOT = Path(__file__).resolve().parents[1]
# name -> (config file, overrides)
PRESETS = {
    "tiny-cpu": ("configs/tiny-cpu.yaml", []),
    "moepp-0.6b-2layer": (
        "configs/moepp-0.6b.yaml",
        ["model.num_layers=2", "data.seq_len=256", "train.global_batch_size=4", "train.micro_batch_size=2"],
    ),
    "moe-0.6b-2layer": (
        "configs/moe-0.6b.yaml",
        ["model.num_layers=2", "data.seq_len=256", "train.global_batch_size=4", "train.micro_batch_size=2"],
    ),
    "moepp-0.6b": ("configs/moepp-0.6b.yaml", ["train.global_batch_size=4", "train.micro_batch_size=4"]),
    "moe-0.6b": ("configs/moe-0.6b.yaml", ["train.global_batch_size=4", "train.micro_batch_size=4"]),
}


DEFAULT_PRESETS = ["tiny-cpu", "moepp-0.6b-2layer", "moe-0.6b-2layer"]


def run_preset(name: str, steps: int, warmup: int, device_name: str, compiled: bool = False) -> dict:
    """Train `warmup + steps` steps of a preset in this process; returns the measurements. With `compiled`, each
    block is compiled as under train.compile (the warm-up steps pay the compile time and are not timed)."""
    from data.loader import build_data
    from model.transformer import Decoder
    from parallel.mesh import init_parallel
    from train.config_load import load_config
    from train.optim import build_optimizer
    from train.step import autocast_context, train_step

    path, overrides = PRESETS[name]
    cfg = load_config(ROOT / path, [*overrides, f"train.device={device_name}", "data.path=null"])
    ctx = init_parallel(cfg.parallel, "cuda" if device_name == "cuda" else "cpu")
    device = ctx.device
    torch.manual_seed(cfg.train.seed)
    model = Decoder(cfg.model, cfg.moe).to(device)
    if compiled:
        from parallel.compile import apply_compile

        apply_compile(model)
    optimizer = build_optimizer(model, cfg.optim)
    data = build_data(cfg.data, cfg.train.seed)
    amp = autocast_context(device, cfg.train.dtype)
    tc = cfg.train
    tokens_per_step = tc.global_batch_size * cfg.data.seq_len
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, routing = [], []
    for step in range(warmup + steps):
        batch = data.global_batch(step * tc.global_batch_size, tc.global_batch_size).to(device)
        sync()
        t = time.perf_counter()
        result = train_step(model, optimizer, list(batch.split(tc.micro_batch_size)), cfg.optim.clip_grad, amp)
        sync()
        if step >= warmup:
            times.append(time.perf_counter() - t)
            routing.append(
                [s.expert_counts_E[: cfg.moe.num_experts].sum().item() / s.num_tokens for s in result.routing]
            )
    # FFN experts per token of each MoE layer, averaged over the timed steps: what the experts actually computed.
    ffn_per_token = [sum(col) / len(col) for col in zip(*routing, strict=True)] if routing and routing[0] else None
    flops = flops_per_token(cfg.model, cfg.moe, cfg.data.seq_len, ffn_per_token if cfg.moe.enabled else None)
    step_s = sum(times) / len(times)
    tokens_per_s = tokens_per_step / step_s
    tflops = flops.train * tokens_per_s / 1e12
    peak = peak_tflops(torch.cuda.get_device_name()) if device.type == "cuda" else None
    memory_gb = (
        torch.cuda.max_memory_allocated() / 1e9
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB
    )
    return {
        "preset": name + (" compiled" if compiled else ""),
        "params": model.num_params(),
        "tokens_per_step": tokens_per_step,
        "step_s": step_s,
        "step_s_all": times,
        "tokens_per_s": tokens_per_s,
        "ffn_per_token": ffn_per_token,
        "flops_per_token_train": flops.train,
        "flops_breakdown_forward": {k: v for k, v in vars(flops).items()},
        "tflops": tflops,
        "mfu": tflops / peak[1] if peak else None,
        "peak_name": peak[0] if peak else None,
        "memory_gb": memory_gb,
        "memory_kind": "max allocated (CUDA)" if device.type == "cuda" else "peak RSS of the process",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} thr)",
    }


def fmt_row(r: dict) -> list[str]:
    parts = r["flops_breakdown_forward"]
    fwd = sum(parts.values())
    share = ", ".join(f"{k.replace('_', ' ')} {v / fwd:.0%}" for k, v in parts.items() if v / fwd >= 0.005)
    ffn = "-" if not r["ffn_per_token"] else " / ".join(f"{x:.2f}" for x in r["ffn_per_token"])
    return [
        r["preset"],
        f"{r['params'] / 1e6:.1f}M",
        str(r["tokens_per_step"]),
        f"{r['step_s']:.2f}",
        f"{r['tokens_per_s']:,.0f}",
        ffn,
        f"{r['flops_per_token_train'] / 1e6:,.1f}M ({share})",
        f"{r['tflops']:.3f}",
        f"{r['mfu']:.1%} of {r['peak_name']}" if r["mfu"] is not None else "n/a (CPU)",
        f"{r['memory_gb']:.2f} GB",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=DEFAULT_PRESETS, choices=list(PRESETS))
    parser.add_argument("--steps", type=int, default=3, help="timed steps per preset")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (see bench/expert_forward.py)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one preset, print JSON
    parser.add_argument(
        "--compile", action="store_true", help="run each preset eagerly and with train.compile (needs --warmup >= 1)"
    )
    add_out_argument(parser)
    args = parser.parse_args()
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if args.one:
        if device == "cpu" and args.threads:
            torch.set_num_threads(args.threads)
        print("RESULT " + json.dumps(run_preset(args.one, args.steps, args.warmup, device, args.compile)))
        return
    if args.compile and args.warmup < 1:
        raise SystemExit("--compile: needs --warmup >= 1 (the first step compiles and must not be timed)")
    results = []
    runs = [(name, compiled) for name in args.presets for compiled in ((False, True) if args.compile else (False,))]
    for name, compiled in runs:
        cmd = [sys.executable, __file__, "--one", name, "--steps", str(args.steps), "--warmup", str(args.warmup)]
        cmd += ["--device", device, "--threads", str(args.threads)] + ["--compile"] * compiled
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            raise SystemExit(f"{name}: failed\n{proc.stderr[-3000:]}")
        results.append(json.loads(line[len("RESULT ") :]))
        print(" | ".join(fmt_row(results[-1])), flush=True)
    headers = [
        "preset",
        "params",
        "tokens/step",
        "s/step",
        "tokens/s",
        "FFN experts/token per layer",
        "train FLOPs/token (forward split)",
        "model TFLOP/s",
        "MFU",
        "peak memory",
    ]
    precision = "bf16 autocast (the presets' train.dtype)" if device == "cuda" else "fp32"
    title = (
        f"Training steps on {results[0]['device']}, {precision}: mean of {args.steps} timed steps after "
        f"{args.warmup} warm-up steps, synthetic corpus, freshly initialised models"
        + (
            "; `compiled` rows: each block under torch.compile (inductor, static shapes; train.compile)"
            if args.compile
            else ""
        )
    )
    print_table(title, headers, [fmt_row(r) for r in results])
    numbers = {
        "device": device,
        "dtype": precision,
        "steps": args.steps,
        "warmup": args.warmup,
        "compile": args.compile,
        "presets": results,
    }
    write_results(f"train_throughput_{device}", numbers, args.out)


if __name__ == "__main__":
    main()
