"""Memory and speed of the data-parallel modes on CPU gloo: measured bytes of parameters + gradients + AdamW state
per rank under `fsdp` at dp = 1, 2, 4 against the unsharded total / dp, and tokens/s of `replicate` vs `fsdp` at
dp = 2. Prints the tables and writes the results (bench/results/memory.json, or --out).

    python bench/memory.py [--preset moepp-0.6b-2layer] [--dps 1 2 4] [--batch 8] [--steps 3] [--rounds 2]
                           [--out PATH]

The preset is bench/train_throughput.py's `moepp-0.6b-2layer` (configs/moepp-0.6b.yaml with 2 of its 12 layers,
sequences of 256), with `--batch` sequences per rank per step in one micro-batch (8: 2048 tokens per rank, still
fewer than a GPU step of the preset's 4 x 2048). State bytes are counted per distinct storage of the rank's local
tensors (parameters, gradients, AdamW moments and step counters) after a step, so FSDP's padding is included. Each
data-parallel world runs in its own spawned processes (one thread each); throughput alternates replicate and fsdp
worlds `--rounds` times, since the machine is shared, and reports the median of the rounds' ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.report import add_out_argument, print_table, write_results
from bench.train_throughput import PRESETS

ROOT = Path(__file__).resolve().parents[1]
TARGET_STATE = 1.05  # sharded state per rank <= 1.05 x (unsharded total / dp)
TARGET_SPEED = 0.85  # fsdp tokens/s >= 0.85 x replicate at dp=2


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this rank holds for parameters, gradients and optimizer state: each distinct storage of their local
    tensors counted once (FSDP's gradients are views of one buffer per group; padding included)."""
    seen: set[int] = set()

    def size(tensors) -> int:
        total = 0
        for t in tensors:
            if t is None:
                continue
            local = t.to_local() if hasattr(t, "to_local") else t
            storage = local.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        return total

    params = list(model.parameters())
    return {
        "params": size(params),
        "grads": size(p.grad for p in params),
        "optimizer": size(v for p in params for v in optimizer.state.get(p, {}).values() if torch.is_tensor(v)),
    }


def worker(rank: int, world: int, port: int, job: dict, out_dir: str) -> None:
    """One rank of a data-parallel world: build the preset in job["mode"], train job["steps"] timed steps after a
    warm-up, then take one more forward/backward and measure the state with its gradients in place."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world)
    )
    torch.set_num_threads(1)
    try:
        from data.loader import build_data
        from model.transformer import Decoder
        from parallel import parallelize
        from parallel.grads import GradSync
        from parallel.mesh import init_parallel
        from train.config_load import load_config
        from train.optim import build_optimizer
        from train.step import local_forward_backward, train_step

        path, overrides = PRESETS[job["preset"]]
        batch_size = job["batch"] * world
        overrides = [
            *overrides,
            "data.path=null",
            f"parallel.data_parallel={job['mode']}",
            f"train.global_batch_size={batch_size}",
            f"train.micro_batch_size={job['batch']}",
        ]
        cfg = load_config(ROOT / path, overrides)
        ctx = init_parallel(cfg.parallel, "cpu")
        dp, tc = ctx.dims.dp, cfg.train
        torch.manual_seed(tc.seed)
        model = parallelize(Decoder(cfg.model, cfg.moe), ctx)
        optimizer = build_optimizer(model, cfg.optim)
        sync = GradSync(model, ctx)
        data = build_data(cfg.data, tc.seed)

        def batch(step: int) -> list[torch.Tensor]:
            tokens = data.global_batch(step * tc.global_batch_size, tc.global_batch_size, ctx.dp_rank, dp)
            return list(tokens.split(tc.micro_batch_size))

        times = []
        for step in range(1 + job["steps"]):
            dist.barrier()
            start = time.perf_counter()
            train_step(model, optimizer, batch(step), cfg.optim.clip_grad, grad_sync=sync)
            if step:  # the first step warms up
                times.append(time.perf_counter() - start)
        local_forward_backward(model, batch(0), torch.autocast("cpu", enabled=False))
        sync.reduce()
        result = {
            "rank": rank,
            "dp": dp,
            "mode": job["mode"],
            "state": state_bytes(model, optimizer),
            "step_s": times,
            "tokens_per_step": tc.global_batch_size * cfg.data.seq_len,
            "num_params": sum(p.numel() for p in model.parameters()),
        }
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    except BaseException:
        traceback.print_exc()  # no teardown under peers that may still be in a collective
        sys.stderr.flush()
        raise
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter finalization, where gloo's threads were seen to abort finished workers


def run_world(world: int, job: dict) -> list[dict]:
    """Every rank's result dict of `worker` in a fresh world of `world` processes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(world, port, job, tmp), nprocs=world, join=True)
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]


def measure_state(preset: str, dps: list[int]) -> list[dict]:
    """fsdp at each dp: the largest rank's state against the dp=1 total / dp (one sequence per rank: the state
    does not depend on the batch, the activations of a larger one only crowd the machine)."""
    rows = []
    for dp in dps:
        ranks = run_world(dp, {"preset": preset, "mode": "fsdp", "steps": 0, "batch": 1})
        per_rank = [sum(r["state"].values()) for r in ranks]
        rows.append({"dp": dp, "per_rank": per_rank, "parts_rank0": ranks[0]["state"]})
        print(f"state fsdp dp={dp}: {[f'{b / 1e9:.3f} GB' for b in per_rank]}", flush=True)
    total = rows[0]["per_rank"][0] if rows[0]["dp"] == 1 else None
    for row in rows:
        row["unsharded_total"] = total
        row["ratio"] = max(row["per_rank"]) / (total / row["dp"]) if total else None
    return rows


def measure_throughput(preset: str, steps: int, rounds: int, batch: int) -> dict:
    """tokens/s of replicate and fsdp at dp=2, worlds alternated `rounds` times."""
    runs: dict[str, list[float]] = {"replicate": [], "fsdp": []}
    steps_s: dict[str, list[list[float]]] = {"replicate": [], "fsdp": []}
    state: dict[str, int] = {}
    for _ in range(rounds):
        for mode in runs:
            ranks = run_world(2, {"preset": preset, "mode": mode, "steps": steps, "batch": batch})
            slowest = [max(r["step_s"][i] for r in ranks) for i in range(steps)]  # a step ends on its last rank
            steps_s[mode].append(slowest)
            runs[mode].append(ranks[0]["tokens_per_step"] / statistics.median(slowest))
            state[mode] = max(sum(r["state"].values()) for r in ranks)
            print(f"throughput {mode} dp=2: {runs[mode][-1]:,.0f} tokens/s", flush=True)
    best = {mode: max(values) for mode, values in runs.items()}
    # Each round's two worlds run back to back, so a slow patch of the shared machine mostly hits both of them:
    # the median of the per-round ratios is the number to read, the best worlds' ratio a cross-check.
    ratios = [f / r for f, r in zip(runs["fsdp"], runs["replicate"], strict=True)]
    return {
        "runs": runs,
        "step_s": steps_s,
        "tokens_per_s": best,
        "round_ratios": ratios,
        "ratio": statistics.median(ratios),
        "best_ratio": best["fsdp"] / best["replicate"],
        "state_per_rank": state,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="moepp-0.6b-2layer", choices=list(PRESETS))
    parser.add_argument("--dps", nargs="+", type=int, default=[1, 2, 4], help="data-parallel sizes for the state")
    parser.add_argument("--batch", type=int, default=8, help="sequences per rank per step (one micro-batch)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per throughput world")
    parser.add_argument("--rounds", type=int, default=2, help="replicate/fsdp worlds alternated this many times")
    add_out_argument(parser)
    args = parser.parse_args()
    state = measure_state(args.preset, args.dps)
    speed = measure_throughput(args.preset, args.steps, args.rounds, args.batch)

    headers = ["dp", "fsdp state per rank (params + grads + AdamW)", "unsharded total / dp", "ratio (target <= 1.05)"]
    rows = [
        [
            str(r["dp"]),
            " / ".join(f"{b / 1e9:.3f}" for b in r["per_rank"]) + " GB",
            f"{r['unsharded_total'] / r['dp'] / 1e9:.3f} GB" if r["unsharded_total"] else "-",
            f"{r['ratio']:.3f}" if r["ratio"] else "-",
        ]
        for r in state
    ]
    print_table(f"Sharded state per rank, preset {args.preset}", headers, rows)
    tps = speed["tokens_per_s"]
    speed_rows = [
        [mode, f"{tps[mode]:,.0f}", ", ".join(f"{x:,.0f}" for x in speed["runs"][mode]), f"{b / 1e9:.3f} GB"]
        for mode, b in speed["state_per_rank"].items()
    ]
    print_table(
        f"Tokens/s at dp=2, {args.batch} sequences per rank per step",
        ["mode", "best tokens/s", "each round", "state per rank"],
        speed_rows,
    )
    print(
        f"fsdp / replicate = **{speed['ratio']:.3f}** (median of the rounds' ratios "
        f"{', '.join(f'{x:.2f}' for x in speed['round_ratios'])}; best worlds {speed['best_ratio']:.3f}; "
        f"target >= {TARGET_SPEED})"
    )
    write_results("memory", {"preset": args.preset, "batch": args.batch, "state": state, "throughput": speed}, args.out)


if __name__ == "__main__":
    main()
