"""Single-process training: the CLI lowers the loss on the synthetic corpus; schedule; checkpoints."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model.transformer import Decoder
from parallel.init import build_model
from parallel.mesh import init_parallel
from train.checkpoint import load_training_state
from train.checkpoint_meta import latest_checkpoint
from train.config import OptimConfig
from train.config_load import load_config
from train.optim import lr_at

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cli_trains_tiny_moepp_and_lowers_the_loss(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "train",
            "configs/tiny-cpu.yaml",
            "train.max_steps=40",
            "logging.interval=5",
            "train.eval_interval=20",
            f"train.run_dir={run_dir}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(5, 41, 5))
    for key in ("loss", "lr", "tokens_per_s", "ffn_per_token", "aux_loss", "balance_heterogeneous", "routing"):
        assert key in records[-1]
    assert records[-1]["loss"] < 0.5 * records[0]["loss"]
    # The synthetic corpus' floor is ~0.67 nats; 40 steps get within reach of it.
    assert records[-1]["val_loss"] < 1.5
    assert 0.0 < records[-1]["ffn_per_token"] <= 2.0
    assert "step     40/40" in proc.stdout and "ffn/tok" in proc.stdout
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    assert ckpt is not None and ckpt.name == "step_00000040"
    cfg = load_config(run_dir / "config.yaml")  # the resolved config is itself a loadable config
    model = Decoder(cfg.model, cfg.moe)
    meta = load_training_state(ckpt, model, None, init_parallel(cfg.parallel, "cpu"))
    assert meta["step"] == 40 and meta["consumed_samples"] == 40 * 16


def test_training_in_process_matches_a_manual_loop(tmp_path):
    """run() is the loop we think it is: same seed -> same loss as stepping by hand."""
    from data.loader import build_data
    from train.optim import build_optimizer, set_lr
    from train.step import train_step
    from train.trainer import run

    overrides = [
        "train.max_steps=3",
        "logging.interval=1",
        "train.eval_interval=0",
        f"train.run_dir={tmp_path}",
        "model.num_layers=2",
        "logging.progress_bar=false",
    ]
    cfg = load_config(ROOT / "configs/tiny-cpu.yaml", overrides)
    record = run(cfg)

    model = build_model(cfg.model, cfg.moe, init_parallel(cfg.parallel, "cpu"), cfg.train.seed)
    opt = build_optimizer(model, cfg.optim)
    data = build_data(cfg.data, cfg.train.seed)
    for step in range(3):
        set_lr(opt, lr_at(step, cfg.optim, 3))
        batch = data.global_batch(step * 16, 16)
        result = train_step(model, opt, list(batch.split(cfg.train.micro_batch_size)), cfg.optim.clip_grad)
    assert record["loss"] == pytest.approx(result.loss.item(), rel=1e-6)


def test_bf16_autocast_runs_on_cpu(tmp_path):
    from train.trainer import run

    cfg = load_config(
        ROOT / "configs/tiny-cpu.yaml",
        [
            "train.max_steps=2",
            "train.dtype=bf16",
            "logging.interval=1",
            "train.eval_interval=0",
            f"train.run_dir={tmp_path}",
            "model.num_layers=2",
            "logging.progress_bar=false",
        ],
    )
    record = run(cfg)
    assert math.isfinite(record["loss"])


def test_lr_schedule_warmup_then_cosine_to_floor():
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, warmup_init_lr=0.0, decay="cosine")
    assert lr_at(0, cfg, 110) == pytest.approx(0.1)
    assert lr_at(9, cfg, 110) == pytest.approx(1.0)
    assert lr_at(10, cfg, 110) == pytest.approx(1.0)
    assert lr_at(60, cfg, 110) == pytest.approx(0.55)
    assert lr_at(110, cfg, 110) == pytest.approx(0.1)
    assert lr_at(500, cfg, 110) == pytest.approx(0.1)
    linear = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=0, decay="linear")
    assert lr_at(25, linear, 100) == pytest.approx(0.75)


def test_peak_memory_is_logged_each_interval(tmp_path, capsys):
    from train.trainer import run

    overrides = ["train.max_steps=2", "logging.interval=1", "train.eval_interval=0", "model.num_layers=1"]
    overrides += ["logging.progress_bar=false", "logging.wandb.mode=disabled", f"train.run_dir={tmp_path}"]
    record = run(load_config(ROOT / "configs/tiny-cpu.yaml", overrides))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and record["mem_peak_gib"] == records[-1]["mem_peak_gib"]
    # CPU: the process's peak RSS, at least the model and optimizer state it has held (a few MiB here).
    for r in records:
        assert 0.001 < r["mem_peak_gib"] < 1024
    assert "mem_reserved_gib" not in records[-1]  # CUDA's caching allocator only
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    assert len(lines) == 2
    for r, line in zip(records, lines, strict=True):
        assert f"mem {r['mem_peak_gib']:.2f} GiB" in line
