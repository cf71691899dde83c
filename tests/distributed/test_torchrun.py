"""`python -m train` under torchrun: each layout logs the same global-batch loss curve as one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

COMMON = [
    "train.max_steps=6",
    "logging.interval=1",
    "train.eval_interval=0",
    "model.num_layers=2",
    "logging.progress_bar=false",
]


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _train(run_dir: Path, nproc: int, overrides: list[str]) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [
        *(launcher if nproc > 1 else [sys.executable]),
        "-m",
        "train",
        "configs/tiny-cpu.yaml",
        *COMMON,
        f"train.run_dir={run_dir}",
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_layouts_under_torchrun_match_single_process(tmp_path):
    _train(tmp_path / "single", 1, [])
    reference = _losses(tmp_path / "single")
    for name, overrides in {
        "ep4": ["parallel.ep=4"],
        "tp2-sp-xep2": ["parallel.tp=2", "parallel.ep=2", "parallel.sequence_parallel=true"],
        "pp2xep2": ["parallel.pp=2", "parallel.ep=2"],
    }.items():
        proc = _train(tmp_path / name, 4, overrides)
        assert _losses(tmp_path / name) == pytest.approx(reference, rel=1e-4), name
        assert "world 4" in proc.stdout


def test_bad_layout_is_one_line_before_training(tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3"]
    proc = subprocess.run(
        [*launcher, "-m", "train", "configs/tiny-cpu.yaml", "parallel.tp=2", f"train.run_dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("config error:")]
    # Printed once (by rank 0), not once per process.
    assert lines == [
        "config error: parallel.tp: tp x pp = 2 x 1 = 2 does not divide WORLD_SIZE=3; change tp/pp or "
        "the number of processes"
    ]
