"""Metrics: routing summaries, metrics.jsonl, and the console progress line."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from model.config import MoEConfig
from model.moe import RoutingStats


def routing_summary(stats: list[RoutingStats], moe: MoEConfig) -> dict[str, Any]:
    """Per-layer shares of assignments per expert kind, FFN experts per token, dropped assignments and
    all-to-all bytes. Reads device counters: call only at logging time (host-device sync)."""
    layers = []
    n_ffn, n_const, n_copy = moe.num_experts, moe.num_constant_experts, moe.num_copy_experts
    for s in stats:
        counts = s.expert_counts_E.tolist()  # host-device sync, once per logging interval
        total = moe.top_k * s.num_tokens
        ffn = sum(counts[:n_ffn])
        const = sum(counts[n_ffn : n_ffn + n_const])
        copy = sum(counts[n_ffn + n_const : n_ffn + n_const + n_copy])
        zero = sum(counts[n_ffn + n_const + n_copy :])
        layers.append(
            {
                "ffn_per_token": ffn / s.num_tokens,
                "share_ffn": ffn / total,
                "share_constant": const / total,
                "share_copy": copy / total,
                "share_zero": zero / total,
                "dropped": int(s.dropped.item()) / total,
                "expert_load": [c / total for c in counts],
                "a2a_bytes_sent": s.bytes_sent,
                "a2a_bytes_received": s.bytes_received,
            }
        )
    summary: dict[str, Any] = {"layers": layers}
    if layers:
        summary["ffn_per_token"] = sum(x["ffn_per_token"] for x in layers) / len(layers)
        summary["share_zero_computation"] = sum(1 - x["share_ffn"] - x["dropped"] for x in layers) / len(layers)
    return summary


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class MetricsLogger:
    """Writes one JSON object per logging interval to metrics.jsonl and one line to the console (above a
    progress bar when stderr is a terminal)."""

    def __init__(
        self, run_dir: Path, total_steps: int, start_step: int = 0, progress_bar: bool = True, enabled: bool = True
    ) -> None:
        self.enabled = enabled
        self.total_steps = total_steps
        self.path = run_dir / "metrics.jsonl"
        self.start_time = time.perf_counter()
        self.start_step = start_step
        self.bar = None
        if enabled and progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, leave=False)

    def eta(self, step: int) -> float:
        done = step - self.start_step
        elapsed = time.perf_counter() - self.start_time
        return elapsed / done * (self.total_steps - step) if done > 0 else float("nan")

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def log(self, record: dict[str, Any], console: str | None = None) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if console:
            self.write(console)

    def write(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
