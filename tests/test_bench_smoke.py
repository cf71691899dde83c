"""The benchmark scripts run end to end at tiny sizes (benchmarks are not tests: nothing here looks at a time).

What is asserted is what a run must always produce: a row for every cell, the exact all-to-all byte accounting, the
peers named (with numbers, or why not), and a results file with the command, machine, torch version and date
beside the numbers, written where --out says and nowhere in the repository. A crash late in a benchmark, after
minutes of timings, is caught here in seconds instead.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECORD_KEYS = {"benchmark", "command", "machine", "torch", "date"}

pytestmark = pytest.mark.slow


def repository_files() -> dict[Path, int]:
    """Every file of the working tree that a benchmark could write (docs and results), with its mtime."""
    files = [*ROOT.joinpath("docs").rglob("*"), *ROOT.joinpath("bench", "results").rglob("*")]
    return {f: f.stat().st_mtime_ns for f in files if f.is_file()}


def run_bench(script: str, *args: str, out: Path) -> tuple[str, dict]:
    """(stdout, the results record) of one benchmark run with `--out out`, which must be its only file."""
    before = repository_files()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, f"bench/{script}", *args, "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert repository_files() == before, f"{script} wrote into docs/ or bench/results/ despite --out"
    (written,) = out.iterdir() if out.is_dir() else [out]
    record = json.loads(written.read_text())
    assert record.keys() >= RECORD_KEYS, record.keys()
    assert shlex.split(record["command"]) == ["python", f"bench/{script}", *args, "--out", str(out)]
    assert record["torch"] == torch_version()
    assert record["machine"]["cpu_count"] == os.cpu_count()
    return proc.stdout, record


def torch_version() -> str:
    import torch

    return torch.__version__


def table_rows(text: str, first_cell: str) -> list[list[str]]:
    return [
        [c.strip() for c in line.strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith(f"| {first_cell}")
    ]


def test_expert_forward_prints_every_cell(tmp_path):
    args = ("--tokens", "64", "--small-tokens", "32", "--repeats", "1")
    out, record = run_bench("expert_forward.py", *args, out=tmp_path)
    # The two controlled-routing tables (8 columns; the table of rows per expert has 4).
    rows = [r for r in table_rows(out, "(") if len(r) == 8 and r[1] != "trained"]
    # 3 shapes x 5 taus at --tokens, then 3 shapes x 2 taus at --small-tokens.
    assert [(r[0], r[1]) for r in rows[:15]] == [
        (shape, tau) for shape in ("(8+4)", "(16+4)", "(32+8)") for tau in ("0.1", "0.25", "0.5", "0.75", "1.0")
    ]
    assert len(rows) == 21
    for r in rows:
        share, ideal, efficiency = float(r[2]), float(r[6].rstrip("x")), float(r[7])
        assert 0 < share <= 1 and ideal == pytest.approx(1 / share, rel=0.01) and efficiency > 0
    assert re.search(r"Efficiency min [0-9.]+, max [0-9.]+ \(target >= 0.9 at every tau; \d+/15 cells", out)
    assert record["benchmark"] == "expert_forward_cpu" and record["tokens"] == 64
    assert [(c["layer"], c["tau"]) for c in record["controlled"]] == [(r[0], r[1]) for r in rows[:15]]
    assert len(record["controlled_small"]) == 6
    for c in record["controlled"] + record["controlled_small"]:
        assert c["efficiency"] == pytest.approx(c["speedup"] * c["ffn_share"]) and c["vanilla_ms"] > 0


def test_all_to_all_bytes_are_the_ffn_share_exactly(tmp_path):
    # 420 tokens x top-2 = 840 assignments: every FFN share of the sweep is a whole number of assignments.
    out, record = run_bench("all_to_all.py", "--tokens", "420", "--repeats", "1", "--ep", "2", out=tmp_path)
    rows = table_rows(out, "ep=2")
    assert len(rows) == 15
    for r in rows:
        share, van_mb, pp_mb, remote_mb = float(r[3]), float(r[4]), float(r[5]), float(r[7])
        assert r[9] == "exact", r
        assert pp_mb / van_mb == pytest.approx(share, abs=1e-3)
        assert 0 < remote_mb < pp_mb  # a rank keeps its own chunk
        assert r[8] == "0.5000", r  # bf16 payload: half the fp32 bytes per FFN assignment
    assert "15/15 rows" in out
    assert len(record["cells"]) == 15 and all(c["exact"] and c["ep"] == 2 for c in record["cells"])
    assert record["tokens_per_rank"] == 420


def test_all_to_all_overlap_reports_both_layers(tmp_path):
    args = ("--overlap", "--tokens", "64", "--repeats", "1", "--ep", "2")
    out, record = run_bench("all_to_all.py", *args, out=tmp_path / "overlap.json")
    rows = table_rows(out, "ep=2")
    assert [r[1] for r in rows] == ["(8+4)", "(8+4) + shared"]
    for r in rows:
        serial, overlapped, local = float(r[2]), float(r[3]), float(r[5])
        assert serial > 0 and overlapped > 0 and local > 0
        float(r[6])  # the hidden share is a number (its value is a timing)
    assert record["benchmark"] == "all_to_all_overlap"
    assert [c["layer"] for c in record["cells"]] == ["(8+4)", "(8+4) + shared"]


def test_peers_names_every_implementation(tmp_path):
    out, record = run_bench("peers.py", "--tokens", "64", "--repeats", "1", out=tmp_path)
    for n in ("8", "16", "32"):
        rows = {r[1]: r for r in table_rows(out, n)}
        ours = rows["ours (model.moe.MoELayer)"]
        assert float(ours[2]) > 0 and float(ours[3]) > 0 and ours[4] == "1.00"
        # A peer has numbers or says why it has none; it never silently disappears.
        for peer in ("DeepSpeed MoE", "megatron-core MoELayer"):
            assert peer in rows, f"{peer} missing from the {n}-expert rows"
            cell = rows[peer][2]
            assert re.fullmatch(r"\d+", cell) or cell.startswith(("not ", "failed")), cell
    assert len(record["cells"]) == 9 and {"deepspeed", "megatron.core"} <= record["versions"].keys()


def test_train_throughput_reports_a_step(tmp_path):
    args = ("--presets", "tiny-cpu", "--steps", "1", "--warmup", "0")
    out, record = run_bench("train_throughput.py", *args, out=tmp_path)
    (row,) = table_rows(out, "tiny-cpu")
    tokens_per_s = float(row[4].replace(",", ""))
    assert int(row[2]) > 0 and tokens_per_s > 0
    assert "attention" in row[6] and "experts" in row[6]
    (preset,) = record["presets"]
    assert preset["preset"] == "tiny-cpu" and preset["tokens_per_s"] > 0 and record["steps"] == 1


def test_checkpoint_io_times_every_operation(tmp_path):
    args = ("--config", "configs/tiny-cpu.yaml", "--dir", str(tmp_path / "ckpt"))
    out, record = run_bench("checkpoint_io.py", *args, out=tmp_path / "results" / "io.json")
    assert [r[0] for r in table_rows(out, "")][1:] == [
        "save (sync), no checksums",
        "+ shard checksums",
        "save (async, with checksums)",
        "load, unverified",
        "+ checksum verification",
    ]
    assert record["benchmark"] == "checkpoint_io" and record["params"] > 0 and record["size_mb"] > 0
    assert 0 <= record["save_async_stall_s"] <= record["save_async_s"]
    assert not (tmp_path / "ckpt").exists()  # the benchmark removes its checkpoints


def test_memory_reports_sharded_state_and_throughput(tmp_path):
    args = ("--preset", "tiny-cpu", "--dps", "1", "2", "--steps", "1", "--rounds", "1")
    out, record = run_bench("memory.py", *args, out=tmp_path / "m.json")
    one, two = table_rows(out, "1"), table_rows(out, "2")
    assert float(one[0][3]) == 1.0 and 0.99 < float(two[0][3]) <= 1.05  # fsdp at dp=2 holds half the state
    assert re.search(r"fsdp / replicate = \*\*[0-9.]+\*\*", out)
    assert record["benchmark"] == "memory" and {"state", "throughput"} <= record.keys()


def test_memory_plan_reports_every_mode_and_the_7b_plans(tmp_path):
    args = ["--config", "configs/tiny-cpu.yaml", "--seq-len", "16", "--micro-batch", "1"]
    out, record = run_bench("memory_plan.py", *args, out=tmp_path / "m.json")
    rows = {r[0]: r for r in table_rows(out, "") if r[0] in ("none", "full", "moe", "attention")}
    assert set(rows) == {"none", "full", "moe", "attention"}
    assert all(float(rows[m][2]) < 1 for m in ("full", "moe", "attention"))
    assert record["full_ac_max_block_ratio"] <= 1.1 and record["rss"]["step"]["rss_after_step_gib"] > 0
    assert len(record["plan_7b"]) == 3 and out.count("memory plan per rank: world") == 3
