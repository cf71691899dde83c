"""Checkpoints: exact resume, exit_at_step, crash safety, damaged/foreign/unsafe checkpoints, non-finite steps,
SIGTERM."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from model.transformer import Decoder
from parallel.mesh import init_parallel
from train.checkpoint import load_training_state
from train.checkpoint_meta import latest_checkpoint, read_meta
from train.checkpoint_safety import CheckpointError
from train.config_load import load_config
from train.trainer import run

ROOT = Path(__file__).resolve().parents[1]
QUICK = [
    "model.num_layers=2",
    "logging.interval=1",
    "train.eval_interval=0",
    "logging.progress_bar=false",
    "train.max_steps=8",
]


def _cfg(run_dir: Path, *extra: str):
    return load_config(ROOT / "configs/tiny-cpu.yaml", [*QUICK, f"train.run_dir={run_dir}", *extra])


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("async_save", [False, True])
def test_resume_is_bit_exact(tmp_path, async_save):
    run(_cfg(tmp_path / "straight", "train.resume=never"))
    split = tmp_path / "split"
    run(_cfg(split, "train.exit_at_step=4", f"checkpoint.async={str(async_save).lower()}"))
    assert latest_checkpoint(split / "checkpoints").name == "step_00000004"
    assert len(_losses(split)) == 4
    run(_cfg(split, f"checkpoint.async={str(async_save).lower()}"))  # resume: auto
    assert _losses(split) == _losses(tmp_path / "straight")  # identical floats at every step, not approximately
    assert read_meta(latest_checkpoint(split / "checkpoints"))["consumed_samples"] == 8 * 16


ROUTER_STATE = [
    "moe.router.kind=etr",
    "moe.gating_residual=false",
    "moe.capacity_factor=1.5",
    "moe.router.etr.capacity_schedule=lower_bound",
    "moe.router.etr.recompute_every=3",
    "moe.balance=[{kind: switch}, {kind: aux_free_bias, coeff: 0.01}]",
]


def test_resume_restores_the_router_state_no_gradient_moves(tmp_path):
    """The aux-free bias and the ETR capacity schedule are buffers changed between steps: a resume that lost them
    would route differently after the restart."""
    run(_cfg(tmp_path / "straight", "train.resume=never", *ROUTER_STATE))
    last = json.loads((tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()[-1])
    for layer in last["routing"]:  # the state is logged per MoE layer
        assert len(layer["expert_bias"]) == 12 and any(b != 0 for b in layer["expert_bias"])
        assert 0.5 <= layer["etr_capacity_factor"] <= 1.5
    split = tmp_path / "split"
    run(_cfg(split, "train.exit_at_step=4", *ROUTER_STATE))
    from train.checkpoint_meta import SafeFileSystemReader

    keys = SafeFileSystemReader(split / "checkpoints" / "step_00000004").read_metadata().state_dict_metadata
    assert any(k.endswith("router.expert_bias_E") for k in keys) and any(k.endswith("router.etr_state") for k in keys)
    run(_cfg(split, *ROUTER_STATE))
    assert _losses(split) == _losses(tmp_path / "straight")


def test_exit_at_step_keeps_the_schedule_of_max_steps(tmp_path):
    run(_cfg(tmp_path, "train.exit_at_step=3", "optim.warmup_steps=2"))
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    from train.optim import lr_at

    cfg = _cfg(tmp_path, "optim.warmup_steps=2")
    assert lrs == [lr_at(s, cfg.optim, 8) for s in range(3)]


def test_resume_never_and_explicit_path(tmp_path):
    run(_cfg(tmp_path, "train.exit_at_step=2", "checkpoint.interval=1", "checkpoint.keep_last=5"))
    first = tmp_path / "checkpoints" / "step_00000001"
    run(_cfg(tmp_path, f"train.resume={first}", "train.exit_at_step=2"))
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    record = run(_cfg(tmp_path, "train.resume=never", "train.exit_at_step=1"))
    assert record["step"] == 1


def test_a_killed_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    run(_cfg(tmp_path, "train.exit_at_step=2"))
    ckpts = tmp_path / "checkpoints"
    # What a kill -9 during the next save leaves: a hidden temp directory with partial shards, no meta.json.
    partial = ckpts / ".tmp-step_00000003"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"\0" * 100)
    assert latest_checkpoint(ckpts).name == "step_00000002"
    record = run(_cfg(tmp_path, "train.exit_at_step=3"))  # resumes from step 2 and replaces the temp directory
    assert record["step"] == 3 and latest_checkpoint(ckpts).name == "step_00000003"
    assert not partial.exists()


@pytest.mark.slow
def test_kill_9_at_random_moments_never_leaves_a_broken_latest(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "train",
        "configs/tiny-cpu.yaml",
        *QUICK,
        "train.max_steps=400",
        "checkpoint.interval=1",
        f"train.run_dir={tmp_path}",
    ]
    for delay in (4.0, 5.3, 6.1):
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        latest = latest_checkpoint(tmp_path / "checkpoints")
        if latest is None:
            continue
        cfg = _cfg(tmp_path)
        model = Decoder(cfg.model, cfg.moe)

        meta = load_training_state(latest, model, None, init_parallel(cfg.parallel, "cpu"))
        assert meta["step"] == int(latest.name.split("_")[1])


def test_damaged_and_foreign_checkpoints_are_one_line_errors(tmp_path):
    run(_cfg(tmp_path, "train.exit_at_step=1"))
    step = tmp_path / "checkpoints" / "step_00000001"
    cfg = _cfg(tmp_path)

    ctx = init_parallel(cfg.parallel, "cpu")

    # Different model shape: named field, before any tensor is read.
    with pytest.raises(CheckpointError, match=r"meta.json: model.hidden_size is 128 in the checkpoint but 64"):
        run(_cfg(tmp_path, "model.hidden_size=64"))

    # Truncated shard: the file is named.
    shard = step / "__0_0.distcp"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"__0_0.distcp: truncated"):
        load_training_state(step, Decoder(cfg.model, cfg.moe), None, ctx)
    shard.write_bytes(data)

    # Missing step field in meta.json.
    meta = json.loads((step / "meta.json").read_text())
    del meta["step"]
    (step / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"meta.json: field 'step' is missing"):
        read_meta(step)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/moepp-pwned",))


def test_loading_never_executes_pickled_code(tmp_path):
    run(_cfg(tmp_path, "train.exit_at_step=1"))
    step = tmp_path / "checkpoints" / "step_00000001"
    (step / ".metadata").write_bytes(pickle.dumps(_Evil()))
    cfg = _cfg(tmp_path)

    with pytest.raises(CheckpointError, match=r"\.metadata: unreadable DCP metadata \(refusing to load posix.system"):
        # Unverified: the unpickler itself refuses (with checksums on, the altered file is refused before it is read).
        load_training_state(step, Decoder(cfg.model, cfg.moe), None, init_parallel(cfg.parallel, "cpu"), verify=False)
    assert not Path("/tmp/moepp-pwned").exists()


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    import train.trainer as trainer

    real_step = trainer.train_step
    calls = {"n": 0}

    def poisoned(model, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] != 3:
            return real_step(model, *args, **kwargs)
        # One bad step: a NaN weight makes the loss and gradients NaN; the update must be skipped.
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        with torch.no_grad():
            model.output.weight[0, 0] = float("nan")
        result = real_step(model, *args, **kwargs)
        with torch.no_grad():
            model.output.weight[0, 0] = before["output.weight"][0, 0]
        assert result.skipped
        assert all(torch.equal(before[n], p.detach()) for n, p in model.named_parameters())
        return result

    monkeypatch.setattr(trainer, "train_step", poisoned)
    record = run(_cfg(tmp_path, "train.max_steps=5"))
    assert record["step"] == 5 and record["skipped_steps"] == 1

    def always_nan(model, *args, **kwargs):
        with torch.no_grad():
            model.output.weight[0, 0] = float("nan")
        return real_step(model, *args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", always_nan)
    with pytest.raises(RuntimeError, match=r"train.max_nonfinite_steps: 2 non-finite steps in a row at step 7"):
        run(_cfg(tmp_path, "train.max_steps=10", "train.max_nonfinite_steps=2"))
    # The run stopped without saving: the last good checkpoint (step 5) is still the latest.
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_00000005"


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_exits_cleanly(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "train",
        "configs/tiny-cpu.yaml",
        *QUICK,
        "train.max_steps=10000",
        f"train.run_dir={tmp_path}",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # wait until training is under way
        if line.startswith("step"):
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "SIGTERM, saving and exiting" in out
    latest = latest_checkpoint(tmp_path / "checkpoints")
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert latest is not None and read_meta(latest)["step"] == steps[-1] < 10000


def test_resume_may_change_loss_coefficients_but_not_the_bias_state(tmp_path):
    run(_cfg(tmp_path, "train.exit_at_step=2"))
    # Coefficients, scope and capacity are training choices: a resume may change them.
    changed = "moe.balance=[{kind: heterogeneous, coeff: 0.02}, {kind: zloss}]"
    run(_cfg(tmp_path, "train.exit_at_step=4", changed, "moe.balance_scope=global_batch", "moe.capacity_factor=1.5"))
    assert read_meta(latest_checkpoint(tmp_path / "checkpoints"))["step"] == 4
    # An aux-free bias is saved state: adding it on resume is refused in one line, and the checkpoint is untouched.
    with pytest.raises(CheckpointError) as e:
        run(_cfg(tmp_path, "moe.balance=[{kind: heterogeneous}, {kind: aux_free_bias}]"))
    assert "aux_free_bias" in str(e.value) and "\n" not in str(e.value)
    assert read_meta(latest_checkpoint(tmp_path / "checkpoints"))["step"] == 4
