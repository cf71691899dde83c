"""Metrics: routing summaries, metrics.jsonl, the console progress line, and an optional wandb mirror."""

from __future__ import annotations

import importlib
import json
import sys
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model.config import MoEConfig
from model.moe import RoutingStats

if TYPE_CHECKING:
    from train.config import WandbConfig


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
                # Per rank, one forward: dispatch + combine, then each collective apart and the remote part.
                "a2a_bytes_sent": s.a2a.sent,
                "a2a_bytes_received": s.a2a.received,
                **{f"a2a_bytes_{k}": v for k, v in asdict(s.a2a).items()},
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


def flatten_for_wandb(record: dict[str, Any]) -> dict[str, float]:
    """One metrics.jsonl record as flat wandb keys: scalars keep their names; `routing` (one dict per MoE layer,
    in layer order) becomes `routing/layer{i}/{key}`, its expert_load list `routing/layer{i}/load/e{j}` and an
    aux-free bias `routing/layer{i}/bias/e{j}`.
    None (a non-finite value) and non-numeric entries are left out."""
    flat: dict[str, float] = {}
    for key, value in record.items():
        if key == "routing":
            for i, layer in enumerate(value):
                for k, v in layer.items():
                    if k in ("expert_load", "expert_bias"):
                        name = "load" if k == "expert_load" else "bias"
                        flat.update({f"routing/layer{i}/{name}/e{j}": float(x) for j, x in enumerate(v)})
                    elif _is_number(v):
                        flat[f"routing/layer{i}/{k}"] = float(v)
        elif key != "step" and _is_number(value):
            flat[key] = float(value)
    return flat


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


WANDB_ID_FILE = "wandb_run_id"


def wandb_run_id(run_dir: Path, resuming: bool) -> str:
    """The wandb run id of this run directory: a resumed run continues the run it was saved from (same id,
    resume="allow"), a fresh start gets a new id. Kept in RUN_DIR/wandb_run_id."""
    path = run_dir / WANDB_ID_FILE
    if resuming and path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    return run_id


def start_wandb(
    cfg: WandbConfig | None, run_dir: Path, run_config: dict[str, Any], name: str, resuming: bool = False
) -> Any | None:
    """A wandb run, or None when disabled, not installed, or failing to start (one console line says which).
    wandb is imported here and nowhere else, so the package stays optional."""
    if cfg is None or cfg.mode == "disabled":
        return None
    try:
        wandb = importlib.import_module("wandb")
    except ImportError:
        print(
            f"wandb: not installed, logging to {run_dir / 'metrics.jsonl'} only "
            "(pip install -e '.[wandb]', or set logging.wandb.mode=disabled to silence this)",
            flush=True,
        )
        return None
    try:
        # console="off": wandb must not wrap our stdout (the progress bar and torchrun's rank prefixes use it).
        run = wandb.init(
            id=wandb_run_id(run_dir, resuming),
            resume="allow",
            project=cfg.project,
            name=cfg.run_name or name,
            mode=cfg.mode,
            dir=str(run_dir),
            config=run_config,
            settings={"silent": True, "console": "off"},
        )
    except Exception as e:  # a logging mirror must never stop training
        print(f"wandb: could not start ({type(e).__name__}: {e}); logging to metrics.jsonl only", flush=True)
        return None
    where = getattr(run, "dir", None) or run_dir
    hint = f"; sync later with `wandb sync {Path(where).parent}`" if cfg.mode == "offline" else ""
    print(f"wandb: {cfg.mode} run {cfg.project}/{cfg.run_name or name} in {where}{hint}", flush=True)
    return run


class MetricsLogger:
    """Writes one JSON object per logging interval to metrics.jsonl and one line to the console (above a
    progress bar when stderr is a terminal), and mirrors each record to wandb when `wandb` says so. total_steps is
    the step the run stops at: the ETA and the progress bar count to it."""

    def __init__(
        self,
        run_dir: Path,
        total_steps: int,
        start_step: int = 0,
        progress_bar: bool = True,
        enabled: bool = True,
        wandb: WandbConfig | None = None,
        run_config: dict[str, Any] | None = None,
        name: str = "run",
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
        resuming = start_step > 0
        self.wandb_run = start_wandb(wandb, run_dir, run_config or {}, name, resuming) if enabled else None

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
        if self.wandb_run is not None:
            self.wandb_run.log(flatten_for_wandb(record), step=record.get("step"))
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
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
