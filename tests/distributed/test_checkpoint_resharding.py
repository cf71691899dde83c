"""Distributed checkpoints: a checkpoint saved in one layout loads in another (DCP reshards: logits equal, AdamW
state restored), and a resumed run continues bit for bit (expert parallelism through torchrun, fsdp with experts
sharded over their replicas in-process)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed import workers
from tests.distributed.harness import run_world

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_dp2_ep2_checkpoint_loads_under_ep4_ep1_tp2(tmp_path):
    run_world(workers.save_layout, 4, 1, 2, str(tmp_path))  # dp=4 = 2 expert replicas x ep 2
    for world, tp, ep in ((4, 1, 4), (1, 1, 1), (2, 2, 1)):
        run_world(workers.load_layout, world, tp, ep, str(tmp_path))


def test_tp2_ep2_checkpoint_loads_in_one_process(tmp_path):
    run_world(workers.save_layout, 4, 2, 2, str(tmp_path))
    run_world(workers.load_layout, 1, 1, 1, str(tmp_path))


def test_fsdp_checkpoint_loads_under_hsdp_replicate_tp_and_one_process(tmp_path):
    run_world(workers.save_in, 4, {"data_parallel": "fsdp", "ep": 2}, str(tmp_path))  # experts: 2 of 8 per rank
    layouts = [{"data_parallel": "hsdp", "dp_shard": 2}, {"tp": 2, "ep": 2}, {"data_parallel": "fsdp", "tp": 2}]
    run_world(workers.load_in, 4, layouts, str(tmp_path))
    workers.load_in(0, 1, [{}], str(tmp_path))  # one process: plain tensors


def test_fsdp_tp2_ep2_checkpoint_passes_the_load_checks_in_one_process(tmp_path):
    # Dense weights are strided (dp, tp) shards, FFN experts shards on (edp, ep): the metadata's chunks must still
    # tile every tensor, with every tensor of the one-process model covered, and the checksums recorded.
    run_world(workers.save_in, 4, {"data_parallel": "fsdp", "tp": 2, "ep": 2}, str(tmp_path))
    workers.load_in(0, 1, [{}], str(tmp_path))


def test_one_process_checkpoint_loads_under_fsdp_and_hsdp(tmp_path):
    workers.save_in(0, 1, {}, str(tmp_path))
    layouts = [{"data_parallel": "fsdp", "ep": 2}, {"data_parallel": "hsdp", "dp_shard": 2, "ep": 2}]
    run_world(workers.load_in, 4, layouts, str(tmp_path))


def test_fsdp_resume_is_bit_exact(tmp_path):
    run_world(workers.resume_exact, 4, {"data_parallel": "fsdp", "ep": 2}, str(tmp_path))


def _torchrun(run_dir: Path, *extra: str) -> None:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "train",
        "configs/tiny-cpu.yaml",
        "model.num_layers=2",
        "logging.interval=1",
        "train.eval_interval=0",
        "logging.progress_bar=false",
        "train.max_steps=6",
        "parallel.ep=2",
        f"train.run_dir={run_dir}",
        *extra,
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def test_ep2_resume_is_bit_exact(tmp_path):
    _torchrun(tmp_path / "straight")
    _torchrun(tmp_path / "split", "train.exit_at_step=3")
    _torchrun(tmp_path / "split")

    def losses(d: Path) -> list[float]:
        return [json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()]

    assert losses(tmp_path / "split") == losses(tmp_path / "straight")
    assert len(losses(tmp_path / "straight")) == 6
