"""PNG plots of a run directory's metrics.jsonl: training curves and routing per MoE layer over time.

    python tools/plot_run.py RUN_DIR [--out DIR]

Writes into RUN_DIR/plots (or --out):
  training.png              loss (train and validation, log scale, with the corpus entropy when known), learning
                            rate, tokens/s, mean FFN experts per token
  routing_ffn_per_token.png mean FFN experts per token of every MoE layer over steps
  routing_shares.png        share of assignments per expert kind (FFN / constant / copy / zero / dropped) per layer
  routing_load.png          per-expert share of assignments (heatmap: expert x step) per layer

Needs matplotlib (`pip install -e '.[plots]'`); nothing else from the repository, so it also works on a copied run
directory.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

KINDS = ("share_ffn", "share_constant", "share_copy", "share_zero", "dropped")
KIND_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:gray", "tab:red")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; pass a run directory written by `python -m train`")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{path}: no records yet; plot again after the first logging interval")
    return records


def moe_section(run_dir: Path) -> dict[str, Any]:
    """The `moe:` section of the run's config.yaml ({} when absent)."""
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        return {}
    import yaml

    return (yaml.safe_load(cfg_path.read_text()) or {}).get("moe", {}) or {}


def balance_ffn_per_token(moe: dict[str, Any]) -> float | None:
    """FFN experts per token at balance, top_k * tau N_ffn / (tau N_ffn + N_zc) (MoE++ spec §4); None for vanilla."""
    n_zc = sum(moe.get(k, 0) for k in ("num_zero_experts", "num_copy_experts", "num_constant_experts"))
    if not n_zc or not moe.get("num_experts"):
        return None
    tau_n = moe.get("tau", 0.75) * moe["num_experts"]
    return moe.get("top_k", 2) * tau_n / (tau_n + n_zc)


def expert_labels(run_dir: Path, num_experts: int) -> list[str]:
    """Expert names in the model's order [FFN, constant, copy, zero], from the run's config.yaml when present."""
    moe = moe_section(run_dir)
    if moe:
        counts = [
            ("", moe.get("num_experts", 0)),
            ("const", moe.get("num_constant_experts", 0)),
            ("copy", moe.get("num_copy_experts", 0)),
            ("zero", moe.get("num_zero_experts", 0)),
        ]
        labels = [f"{name}{i}" if name else f"ffn{i}" for name, n in counts for i in range(n)]
        if len(labels) == num_experts:
            return labels
    return [f"e{i}" for i in range(num_experts)]


def series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that have a finite `key`."""
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), int | float) and math.isfinite(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 4)
    return math.ceil(n / cols), cols


def corpus_entropy(records: list[dict[str, Any]]) -> float | None:
    """The corpus entropy the run logged (the synthetic corpus knows it), or None."""
    values = series(records, "corpus_entropy")[1]
    return values[-1] if values else None


# The first steps' losses (near ln(vocab)) run off the top of the loss axis, so the rest of the curve is legible.
SKIP_FIRST_FRACTION = 0.1


def loss_axis_limits(records: list[dict[str, Any]]) -> tuple[float, float] | None:
    """(bottom, top) of the log loss axis: every train and validation loss after the first tenth of the logged
    steps, and the corpus entropy when known; None when there is nothing positive to draw."""
    steps, losses = series(records, "loss")
    val_steps, val = series(records, "val_loss")
    points = list(zip(steps + val_steps, losses + val, strict=True))
    if not points:
        return None
    first, last = min(s for s, _ in points), max(s for s, _ in points)
    later = [v for s, v in points if s >= first + SKIP_FIRST_FRACTION * (last - first)]
    entropy = corpus_entropy(records)
    values = [v for v in later + ([entropy] if entropy is not None else []) if v > 0]
    if not values:
        return None
    return min(values) / 1.05, max(values) * 1.05


def plain_log_formatter() -> Any:
    """Labels the ticks matplotlib's LogFormatter would label, as plain numbers (0.7, 2, 30, not 7e-01 or 3x10^1)."""
    from matplotlib.ticker import LogFormatter

    class PlainLogFormatter(LogFormatter):
        def __call__(self, x: float, pos: int | None = None) -> str:
            return f"{x:g}" if super().__call__(x, pos) else ""

    return PlainLogFormatter()


def draw_loss(ax: Any, records: list[dict[str, Any]]) -> None:
    """Train and validation loss on a log axis, with the corpus entropy (what a perfect model's expected loss is)
    as a dashed line when the run logged it."""
    ax.plot(*series(records, "loss"), label="train")
    steps, val = series(records, "val_loss")
    if steps:
        ax.plot(steps, val, "o-", label="validation")
    entropy = corpus_entropy(records)
    if entropy is not None:
        ax.axhline(entropy, color="black", linestyle="--", linewidth=1, label=f"corpus entropy ({entropy:.3f})")
    limits = loss_axis_limits(records)
    if limits is not None:
        ax.set_yscale("log")
        ax.set_ylim(*limits)
        ax.yaxis.set_major_formatter(plain_log_formatter())
        ax.yaxis.set_minor_formatter(plain_log_formatter())
    ax.set_title("loss (nats/token, log scale)")
    ax.legend()


def plot_training(records: list[dict[str, Any]], path: Path, plt: Any) -> None:
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    draw_loss(axes[0, 0], records)
    ax = axes[0, 1]
    ax.plot(*series(records, "lr"))
    ax.set_title("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax = axes[1, 0]
    ax.plot(*series(records, "tokens_per_s"))
    ax.set_title("throughput (tokens/s)")
    ax.set_ylim(bottom=0)
    ax = axes[1, 1]
    steps, ffn = series(records, "ffn_per_token")
    if steps:
        ax.plot(steps, ffn, label="all positions")
        for key, style in (("ffn_per_token_easy", "s--"), ("ffn_per_token_hard", "^--")):
            s, v = series(records, key)
            if s:
                ax.plot(s, v, style, label=key.rsplit("_", 1)[1] + " positions")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no MoE layers", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("FFN experts per token (mean over MoE layers)")
    ax.set_ylim(bottom=0)
    for a in axes.flat:
        a.set_xlabel("step")
        a.grid(alpha=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def routing_arrays(records: list[dict[str, Any]]) -> tuple[np.ndarray, list[list[dict[str, Any]]]]:
    """Steps of the records that carry routing statistics, and those statistics (one list of layers per step)."""
    rows = [(r["step"], r["routing"]) for r in records if r.get("routing")]
    return np.array([s for s, _ in rows]), [layers for _, layers in rows]


def plot_ffn_per_token(
    steps: np.ndarray, routing: list[list[dict[str, Any]]], balance: float | None, path: Path, plt: Any
) -> None:
    n_layers = len(routing[0])
    fig, ax = plt.subplots(figsize=(9, 5), constrained_layout=True)
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, n_layers))
    for i in range(n_layers):
        ax.plot(steps, [layers[i]["ffn_per_token"] for layers in routing], color=colors[i], label=f"MoE layer {i}")
    if balance is not None:
        ax.axhline(balance, color="black", linestyle="--", linewidth=1, label=f"at balance ({balance:.2f})")
    ax.set_title("FFN experts per token, per MoE layer")
    ax.set_xlabel("step")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(ncol=max(1, n_layers // 8), fontsize="small")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_shares(steps: np.ndarray, routing: list[list[dict[str, Any]]], path: Path, plt: Any) -> None:
    n_layers = len(routing[0])
    rows, cols = _grid(n_layers)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False, constrained_layout=True)
    for i, ax in enumerate(axes.flat):
        if i >= n_layers:
            ax.axis("off")
            continue
        shares = [[layers[i].get(k, 0.0) for layers in routing] for k in KINDS]
        ax.stackplot(steps, shares, labels=[k.replace("share_", "") for k in KINDS], colors=KIND_COLORS)
        ax.set_ylim(0, 1)
        if len(steps) > 1:
            ax.set_xlim(steps[0], steps[-1])
        ax.set_title(f"MoE layer {i}")
        ax.set_xlabel("step")
    axes.flat[0].set_ylabel("share of assignments")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(KINDS))
    fig.suptitle("Assignments per expert kind")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_load(steps: np.ndarray, routing: list[list[dict[str, Any]]], labels: list[str], path: Path, plt: Any) -> None:
    n_layers = len(routing[0])
    loads = np.array([[layers[i]["expert_load"] for layers in routing] for i in range(n_layers)])  # [L, steps, E]
    vmax = float(loads.max()) or 1.0
    rows, cols = _grid(n_layers)
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols, 3.0 * rows), squeeze=False, constrained_layout=True)
    image = None
    # Column edges halfway between logged steps, so uneven logging intervals are drawn to scale.
    edges = np.concatenate([[steps[0] - 0.5], (steps[1:] + steps[:-1]) / 2, [steps[-1] + 0.5]])
    for i, ax in enumerate(axes.flat):
        if i >= n_layers:
            ax.axis("off")
            continue
        image = ax.pcolormesh(edges, np.arange(len(labels) + 1), loads[i].T, vmin=0, vmax=vmax, cmap="magma")
        ax.set_yticks(np.arange(len(labels)) + 0.5, labels, fontsize="x-small")
        n_ffn = sum(label.startswith("ffn") for label in labels)
        if 0 < n_ffn < len(labels):  # separates FFN experts from zero-computation ones
            ax.axhline(n_ffn, color="white", linewidth=1.0)
        ax.invert_yaxis()
        ax.set_title(f"MoE layer {i}")
        ax.set_xlabel("step")
    fig.colorbar(image, ax=axes, label="share of assignments", shrink=0.8)
    fig.suptitle("Per-expert load")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_run(run_dir: Path, out_dir: Path | None = None) -> list[Path]:
    """Write the PNGs; returns their paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on training machines
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("matplotlib is not installed; pip install -e '.[plots]'") from None
    records = read_metrics(run_dir)
    out_dir = out_dir or run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "training.png"]
    plot_training(records, written[0], plt)
    steps, routing = routing_arrays(records)
    if len(steps):
        labels = expert_labels(run_dir, len(routing[0][0]["expert_load"]))
        for name, fn, extra in (
            ("routing_ffn_per_token.png", plot_ffn_per_token, (balance_ffn_per_token(moe_section(run_dir)),)),
            ("routing_shares.png", plot_shares, ()),
            ("routing_load.png", plot_load, (labels,)),
        ):
            fn(steps, routing, *extra, out_dir / name, plt)
            written.append(out_dir / name)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python tools/plot_run.py", description=__doc__.split("\n")[0])
    p.add_argument("run_dir", type=Path, help="a run directory holding metrics.jsonl")
    p.add_argument("--out", type=Path, default=None, help="where to write the PNGs (default RUN_DIR/plots)")
    args = p.parse_args(argv)
    try:
        paths = plot_run(args.run_dir, args.out)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
