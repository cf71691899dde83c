"""Hugging Face folder (release MoE++ layout, our own, or Mixtral) -> a checkpoint that pretraining continues from."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from data.config import DataConfig
from model.transformer import Decoder
from tools.hf.checkpoint_io import ConversionError, save_checkpoint
from tools.hf.import_config import our_config
from tools.hf.safetensors_io import ShardedReader
from tools.hf.weights import weight_rules
from train.config import Config


def fill_from_hf(model: Decoder, hf: Mapping[str, torch.Tensor], layout: str) -> list[str]:
    """Copy every tensor the weight table names into the model; returns the HF keys the table does not use.
    Each parameter must be covered completely: a slice left at its random init would be a silent error."""
    ours = model.state_dict()
    covered = {k: torch.zeros(v.shape, dtype=torch.bool) for k, v in ours.items()}
    rules = weight_rules(model.cfg, model.moe_cfg, layout)
    with torch.no_grad():
        for rule in rules:
            if rule.our_key is None:  # the release's unused first-layer gate_map: nothing to keep
                continue
            if rule.hf_key not in hf:
                raise ConversionError(f"weights: {rule.hf_key} is missing")
            src = hf[rule.hf_key]
            dst = ours[rule.our_key][rule.index]
            if tuple(src.shape) != tuple(dst.shape):
                raise ConversionError(
                    f"weights: {rule.hf_key} has shape {tuple(src.shape)}, config.json implies {tuple(dst.shape)}"
                )
            dst.copy_(src.to(dst.dtype))
            covered[rule.our_key][rule.index] = True
    uncovered = [k for k, c in covered.items() if not bool(c.all())]
    if uncovered:
        raise ConversionError(f"weights: nothing fills {', '.join(uncovered)}")
    known = {r.hf_key for r in rules}
    return sorted(k for k in hf if k not in known)


def import_hf(hf_dir: Path, out_dir: Path, log: Callable[[str], None] = print) -> Path:
    """Returns the step directory written under out_dir (a checkpoint directory with `latest`)."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    cfg_file = hf_dir / "config.json"
    if not cfg_file.is_file():
        raise ConversionError(f"{cfg_file}: missing; pass a Hugging Face model folder")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConversionError(f"{out_dir}: exists and is not empty; pick a new checkpoint directory")
    try:
        hf_cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{cfg_file}: not valid JSON ({e}); re-download or re-export the folder") from e
    if not isinstance(hf_cfg, dict):
        raise ConversionError(f"{cfg_file}: not a JSON object; re-download or re-export the folder")
    layout, model_cfg, moe_cfg, notes = our_config(hf_cfg)
    model = Decoder(model_cfg, moe_cfg)
    unused = fill_from_hf(model, ShardedReader(hf_dir), layout)
    # Rotary tables are computed, never loaded; anything else unused means the folder holds weights we would drop.
    dropped = [k for k in unused if not k.endswith("rotary_emb.inv_freq")]
    if dropped:
        raise ConversionError(f"weights: {len(dropped)} tensors have no place in our model, e.g. {dropped[0]}")

    out_dir.mkdir(parents=True, exist_ok=True)
    data = DataConfig(seq_len=model_cfg.max_seq_len)
    if (hf_dir / "tokenizer.model").is_file():
        shutil.copyfile(hf_dir / "tokenizer.model", out_dir / "tokenizer.model")
        data.tokenizer = str((out_dir / "tokenizer.model").resolve())
    elif (hf_dir / "tokenizer.json").is_file():
        # A tokenizer folder (data/tokenizer.py reads its special tokens from tokenizer_config.json).
        tok_dir = out_dir / "tokenizer"
        tok_dir.mkdir()
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (hf_dir / name).is_file():
                shutil.copyfile(hf_dir / name, tok_dir / name)
        data.tokenizer = str(tok_dir.resolve())
    else:
        notes.append("no tokenizer.model or tokenizer.json in the folder; data.tokenizer left unset")
    config = Config(model=model_cfg, moe=moe_cfg, data=data, name=hf_dir.resolve().name)
    step_dir = save_checkpoint(out_dir, model, config, {"hf_dir": str(hf_dir.resolve()), "layout": layout})
    for note in notes:
        log(note)
    log(
        f"imported {hf_dir} ({layout} layout) -> {step_dir}; continue pretraining with: python -m train "
        f"{out_dir / 'config.yaml'} data.path=YOUR_DATA train.resume={step_dir}"
    )
    return step_dir
