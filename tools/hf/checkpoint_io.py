"""Our side of the conversion: a plain single-process `Decoder` filled from a checkpoint of any parallel layout (DCP
reshards on load), and an imported model written as a checkpoint that `train.resume=` continues from."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import yaml

from model.config import ModelConfig, MoEConfig
from model.errors import UserError
from model.transformer import Decoder
from parallel.mesh import ParallelContext, ParallelDims
from train.checkpoint import Checkpointer, init_optimizer_state, load_training_state
from train.checkpoint_meta import latest_checkpoint, read_meta
from train.config import Config
from train.config_load import build
from train.optim import build_optimizer


class ConversionError(UserError):
    """One line naming the path or field and what to do."""


def world_of_one() -> ParallelContext:
    # Built directly rather than through init_parallel: a converter started inside a torchrun job (RANK/WORLD_SIZE
    # set) must still be a plain single process on CPU.
    return ParallelContext(ParallelDims(tp=1, ep=1, pp=1, dp=1), 0, torch.device("cpu"))


def resolve_step_dir(path: Path) -> Path:
    """A step directory as is; a checkpoint directory or a run directory -> its `latest` step."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    for ckpt_dir in (path, path / "checkpoints", _configured_checkpoint_dir(path)):
        if ckpt_dir is not None and (ckpt_dir / "latest").is_file():
            return latest_checkpoint(ckpt_dir)
    raise ConversionError(
        f"{path}: not a checkpoint step directory (no meta.json) and no checkpoints/latest found; pass a run "
        "directory, its checkpoints/ directory or a step_XXXXXXXX directory"
    )


def _configured_checkpoint_dir(run_dir: Path) -> Path | None:
    """checkpoint.dir of the run's config.yaml, for runs that keep checkpoints outside the run directory."""
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        return None
    try:
        data = yaml.safe_load(cfg_file.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        cause = getattr(e, "problem", None) or str(e)  # a YAML error's own text spans several lines
        raise ConversionError(f"{cfg_file}: not valid YAML ({cause}); pass the checkpoints directory instead") from e
    section = data.get("checkpoint") if isinstance(data, dict) else None
    ckpt = section.get("dir") if isinstance(section, dict) else None
    return Path(ckpt) if isinstance(ckpt, str) and ckpt else None


def model_sections(config: dict[str, Any]) -> tuple[ModelConfig, MoEConfig]:
    try:
        return build(ModelConfig, config["model"], "model."), build(MoEConfig, config["moe"], "moe.")
    except KeyError as e:
        raise ConversionError(f"meta.json: config has no {e} section") from None


def load_decoder(step_dir: Path, verify: bool = True) -> tuple[Decoder, dict[str, Any]]:
    """(model in fp32 on CPU, meta.json) from a checkpoint step directory of any layout; verify: compare the shards
    with the checksums meta.json records."""
    meta = read_meta(step_dir)
    model_cfg, moe_cfg = model_sections(meta["config"])
    model = Decoder(model_cfg, moe_cfg)
    load_training_state(step_dir, model, None, world_of_one(), verify=verify)
    return model.eval(), meta


def save_checkpoint(out_dir: Path, model: Decoder, config: Config, source: dict[str, Any]) -> Path:
    """Step 0 of a fresh run: the weights, zero AdamW moments (the state a first step starts from; the trainer's
    resume loads optimizer state and needs it present) and meta.json with the full config. Also writes
    out_dir/config.yaml, the run config to train from it."""
    ctx = world_of_one()
    optimizer = build_optimizer(model, config.optim)
    init_optimizer_state(model, optimizer)
    meta = {
        "consumed_samples": 0,
        "config": config.to_dict(),
        "layout": dataclasses.asdict(ctx.dims),
        "imported_from": source,
    }
    step_dir = Checkpointer(out_dir, ctx, keep_last=1).save(0, model, optimizer, meta)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    return step_dir
