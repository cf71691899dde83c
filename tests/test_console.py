"""What a run prints and logs: no torch warnings on one-process checkpoints, the corpus entropy named as such, the
ETA counted to the step the run stops at; and the loss plot drawn on a log axis with that entropy."""

import contextlib
import io
import json
import warnings
from pathlib import Path

import pytest

from train.config_load import load_config
from train.trainer import format_line, run

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["model.num_layers=2", "logging.interval=1", "train.eval_interval=0", "logging.progress_bar=false"]


@pytest.fixture(scope="module")
def exit_then_resume(tmp_path_factory):
    """A one-process run that saves at step 2 and exits (max_steps 4), then its resume to step 4: their console
    output, the warnings they raised and metrics.jsonl."""
    run_dir = tmp_path_factory.mktemp("console") / "run"
    console = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(console):
        warnings.simplefilter("always")
        for exit_at in ("train.exit_at_step=2", "train.exit_at_step=null"):
            cfg = load_config(
                ROOT / "configs/tiny-cpu.yaml",
                [*QUICK, "train.max_steps=4", "checkpoint.interval=1", f"train.run_dir={run_dir}", exit_at],
            )
            run(cfg)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return console.getvalue(), [str(w.message) for w in caught], records


def test_one_process_checkpoints_save_and_load_without_torch_warnings(exit_then_resume):
    console, messages, _ = exit_then_resume
    assert "resumed from" in console and "step_00000002" in console  # the second run loaded the first's checkpoint
    assert not [m for m in messages if "torch.distributed is disabled" in m]


def test_eta_counts_to_the_step_the_run_stops_at(exit_then_resume):
    _, _, records = exit_then_resume
    by_step = {r["step"]: r for r in records}
    assert sorted(by_step) == [1, 2, 3, 4]
    assert by_step[2]["eta_s"] == 0.0  # exit_at_step=2: nothing left, although max_steps is 4
    assert by_step[1]["eta_s"] > 0.0 and by_step[3]["eta_s"] > 0.0
    assert by_step[4]["eta_s"] == 0.0


def test_the_corpus_entropy_is_named_in_console_and_metrics(exit_then_resume):
    console, _, records = exit_then_resume
    assert "floor" not in console
    assert "synthetic corpus, entropy 0." in console
    step_lines = [line for line in console.splitlines() if line.startswith("step ")]
    assert len(step_lines) == 4 and all(" | entropy 0." in line for line in step_lines)
    entropies = {r["corpus_entropy"] for r in records}
    assert len(entropies) == 1 and 0.1 < entropies.pop() < 2.0


def test_last_step_is_exit_at_step_or_max_steps():
    cfg = load_config(ROOT / "configs/tiny-cpu.yaml", ["train.max_steps=10"])
    assert cfg.train.last_step == 10
    cfg = load_config(ROOT / "configs/tiny-cpu.yaml", ["train.max_steps=10", "train.exit_at_step=7"])
    assert cfg.train.last_step == 7


def test_format_line_labels_the_entropy():
    record = {"step": 5, "loss": 0.6601, "lr": 1e-3, "tokens_per_s": 100.0, "eta_s": 3.0}
    line = format_line(record, 10, 0.6746)
    assert "entropy 0.675" in line and "floor" not in line
    assert "entropy" not in format_line(record, 10, None)


# ---------------------------------------------------------------------------------------------------------------
# tools/plot_run.py loss panel


def _losses(entropy: float | None) -> list[dict]:
    records = [{"step": s, "loss": 0.7 + 6.0 / s**2} for s in range(1, 101)]
    records[-1]["val_loss"] = 0.75
    if entropy is not None:
        for r in records:
            r["corpus_entropy"] = entropy
    return records


def test_loss_plot_is_log_scaled_past_the_first_steps_with_the_entropy_line():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tools.plot_run import draw_loss, loss_axis_limits

    fig, ax = plt.subplots()
    try:
        draw_loss(ax, _losses(entropy=0.65))
        bottom, top = ax.get_ylim()
        assert ax.get_yscale() == "log"
        assert top < 1.0 < 6.7  # step 1's loss (6.7) is off the top; from step 11 on (<= 0.75) everything shows
        assert bottom < 0.65  # the entropy line is in view
        entropy_lines = [line for line in ax.get_lines() if "entropy" in str(line.get_label())]
        assert len(entropy_lines) == 1 and entropy_lines[0].get_ydata()[0] == 0.65
        fig.canvas.draw()
        labels = [t.get_text() for t in ax.yaxis.get_ticklabels(minor=True) + ax.yaxis.get_ticklabels()]
        assert "0.7" in labels and not any("e-" in s or "times" in s for s in labels)
    finally:
        plt.close(fig)
    assert loss_axis_limits(_losses(entropy=None))[0] > 0.65  # no entropy logged: no line to keep in view
    assert loss_axis_limits([{"step": 1, "loss": None}]) is None
