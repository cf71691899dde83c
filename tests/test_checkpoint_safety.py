"""Crafted checkpoints: a `.metadata` that would run code (a dotted global inside an allowed module, a pickled byte
blob DCP would `torch.load(weights_only=False)`) or leave a weight unfilled (a missing tensor, chunks with a gap) is
refused in one line by the trainer's resume and by convert_to_hf, and the code never runs; shard checksums refuse a
zeroed, altered or unrecorded shard."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

from model.transformer import Decoder
from parallel.mesh import init_parallel
from tools.hf.export import export
from train.checkpoint import Checkpointer, init_optimizer_state, load_training_state
from train.checkpoint_integrity import shard_checksums
from train.checkpoint_meta import read_meta
from train.checkpoint_safety import CheckpointError
from train.config_load import load_config
from train.optim import build_optimizer
from train.trainer import run

ROOT = Path(__file__).resolve().parents[1]
QUICK = [
    "model.num_layers=2",
    "logging.interval=1",
    "train.eval_interval=0",
    "logging.progress_bar=false",
    "train.max_steps=8",
]
FILLED = "model.tok_embeddings.weight"  # the weight a crafted checkpoint tries to leave at its random init
DCP_MODULE = "torch.distributed.checkpoint.filesystem"  # an allowed module that imports os and pathlib.Path


def _cfg(run_dir: Path, *extra: str):
    return load_config(ROOT / "configs/tiny-cpu.yaml", [*QUICK, f"train.run_dir={run_dir}", *extra])


@pytest.fixture(scope="module")
def saved_step(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("saved")
    run(_cfg(run_dir, "train.exit_at_step=1"))
    return run_dir / "checkpoints" / "step_00000001"


@pytest.fixture
def step(saved_step, tmp_path) -> Path:
    """A private copy of a genuine checkpoint to damage."""
    copy = tmp_path / "ckpt" / "step_00000001"
    shutil.copytree(saved_step, copy)
    return copy


def _rerecord(step: Path) -> None:
    """What someone crafting a checkpoint would do: checksums that match the crafted files, so the safety checks
    themselves (not the integrity check) have to refuse it."""
    meta = json.loads((step / "meta.json").read_text())
    meta["checksums"] = shard_checksums(step)
    (step / "meta.json").write_text(json.dumps(meta))


def _genuine_metadata(step: Path):
    with (step / ".metadata").open("rb") as f:
        return pickle.load(f)  # the test's own file, written by DCP


def _write_metadata(step: Path, metadata) -> None:
    (step / ".metadata").write_bytes(pickle.dumps(metadata))
    _rerecord(step)


def _pickled_str(s: str) -> bytes:
    b = s.encode()
    return b"\x8c" + bytes([len(b)]) + b  # SHORT_BINUNICODE


def _dotted_global(module: str, name: str) -> bytes:
    return _pickled_str(module) + _pickled_str(name) + b"\x93"  # STACK_GLOBAL: protocol 4 resolves dots in name


def _os_system_payload(marker: Path) -> bytes:
    """(torch.distributed.checkpoint.filesystem, os.system)("touch MARKER")"""
    return b"\x80\x04" + _dotted_global(DCP_MODULE, "os.system") + _pickled_str(f"touch {marker}") + b"\x85R."


def _path_touch_payload(marker: Path) -> bytes:
    """(torch.distributed.checkpoint.filesystem, Path.touch)(Path("MARKER")): no shell involved."""
    path_obj = _dotted_global(DCP_MODULE, "Path") + _pickled_str(str(marker)) + b"\x85R"
    return b"\x80\x04" + _dotted_global(DCP_MODULE, "Path.touch") + path_obj + b"\x85R."


class _RunsCommand:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _craft_dotted_os_system(step: Path, marker: Path) -> None:
    payload = _os_system_payload(marker)
    _assert_runs_code(lambda: pickle.loads(payload), marker)
    (step / ".metadata").write_bytes(payload)
    _rerecord(step)


def _craft_dotted_path_touch(step: Path, marker: Path) -> None:
    payload = _path_touch_payload(marker)
    _assert_runs_code(lambda: pickle.loads(payload), marker)
    (step / ".metadata").write_bytes(payload)
    _rerecord(step)


def _craft_byte_blob(step: Path, marker: Path) -> None:
    """Only DCP's own classes: the embedding becomes a byte entry stored in a new file whose bytes are a pickle."""
    buffer = io.BytesIO()
    torch.save(_RunsCommand(f"touch {marker}"), buffer)  # loads "successfully" as os.system's exit status
    blob = buffer.getvalue()
    _assert_runs_code(lambda: torch.load(io.BytesIO(blob), weights_only=False), marker)
    (step / "blob.distcp").write_bytes(blob)
    md = _genuine_metadata(step)
    md.state_dict_metadata[FILLED] = BytesStorageMetadata()
    md.storage_data = {k: v for k, v in md.storage_data.items() if k.fqn != FILLED}
    md.storage_data[MetadataIndex(FILLED)] = _StorageInfo("blob.distcp", 0, len(blob))
    _write_metadata(step, md)


def _craft_missing_tensor(step: Path, marker: Path) -> None:
    md = _genuine_metadata(step)
    del md.state_dict_metadata[FILLED]
    _write_metadata(step, md)


def _craft_chunk_gap(step: Path, marker: Path) -> None:
    md = _genuine_metadata(step)
    md.state_dict_metadata[FILLED].chunks = []  # DCP would read nothing into it
    _write_metadata(step, md)


def _craft_wrong_dtype(step: Path, marker: Path) -> None:
    md = _genuine_metadata(step)
    md.state_dict_metadata[FILLED].properties.dtype = torch.float16
    _write_metadata(step, md)


def _assert_runs_code(load: Callable[[], object], marker: Path) -> None:
    """The payload is live: an unrestricted loader does run it."""
    load()
    assert marker.exists(), "the crafted payload does not run code; the test would prove nothing"
    marker.unlink()


CRAFTED = {
    "dotted-os-system": (_craft_dotted_os_system, r"refusing to load torch\.distributed\.checkpoint\.filesystem\.os"),
    "dotted-path-touch": (_craft_dotted_path_touch, r"refusing to load torch\.distributed\.checkpoint\.filesystem\."),
    "byte-blob": (_craft_byte_blob, r"'model\.tok_embeddings\.weight' is stored as a pickled byte blob"),
    "missing-tensor": (_craft_missing_tensor, r"'model\.tok_embeddings\.weight' is not in the checkpoint"),
    "chunk-gap": (_craft_chunk_gap, r"the chunks of 'model\.tok_embeddings\.weight' do not cover"),
    "wrong-dtype": (_craft_wrong_dtype, r"'model\.tok_embeddings\.weight' is torch\.float16 \[512, 128\] in the"),
}


def _one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("case", CRAFTED)
def test_crafted_metadata_is_refused_by_resume_and_export(step, tmp_path, case):
    craft, expected = CRAFTED[case]
    marker = tmp_path / "MARKER"
    craft(step, marker)
    with pytest.raises(CheckpointError, match=expected) as e:
        run(_cfg(tmp_path / "resumed", f"train.resume={step}"))
    _one_line(e)
    assert not (tmp_path / "resumed" / "metrics.jsonl").exists()  # refused before the run started
    with pytest.raises(CheckpointError, match=expected) as e:
        export(step, tmp_path / "hf", log=lambda s: None)
    _one_line(e)
    assert not (tmp_path / "hf").exists()
    assert not marker.exists()


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def _assert_refused(proc: subprocess.CompletedProcess, expected: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert expected in lines[0], lines[0]


def test_command_lines_refuse_a_crafted_checkpoint_in_one_line(step, tmp_path):
    marker = tmp_path / "MARKER"
    _craft_byte_blob(step, marker)
    expected = "'model.tok_embeddings.weight' is stored as a pickled byte blob"
    resume = _cli(
        "-m", "train", "configs/tiny-cpu.yaml", *QUICK, f"train.run_dir={tmp_path / 'r'}", f"train.resume={step}"
    )
    _assert_refused(resume, expected)
    _assert_refused(_cli("tools/convert_to_hf.py", "--checkpoint", str(step), "--out", str(tmp_path / "hf")), expected)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------
# Shard checksums


def _load(step: Path, verify: bool = True) -> dict:
    cfg = _cfg(step.parent.parent)
    model = Decoder(cfg.model, cfg.moe)
    return load_training_state(
        step, model, build_optimizer(model, cfg.optim), init_parallel(cfg.parallel, "cpu"), verify
    )


def _zero(path: Path) -> None:
    path.write_bytes(bytes(path.stat().st_size))


def _flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _drop_entry(step: Path, name: str) -> None:
    meta = json.loads((step / "meta.json").read_text())
    del meta["checksums"][name]
    (step / "meta.json").write_text(json.dumps(meta))


DAMAGE = {
    "zeroed-shard": (lambda s: _zero(s / "__0_0.distcp"), r"__0_0\.distcp: CRC-32 [0-9a-f]{8} but meta\.json records"),
    "flipped-byte": (
        lambda s: _flip_one_byte(s / "__0_0.distcp"),
        r"__0_0\.distcp: CRC-32 [0-9a-f]{8} but meta\.json records",
    ),
    "flipped-metadata-byte": (lambda s: _flip_one_byte(s / ".metadata"), r"\.metadata: CRC-32 [0-9a-f]{8} but"),
    "unrecorded-shard": (
        lambda s: _drop_entry(s, "__0_0.distcp"),
        r"__0_0\.distcp: no checksum recorded in meta\.json",
    ),
    "unrecorded-metadata": (
        lambda s: _drop_entry(s, ".metadata"),
        r"meta\.json: field 'checksums' is malformed or lacks",
    ),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_shard_is_refused_naming_the_file(step, case):
    damage, expected = DAMAGE[case]
    _load(step)  # the genuine checkpoint verifies
    damage(step)
    with pytest.raises(CheckpointError, match=expected) as e:
        _load(step)
    _one_line(e)


def test_checksums_are_recorded_for_every_file_and_required(step):
    meta = read_meta(step)
    files = sorted(f.name for f in step.iterdir() if f.name != "meta.json")
    assert sorted(meta["checksums"]) == files and ".metadata" in files
    assert all(meta["checksums"][f]["bytes"] == (step / f).stat().st_size for f in files)
    del meta["checksums"]
    (step / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"meta\.json: field 'checksums' is missing"):
        _load(step)


def test_verify_false_neither_records_nor_checks(step, tmp_path):
    cfg = _cfg(tmp_path)
    ctx = init_parallel(cfg.parallel, "cpu")
    model = Decoder(cfg.model, cfg.moe)
    optimizer = build_optimizer(model, cfg.optim)
    init_optimizer_state(model, optimizer)
    meta = {"consumed_samples": 0, "config": cfg.to_dict()}
    unverified = Checkpointer(tmp_path / "unverified", ctx, keep_last=1, verify=False).save(1, model, optimizer, meta)
    assert read_meta(unverified)["checksums"] is None
    with pytest.raises(CheckpointError, match=r"no shard checksums recorded \(saved with checkpoint\.verify=false\)"):
        _load(unverified)
    assert _load(unverified, verify=False)["step"] == 1
    # The flag also turns the comparison off for a checkpoint that has checksums.
    meta = json.loads((step / "meta.json").read_text())
    meta["checksums"]["__0_0.distcp"]["crc32"] = "00000000"
    (step / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="CRC-32"):
        _load(step)
    assert _load(step, verify=False)["step"] == 1
