"""Sharded checkpoints with PyTorch Distributed Checkpoint (DCP): every rank writes its own shards, any layout
can load them (DCP reshards), and a kill at any moment never leaves a half checkpoint that looks complete.

Layout of a checkpoint directory `<dir>/step_00001000/`:
  `__<rank>_0.distcp` + `.metadata`  DCP shards of the model and AdamW state (tensors only)
  `meta.json`                        step, consumed samples, RNG state, the run's config, the size and CRC-32
                                     of every other file (written last)
`<dir>/latest` names the newest complete step directory; it is replaced atomically after the rename.

Sequence of a save: all ranks write into `.tmp-step_XXXXXXXX` -> barrier -> rank 0 hashes the files and writes
meta.json, renames the directory to `step_XXXXXXXX` (a step saved before is first renamed aside to
`.old-step_XXXXXXXX` and deleted only once the new one is in place and `latest` names it), then rewrites `latest`,
then removes what earlier kills left (`.tmp-*`, `.old-*`, `.latest.tmp-*`) and prunes old steps. When `latest` is
missing or names no complete step, the newest step directory with a meta.json is the latest checkpoint.

Loading compares every file with its checksum, reads the DCP metadata through an unpickler that builds only the
exact classes DCP's metadata is made of, refuses byte entries and any model or optimizer tensor the checkpoint does
not cover entirely, and reads tensors with `weights_only=True`: a checkpoint can never execute code or leave a
parameter unfilled (train/checkpoint_safety.py, train/checkpoint_integrity.py).

An asynchronous save writes in a background thread whose collectives run on a gloo group of their own (sharing the
training step's groups, the two threads' collectives would interleave and deadlock); it is published the same way,
once every rank's write has finished.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import threading
import warnings
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.tensor import DTensor

from parallel.data_parallel import reshard
from parallel.mesh import CollectiveError, ParallelContext
from train.checkpoint_integrity import require_checksums_for, shard_checksums, verify_checksums
from train.checkpoint_meta import (
    LATEST_FILE,
    META_FILE,
    SafeFileSystemReader,
    read_meta,
    step_dir_name,
    step_number,
    verify_shards,
)
from train.checkpoint_safety import CheckpointError, TensorsOnlyLoadPlanner, check_covers, referenced_files

# Fault injection for the multi-process tests, unset in real runs: STEP or STEP@RANK makes the shard write of that
# step stall on every rank (or on RANK only) once its shards are on disk, before DCP's `.metadata`, until the process
# ends; a test can then kill a run in the middle of a save, or watch the other ranks time out.
STALL_WRITE_ENV = "MOEPP_TEST_STALL_CHECKPOINT_WRITE"
TMP_PREFIX = ".tmp-"  # a step being written: never complete until renamed
OLD_PREFIX = ".old-"  # a step being replaced or pruned: renamed aside, then deleted
# Crash tests: `<point>:<step>` makes rank 0 SIGKILL itself at that point of that step's save (see _kill_point).
KILL_AT_ENV = "MOEPP_TEST_KILL_AT"


# ---------------------------------------------------------------------------------------------------------------
# State dicts: live tensors, wrapped so DCP knows how each is sharded


def _wrap(t: Tensor) -> Tensor:
    """DTensors (tensor-, expert- and data-parallel shards) pass through; everything else is the full tensor,
    identical on every rank (DCP keeps one copy)."""
    return t if isinstance(t, DTensor) else t.detach()


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, ctx: ParallelContext) -> dict[str, Any]:
    """{"model": {name: tensor}, "optim": {name: {"exp_avg", "exp_avg_sq", "step"}}}, views of the live tensors
    (parameters and persistent buffers), so dcp.load fills the model and optimizer in place."""
    reshard(model)  # the optimizer's sharded parameters, never gathered copies
    model_sd, optim_sd = {}, {}
    for name, p in model.named_parameters():
        model_sd[name] = _wrap(p)
        state = optimizer.state.get(p) if optimizer is not None else None
        if state:
            optim_sd[name] = {k: (_wrap(v) if v.shape == p.shape else v) for k, v in state.items()}
    # Persistent buffers are training state that no gradient moves (the aux-free routing bias, the ETR capacity
    # schedule); replicated on every rank.
    params = dict(model.named_parameters())
    for name, value in model.state_dict(keep_vars=True).items():
        if name not in params:
            model_sd[name] = _wrap(value)
    return {"model": model_sd, "optim": optim_sd} if optimizer is not None else {"model": model_sd}


def init_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Create AdamW's state tensors (a zero-gradient, zero-lr step) so a checkpoint can be loaded into them."""
    if all(optimizer.state.get(p) for p in model.parameters()):
        return
    saved = [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"], g["weight_decay"] = 0.0, 0.0
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for g, (lr, wd) in zip(optimizer.param_groups, saved, strict=True):
        g["lr"], g["weight_decay"] = lr, wd
    for state in optimizer.state.values():  # a fresh optimizer has taken no step
        if "step" in state:
            state["step"].zero_()


# ---------------------------------------------------------------------------------------------------------------
# Saving


class Checkpointer:
    def __init__(
        self, ckpt_dir: Path, ctx: ParallelContext, keep_last: int, async_save: bool = False, verify: bool = True
    ) -> None:
        self.dir = Path(ckpt_dir)
        self.ctx = ctx
        self.keep_last = keep_last
        self.async_save = async_save
        self.verify = verify  # record shard checksums in meta.json
        self._pending: tuple[Future, Path, Path, dict[str, Any]] | None = None
        self._async_group: dist.ProcessGroup | None = None

    def _barrier(self, what: str) -> None:
        if not self.ctx.distributed:
            return
        try:
            dist.barrier()
        except RuntimeError as e:  # gloo: a peer did not arrive within parallel.timeout_s, or died
            raise CollectiveError(
                f"{what}: rank {self.ctx.rank} waited for the other ranks and gave up ({_first_line(e)}); a rank "
                f"stopped or stalled, or parallel.timeout_s={self.ctx.timeout_s:g} is too short"
            ) from e

    def _background_group(self) -> dist.ProcessGroup | None:
        """The gloo group the background writes synchronise on, created once, by every rank at the same save."""
        if self.ctx.distributed and self._async_group is None:
            self._async_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=self.ctx.timeout_s))
        return self._async_group

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict[str, Any]) -> Path:
        """Write step `step`; with async_save the tensors are staged now and written in the background, and the
        directory is published (renamed, `latest` moved) by the next save() or by finish()."""
        self.finish()
        final = self.dir / step_dir_name(step)
        tmp = self.dir / f"{TMP_PREFIX}{step_dir_name(step)}"
        if self.ctx.is_logging_rank:
            self.dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left by a killed run: never complete, safe to drop
                shutil.rmtree(tmp)
            tmp.mkdir()
        self._barrier(f"checkpoint {final.name}: creating {tmp.name}")
        state = training_state(model, optimizer, self.ctx)
        meta = {"step": step, **meta, "rng": _rng_state()}
        writer = _ShardWriter(tmp, stall=_stall_requested(step, self.ctx.rank))
        if self.async_save:
            future = dcp.async_save(
                state,
                storage_writer=writer,
                process_group=self._background_group(),
                no_dist=not self.ctx.distributed,
            )
            self._pending = (future, tmp, final, meta)
        else:
            with warnings.catch_warnings():  # DCP warns that no_dist means one process, on every such save
                warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
                dcp.save(state, storage_writer=writer, no_dist=not self.ctx.distributed)
            self._publish(tmp, final, meta)
        return final

    def finish(self) -> None:
        """Wait for an in-flight asynchronous save (at most parallel.timeout_s) and publish it."""
        if self._pending is None:
            return
        future, tmp, final, meta = self._pending
        self._pending = None
        try:
            future.result(timeout=self.ctx.timeout_s)
        except FutureTimeout:
            raise CollectiveError(
                f"checkpoint {final.name}: background write did not finish within {self.ctx.timeout_s:g} s on rank "
                f"{self.ctx.rank} (parallel.timeout_s); check the storage under {self.dir} or raise the timeout; "
                f"{_latest_note(self.dir)}"
            ) from None
        except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
            raise CollectiveError(
                f"checkpoint {final.name}: background write failed on rank {self.ctx.rank} ({_first_line(e)}); "
                f"{_latest_note(self.dir)}"
            ) from e
        self._publish(tmp, final, meta)

    def _publish(self, tmp: Path, final: Path, meta: dict[str, Any]) -> None:
        self._barrier(f"checkpoint {final.name}: waiting for every rank's shards")
        if self.ctx.is_logging_rank:
            _kill_point("meta", meta["step"])
            meta = {**meta, "checksums": shard_checksums(tmp) if self.verify else None}
            _write_json(tmp / META_FILE, meta)  # written last: a directory without it was never complete
            _fsync_tree(tmp)
            # Re-saving a step (e.g. after resuming from an older one): the old directory is renamed aside, not
            # deleted, until the new one is in place. A kill between the two renames leaves `latest` naming a
            # missing step; latest_checkpoint then falls back to the newest complete one.
            old = self.dir / f"{OLD_PREFIX}{final.name}"
            if final.exists():
                _remove_dir(old)
                os.replace(final, old)
            os.replace(tmp, final)
            _write_atomic(self.dir / LATEST_FILE, final.name + "\n", kill_point=("latest", meta["step"]))
            _remove_leftovers(self.dir)
            _prune(self.dir, self.keep_last, final)
        self._barrier(f"checkpoint {final.name}: waiting for rank 0 to publish it")


class _ShardWriter(FileSystemWriter):
    """DCP's file writer, with the test-only stall of STALL_WRITE_ENV."""

    def __init__(self, path: Path, stall: bool) -> None:
        super().__init__(path)
        self._stall = stall

    def write_data(self, *args: Any, **kwargs: Any):  # type: ignore[override]
        written = super().write_data(*args, **kwargs)
        if self._stall:
            threading.Event().wait()
        return written


def _stall_requested(step: int, rank: int) -> bool:
    value = os.environ.get(STALL_WRITE_ENV)
    if not value:
        return False
    stall_step, _, stall_rank = value.partition("@")
    return int(stall_step) == step and (not stall_rank or int(stall_rank) == rank)


def _latest_note(ckpt_dir: Path) -> str:
    pointer = Path(ckpt_dir) / "latest"
    if pointer.is_file():
        return f"{pointer} still names the last complete step ({pointer.read_text(errors='replace').strip()})"
    return "no complete checkpoint was published yet"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__


# ---------------------------------------------------------------------------------------------------------------
# Loading


def load_training_state(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, ctx: ParallelContext, verify: bool = True
) -> dict[str, Any]:
    """Fill model (and optimizer) in place from a checkpoint of any layout; returns its meta.json. verify: compare
    every shard with the checksum meta.json records first (refusing a checkpoint that recorded none)."""
    path = Path(path)
    meta = read_meta(path)
    if verify:
        verify_checksums(path, meta, ctx)
    verify_shards(path)
    metadata = SafeFileSystemReader(path).read_metadata()
    if verify:
        require_checksums_for(path, meta, referenced_files(metadata))
    if optimizer is not None:
        init_optimizer_state(model, optimizer)
    state = training_state(model, optimizer, ctx)
    check_covers(metadata, state, path)
    try:
        with warnings.catch_warnings():  # DCP warns that no_dist means one process, on every such load
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            dcp.load(
                state,
                storage_reader=SafeFileSystemReader(path),
                planner=TensorsOnlyLoadPlanner(),
                no_dist=not ctx.distributed,
            )
    except (Exception, CheckpointException) as e:  # DCP's own errors are long; name the directory and the cause
        # DCP reports a failure on any rank (a shape that does not fit, a reader error) as a CheckpointException,
        # a BaseException holding each rank's exception.
        cause = next(iter(e.failures.values()))[0] if isinstance(e, CheckpointException) and e.failures else e
        if isinstance(cause, CheckpointError):
            raise cause from e
        text = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        raise CheckpointError(f"{path}: cannot be loaded ({type(cause).__name__}: {text}); pick another step") from e
    if optimizer is not None:  # resuming training; a weights-only load leaves the caller's RNG alone
        _set_rng_state(meta.get("rng"))
    return meta


# ---------------------------------------------------------------------------------------------------------------
# Small helpers


def _rng_state() -> dict[str, str]:
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def _set_rng_state(state: dict[str, str] | None) -> None:
    if not state:
        return
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8))


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=1))


def _write_atomic(path: Path, text: str, kill_point: tuple[str, int] | None = None) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    if kill_point is not None:
        _kill_point(*kill_point)
    os.replace(tmp, path)


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())


def _kill_point(point: str, step: int) -> None:
    """Fault injection for the crash tests: with MOEPP_TEST_KILL_AT=<point>:<step> the process kills itself with
    SIGKILL here, exactly what a kill -9 at that moment leaves. Points: `meta` (shards written, no meta.json yet),
    `latest` (step directory renamed, `latest` not yet replaced)."""
    if os.environ.get(KILL_AT_ENV) == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def _remove_dir(path: Path) -> None:
    """Delete a directory without ever leaving a half-deleted one under a step name: rename it aside first."""
    if not path.exists():
        return
    if not path.name.startswith(OLD_PREFIX):
        aside = path.with_name(f"{OLD_PREFIX}{path.name}")
        _remove_dir(aside)
        os.replace(path, aside)
        path = aside
    shutil.rmtree(path, ignore_errors=True)


def _remove_leftovers(ckpt_dir: Path) -> None:
    """What killed saves left: unfinished `.tmp-step_*` directories, replaced `.old-*` ones, `.latest.tmp-*`
    files. Called after a publish, when no write of this run is in flight."""
    for p in ckpt_dir.iterdir():
        if p.name.startswith(f".{LATEST_FILE}.tmp-") and p.is_file():
            p.unlink(missing_ok=True)
        elif p.name.startswith((TMP_PREFIX, OLD_PREFIX)) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def _prune(ckpt_dir: Path, keep_last: int, newest: Path) -> None:
    """Keep `newest` (just published) and the keep_last - 1 steps before it; later steps (left by a run that was
    resumed from an earlier step) are not older, so they stay until re-saved."""
    step = step_number(newest.name)
    numbered = [(step_number(p.name), p) for p in ckpt_dir.iterdir() if p.is_dir()]
    older = sorted((n, p) for n, p in numbered if n is not None and n < step)
    for _, old in older[: max(len(older) - (keep_last - 1), 0)]:
        _remove_dir(old)
