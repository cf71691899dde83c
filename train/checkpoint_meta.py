"""Reading a checkpoint directory without loading its tensors: which step is the latest complete one, its
meta.json (validated field by field), whether a config may resume from it, and its DCP metadata, read through an
unpickler that builds only DCP's own metadata classes (train/checkpoint_safety.py). The layout and the save sequence
are described in train/checkpoint.py.
"""

from __future__ import annotations

import base64
import binascii
import json
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from model.config import ConfigError, ModelConfig, MoEConfig
from train.checkpoint_safety import CheckpointError, check_metadata, unpickle_metadata
from train.config_load import build

STEP_PREFIX = "step_"
META_FILE = "meta.json"
LATEST_FILE = "latest"


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


class SafeFileSystemReader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any):  # type: ignore[override]
        path = Path(self.path) / ".metadata"
        try:
            with path.open("rb") as f:
                metadata = unpickle_metadata(f)
        except (pickle.UnpicklingError, OSError) as e:  # unpickle_metadata reports any damaged content this way
            cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{path}: unreadable DCP metadata ({cause}); pick another step") from e
        if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
            raise CheckpointError(
                f"{path}: holds a {type(metadata).__name__}, not DCP checkpoint metadata; the checkpoint is damaged, "
                "pick another step"
            )
        check_metadata(metadata, path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The step directory `latest` names, or, when `latest` is missing or names no complete step (a kill between a
    rename and the rewrite of `latest`), the newest complete step directory; None if there is none."""
    return find_latest(ckpt_dir)[0]


def find_latest(ckpt_dir: Path) -> tuple[Path | None, str | None]:
    """(latest checkpoint as latest_checkpoint finds it, a one-line note when `latest` did not name it)."""
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / LATEST_FILE
    steps = complete_steps(ckpt_dir)
    newest = steps[-1] if steps else None
    if not pointer.is_file():
        note = f"{pointer} is missing; using the newest complete step, {newest.name}" if newest else None
        return newest, note
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError):
        name = ""
    path = ckpt_dir / name
    if step_number(name) is not None and (path / META_FILE).is_file():
        return path, None
    what = f"names {name!r}, which is missing or incomplete" if name else "is empty or unreadable"
    if newest is None:
        raise CheckpointError(
            f"{pointer}: {what}, and {ckpt_dir} holds no complete step directory; restore one or delete {pointer}"
        )
    return newest, f"{pointer} {what}; using the newest complete step, {newest.name}"


def complete_steps(ckpt_dir: Path) -> list[Path]:
    """Step directories with a meta.json (written last, so they are complete), oldest first."""
    if not Path(ckpt_dir).is_dir():
        return []
    steps = [p for p in Path(ckpt_dir).iterdir() if step_number(p.name) is not None and (p / META_FILE).is_file()]
    return sorted(steps, key=lambda p: step_number(p.name))


def step_number(name: str) -> int | None:
    digits = name.removeprefix(STEP_PREFIX)
    return int(digits) if name.startswith(STEP_PREFIX) and digits.isdigit() else None


def read_meta(path: Path) -> dict[str, Any]:
    meta_file = Path(path) / META_FILE
    if not meta_file.is_file():
        raise CheckpointError(f"{meta_file}: missing; {path} is not a complete checkpoint, pick another step")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{meta_file}: not valid JSON; the checkpoint is damaged, pick another step") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_file}: not a JSON object; the checkpoint is damaged, pick another step")
    for key in ("step", "consumed_samples", "config"):
        if key not in meta:
            raise CheckpointError(
                f"{meta_file}: field {key!r} is missing; the checkpoint is damaged, pick another step"
            )
    _check_meta_types(meta, meta_file)
    for section, cls in (("model", ModelConfig), ("moe", MoEConfig)):
        value = meta["config"].get(section, {})
        try:
            if not isinstance(value, dict):
                raise ConfigError(f"{section}: expected a mapping (section), got {value!r}")
            build(cls, value, f"{section}.")
        except ConfigError as e:
            raise CheckpointError(f"{meta_file}: config.{e}; the checkpoint is damaged, pick another step") from e
    return meta


def _check_meta_types(meta: dict[str, Any], meta_file: Path) -> None:
    """The fields a resume uses have the types the trainer wrote, so a hand-edited meta.json fails here."""

    def damaged(key: str, expected: str) -> CheckpointError:
        return CheckpointError(
            f"{meta_file}: field {key!r} is {meta[key]!r}, expected {expected}; the checkpoint is damaged, pick "
            "another step"
        )

    for key in ("step", "consumed_samples"):
        if isinstance(meta[key], bool) or not isinstance(meta[key], int) or meta[key] < 0:
            raise damaged(key, "an integer >= 0")
    if not isinstance(meta["config"], dict):
        raise damaged("config", "an object (the run's config)")
    rng = meta.get("rng")
    if rng is None:
        return
    if not isinstance(rng, dict) or not all(isinstance(v, str) for v in rng.values()):
        raise damaged("rng", "an object of base64 strings")
    for name, text in rng.items():
        try:
            size = len(base64.b64decode(text, validate=True))
        except binascii.Error:
            size = -1
        if size < 0 or (name == "torch" and size != torch.get_rng_state().numel()):
            raise damaged("rng", f"base64 of the {name} generator's state")


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
