"""Publishing checkpoints: a non-finite state is never saved, published or pruned; re-saving a step is atomic at
every point; a missing or stale `latest` falls back to the newest complete step; kill -9 during a save or during
the publish of `latest` resumes to the losses of an uninterrupted run and the next save removes the leftovers."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.transformer import Decoder
from parallel.config import ParallelConfig
from parallel.mesh import init_parallel
from train.checkpoint import KILL_AT_ENV, Checkpointer, load_training_state
from train.checkpoint_meta import complete_steps, find_latest, latest_checkpoint, read_meta
from train.checkpoint_safety import CheckpointError
from train.config_load import load_config
from train.optim import build_optimizer
from train.step import state_is_finite, train_step
from train.trainer import NonFiniteStateError, run

ROOT = Path(__file__).resolve().parents[1]
QUICK = [
    "model.num_layers=2",
    "logging.interval=1",
    "train.eval_interval=0",
    "logging.progress_bar=false",
    "train.max_steps=6",
    "checkpoint.interval=2",
]
LEFTOVER_PREFIXES = (".tmp-", ".old-", ".latest.tmp-")


def _cfg(run_dir: Path, *extra: str):
    return load_config(ROOT / "configs/tiny-cpu.yaml", [*QUICK, f"train.run_dir={run_dir}", *extra])


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _leftovers(ckpt_dir: Path) -> list[str]:
    return sorted(p.name for p in ckpt_dir.iterdir() if p.name.startswith(LEFTOVER_PREFIXES))


def _digest(step_dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(step_dir.iterdir())}


# ---------------------------------------------------------------------------------------------------------------
# Non-finite state


def test_state_check_covers_loss_gradients_parameters_and_optimizer_state():
    cfg = _cfg(Path("unused"))
    model = Decoder(cfg.model, cfg.moe)
    opt = build_optimizer(model, cfg.optim)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 17))
    result = train_step(model, opt, [tokens], cfg.optim.clip_grad)
    assert state_is_finite(model, opt, result, distributed=False)

    weight = model.output.weight
    exp_avg_sq = opt.state[weight]["exp_avg_sq"]
    for tensor, bad in ((weight, float("nan")), (weight, 1e30), (exp_avg_sq, float("inf"))):
        # 1e30 is finite, but its square overflows: the weights a huge learning rate leaves behind.
        saved = tensor.detach().clone()
        with torch.no_grad():
            tensor[0, 0] = bad
        assert not state_is_finite(model, opt, result, distributed=False), bad
        with torch.no_grad():
            tensor.copy_(saved)
    assert state_is_finite(model, opt, result, distributed=False)

    skipped = type(result)(result.loss, result.aux_loss, result.grad_norm, result.routing, skipped=True)
    assert not state_is_finite(model, opt, skipped, distributed=False)
    nan_loss = type(result)(torch.tensor(float("nan")), result.aux_loss, result.grad_norm, result.routing)
    assert not state_is_finite(model, opt, nan_loss, distributed=False)


def test_huge_lr_resume_never_publishes_or_prunes_the_good_checkpoint(tmp_path, capsys):
    run(_cfg(tmp_path, "train.exit_at_step=4", "checkpoint.keep_last=1"))
    capsys.readouterr()
    ckpts = tmp_path / "checkpoints"
    good = ckpts / "step_00000004"
    before = _digest(good)
    blow_up = ["optim.lr=1e30", "optim.min_lr=1e30", "checkpoint.interval=1", "checkpoint.keep_last=1"]

    # Step 5 applies the update (its loss and gradients were finite) and leaves ~1e29 weights; steps 6.. are NaN.
    with pytest.raises(NonFiniteStateError) as e:
        run(_cfg(tmp_path, *blow_up, "train.max_nonfinite_steps=20"))
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("train: the state at step 6, the last of this run, is non-finite and was not saved")
    assert f"the last good checkpoint, {good}, is intact" in message
    out = capsys.readouterr().out
    assert "step 5: non-finite loss, gradients or model/optimizer state, no checkpoint" in out
    assert "checkpoint: " not in out

    # What the message says is true: the checkpoint is there, untouched, `latest`, and loads.
    assert [p.name for p in complete_steps(ckpts)] == ["step_00000004"] and latest_checkpoint(ckpts) == good
    assert _digest(good) == before
    cfg = _cfg(tmp_path)
    model = Decoder(cfg.model, cfg.moe)
    load_training_state(good, model, None, init_parallel(cfg.parallel, "cpu"))
    assert all(torch.isfinite(p).all() for p in model.parameters())

    # The CLI: max_nonfinite_steps stops the run with one line naming the same checkpoint.
    from train.__main__ import main

    args = [f"train.run_dir={tmp_path}", *QUICK, *blow_up, "train.max_nonfinite_steps=2", "train.max_steps=8"]
    assert main(["configs/tiny-cpu.yaml", *args]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert err == [
        "error: train.max_nonfinite_steps: 2 non-finite steps in a row at step 7; the last good checkpoint, "
        f"{good}, is intact; lower optim.lr or check the data, then resume"
    ]
    assert latest_checkpoint(ckpts) == good and _digest(good) == before


# ---------------------------------------------------------------------------------------------------------------
# Re-saving a step, missing or stale `latest`


def _checkpointer_fixture(tmp_path: Path, keep_last: int = 2):
    cfg = _cfg(tmp_path)
    ctx = init_parallel(ParallelConfig(), "cpu")
    model = Decoder(cfg.model, cfg.moe)
    opt = build_optimizer(model, cfg.optim)
    train_step(model, opt, [torch.randint(0, cfg.model.vocab_size, (2, 17))], cfg.optim.clip_grad)
    ckpt = Checkpointer(tmp_path / "checkpoints", ctx, keep_last=keep_last)

    def save(step: int, version: int) -> Path:
        # The version travels in meta.json, so a test can tell an old copy of a step from its new one.
        return ckpt.save(step, model, opt, {"consumed_samples": version, "config": cfg.to_dict()})

    def loads(path: Path) -> int:
        fresh = Decoder(cfg.model, cfg.moe)
        meta = load_training_state(path, fresh, build_optimizer(fresh, cfg.optim), ctx)
        assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters(), strict=True))
        return meta["consumed_samples"]

    return ckpt.dir, save, loads


# Where the re-save of step 4 is cut short, and what latest_checkpoint must then find: (step, version).
CUT_POINTS = {
    "moving the old copy aside": ("replace", lambda src, dst: Path(dst).name == ".old-step_00000004", (4, 1)),
    "moving the new copy in": ("replace", lambda src, dst: Path(src).name == ".tmp-step_00000004", (2, 1)),
    "replacing latest": ("replace", lambda src, dst: Path(dst).name == "latest", (4, 2)),
    "deleting the old copy": ("rmtree", lambda path, *_: Path(path).name == ".old-step_00000004", (4, 2)),
}


@pytest.mark.parametrize("cut", list(CUT_POINTS))
def test_resaving_a_step_is_atomic_at_every_point(tmp_path, monkeypatch, cut):
    ckpt_dir, save, loads = _checkpointer_fixture(tmp_path)
    save(2, version=1)
    save(4, version=1)  # `latest` names step 4, which a run resumed from step 2 saves again
    which, matches, (want_step, want_version) = CUT_POINTS[cut]
    real = {"replace": os.replace, "rmtree": shutil.rmtree}[which]

    def cut_short(*args, **kwargs):
        if matches(*args):
            raise OSError(f"killed while {cut}")
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(os if which == "replace" else shutil, which, cut_short)
        with pytest.raises(OSError, match="killed while"):
            save(4, version=2)

    found = latest_checkpoint(ckpt_dir)
    assert found == ckpt_dir / f"step_{want_step:08d}"
    assert loads(found) == want_version  # complete: meta.json and every shard load
    note = find_latest(ckpt_dir)[1]
    assert (note is not None) == (cut == "moving the new copy in")
    # The next successful save publishes and leaves nothing of the interrupted one.
    save(6, version=3)
    assert latest_checkpoint(ckpt_dir) == ckpt_dir / "step_00000006" and loads(ckpt_dir / "step_00000006") == 3
    assert _leftovers(ckpt_dir) == []
    assert [p.name for p in complete_steps(ckpt_dir)] == [f"step_{want_step:08d}", "step_00000006"]


def test_pruning_keeps_later_steps_and_never_leaves_a_half_deleted_step(tmp_path, monkeypatch):
    ckpt_dir, save, loads = _checkpointer_fixture(tmp_path, keep_last=1)
    save(8, version=1)
    save(4, version=1)  # a run resumed from an earlier step: step 8 is not older than step 4, so it stays
    assert [p.name for p in complete_steps(ckpt_dir)] == ["step_00000004", "step_00000008"]

    def dies_midway(path, *args, **kwargs):
        (Path(path) / "meta.json").unlink(missing_ok=True)  # part of the directory is gone
        raise OSError("killed while pruning")

    with monkeypatch.context() as m:
        m.setattr(shutil, "rmtree", dies_midway)
        with pytest.raises(OSError, match="killed while pruning"):
            save(6, version=2)  # keep_last=1 prunes step 4
    # The step being pruned was renamed aside first: no step directory is half deleted.
    assert sorted(p.name for p in ckpt_dir.iterdir() if p.name.startswith("step_")) == [
        "step_00000006",
        "step_00000008",
    ]
    assert latest_checkpoint(ckpt_dir) == ckpt_dir / "step_00000006" and loads(ckpt_dir / "step_00000006") == 2
    save(10, version=3)
    assert _leftovers(ckpt_dir) == [] and [p.name for p in complete_steps(ckpt_dir)] == ["step_00000010"]


def test_missing_or_stale_latest_falls_back_to_the_newest_complete_step(tmp_path):
    ckpt_dir, save, _ = _checkpointer_fixture(tmp_path)
    assert find_latest(ckpt_dir) == (None, None)  # nothing saved yet: a fresh start
    save(2, version=1)
    save(4, version=1)
    (ckpt_dir / ".tmp-step_00000006").mkdir()  # a save killed while writing: never complete
    pointer = ckpt_dir / "latest"
    for content, why in (
        (None, "is missing"),
        (b"step_00000009\n", "names 'step_00000009', which is missing or incomplete"),
        (b"", "is empty or unreadable"),
        (b"\xff\xfe", "is empty or unreadable"),
        (b"../step_00000004\n", "which is missing or incomplete"),
    ):
        pointer.unlink(missing_ok=True)
        if content is not None:
            pointer.write_bytes(content)
        found, note = find_latest(ckpt_dir)
        assert found == ckpt_dir / "step_00000004", content
        assert why in note and "using the newest complete step, step_00000004" in note and "\n" not in note
    shutil.rmtree(ckpt_dir / "step_00000002")
    shutil.rmtree(ckpt_dir / "step_00000004")
    with pytest.raises(CheckpointError, match=r"latest: .* holds no complete step directory"):
        find_latest(ckpt_dir)


def test_missing_latest_resumes_from_the_newest_complete_step_and_keeps_the_metrics(tmp_path, capsys):
    run(_cfg(tmp_path / "straight", "train.resume=never"))
    split = tmp_path / "split"
    run(_cfg(split, "train.exit_at_step=4", "checkpoint.keep_last=3"))
    ckpts = split / "checkpoints"
    # What a kill between the rename of the first checkpoint and the write of `latest` leaves (plus strays).
    (ckpts / "latest").unlink()
    (ckpts / ".latest.tmp-12345").write_text("step_00000004\n")
    (ckpts / ".old-step_00000002").mkdir()
    logged = (split / "metrics.jsonl").read_text()
    capsys.readouterr()
    run(_cfg(split, "checkpoint.keep_last=3"))
    out = capsys.readouterr().out
    assert f"resume: {ckpts / 'latest'} is missing; using the newest complete step, step_00000004" in out
    assert f"resumed from {ckpts / 'step_00000004'} (step 4)" in out
    assert (split / "metrics.jsonl").read_text().startswith(logged)  # steps 1-4 kept as they were written
    assert _losses(split) == _losses(tmp_path / "straight")
    assert _leftovers(ckpts) == [] and read_meta(latest_checkpoint(ckpts))["step"] == 6


# ---------------------------------------------------------------------------------------------------------------
# kill -9


@pytest.mark.slow
@pytest.mark.parametrize(
    "kill_at, resumes_from",
    [("meta:4", 2), ("latest:2", 2)],
    ids=["during-a-synchronous-save", "during-the-publish-of-latest"],
)
def test_kill_9_resumes_to_the_uninterrupted_losses(tmp_path, kill_at, resumes_from):
    run(_cfg(tmp_path / "straight", "train.resume=never"))
    run_dir = tmp_path / "killed"
    ckpts = run_dir / "checkpoints"
    cmd = [sys.executable, "-m", "train", "configs/tiny-cpu.yaml", *QUICK, f"train.run_dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the same float sums as in-process

    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**env, KILL_AT_ENV: kill_at})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    if kill_at == "meta:4":  # shards written, meta.json not: the temp directory is not a checkpoint
        assert (ckpts / ".tmp-step_00000004").is_dir() and not (ckpts / ".tmp-step_00000004" / "meta.json").exists()
        assert (ckpts / "latest").read_text().strip() == "step_00000002"
    else:  # the first step directory is in place, `latest` was never written
        assert (ckpts / "step_00000002" / "meta.json").is_file() and not (ckpts / "latest").exists()
        assert any(p.name.startswith(".latest.tmp-") for p in ckpts.iterdir())
    logged = (run_dir / "metrics.jsonl").read_text()

    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"resumed from {ckpts / f'step_{resumes_from:08d}'} (step {resumes_from})" in proc.stdout
    if kill_at.startswith("latest"):
        assert f"resume: {ckpts / 'latest'} is missing; using the newest complete step" in proc.stdout
    kept = [line for line in logged.splitlines(keepends=True) if json.loads(line)["step"] <= resumes_from]
    assert len(kept) == resumes_from and (run_dir / "metrics.jsonl").read_text().startswith("".join(kept))
    assert _losses(run_dir) == _losses(tmp_path / "straight")
    assert _leftovers(ckpts) == [] and latest_checkpoint(ckpts).name == "step_00000006"
