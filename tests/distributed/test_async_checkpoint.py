"""Asynchronous checkpoints under torchrun (2 processes): ep2 and dp2 runs complete and resume to the same losses (dp2
after a kill -9 in the middle of a background write, from the last complete step), and a rank whose write never ends
stops the run with one line per waiting rank instead of a hang."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from train.checkpoint import STALL_WRITE_ENV

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

# Saves at steps 2 and 4 (in the background) and 6 (the final one).
COMMON = [
    "model.num_layers=2",
    "logging.interval=1",
    "train.eval_interval=0",
    "logging.progress_bar=false",
    "train.max_steps=6",
    "checkpoint.async=true",
    "checkpoint.interval=2",
    "checkpoint.keep_last=3",
]


def _command(run_dir: Path, overrides: list[str]) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return [*launcher, "-m", "train", "configs/tiny-cpu.yaml", *COMMON, f"train.run_dir={run_dir}", *overrides]


def _env(stall: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != STALL_WRITE_ENV}
    env["OMP_NUM_THREADS"] = "1"
    if stall is not None:
        env[STALL_WRITE_ENV] = stall
    return env


def _train(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        _command(run_dir, list(overrides)), cwd=ROOT, capture_output=True, text=True, timeout=600, env=_env()
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _records(run_dir)}


def _checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def _logged_steps(run_dir: Path) -> list[int]:
    """Steps in metrics.jsonl so far, while the run is writing it."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(line)["step"] for line in lines if line.endswith("}")]


def _kill_everything(torchrun: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers (each worker runs in a session of its own), as a node failure would."""
    workers = [
        int(pid)
        for task in Path(f"/proc/{torchrun.pid}/task").iterdir()
        for pid in (task / "children").read_text().split()
    ]
    for group in (torchrun.pid, *workers):
        with contextlib.suppress(ProcessLookupError):  # already gone
            os.killpg(group, signal.SIGKILL)
    torchrun.wait(timeout=60)


def test_ep2_async_checkpoints_resume_to_the_same_losses(tmp_path):
    straight = tmp_path / "straight"
    _train(straight, "parallel.ep=2")
    assert _checkpoints(straight) == ["latest", "step_00000002", "step_00000004", "step_00000006"]
    assert (straight / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    resumed = tmp_path / "resumed"
    proc = _train(resumed, "parallel.ep=2", f"train.resume={straight / 'checkpoints' / 'step_00000002'}")
    assert "(step 2)" in proc.stdout
    reference = _losses(straight)
    assert _losses(resumed) == {step: reference[step] for step in (3, 4, 5, 6)}


def test_dp2_kill_during_background_write_resumes_from_last_complete_step(tmp_path):
    reference = tmp_path / "straight"
    _train(reference)
    assert _checkpoints(reference) == ["latest", "step_00000002", "step_00000004", "step_00000006"]

    run_dir = tmp_path / "killed"
    # The write of step 4 stalls on both ranks once their shards are on disk; training goes on meanwhile.
    torchrun = subprocess.Popen(
        _command(run_dir, []),
        cwd=ROOT,
        env=_env(stall="4"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    pending = run_dir / "checkpoints" / ".tmp-step_00000004"
    try:
        deadline = time.monotonic() + 600
        while not (
            (pending / "__0_0.distcp").is_file()
            and (pending / "__1_0.distcp").is_file()
            and 5 in _logged_steps(run_dir)
        ):
            assert torchrun.poll() is None, "the run ended before its background write of step 4 could be killed"
            assert time.monotonic() < deadline, "the run never reached the stalled write of step 4"
            time.sleep(0.2)
    finally:
        _kill_everything(torchrun)
    assert not (pending / "meta.json").exists()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000002"

    proc = _train(run_dir)  # resume: auto
    assert "(step 2)" in proc.stdout
    assert _losses(run_dir) == _losses(reference)
    assert [r["step"] for r in _records(run_dir)] == [1, 2, 3, 4, 5, 6]
    assert _checkpoints(run_dir) == ["latest", "step_00000002", "step_00000004", "step_00000006"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000006"


def test_a_rank_whose_background_write_never_ends_stops_the_run_in_one_line(tmp_path):
    proc = subprocess.run(
        _command(tmp_path, ["parallel.timeout_s=5"]),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(stall="2@1"),  # rank 1 never finishes writing step 2; rank 0 waits for it in the save's collectives
    )
    assert proc.returncode != 0
    errors = sorted(line for line in proc.stderr.splitlines() if line.startswith("error: "))
    assert len(errors) == 2, proc.stderr[-3000:]
    assert errors[0].startswith("error: checkpoint step_00000002: background write did not finish within 5 s on rank 1")
    assert errors[1].startswith("error: checkpoint step_00000002: background write failed on rank 0 (")
    assert all(line.endswith("no complete checkpoint was published yet") for line in errors)
    assert _checkpoints(tmp_path) == [".tmp-step_00000002"]
