"""Config loading: presets validate, overrides apply, bad input fails with one line naming the dotted key."""

import subprocess
import sys
from pathlib import Path

import pytest

from model.config import ConfigError
from train.config_load import load_config

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_preset_loads_and_validates(path):
    cfg = load_config(path)
    assert cfg.name == path.stem


def test_overrides_apply_with_yaml_types():
    cfg = load_config(
        ROOT / "configs/tiny-cpu.yaml",
        [
            "train.max_steps=7",
            "optim.lr=1e-3",
            "moe.capacity_factor=1.25",
            "moe.router.gate_convention=release",
            "data.path=null",
        ],
    )
    assert cfg.train.max_steps == 7 and cfg.optim.lr == 1e-3 and cfg.moe.capacity_factor == 1.25
    assert cfg.moe.router.gate_convention == "release" and cfg.data.path is None


@pytest.mark.parametrize(
    ("overrides", "key", "reason"),
    [
        (["moe.top_k=13"], "moe.top_k", "13 > number of experts 12"),
        (["model.num_heads=5"], "model.hidden_size", "not divisible by model.num_heads=5"),
        (["model.hidden_sise=64"], "model.hidden_sise", "unknown key"),
        (["bogus.x=1"], "bogus", "unknown key"),
        (["train.max_steps=ten"], "train.max_steps", "expected an integer"),
        (["train.max_steps=1.5"], "train.max_steps", "expected an integer"),
        (["moe.gating_residual=3"], "moe.gating_residual", "expected true or false"),
        (["moe.router.gate_convention=mixed"], "moe.router.gate_convention", "not one of paper, release"),
        (["optim.lr=-1"], "optim.lr", "must be positive"),
        (["moe.capacity_factor=0"], "moe.capacity_factor", "must be positive"),
        (["train.global_batch_size=10", "train.micro_batch_size=4"], "train.global_batch_size", "not a multiple"),
        (["data.seq_len=512"], "data.seq_len", "> model.max_seq_len"),
        (["parallel.ep=3"], "parallel.ep", "not divisible by ep=3"),
        (["model.num_kv_heads=3"], "model.num_kv_heads", "not divisible"),
        (["data.path=/no/such/file.txt"], "data.path", "does not exist"),
        (["train.max_steps"], "train.max_steps", "dotted.key=value"),
        (["model=3"], "model", "expected a mapping"),
        (["train.activation_checkpointing=some"], "train.activation_checkpointing", "not one of none, full"),
        (
            ["train.activation_checkpointing=moe", "moe.num_experts=0", "parallel.ep=1"],
            "train.activation_checkpointing",
            "moe.num_experts is 0",
        ),
    ],
)
def test_bad_values_name_the_dotted_key(overrides, key, reason):
    with pytest.raises(ConfigError) as info:
        load_config(ROOT / "configs/tiny-cpu.yaml", overrides)
    message = str(info.value)
    assert message.startswith(key + ":") or message.startswith(overrides[0] + ":"), message
    assert reason in message
    assert "\n" not in message


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden_size: [1,\n")
    with pytest.raises(ConfigError, match="bad.yaml.*not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(listy)


def test_cli_prints_one_line_and_exits_2_before_training(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "train", "configs/tiny-cpu.yaml", "moe.top_k=99", f"train.run_dir={tmp_path / 'run'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: moe.top_k:"), proc.stderr
    assert not (tmp_path / "run").exists()  # nothing started


@pytest.mark.parametrize(
    ("name", "billions"),
    [("moepp-0.6b", 0.6), ("moepp-1b", 1.0), ("moepp-2b", 2.0), ("moepp-7b", 7.0), ("moe-0.6b", 0.6), ("moe-7b", 7.0)],
)
def test_paper_presets_have_the_paper_sizes(name, billions):
    import torch

    from model.transformer import Decoder

    cfg = load_config(ROOT / f"configs/{name}.yaml")
    with torch.device("meta"):  # shapes only, no memory
        model = Decoder(cfg.model, cfg.moe)
    assert abs(model.num_params() / 1e9 - billions) / billions < 0.12


def test_vanilla_twins_share_ffn_experts_and_drop_the_rest():
    for size in ("0.6b", "1b", "2b", "7b"):
        moepp, vanilla = (
            load_config(ROOT / f"configs/moepp-{size}.yaml"),
            load_config(ROOT / f"configs/moe-{size}.yaml"),
        )
        assert vanilla.moe.num_experts == moepp.moe.num_experts and vanilla.model == moepp.model
        assert vanilla.moe.num_zc_experts == 0 and not vanilla.moe.gating_residual
        assert moepp.moe.num_zc_experts in (4, 8) and moepp.moe.gating_residual


def test_document_options_need_a_known_end_of_document_id(tmp_path):
    import numpy as np

    from data.indexed import IndexedDatasetWriter

    prefix = tmp_path / "corpus"
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        w.add_documents(np.arange(400, dtype=np.uint16) % 500, np.array([150, 250]))
    text = tmp_path / "docs.txt"
    text.write_text("one document\n\nanother one\n")
    preset = ROOT / "configs/tiny-cpu.yaml"

    def error(overrides: list[str]) -> str:
        with pytest.raises(ConfigError) as info:
            load_config(preset, overrides)
        assert "\n" not in str(info.value)
        return str(info.value)

    assert error(["data.document_mask=true"]).startswith("data.document_mask: the synthetic corpus")
    message = error([f"data.path={prefix}", "data.document_mask=true"])
    assert message.startswith("data.document_mask: needs the end-of-document token id") and "data.eod_id" in message
    assert error([f"data.path={prefix}", "data.eod_mask_loss=true"]).startswith("data.eod_mask_loss: needs")
    assert error([f"data.path={prefix}", "data.eod_id=512"]).startswith("data.eod_id: 512 >= model.vocab_size=512")
    assert error([f"data.path={prefix}", "data.eod_id=-1"]).startswith("data.eod_id: must be >= 0")
    assert error([f"data.path={text}", "data.eod_id=5"]).startswith("data.eod_id: byte-level")
    assert error(["data.document_mask=yes please"]).startswith("data.document_mask: expected true or false")

    cfg = load_config(preset, [f"data.path={prefix}", "data.eod_id=2", "data.document_mask=true"])
    packing = cfg.data.packing()
    assert (packing.eod_id, packing.mask_attention, packing.reset_positions, packing.mask_loss) == (
        2,
        True,
        False,
        False,
    )
    cfg = load_config(preset, [f"data.path={text}", "data.reset_position_ids=true", "data.eod_mask_loss=true"])
    packing = cfg.data.packing()
    assert (packing.eod_id, packing.mask_attention, packing.reset_positions, packing.mask_loss) == (
        256,
        False,
        True,
        True,
    )
    assert load_config(preset, [f"data.path={text}"]).data.packing() is None  # off by default
