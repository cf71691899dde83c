"""Bad input of every kind is one line on stderr naming the file or key, exit code 2, no traceback, and the files
involved are left as they were: checkpoints (shapes, meta.json, .metadata, latest), config files, datasets,
metrics.jsonl, sizes that cannot fit, non-finite numbers, scheduler variables. Also: the built-in defaults form a
valid config. (Hugging Face folders: tests/test_hf_import.py.)"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import train.memory_fit
from data.indexed import IndexedDatasetWriter
from launch.__main__ import main as launch_main
from train.__main__ import main as train_main
from train.config import Config
from train.config_load import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/tiny-cpu.yaml"
# A model of a few thousand parameters and steps of 2 x 16 tokens: each run takes a second or two.
SMALL = [
    "model.num_layers=1",
    "model.hidden_size=32",
    "model.ffn_hidden_size=32",
    "moe.expert_ffn_hidden_size=16",
    "logging.interval=1",
    "train.eval_interval=0",
    "logging.progress_bar=false",
    "logging.wandb.mode=disabled",
    "train.global_batch_size=2",
    "train.micro_batch_size=2",
    "data.seq_len=16",
    "data.synthetic.num_tokens=20000",
]
STEP = "checkpoints/step_00000002"


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line(capsys: pytest.CaptureFixture[str], code: int) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory with a complete checkpoint at step 2 and metrics records for steps 1 and 2."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    assert train_main([str(TINY), *SMALL, "train.max_steps=2", f"train.run_dir={run_dir}"]) == 0
    return run_dir


@pytest.fixture
def run_dir(trained: Path, tmp_path: Path) -> Path:
    """A fresh copy of the trained run, free to damage."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


def _resume(run_dir: Path, *extra: str) -> int:
    return train_main([str(TINY), *SMALL, "train.max_steps=3", f"train.run_dir={run_dir}", *extra])


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints


def test_checkpoint_of_another_model_size_is_one_line_from_the_command_line(run_dir):
    """meta.json claims the other size, so only the shard metadata shows that the tensors differ: one line naming
    the first tensor that does not fit, and the checkpoint is left alone."""
    meta_file = run_dir / STEP / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["config"]["model"]["hidden_size"] = 64
    meta_file.write_text(json.dumps(meta))
    before = _snapshot(run_dir)
    cmd = [sys.executable, "-m", "train", str(TINY), *SMALL, "model.hidden_size=64", f"train.run_dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: {run_dir / STEP}: 'model.tok_embeddings.weight' is torch.float32 [512, 32]")
    assert "use the checkpoint's model shape" in line
    assert _snapshot(run_dir) == before


def test_export_of_a_checkpoint_whose_shards_do_not_fit_its_meta_json(run_dir, capsys):
    from tools.convert_to_hf import main as export_main

    meta_file = run_dir / STEP / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["config"]["model"]["hidden_size"] = 64
    meta_file.write_text(json.dumps(meta))
    before = _snapshot(run_dir)
    line = _one_line(capsys, export_main(["--checkpoint", str(run_dir), "--out", str(run_dir.parent / "hf")]))
    assert line.startswith(f"convert_to_hf: {run_dir / STEP}: 'model.tok_embeddings.weight' is torch.float32 [512, 32]")
    assert _snapshot(run_dir) == before and not (run_dir.parent / "hf").exists()


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda m: m.update(step="abc"), "field 'step' is 'abc', expected an integer >= 0"),
        (lambda m: m.update(step=-1), "field 'step' is -1"),
        (lambda m: m.update(step=True), "field 'step' is True"),
        (lambda m: m.update(consumed_samples=None), "field 'consumed_samples' is None"),
        (lambda m: m.update(config=[1]), "field 'config' is [1], expected an object"),
        (lambda m: m["config"].update(model=5), "config.model: expected a mapping"),
        (lambda m: m["config"]["model"].update(hidden_size="x"), "config.model.hidden_size: expected an integer"),
        (lambda m: m["config"]["moe"].update(balance=[3]), "config.moe.balance[0]: expected a mapping"),
        (lambda m: m.update(rng=5), "field 'rng' is 5, expected an object of base64 strings"),
        (lambda m: m.update(rng={"torch": "zz"}), "expected base64 of the torch generator's state"),
        (lambda m: m.update(rng={"torch": "AAAA"}), "expected base64 of the torch generator's state"),
    ],
    ids=[
        "step-str",
        "step-negative",
        "step-bool",
        "consumed-null",
        "config-list",
        "model-int",
        "hidden-str",
        "balance-item",
        "rng-int",
        "rng-not-base64",
        "rng-wrong-size",
    ],
)
def test_meta_json_with_wrong_field_types(run_dir, capsys, edit, field):
    meta_file = run_dir / STEP / "meta.json"
    meta = json.loads(meta_file.read_text())
    edit(meta)
    meta_file.write_text(json.dumps(meta))
    before = _snapshot(run_dir)
    line = _one_line(capsys, _resume(run_dir))
    assert line.startswith(f"error: {meta_file}: ") and field in line and "pick another step" in line
    assert _snapshot(run_dir) == before


def test_meta_json_that_is_not_an_object(run_dir, capsys):
    meta_file = run_dir / STEP / "meta.json"
    meta_file.write_text("[1, 2]")
    assert _one_line(capsys, _resume(run_dir)) == (
        f"error: {meta_file}: not a JSON object; the checkpoint is damaged, pick another step"
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (pickle.dumps({"state_dict_metadata": {}}), "holds a dict, not DCP checkpoint metadata"),
        (pickle.dumps([1, 2]), "holds a list, not DCP checkpoint metadata"),
        (pickle.dumps(None), "holds a NoneType, not DCP checkpoint metadata"),
        (np.random.default_rng(0).bytes(300), "unreadable DCP metadata"),
        (b"", "unreadable DCP metadata"),
    ],
    ids=["dict", "list", "none", "random-bytes", "empty"],
)
def test_metadata_that_is_not_checkpoint_metadata(run_dir, capsys, content, message):
    metadata = run_dir / STEP / ".metadata"
    metadata.write_bytes(content)
    before = _snapshot(run_dir)
    # With checksums on, the altered file is refused before it is read; this is the reader's own refusal.
    line = _one_line(capsys, _resume(run_dir, "checkpoint.verify=false"))
    assert line.startswith(f"error: {metadata}: ") and message in line
    assert _snapshot(run_dir) == before


LATEST_CONTENTS = pytest.mark.parametrize(
    "content",
    [b"", b"\n  \n", b"\xff\xfestep", b"../x\n", b"step_00000099\n"],
    ids=["empty", "blank", "not-utf8", "a-path", "a-missing-step"],
)


@LATEST_CONTENTS
def test_damaged_latest_falls_back_to_the_newest_complete_step(run_dir, capsys, content):
    """A `latest` that names no complete step is stale, not fatal: auto-resume takes the newest complete step,
    says so on the console, and the next save rewrites `latest`."""
    latest = run_dir / "checkpoints/latest"
    latest.write_bytes(content)
    assert _resume(run_dir) == 0
    out = capsys.readouterr().out
    assert f"resume: {latest}" in out and "using the newest complete step, step_00000002" in out
    assert "resumed from" in out and "(step 2)" in out
    assert latest.read_text() == "step_00000003\n"


@LATEST_CONTENTS
def test_damaged_latest_without_a_complete_step_is_one_line(run_dir, capsys, content):
    from tools.convert_to_hf import main as export_main

    latest = run_dir / "checkpoints/latest"
    latest.write_bytes(content)
    (run_dir / STEP / "meta.json").unlink()  # the only step is now incomplete
    before = _snapshot(run_dir)
    line = _one_line(capsys, _resume(run_dir))
    assert line.startswith(f"error: {latest}: ") and "holds no complete step directory" in line
    line = _one_line(capsys, export_main(["--checkpoint", str(run_dir), "--out", str(run_dir.parent / "hf")]))
    assert line.startswith(f"convert_to_hf: {latest}: ")
    assert "train." not in line and "resume" not in line  # export errors give no training advice
    assert _snapshot(run_dir) == before and not (run_dir.parent / "hf").exists()


# ---------------------------------------------------------------------------------------------------------------
# metrics.jsonl


def _steps(metrics: Path) -> list[int]:
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines()]


def test_a_half_written_last_metrics_line_is_dropped_on_resume(run_dir, capsys):
    metrics = run_dir / "metrics.jsonl"
    complete = metrics.read_text()
    assert _steps(metrics) == [1, 2]
    metrics.write_text(complete + '{"step": 3, "loss": 6.1, "rou')  # a kill in the middle of a write
    assert _resume(run_dir) == 0
    assert _steps(metrics) == [1, 2, 3]
    assert metrics.read_text().startswith(complete)  # the complete records up to the resumed step, byte for byte


def test_records_after_the_resumed_step_go_with_a_half_written_line(run_dir):
    metrics = run_dir / "metrics.jsonl"
    records = metrics.read_text().splitlines()
    later = json.dumps({**json.loads(records[-1]), "step": 3})
    metrics.write_text("\n".join([*records, later, '{"st']))
    assert _resume(run_dir) == 0
    assert _steps(metrics) == [1, 2, 3]
    assert metrics.read_text().splitlines()[:2] == records


def test_a_damaged_metrics_line_before_the_last_is_refused(run_dir, capsys):
    metrics = run_dir / "metrics.jsonl"
    records = metrics.read_text().splitlines()
    metrics.write_text("\n".join([records[0], "not json", records[1]]) + "\n")
    before = _snapshot(run_dir)
    assert _one_line(capsys, _resume(run_dir)).startswith(f"error: {metrics}:2: not a metrics record; remove")
    assert _snapshot(run_dir) == before


# ---------------------------------------------------------------------------------------------------------------
# Config files and values


def test_config_file_that_is_not_utf8(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("# r\xe9glages\ntrain:\n  max_steps: 2\n".encode("latin-1"))
    expected = f"config error: {path}: not UTF-8 text (byte 3 is b'\\xe9'); save the config as UTF-8 YAML"
    assert _one_line(capsys, train_main([str(path)])) == expected
    assert _one_line(capsys, launch_main([str(path), "--dry-run"])) == expected
    proc = subprocess.run(
        [sys.executable, "-m", "launch", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and proc.stderr == expected + "\n" and proc.stdout == ""


@pytest.mark.parametrize(
    ("override", "key", "what"),
    [
        ("model.max_seq_len=100000000", "model.max_seq_len", "the RoPE tables"),
        ("model.vocab_size=1000000000", "model.vocab_size", "the fp32 embedding and output head"),
        ("data.synthetic.num_tokens=1000000000000", "data.synthetic.num_tokens", "the synthetic corpus"),
    ],
)
def test_sizes_that_cannot_fit_fail_at_validation(tmp_path, capsys, monkeypatch, override, key, what):
    monkeypatch.setattr(train.memory_fit, "available_memory_bytes", lambda: 16 * 2**30)
    line = _one_line(capsys, train_main([str(TINY), override, f"train.run_dir={tmp_path / 'run'}"]))
    assert line.startswith(f"config error: {key}: ") and what in line
    assert line.endswith("more than the 16.0 GiB of memory available; lower it")
    assert not (tmp_path / "run").exists()  # refused before anything was allocated or written


def test_an_absurd_size_is_refused_on_any_machine(tmp_path):
    """No machine holds a petabyte: the real memory probe refuses it too, before allocating."""
    proc = subprocess.run(
        [sys.executable, "-m", "train", str(TINY), "model.vocab_size=1000000000000", f"train.run_dir={tmp_path}/r"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("config error: model.vocab_size: 1000000000000 needs ")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("value", [".inf", "-.inf", "inf", ".nan", "nan"])
def test_non_finite_learning_rate(tmp_path, capsys, value):
    line = _one_line(capsys, train_main([str(TINY), f"optim.lr={value}", f"train.run_dir={tmp_path / 'run'}"]))
    assert line.startswith("config error: optim.lr: expected a finite number, got ")
    assert not (tmp_path / "run").exists()


def test_built_in_defaults_form_a_valid_config(tmp_path, capsys):
    Config().validate()
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    run_dir = tmp_path / "run"
    assert train_main([str(empty), "train.max_steps=2", "logging.progress_bar=false", f"train.run_dir={run_dir}"]) == 0
    assert _steps(run_dir / "metrics.jsonl") == [2]


# ---------------------------------------------------------------------------------------------------------------
# Data


def _indexed(prefix: Path, top_id: int) -> Path:
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for _ in range(20):
            writer.add_document(rng.integers(0, 100, size=40).astype(np.uint16))
        writer.add_document(np.array([1, 2, top_id, 0], dtype=np.uint16))
    return prefix


def test_dataset_token_ids_beyond_the_vocabulary(tmp_path, capsys):
    good, bad = _indexed(tmp_path / "good", 511), _indexed(tmp_path / "bad", 600)
    before = _snapshot(tmp_path)
    run = [f"train.run_dir={tmp_path / 'run'}", "train.max_steps=1", *SMALL]
    line = _one_line(capsys, train_main([str(TINY), *run, f"data.path={bad}"]))
    assert line == (
        f"error: {bad}: holds token id 600 >= model.vocab_size=512; set model.vocab_size >= 601 or rebuild the "
        "dataset with the tokenizer of this model"
    )
    blend = f"data.datasets=[{{path: {good}, weight: 1}}, {{path: {bad}, weight: 1}}]"
    assert _one_line(capsys, train_main([str(TINY), *run, blend])).startswith(f"error: {bad}: holds token id 600")
    assert _snapshot(tmp_path) == before  # the datasets are untouched and no run started
    assert train_main([str(TINY), *run, f"data.path={good}"]) == 0  # id 511 fits a vocabulary of 512


# ---------------------------------------------------------------------------------------------------------------
# Scheduler environment


@pytest.mark.parametrize("value", ["abc", "-1", "1.0", "²"])
def test_malformed_slurm_nodeid(capsys, monkeypatch, value):
    monkeypatch.setenv("SLURM_NODEID", value)
    monkeypatch.setenv("SLURM_PROCID", "1")  # a valid later variable does not hide the malformed one
    config = str(ROOT / "configs/tiny-cpu-2node.yaml")
    line = _one_line(capsys, launch_main([config, "cluster.rendezvous_endpoint=127.0.0.1:1"]))
    assert line == (
        f"config error: SLURM_NODEID: {value!r} is malformed, expected a node index (0, 1, ...); fix or unset the "
        "variable, or pass --node-rank R"
    )


def test_well_formed_scheduler_variables_still_work():
    from launch.plan import resolve_node_rank

    cfg = load_config(ROOT / "configs/tiny-cpu-2node.yaml")
    assert resolve_node_rank(cfg, None, {"SLURM_NODEID": " 1\n"}) == (1, "SLURM_NODEID")
    assert resolve_node_rank(cfg, None, {"SLURM_NODEID": "", "SLURM_PROCID": "1"}) == (1, "SLURM_PROCID")
