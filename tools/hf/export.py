"""Checkpoint -> Hugging Face folder: pick the layout that expresses the trained model exactly, write config.json,
safetensors shards with their index, the remote code (MoE++ layouts) and the tokenizer."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from data.errors import MissingDataError
from data.tokenizer import Tokenizer, load_tokenizer
from model.config import ModelConfig, MoEConfig
from model.errors import UserError
from tools.hf import layouts
from tools.hf.checkpoint_io import ConversionError, load_decoder, resolve_step_dir
from tools.hf.layouts import MIXTRAL, OWN, RELEASE
from tools.hf.safetensors_io import write_sharded
from tools.hf.tokenizer import export_tokenizer, probe, special_ids
from tools.hf.weights import weight_rules

HF_DIR = Path(__file__).resolve().parent
REMOTE_CODE = ("configuration_moepp.py", "modeling_moepp.py")
DTYPES = {"fp32": (torch.float32, "float32"), "bf16": (torch.bfloat16, "bfloat16")}
DEFAULT_SHARD_BYTES = 5 * 1024**3


@dataclass
class ExportResult:
    layout: str
    step_dir: Path
    files: list[str]
    notes: list[str] = field(default_factory=list)


def choose_layout(moe: MoEConfig, fmt: str) -> tuple[str, list[str]]:
    """(layout, console notes). fmt: auto (Mixtral for a vanilla MoE it expresses, else MoE++), moepp or mixtral."""
    mixtral_no = layouts.mixtral_blockers(moe)
    if fmt == "mixtral":
        if mixtral_no:
            raise ConversionError("--format mixtral: Mixtral cannot express this model: " + "; ".join(mixtral_no))
        return MIXTRAL, []
    if fmt == "auto" and not mixtral_no:
        return MIXTRAL, []
    notes = []
    vanilla = moe.enabled and moe.num_zc_experts == 0 and not moe.gating_residual
    if fmt == "auto" and vanilla:
        notes.append("not exported as native Mixtral: " + "; ".join(mixtral_no))
    release_no = layouts.release_blockers(moe)
    if not release_no:
        return RELEASE, notes
    notes.append(
        "the MoE++-7B release layout cannot express this model: "
        + "; ".join(release_no)
        + ". Exported with moepp's own config fields (model_type moepp, MoEPPForCausalLM) instead"
    )
    return OWN, notes


def _tokenizer_path(config: dict) -> Path | None:
    # Runs on the synthetic corpus or byte-level text have no data.tokenizer.
    path = (config.get("data") or {}).get("tokenizer")
    return Path(path) if path else None


def _load_tokenizer(path: Path | None, notes: list[str]) -> Tokenizer | None:
    """The run's tokenizer, or None with a note saying why none is exported."""
    if path is None:
        notes.append("the run has no data.tokenizer (synthetic or byte-level data); no tokenizer exported")
        return None
    try:
        return load_tokenizer(path)
    except MissingDataError:
        notes.append(f"data.tokenizer {path} not found; tokenizer not exported")
    except UserError as e:
        notes.append(f"data.tokenizer: {e}; tokenizer not exported")
    return None


def export(
    checkpoint: Path,
    out_dir: Path,
    dtype: str = "fp32",
    fmt: str = "auto",
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
    verify: bool = True,
) -> ExportResult:
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ConversionError(f"{out_dir}: exists and is not empty; pick a new folder or pass --overwrite")
    step_dir = resolve_step_dir(checkpoint)
    model, meta = load_decoder(step_dir, verify=verify)
    mcfg, moe = model.cfg, model.moe_cfg
    blockers = layouts.export_blockers(moe)
    if blockers:
        raise ConversionError(
            f"{step_dir}: no Hugging Face layout can express " + "; ".join(blockers) + " yet; export a model without it"
        )
    layout, notes = choose_layout(moe, fmt)
    notes += layouts.training_only_notes(moe)

    tokenizer = _load_tokenizer(_tokenizer_path(meta["config"]), notes)
    tokens = special_ids(tokenizer) if tokenizer else {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}

    torch_dtype, dtype_name = DTYPES[dtype]
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    files = write_weights(model.state_dict(), mcfg, moe, layout, tmp, torch_dtype, max_shard_bytes)
    config = layouts.hf_config(mcfg, moe, layout, tokens, dtype_name)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    files.append("config.json")
    if layout != MIXTRAL:
        for name in REMOTE_CODE:
            shutil.copyfile(HF_DIR / name, tmp / name)
        files += REMOTE_CODE
    if tokenizer is not None:
        files += export_tokenizer(tokenizer, tmp, mcfg.max_seq_len)
    give_new_file_modes(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)  # a half-written export never sits under the requested name
    if tokenizer is not None:
        notes.append(probe(tokenizer, out_dir))
    for note in notes:
        log(note)
    log(f"exported {step_dir} -> {out_dir} ({layout} layout, {dtype_name}, {len(files)} files)")
    return ExportResult(layout, step_dir, files, notes)


def give_new_file_modes(folder: Path) -> None:
    """Give `folder` and everything in it the mode a newly created file or folder gets under the umask (0644 and
    0755 under the usual 022): safetensors writes its shards 0600, which other users of a shared model folder
    cannot read, and a copied tokenizer would keep its source's mode."""
    umask = os.umask(0o022)  # reading the umask means setting it; restored at once (export runs in one thread)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def write_weights(
    ours: dict[str, torch.Tensor],
    model: ModelConfig,
    moe: MoEConfig,
    layout: str,
    out_dir: Path,
    dtype: torch.dtype,
    max_shard_bytes: int,
) -> list[str]:
    rules = {r.hf_key: r for r in weight_rules(model, moe, layout)}

    def make(key: str) -> torch.Tensor:
        rule = rules[key]
        if rule.our_key is None:
            return torch.zeros(rule.zeros_shape)
        return ours[rule.our_key][rule.index].detach().clone()

    def shape(key: str) -> tuple[int, ...]:
        rule = rules[key]
        return rule.zeros_shape if rule.our_key is None else tuple(ours[rule.our_key][rule.index].shape)

    used = {r.our_key for r in rules.values()}
    missing = sorted(set(ours) - used)
    if missing:  # a parameter the table forgot would silently vanish from the export
        raise ConversionError(f"no Hugging Face name for {', '.join(missing)}")
    return write_sharded(out_dir, [(k, shape(k)) for k in rules], make, dtype, max_shard_bytes)
