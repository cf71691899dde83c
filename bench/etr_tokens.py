"""Tokens processed per FFN expert: Expert-Token Resonance (ETR) vs top-k routing, and the quality of each.

The ETR paper (arXiv 2406.00023) reports about 40% fewer tokens processed per expert than top-k routing.
This trains small vanilla MoE models (no zero-computation experts, no gating residual) on the embedded synthetic
corpus of configs/tiny-cpu.yaml, same seed, same data and same steps, differing only in the router:

    topk-2     `topk`, top-2, Mixtral gating (softmax over the 2 chosen logits), switch loss, dropless
    topk-1     `topk`, top-1, switch loss, dropless
    etr-fixed  `etr`, top-1 token choice, expert choice with a fixed capacity factor (1.0), switch loss
    etr-lb     `etr`, top-1, `capacity_schedule: lower_bound` (factor from 2.0 down to the paper's bound, floor
               0.5, recomputed every 50 steps), switch loss

and reports, for each, the final validation loss (dropless, as evaluation always is) and the FFN tokens processed
per expert per optimizer step: kept FFN assignments / number of FFN experts (mean), and the busiest expert (max),
averaged over the MoE layers and the last `--window` logged steps, read from the run's metrics.jsonl. Capacity is
checked on every training micro-batch of every layer (no expert may keep more than C). Prints a table and writes
bench/results/etr_tokens.json.

    python bench/etr_tokens.py [--steps 300] [--layers 4] [--window 100] [--quick] [--jobs 2] [--threads 1]
        [--out PATH]

`--quick` (2 layers, 60 steps, window 20) is a smoke test. Run directories go to a temporary directory that is
removed afterwards (`--keep` prints and keeps it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import add_out_argument, print_table, write_results

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny-cpu.yaml"
# Every variant: the tiny-cpu model and corpus as a vanilla MoE, switch loss only.
COMMON = [
    "moe.num_zero_experts=0",
    "moe.num_copy_experts=0",
    "moe.num_constant_experts=0",
    "moe.gating_residual=false",
    "moe.balance=[{kind: switch, coeff: 0.01}]",
    "data.path=null",
    "train.device=cpu",
    "train.resume=never",
    "logging.interval=1",
    "logging.progress_bar=false",
    "logging.wandb.mode=disabled",
    "checkpoint.interval=0",
]
# name -> (description, overrides)
VARIANTS = {
    "topk-2": (
        "top-2, Mixtral gating, dropless",
        ["moe.router.kind=topk", "moe.router.mixtral_gating=true", "moe.top_k=2", "moe.capacity_factor=null"],
    ),
    "topk-1": ("top-1, dropless", ["moe.router.kind=topk", "moe.top_k=1", "moe.capacity_factor=null"]),
    "etr-fixed": (
        "ETR top-1, expert choice, capacity factor 1.0 (fixed)",
        ["moe.router.kind=etr", "moe.top_k=1", "moe.capacity_factor=1.0", "moe.router.etr.capacity_schedule=fixed"],
    ),
    "etr-lb": (
        "ETR top-1, capacity_schedule lower_bound (factor <= 2.0, floor 0.5, every 50 steps)",
        [
            "moe.router.kind=etr",
            "moe.top_k=1",
            "moe.capacity_factor=2.0",
            "moe.router.etr.capacity_schedule=lower_bound",
            "moe.router.etr.min_capacity_factor=0.5",
            "moe.router.etr.recompute_every=50",
        ],
    ),
}
REFERENCE = "topk-2"
# Quality counts as matched when the final val loss is within this relative margin of the reference's.
MATCH_TOLERANCE = 0.02


def install_capacity_probe(log: list[dict]) -> None:
    """Wrap MoELayer.forward (this process only) to record, for every training micro-batch of every MoE layer, the
    largest number of assignments an FFN expert kept and the capacity C the router applied (None: dropless)."""
    from model.moe import MoELayer
    from model.routers import EtrRouter
    from model.routers.capacity import capacities

    original = MoELayer.forward

    def forward(self, x_TD, prev_logits_TE, num_sequences=1):
        out = original(self, x_TD, prev_logits_TE, num_sequences)
        if self.training:
            stats, router, cfg = out[3], self.router, self.cfg
            ffn = stats.expert_counts_E[: cfg.num_experts]
            capacity = factor = None
            if cfg.capacity_factor is not None:
                if isinstance(router, EtrRouter):
                    factor = router.capacity_factor()
                    capacity = router.capacity(stats.num_tokens)
                else:
                    capacity = int(capacities(cfg, stats.num_tokens)[0])
            log.append(
                {
                    "layer": id(self),
                    "tokens": stats.num_tokens,
                    "max_kept": int(ffn.max()),
                    "kept": int(ffn.sum()),
                    "capacity": capacity,
                    "factor": factor,
                }
            )
        return out

    MoELayer.forward = forward


def install_schedule_probe(log: list[dict]) -> None:
    """Wrap EtrRouter.advance_schedule (this process only) to record, at every recomputation, the mean chosen
    affinity delta, the paper's unclamped bound exp(d delta^2 / (2 - delta^2)) and the factor the router chose."""
    from model.balance import etr_lower_bound_factor
    from model.routers import EtrRouter

    original = EtrRouter.advance_schedule

    def advance(self, affinity_sum, num_choices):
        before = int(self.etr_state[1])
        original(self, affinity_sum, num_choices)
        if (before + 1) % self.cfg.router.etr.recompute_every == 0:
            delta = float(affinity_sum / num_choices.clamp_min(1))
            bound = etr_lower_bound_factor(self.hidden_size, delta)
            log.append({"step": before + 1, "delta": delta, "bound": bound, "factor": float(self.etr_state[0])})

    EtrRouter.advance_schedule = advance


def run_variant(name: str, steps: int, layers: int, window: int, run_dir: Path) -> dict:
    """Train one variant in this process and measure it."""
    import torch

    from data.loader import build_data
    from train.config_load import load_config
    from train.trainer import run

    _, overrides = VARIANTS[name]
    cfg = load_config(
        CONFIG,
        [
            *COMMON,
            *overrides,
            f"model.num_layers={layers}",
            f"train.max_steps={steps}",
            f"train.eval_interval={max(steps // 3, 1)}",
            f"optim.warmup_steps={min(30, steps // 5)}",
            f"train.run_dir={run_dir}",
        ],
    )
    probe: list[dict] = []
    install_capacity_probe(probe)
    schedule: list[dict] = []
    install_schedule_probe(schedule)
    start = time.perf_counter()
    run(cfg)
    seconds = time.perf_counter() - start

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    final = records[-1]
    assert final["step"] == steps and "val_loss" in final, "the last record must carry the final evaluation"
    last = [r for r in records if r["step"] > steps - window]
    moe, n_ffn = cfg.moe, cfg.moe.num_experts
    tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
    per_step_mean, per_step_max, dropped = [], [], []
    for r in last:
        for layer in r["routing"]:
            # expert_load = kept assignments of the expert / (top_k * tokens of the step)
            kept = [x * moe.top_k * tokens_per_step for x in layer["expert_load"][:n_ffn]]
            per_step_mean.append(sum(kept) / n_ffn)
            per_step_max.append(max(kept))
            dropped.append(layer["dropped"])
    n_micro = len(probe) // max(steps * len({p["layer"] for p in probe}), 1)
    capped = [p for p in probe if p["capacity"] is not None]
    factors: list[tuple[int, float]] = []  # (first step, factor) each time the ETR factor changed
    calls_per_step = max(len(probe) // steps, 1)
    for i, p in enumerate(probe):
        if p["factor"] is not None and (not factors or factors[-1][1] != p["factor"]):
            factors.append((i // calls_per_step + 1, p["factor"]))
    corpus = build_data(cfg.data, cfg.train.seed).corpus
    return {
        "name": name,
        "steps": steps,
        "layers": layers,
        "window": len(last),
        "top_k": moe.top_k,
        "num_ffn_experts": n_ffn,
        "tokens_per_step": tokens_per_step,
        "micro_batches": n_micro,
        "micro_batch_tokens": cfg.train.micro_batch_size * cfg.data.seq_len,
        "hidden": cfg.model.hidden_size,
        "expert_width": moe.expert_ffn_hidden_size or cfg.model.ffn_hidden_size,
        "val_loss": final["val_loss"],
        "train_loss_window": sum(r["loss"] for r in last) / len(last),
        "tokens_per_expert_mean": sum(per_step_mean) / len(per_step_mean),
        "tokens_per_expert_max": sum(per_step_max) / len(per_step_max),
        "dropped": sum(dropped) / len(dropped),
        "capacity_checked": len(capped),
        "capacity_min": min((p["capacity"] for p in capped), default=None),
        "capacity_max": max((p["capacity"] for p in capped), default=None),
        "capacity_violations": sum(p["max_kept"] > p["capacity"] for p in capped),
        "max_kept_over_capacity": max((p["max_kept"] / p["capacity"] for p in capped), default=None),
        "etr_factors": factors,
        "etr_schedule": schedule,
        "loss_floor": corpus.entropy_per_token if corpus is not None else None,
        "seconds": seconds,
        "threads": torch.get_num_threads(),
    }


def launch(name: str, args: argparse.Namespace, root: Path) -> dict:
    cmd = [sys.executable, __file__, "--one", name, "--steps", str(args.steps), "--layers", str(args.layers)]
    cmd += ["--window", str(args.window), "--threads", str(args.threads), "--run-root", str(root)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise SystemExit(f"{name}: failed\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT ") :])


def pct(x: float) -> str:
    return f"{0.0 if abs(x) < 5e-4 else x:+.1%}"


def table(results: list[dict]) -> tuple[list[str], list[list[str]]]:
    ref = next(r for r in results if r["name"] == REFERENCE)
    top1 = next((r for r in results if r["name"] == "topk-1"), None)
    headers = [
        "router",
        "what",
        "val loss (vs top-2)",
        "train loss (window)",
        "FFN tokens/expert/step: mean",
        "busiest expert",
        "mean vs top-2",
        "busiest vs top-2",
        "mean vs top-1",
        "busiest vs top-1",
        "dropped",
        "capacity C per micro-batch (max kept / C, whole run)",
        f"val loss within {MATCH_TOLERANCE:.0%} of top-2",
    ]
    rows = []
    for r in results:
        rel_q = r["val_loss"] / ref["val_loss"] - 1
        quality = f"{r['val_loss']:.4f}" + ("" if r is ref else f" ({pct(rel_q)})")
        if r["capacity_checked"]:
            cap = f"{r['capacity_min']}" + (f"-{r['capacity_max']}" if r["capacity_max"] != r["capacity_min"] else "")
            cap += f" ({r['max_kept_over_capacity']:.2f}; {r['capacity_violations']} over C)"
        else:
            cap = "dropless"

        def vs(other: dict | None, key: str, r: dict = r) -> str:
            if other is None or other is r:
                return "-"
            return pct(r[key] / other[key] - 1)

        rows.append(
            [
                f"`{r['name']}`",
                VARIANTS[r["name"]][0],
                quality,
                f"{r['train_loss_window']:.4f}",
                f"{r['tokens_per_expert_mean']:.1f}",
                f"{r['tokens_per_expert_max']:.1f}",
                vs(ref, "tokens_per_expert_mean"),
                vs(ref, "tokens_per_expert_max"),
                vs(top1, "tokens_per_expert_mean"),
                vs(top1, "tokens_per_expert_max"),
                f"{r['dropped']:.1%}",
                cap,
                "yes" if abs(rel_q) <= MATCH_TOLERANCE else "no",
            ]
        )
    return headers, rows


def schedule_rows(results: list[dict]) -> list[list[str]]:
    """The ETR capacity schedule of each variant that has one: per recomputation step, the range over the layers of
    the mean chosen affinity delta and of the paper's bound, and the factor chosen."""
    rows = []
    for r in results:
        for s in sorted({x["step"] for x in r["etr_schedule"]}):
            at = [x for x in r["etr_schedule"] if x["step"] == s]
            lo, hi = min(x["delta"] for x in at), max(x["delta"] for x in at)
            blo, bhi = min(x["bound"] for x in at), max(x["bound"] for x in at)
            factors = sorted({f"{x['factor']:.2f}" for x in at})
            rows.append([f"`{r['name']}`", str(s), f"{lo:.3f}-{hi:.3f}", f"{blo:.3g}-{bhi:.3g}", ", ".join(factors)])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per variant (default 300)")
    parser.add_argument("--layers", type=int, default=None, help="MoE layers (default 4)")
    parser.add_argument("--window", type=int, default=None, help="last logged steps to average (default steps/3)")
    parser.add_argument("--quick", action="store_true", help="2 layers, 60 steps: a smoke test")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--jobs", type=int, default=2, help="variants trained at once (one process each)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per variant")
    parser.add_argument("--keep", action="store_true", help="keep the run directories and say where")
    add_out_argument(parser)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    parser.add_argument("--run-root", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.steps = args.steps or (60 if args.quick else 300)
    args.layers = args.layers or (2 if args.quick else 4)
    args.window = args.window or max(args.steps // 3, 1)
    if args.one:
        import torch

        torch.set_num_threads(args.threads)
        result = run_variant(args.one, args.steps, args.layers, args.window, Path(args.run_root) / args.one)
        print("RESULT " + json.dumps(result))
        return
    if REFERENCE not in args.variants:
        args.variants.insert(0, REFERENCE)
    root = Path(tempfile.mkdtemp(prefix="etr_tokens_"))
    start = time.perf_counter()
    try:
        with ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
            futures = {name: pool.submit(launch, name, args, root) for name in args.variants}
            results = []
            for name in args.variants:
                results.append(futures[name].result())
                r = results[-1]
                print(
                    f"{name}: val {r['val_loss']:.4f}, tokens/expert/step mean {r['tokens_per_expert_mean']:.1f} "
                    f"max {r['tokens_per_expert_max']:.1f}, dropped {r['dropped']:.1%} ({r['seconds']:.0f}s)",
                    flush=True,
                )
    finally:
        if args.keep:
            print(f"run directories kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    total = time.perf_counter() - start
    r0 = results[0]
    title = (
        f"{args.layers} MoE layers, {r0['num_ffn_experts']} FFN experts, {args.steps} steps of "
        f"{r0['tokens_per_step']} tokens, mean over the last {args.window} steps"
    )
    print_table(title, *table(results))
    schedule = schedule_rows(results)
    if schedule:
        headers = ["router", "step", "mean affinity δ", "bound exp(d δ²/(2 − δ²))", "capacity factor"]
        print_table("Lower-bound capacity schedule (range over the MoE layers)", headers, schedule)
    numbers = {
        "steps": args.steps,
        "layers": args.layers,
        "window": args.window,
        "jobs": args.jobs,
        "threads_per_variant": args.threads,
        "match_tolerance": MATCH_TOLERANCE,
        "reference": REFERENCE,
        "seconds": total,
        "variants": results,
    }
    write_results("etr_tokens", numbers, args.out)


if __name__ == "__main__":
    main()
