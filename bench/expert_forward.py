"""Forward time of one MoE++ layer vs the vanilla MoE layer with the same FFN experts, at the paper's shapes
(hidden 768, FFN 2048; (8+4), (16+4), (32+8)) for tau in {0.1, 0.25, 0.5, 0.75, 1.0}, plus a trained checkpoint's
routing replayed on the (8+4) layer. Prints the tables and writes bench/results/expert_forward_DEVICE.json.

    python bench/expert_forward.py [--tokens 16384] [--repeats 5] [--checkpoint DIR] [--profile] [--default-malloc]
        [--device auto|cpu|cuda] [--out PATH]

Routing is controlled (bench/routing.py): the MoE++ layer gets exactly the FFN share that tau gives at balance,
N_ffn*tau / (N_ffn*tau + N_zc), spread evenly over experts; the vanilla layer sends every assignment to its (evenly
loaded) FFN experts. speed-up = vanilla time / MoE++ time; ideal bound = 1 / FFN share (the FFN compute ratio);
efficiency = speed-up / bound. Timings are whole-layer forwards (router, zero-computation experts, dispatch, FFN
experts, combine) without gradients; vanilla and MoE++ runs alternate so machine noise hits both alike. On CPU the
process keeps freed memory for reuse as a caching allocator does (bench/allocator.py), unless --default-malloc.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from bench.allocator import reuse_freed_memory
from bench.report import add_out_argument, print_table, write_results
from bench.routing import SHAPES, TAUS, LayerPair, balanced_assignments, build_pair, control, ffn_share
from model.moe import MoELayer


def autocast(device: torch.device):
    """bf16 autocast on CUDA (the grouped-GEMM expert path runs in bf16), nothing on CPU (fp32)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()  # host-device sync: a timing needs the kernels finished


@torch.no_grad()
def forward_ms(layer: MoELayer, x: torch.Tensor, prev: torch.Tensor | None) -> tuple[float, float]:
    """(milliseconds of one forward, measured FFN share of its assignments)."""
    sync(x.device)
    t = time.perf_counter()
    with autocast(x.device):
        _, _, _, stats = layer(x, prev)
    sync(x.device)
    ms = (time.perf_counter() - t) * 1e3
    counts = stats.expert_counts_E
    return ms, float(counts[: layer.num_ffn].sum() / counts.sum())


@dataclass
class Timing:
    van_ms: float  # fastest vanilla forward
    pp_ms: float  # fastest MoE++ forward
    speedup: float  # median over back-to-back (vanilla, MoE++) pairs of vanilla ms / MoE++ ms
    share: float  # measured FFN share of the MoE++ layer's assignments


def compare(pair: LayerPair, x: torch.Tensor, prev: torch.Tensor, repeats: int) -> Timing:
    """One warm-up each, then `repeats` back-to-back (vanilla, MoE++) pairs. The speed-up is the median of the
    per-pair ratios: the load of a shared machine can drift over minutes, and both runs of a pair see the same load,
    so their ratio does not drift."""
    forward_ms(pair.vanilla, x, None)
    forward_ms(pair.moepp, x, prev)
    van, pp, share = [], [], 0.0
    for _ in range(repeats):
        van.append(forward_ms(pair.vanilla, x, None)[0])
        ms, share = forward_ms(pair.moepp, x, prev)
        pp.append(ms)
    speedup = statistics.median(v / p for v, p in zip(van, pp, strict=True))
    return Timing(min(van), min(pp), speedup, share)


def row(label: str, tau: str, t: Timing) -> list[str]:
    speedup, bound = t.speedup, 1 / t.share
    return [
        label,
        tau,
        f"{t.share:.3f}",
        f"{t.van_ms:.0f}",
        f"{t.pp_ms:.0f}",
        f"{speedup:.2f}x ({(speedup - 1) * 100:+.0f}%)",
        f"{bound:.2f}x",
        f"{speedup / bound:.3f}",
    ]


def record(label: str, tau: str, t: Timing) -> dict:
    """One table row as numbers, for the results file."""
    return {
        "layer": label,
        "tau": tau,
        "ffn_share": t.share,
        "vanilla_ms": t.van_ms,
        "moepp_ms": t.pp_ms,
        "speedup": t.speedup,
        "ideal": 1 / t.share,
        "efficiency": t.speedup * t.share,
    }


def checkpoint_routing(step_dir: Path, num_tokens: int) -> tuple[list[np.ndarray], str]:
    """Top-2 choices of every MoE layer of a trained checkpoint on num_tokens validation tokens: [T, 2] each."""
    from data.loader import build_data
    from parallel.config import ParallelConfig
    from parallel.mesh import init_parallel
    from tools.routing_report import find_checkpoint
    from train.checkpoint import load_training_state
    from train.checkpoint_meta import read_meta
    from train.config import Config as RunConfig
    from train.config_load import build

    step_dir = find_checkpoint(step_dir)
    meta = read_meta(step_dir)
    cfg = build(RunConfig, meta["config"])
    from model.transformer import Decoder

    model = Decoder(cfg.model, cfg.moe)
    load_training_state(step_dir, model, None, init_parallel(ParallelConfig(), "cpu"))
    model.eval()
    seq_len = cfg.data.seq_len
    n_seq = -(-num_tokens // seq_len)
    batch = build_data(cfg.data, cfg.train.seed).valid_batches(n_seq, 1)[0][:, :-1]
    routes = []
    hooks = [
        m.router.register_forward_hook(lambda _m, _i, out: routes.append(out.expert_idx_TK))
        for m in model.modules()
        if isinstance(m, MoELayer)
    ]
    with torch.no_grad():
        model(batch)
    for h in hooks:
        h.remove()
    m = cfg.moe
    desc = (
        f"{step_dir} ({cfg.name}: {m.num_experts} FFN + {m.num_constant_experts} constant, {m.num_copy_experts} "
        f"copy, {m.num_zero_experts} zero experts, tau {m.tau}, step {meta['step']})"
    )
    layout = (m.num_experts, m.num_zero_experts, m.num_copy_experts, m.num_constant_experts)
    if layout != (8, 1, 1, 2):
        raise SystemExit(f"{step_dir}: replay needs the (8+4) expert layout 8/1/1/2, the checkpoint has {layout}")
    got = routes[0].shape[0]
    if got < num_tokens:
        # A small validation split: its routing is repeated (cyclically) up to the step size.
        desc += f", {got} distinct validation tokens repeated to {num_tokens}"
    return [np.resize(r.numpy(), (num_tokens, r.shape[1])) for r in routes], desc


def expert_ms_per_row(rows: list[int], repeats: int, device: torch.device) -> list[dict]:
    """One SwiGLU expert (768 -> 2x2048 -> 768) over M rows: ms, microseconds per row and GFLOP/s. Explains
    efficiency at small FFN shares: fewer rows per expert run the GEMMs less efficiently."""
    from model.experts import FFNExperts

    experts = FFNExperts(1, 768, 2048).to(device)
    out = []

    def run(x: torch.Tensor, m: int) -> None:
        with autocast(device):
            experts(x, [m])
        sync(device)

    with torch.no_grad():
        for m in rows:
            x = torch.randn(m, 768, device=device)
            run(x, m)
            best = min(_time(lambda x=x, m=m: run(x, m)) for _ in range(repeats))
            out.append(
                {"rows": m, "ms": best * 1e3, "us_per_row": best / m * 1e6, "gflops": 6 * 768 * 2048 * m / best / 1e9}
            )
    return out


def rows_per_expert(num_tokens: int, top_k: int = 2) -> list[dict]:
    """Rows each FFN expert gets at tau 0.1 in the vanilla and the MoE++ layer, per shape."""
    out = []
    for name, n_ffn, n_zero, n_copy, n_const in SHAPES:
        share = ffn_share(0.1, n_ffn, n_zero + n_copy + n_const)
        van, pp = num_tokens * top_k // n_ffn, round(num_tokens * top_k * share / n_ffn)
        out.append({"layer": name, "tokens": num_tokens, "vanilla": van, "moepp": pp})
    return out


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def profile(name: str, pair: LayerPair, x: torch.Tensor, prev: torch.Tensor, share: float) -> list[dict]:
    """Self CPU time per op (torch.profiler) of the vanilla and the MoE++ forward, fastest of 3 alternating runs
    each. An op's excess = MoE++ time - share x vanilla time: what the MoE++ layer spends beyond the ideal."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = x.device.type == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    runs: dict[str, list[dict[str, float]]] = {"vanilla": [], "moepp": []}
    with torch.no_grad():
        for _ in range(3):
            for key, layer, p in (("vanilla", pair.vanilla, None), ("moepp", pair.moepp, prev)):
                with torch_profile(activities=activities) as prof, autocast(x.device):
                    layer(x, p)
                    sync(x.device)
                # On a GPU the device time per kernel is what counts; on CPU the op's own CPU time.
                runs[key].append(
                    {
                        e.key: (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e3
                        for e in prof.key_averages()
                    }
                )
    van, pp = (min(runs[k], key=lambda d: sum(d.values())) for k in ("vanilla", "moepp"))
    ops = sorted(set(van) | set(pp), key=lambda k: pp.get(k, 0) - share * van.get(k, 0), reverse=True)
    totals = [("all ops", sum(van.values()), sum(pp.values()))]
    return [
        {"layer": name, "op": op, "vanilla_ms": v, "share_x_vanilla_ms": share * v, "moepp_ms": p}
        | {"excess_ms": p - share * v}
        for op, v, p in totals + [(k, van.get(k, 0), pp.get(k, 0)) for k in ops[:5]]
    ]


def profile_row(r: dict) -> list[str]:
    op = r["op"] if r["op"] == "all ops" else f"`{r['op']}`"
    nums = (r["vanilla_ms"], r["share_x_vanilla_ms"], r["moepp_ms"])
    return [r["layer"], op, *(f"{v:.1f}" for v in nums), f"{r['excess_ms']:+.1f}"]


def overhead_floor_ms(pair: LayerPair, T: int, repeats: int, device: torch.device) -> float:
    """The MoE++ layer with every assignment on zero-computation experts: its per-token cost without any FFN work
    (router, copy/constant experts, sort, combine)."""
    control(pair.moepp, balanced_assignments(T, pair.n_ffn, pair.n_zc, 0.0))
    x, prev = torch.randn(T, 768, device=device), torch.randn(T, pair.n_ffn + pair.n_zc, device=device)
    forward_ms(pair.moepp, x, prev)
    return min(forward_ms(pair.moepp, x, prev)[0] for _ in range(repeats))


def sweep(
    T: int, repeats: int, shapes: list, taus: list[float], profile_first: bool, device: torch.device
) -> tuple[list, list, list]:
    """Rows of the controlled-routing table (strings, numbers), and (if asked) the op profile of each shape at its
    first tau."""
    rows, records, profile_rows = [], [], []
    for name, n_ffn, n_zero, n_copy, n_const in shapes:
        pair = build_pair(n_ffn, n_zero, n_copy, n_const).to(device)
        x = torch.randn(T, 768, device=device)
        prev = torch.randn(T, n_ffn + pair.n_zc, device=device)
        control(pair.vanilla, balanced_assignments(T, n_ffn, 0, 1.0))
        for tau in taus:
            share = ffn_share(tau, n_ffn, pair.n_zc)
            control(pair.moepp, balanced_assignments(T, n_ffn, pair.n_zc, share))
            timing = compare(pair, x, prev, repeats)
            rows.append(row(name, str(tau), timing))
            records.append(record(name, str(tau), timing))
            print(f"{name} tau {tau}: {timing}", flush=True)
        if profile_first:
            # After the timings, never between them: a profiled run can leave the next timed runs slower.
            share = ffn_share(taus[0], n_ffn, pair.n_zc)
            control(pair.moepp, balanced_assignments(T, n_ffn, pair.n_zc, share))
            profile_rows += profile(f"{name} tau {taus[0]}", pair, x, prev, share)
    return rows, records, profile_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # 8 sequences of the paper's length 2048: a per-GPU micro-batch of a Megatron run of this model size.
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per layer forward")
    parser.add_argument("--small-tokens", type=int, default=4096, help="the smaller step of the second table")
    parser.add_argument("--repeats", type=int, default=5)
    # One thread: on a machine whose cores are shared with other work, more threads spin against that work and
    # time slower with far more spread; one thread gives stable ratios.
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="trained (8+4) checkpoint to replay")
    parser.add_argument("--profile", action="store_true", help="op profile of every shape at tau 0.1")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--default-malloc", action="store_true", help="glibc's defaults instead of reusing freed memory (allocator.py)"
    )
    add_out_argument(parser)
    args = parser.parse_args()
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    reused = device.type == "cpu" and not args.default_malloc and reuse_freed_memory()
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    T = args.tokens
    # The checkpoint first: a bad one should fail before the long sweep, not after it.
    ckpt = checkpoint_routing(args.checkpoint, T) if args.checkpoint is not None else None
    headers = ["layer", "tau", "FFN share", "vanilla ms", "MoE++ ms", "speed-up", "ideal", "efficiency"]
    rows, records, profile_records = sweep(T, args.repeats, SHAPES, TAUS, args.profile, device)
    # Every shape at a quarter of the step: fewer rows per expert, so the small-share GEMMs run further from full
    # speed. Shows how efficiency depends on the step size.
    small_T = args.small_tokens
    small_rows, small_records, _ = sweep(small_T, args.repeats, SHAPES, [0.1, 0.25], False, device)
    floor_pair = build_pair(*SHAPES[0][1:]).to(device)
    floor = overhead_floor_ms(floor_pair, T, args.repeats, device)
    del floor_pair
    per_row = expert_ms_per_row([4096, 2048, 1024, 683, 585, 293, 171, 146, 73], args.repeats, device)

    ckpt_rows, ckpt_records, ckpt_desc = [], [], None
    if ckpt is not None:
        layers, ckpt_desc = ckpt
        pair = build_pair(*SHAPES[0][1:]).to(device)
        x, prev = torch.randn(T, 768, device=device), torch.randn(T, 8 + pair.n_zc, device=device)
        control(pair.vanilla, balanced_assignments(T, 8, 0, 1.0))
        for i, idx in enumerate(layers):
            control(pair.moepp, idx)
            timing = compare(pair, x, prev, args.repeats)
            label = f"(8+4), routing of MoE layer {i}"
            ckpt_rows.append(row(label, "trained", timing))
            ckpt_records.append(record(label, "trained", timing))

    effs = [r["efficiency"] for r in records]
    print_table(f"Controlled routing, {T} tokens per forward, {args.repeats} pairs", headers, rows)
    print(
        f"Efficiency min {min(effs):.3f}, max {max(effs):.3f} (target >= 0.9 at every tau; "
        f"{sum(e >= 0.9 for e in effs)}/{len(effs)} cells meet it).\n"
    )
    print_table(f"Controlled routing, {small_T} tokens per forward", headers, small_rows)
    expert_rows = rows_per_expert(T) + rows_per_expert(small_T)
    cells = [[r["layer"], str(r["tokens"]), str(r["vanilla"]), str(r["moepp"])] for r in expert_rows]
    print_table("Rows per FFN expert at tau 0.1", ["layer", "tokens", "vanilla", "MoE++"], cells)
    per_row_cells = [
        [str(r["rows"]), f"{r['ms']:.1f}", f"{r['us_per_row']:.0f}", f"{r['gflops']:.0f}"] for r in per_row
    ]
    print_table("One SwiGLU expert (768 -> 2x2048 -> 768)", ["rows", "ms", "us / row", "GFLOP/s"], per_row_cells)
    print(f"(8+4) MoE++ layer with no FFN assignment: {floor:.1f} ms for {T} tokens.\n")
    if ckpt_rows:
        print_table(f"Trained routing of {ckpt_desc}, {T} tokens", headers, ckpt_rows)
    if profile_records:
        clock = "device" if device.type == "cuda" else "CPU"
        prof_headers = ["layer", "op", "vanilla ms", "share x vanilla", "MoE++ ms", "excess ms"]
        title = f"Self {clock} time per op at tau {TAUS[0]} (fastest of 3; top 5 ops by excess)"
        print_table(title, prof_headers, [profile_row(r) for r in profile_records])
    numbers = {
        "device": device.type,
        "dtype": "bf16 autocast" if device.type == "cuda" else "fp32",
        "host_memory_reused": reused,
        "tokens": T,
        "small_tokens": small_T,
        "repeats": args.repeats,
        "controlled": records,
        "controlled_small": small_records,
        "rows_per_expert_at_tau_0.1": expert_rows,
        "expert_ms_per_row": per_row,
        "no_ffn_layer_ms": floor,
        "trained_routing": {"checkpoint": ckpt_desc, "cells": ckpt_records} if ckpt_records else None,
        "profile": profile_records or None,
    }
    write_results(f"expert_forward_{device.type}", numbers, args.out)


if __name__ == "__main__":
    main()
