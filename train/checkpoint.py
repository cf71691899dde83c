"""Sharded checkpoints with PyTorch Distributed Checkpoint (DCP): every rank writes its own shards, any layout
can load them (DCP reshards), and a kill at any moment never leaves a half checkpoint that looks complete.

Layout of a checkpoint directory `<dir>/step_00001000/`:
  `__<rank>_0.distcp` + `.metadata`  DCP shards of the model and AdamW state (tensors only)
  `meta.json`                        step, consumed samples, RNG state, the run's config (written last)
`<dir>/latest` names the newest complete step directory; it is replaced atomically after the rename.

Sequence of a save: all ranks write into `.tmp-step_XXXXXXXX` -> barrier -> rank 0 writes meta.json, renames the
directory to `step_XXXXXXXX`, then rewrites `latest`, then prunes old steps. Loading reads tensors with
`weights_only=True` and the DCP metadata through an unpickler that admits only DCP's own metadata classes, so a
checkpoint can never execute code.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import shutil
from concurrent.futures import Future
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.tensor import DTensor

from parallel.data_parallel import reshard
from parallel.mesh import ParallelContext
from train.config import upgrade_config

STEP_PREFIX = "step_"
META_FILE = "meta.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used. One line naming the file or field and what to do."""


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


# ---------------------------------------------------------------------------------------------------------------
# Safe reading of DCP metadata


class _MetadataUnpickler(pickle.Unpickler):
    """DCP pickles its metadata; allow only the classes that metadata is made of, never arbitrary callables."""

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("pathlib", "PosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "PurePosixPath"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("torch.distributed.checkpoint.") and not name.startswith("__"):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from checkpoint metadata")


class SafeFileSystemReader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any):  # type: ignore[override]
        path = Path(self.path) / ".metadata"
        try:
            with path.open("rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except (OSError, EOFError, pickle.UnpicklingError, AttributeError) as e:
            raise CheckpointError(f"{path}: unreadable DCP metadata ({e}); resume from an earlier step") from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


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
    def __init__(self, ckpt_dir: Path, ctx: ParallelContext, keep_last: int, async_save: bool = False) -> None:
        self.dir = Path(ckpt_dir)
        self.ctx = ctx
        self.keep_last = keep_last
        self.async_save = async_save
        self._pending: tuple[Future, Path, Path, dict[str, Any]] | None = None

    def _barrier(self) -> None:
        if self.ctx.distributed:
            dist.barrier()

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict[str, Any]) -> Path:
        """Write step `step`; with async_save the tensors are staged now and written in the background, and the
        directory is published (renamed, `latest` moved) by the next save() or by finish()."""
        self.finish()
        final = self.dir / step_dir_name(step)
        tmp = self.dir / f".tmp-{step_dir_name(step)}"
        if self.ctx.is_logging_rank:
            self.dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left by a killed run: never complete, safe to drop
                shutil.rmtree(tmp)
            tmp.mkdir()
        self._barrier()
        state = training_state(model, optimizer, self.ctx)
        meta = {"step": step, **meta, "rng": _rng_state()}
        writer = FileSystemWriter(tmp)
        if self.async_save:
            future = dcp.async_save(state, storage_writer=writer, no_dist=not self.ctx.distributed)
            self._pending = (future, tmp, final, meta)
        else:
            dcp.save(state, storage_writer=writer, no_dist=not self.ctx.distributed)
            self._publish(tmp, final, meta)
        return final

    def finish(self) -> None:
        """Wait for an in-flight asynchronous save and publish it."""
        if self._pending is None:
            return
        future, tmp, final, meta = self._pending
        self._pending = None
        future.result()
        self._publish(tmp, final, meta)

    def _publish(self, tmp: Path, final: Path, meta: dict[str, Any]) -> None:
        self._barrier()  # every rank's shards are on disk
        if self.ctx.is_logging_rank:
            _write_json(tmp / META_FILE, meta)  # written last: a directory without it was never complete
            _fsync_tree(tmp)
            if final.exists():  # re-saving a step (e.g. after a resume): swap only once the new one is whole
                shutil.rmtree(final)
            os.replace(tmp, final)
            _write_atomic(self.dir / "latest", final.name + "\n")
            _prune(self.dir, self.keep_last, keep=final.name)
        self._barrier()


# ---------------------------------------------------------------------------------------------------------------
# Loading


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    pointer = Path(ckpt_dir) / "latest"
    if not pointer.is_file():
        return None
    path = Path(ckpt_dir) / pointer.read_text().strip()
    if not (path / META_FILE).is_file():
        raise CheckpointError(
            f"{pointer}: points to {path.name}, which is missing or incomplete; "
            "point it at an existing step directory or set train.resume=never"
        )
    return path


def read_meta(path: Path) -> dict[str, Any]:
    meta_file = Path(path) / META_FILE
    if not meta_file.is_file():
        raise CheckpointError(f"{meta_file}: missing; {path} is not a complete checkpoint, pick another step")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{meta_file}: not valid JSON; the checkpoint is damaged, pick another step") from None
    for key in ("step", "consumed_samples", "config"):
        if key not in meta:
            raise CheckpointError(
                f"{meta_file}: field {key!r} is missing; the checkpoint is damaged, pick another step"
            )
    meta["config"] = upgrade_config(meta["config"])
    return meta


# moe keys a resume may change: loss coefficients and capacity shape training, not the model or its saved state.
# Whether an aux_free_bias term is present is checked separately (it adds a buffer to the checkpoint).
RESUME_MAY_CHANGE = {("moe", "balance"), ("moe", "balance_scope"), ("moe", "capacity_factor"), ("moe", "tau")}


def _has_bias(moe: dict[str, Any]) -> bool:
    return any(t.get("kind") == "aux_free_bias" for t in moe.get("balance") or [])


def check_compatible(meta: dict[str, Any], config: dict[str, Any], path: Path) -> None:
    """The model shape and the router's saved state must match; everything else (layout, optimizer, schedule, loss
    coefficients, capacity) may change on resume."""
    saved_moe, now_moe = meta["config"].get("moe", {}), config["moe"]
    if _has_bias(saved_moe) != _has_bias(now_moe):
        where, other = ("checkpoint", "config") if _has_bias(saved_moe) else ("config", "checkpoint")
        raise CheckpointError(
            f"{path / META_FILE}: moe.balance has an aux_free_bias term in the {where} but not in the {other} (its "
            "bias is saved state); keep the term as it was or start a new run"
        )
    for section in ("model", "moe"):
        saved, now = meta["config"].get(section, {}), config[section]
        for key in sorted(set(saved) | set(now)):
            if (section, key) in RESUME_MAY_CHANGE:
                continue
            if saved.get(key) != now.get(key):
                raise CheckpointError(
                    f"{path / META_FILE}: {section}.{key} is {saved.get(key)!r} in the checkpoint but "
                    f"{now.get(key)!r} in the config; use the checkpoint's model shape or another checkpoint"
                )


def verify_shards(path: Path) -> None:
    """Every shard file the metadata references exists and is long enough (a truncated copy is caught here, with
    the file's name, instead of deep inside DCP)."""
    metadata = SafeFileSystemReader(path).read_metadata()
    for info in (metadata.storage_data or {}).values():
        shard = Path(path) / info.relative_path
        if not shard.is_file():
            raise CheckpointError(f"{shard}: missing shard; the checkpoint is incomplete, pick another step")
        if shard.stat().st_size < info.offset + info.length:
            raise CheckpointError(
                f"{shard}: truncated ({shard.stat().st_size} bytes, needs "
                f"{info.offset + info.length}); the checkpoint is damaged, pick another step"
            )


def load_training_state(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, ctx: ParallelContext
) -> dict[str, Any]:
    """Fill model (and optimizer) in place from a checkpoint of any layout; returns its meta.json."""
    path = Path(path)
    meta = read_meta(path)
    verify_shards(path)
    if optimizer is not None:
        init_optimizer_state(model, optimizer)
    state = training_state(model, optimizer, ctx)
    try:
        dcp.load(state, storage_reader=SafeFileSystemReader(path), no_dist=not ctx.distributed)
    except CheckpointError:
        raise
    except Exception as e:  # DCP's own errors are long; name the directory and the cause
        raise CheckpointError(
            f"{path}: cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0][:200]}); pick another step"
        ) from None
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


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())


def _prune(ckpt_dir: Path, keep_last: int, keep: str) -> None:
    steps = sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX))
    for old in steps[:-keep_last]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)
