"""Memory of the 0.6B preset's 2-layer variant on this machine, and the memory plan of the 7B preset on GPUs.

    python bench/memory_plan.py [--config configs/moepp-0.6b.yaml] [--seq-len 256] [--micro-batch 2]
                                [--out PATH]

Measured, each in its own process (peak RSS is a process's high-water mark): peak RSS after building the model
(meta-device parameters, then the shard materialised: parallel/init.py) and after one training step; the bytes
autograd saves for backward per micro-batch under every `train.activation_checkpointing` mode, counted exactly
with saved_tensors_hooks (parallel/saved_tensors.py), per block and against the block's input. Planned
(parallel/memory.py, nothing allocated): configs/moepp-7b.yaml on 8, 64 and 256 GPUs of 80 GB. Prints the tables
and plans and writes the results (bench/results/memory_plan.json, or --out).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.report import add_out_argument, markdown_table, write_results

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/moepp-0.6b.yaml"
MODES = ["none", "full", "moe", "attention"]
MIB, GIB = 1024**2, 1024**3
# 8, 64 and 256 GPUs of 80 GB for configs/moepp-7b.yaml: one node, eight nodes, 32 nodes with 4 pipeline stages.
LAYOUTS_7B = {
    "8 GPUs: fsdp over 8, ep 8": ["parallel.dp=8", "parallel.ep=8", "parallel.data_parallel=fsdp"],
    "64 GPUs: fsdp over 64, ep 8": ["parallel.dp=64", "parallel.ep=8", "parallel.data_parallel=fsdp"],
    "256 GPUs: pp 4 x fsdp over 64, ep 8": [
        "parallel.pp=4",
        "parallel.dp=64",
        "parallel.ep=8",
        "parallel.data_parallel=fsdp",
    ],
}
DEVICE_GIB = 80 * 1e9 / GIB  # an "80 GB" GPU


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def load(config: str, seq_len: int, micro_batch: int):
    from train.config_load import load_config

    overrides = ["model.num_layers=2", f"data.seq_len={seq_len}", f"train.micro_batch_size={micro_batch}"]
    overrides += [f"train.global_batch_size={micro_batch}", "train.device=cpu"]
    return load_config(ROOT / config, overrides)


def measure_process(what: str, config: str, seq_len: int, micro_batch: int) -> dict:
    """One measurement in this (fresh) process."""
    from parallel.init import build_model
    from parallel.mesh import init_parallel
    from train.optim import build_optimizer
    from train.step import train_step

    cfg = load(config, seq_len, micro_batch)
    ctx = init_parallel(cfg.parallel, "cpu")
    before = peak_rss()
    model = build_model(cfg.model, cfg.moe, ctx, cfg.train.seed)
    params = sum(4 * p.numel() for p in model.parameters())
    result = {"rss_before_gib": before / GIB, "params_gib": params / GIB, "params": params // 4}
    result["rss_after_init_gib"] = peak_rss() / GIB
    largest = max(4 * p.numel() for p in model.parameters())
    result["largest_param_gib"] = largest / GIB
    if what == "step":
        optimizer = build_optimizer(model, cfg.optim)
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, cfg.model.vocab_size, (micro_batch, seq_len + 1), generator=g)
        train_step(model, optimizer, [tokens], cfg.optim.clip_grad)
        result["rss_after_step_gib"] = peak_rss() / GIB
    return result


def saved_bytes(config: str, seq_len: int, micro_batch: int) -> dict[str, dict]:
    """Saved-for-backward bytes of one micro-batch under every mode (forward only: the count is complete then)."""
    from parallel.activation_checkpoint import apply_activation_checkpointing
    from parallel.init import build_model
    from parallel.mesh import init_parallel
    from parallel.saved_tensors import SavedActivationBytes

    cfg = load(config, seq_len, micro_batch)
    ctx = init_parallel(cfg.parallel, "cpu")
    model = build_model(cfg.model, cfg.moe, ctx, cfg.train.seed)
    tokens = torch.randint(0, cfg.model.vocab_size, (micro_batch, seq_len), generator=torch.Generator().manual_seed(0))
    out = {}
    for mode in MODES:
        m = model if mode == "none" else copy.deepcopy(model)
        apply_activation_checkpointing(m, mode)
        with SavedActivationBytes(m) as saved:
            result = m(tokens)
        del result
        out[mode] = {
            "total": saved.total,
            "outside_blocks": saved.other,
            "per_block": saved.per_block,
            "block_inputs": saved.block_inputs,
        }
        if m is not model:
            del m
    return out


def plan_small(config: str, seq_len: int, micro_batch: int) -> float:
    """The memory plan's per-rank total (GiB) for the measured model and micro-batch in one CPU process."""
    from train.memory import plan_for

    return plan_for(load(config, seq_len, micro_batch), 1, "cpu").peak.total / GIB


def plan_7b() -> dict[str, dict]:
    from train.config_load import load_config
    from train.memory import plan_for, planned_world_size

    plans = {}
    for name, overrides in LAYOUTS_7B.items():
        cfg = load_config(ROOT / "configs/moepp-7b.yaml", [*overrides, "train.device=cuda"])
        plan = plan_for(cfg, planned_world_size(cfg), "cuda")
        plans[name] = {
            "overrides": overrides,
            "table": plan.table(),
            "peak_gib": plan.peak.total / GIB,
            "fits_80gb": plan.peak.total <= DEVICE_GIB * GIB,
            "stages": [
                {k: getattr(s, k) for k in ("stage", "params", "grads", "optimizer", "buffers", "activations")}
                for s in plan.stages
            ],
        }
    return plans


def run_child(what: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--one", what, "--config", args.config, "--seq-len", str(args.seq_len)]
    cmd += ["--micro-batch", str(args.micro_batch)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise SystemExit(f"{what}: failed\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=CONFIG, help="the preset measured (with 2 layers)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one measurement, print JSON
    add_out_argument(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.one:
        print("RESULT " + json.dumps(measure_process(args.one, args.config, args.seq_len, args.micro_batch)))
        return

    init = run_child("init", args)
    step = run_child("step", args)
    saved = saved_bytes(args.config, args.seq_len, args.micro_batch)
    plans = plan_7b()

    planned = plan_small(args.config, args.seq_len, args.micro_batch)
    vocab = load(args.config, args.seq_len, args.micro_batch).model.vocab_size
    rss_rows = [
        ["at start (interpreter, torch, data)", f"{init['rss_before_gib']:.2f}", "", ""],
        ["after building the model", f"{init['rss_after_init_gib']:.2f}", f"{init['params_gib']:.2f}", ""],
        ["after one training step", f"{step['rss_after_step_gib']:.2f}", f"{step['params_gib']:.2f}", f"{planned:.2f}"],
    ]
    rss_table = markdown_table(["peak RSS", "GiB", "parameters (GiB)", "memory plan, total (GiB)"], rss_rows)
    none = saved["none"]
    save_rows = []
    for mode in MODES:
        s = saved[mode]
        ratios = [s["per_block"][b] / s["block_inputs"][b] for b in sorted(s["per_block"])]
        save_rows.append(
            [
                mode,
                f"{s['total'] / MIB:.1f}",
                f"{s['total'] / none['total']:.3f}",
                " / ".join(f"{s['per_block'][b] / MIB:.1f}" for b in sorted(s["per_block"])),
                " / ".join(f"{r:.2f}" for r in ratios),
            ]
        )
    save_table = markdown_table(
        ["activation checkpointing", "saved MiB", "vs none", "per block MiB", "per block / block input"], save_rows
    )
    full = saved["full"]
    full_ratio = max(full["per_block"][b] / full["block_inputs"][b] for b in full["per_block"])
    numbers = {
        "config": f"{args.config} model.num_layers=2 data.seq_len={args.seq_len} "
        f"train.micro_batch_size={args.micro_batch}",
        "rss": {"init": init, "step": step},
        "planned_total_gib": planned,
        "saved_bytes": saved,
        "full_ac_max_block_ratio": full_ratio,
        "plan_7b": plans,
    }
    measured = (
        "fp32 on CPU. Model: "
        f"{args.config} with 2 layers ({init['params'] / 1e6:.0f}M parameters), micro-batch {args.micro_batch} x "
        f"{args.seq_len} tokens; one process per RSS row (a high-water mark), so the init row is the build alone "
        f"(the largest parameter is {init['largest_param_gib']:.2f} GiB).\n\n{rss_table}\n\n"
        "Saved-for-backward bytes of one micro-batch through the model, counted exactly with saved_tensors_hooks "
        "(parameters and buffers left out; the loss adds its fp32 log-softmax, 4 T V bytes = "
        f"{4 * args.micro_batch * args.seq_len * vocab / MIB:.0f} MiB here), per block and against the block's "
        "input (its residual stream and router logits):\n\n"
        f"{save_table}\n\nTarget: full checkpointing keeps <= 1.1 x the block's input per block; measured max "
        f"{full_ratio:.2f}."
    )
    plan_body = (
        "`python -m train configs/moepp-7b.yaml --plan OVERRIDES train.device=cuda --device-gib 74.5` (an 80 GB GPU "
        "is 74.5 GiB), micro-batch 4 x 2048 tokens, bf16 activations, no activation checkpointing:\n\n"
        + "\n\n".join(
            f"{name} (`{' '.join(p['overrides'])}`): peak {p['peak_gib']:.2f} GiB, "
            f"{'fits' if p['fits_80gb'] else 'does not fit'}\n\n```\n{p['table']}\n```"
            for name, p in plans.items()
        )
    )
    print(measured + "\n\n" + plan_body)
    write_results("memory_plan", numbers, args.out)


if __name__ == "__main__":
    main()
