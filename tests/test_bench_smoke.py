"""The benchmark scripts run end to end at tiny sizes (benchmarks are not tests: nothing here looks at a time).

What is asserted is what a run must always produce: a row for every cell, the exact all-to-all byte accounting, the
peers named (with numbers, or why not), and docs/benchmarks.md left alone under --no-write. A late crash in a
benchmark (one was seen after 8 minutes of timings) is caught here in seconds instead.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = ROOT / "docs" / "benchmarks.md"

pytestmark = pytest.mark.slow


def run_bench(script: str, *args: str) -> str:
    before = BENCHMARKS_MD.read_bytes() if BENCHMARKS_MD.exists() else None
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, f"bench/{script}", *args, "--no-write"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = BENCHMARKS_MD.read_bytes() if BENCHMARKS_MD.exists() else None
    assert after == before, f"{script} --no-write changed docs/benchmarks.md"
    return proc.stdout


def table_rows(text: str, first_cell: str) -> list[list[str]]:
    return [
        [c.strip() for c in line.strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith(f"| {first_cell}")
    ]


def test_expert_forward_prints_every_cell():
    out = run_bench("expert_forward.py", "--tokens", "64", "--small-tokens", "32", "--repeats", "1")
    rows = [r for r in table_rows(out, "(") if r[1] != "trained"]
    # 3 shapes x 5 taus at --tokens, then 3 shapes x 2 taus at --small-tokens.
    assert [(r[0], r[1]) for r in rows[:15]] == [
        (shape, tau) for shape in ("(8+4)", "(16+4)", "(32+8)") for tau in ("0.1", "0.25", "0.5", "0.75", "1.0")
    ]
    assert len(rows) == 21
    for r in rows:
        share, ideal, efficiency = float(r[2]), float(r[6].rstrip("x")), float(r[7])
        assert 0 < share <= 1 and ideal == pytest.approx(1 / share, rel=0.01) and efficiency > 0
    assert re.search(r"Efficiency min [0-9.]+, max [0-9.]+ \(target >= 0.9 at every tau; \d+/15 cells", out)


def test_all_to_all_bytes_are_the_ffn_share_exactly():
    # 420 tokens x top-2 = 840 assignments: every FFN share of the sweep is a whole number of assignments.
    out = run_bench("all_to_all.py", "--tokens", "420", "--repeats", "1", "--ep", "2")
    rows = table_rows(out, "ep=2")
    assert len(rows) == 15
    for r in rows:
        share, van_mb, pp_mb, remote_mb = float(r[3]), float(r[4]), float(r[5]), float(r[7])
        assert r[9] == "exact", r
        assert pp_mb / van_mb == pytest.approx(share, abs=1e-3)
        assert 0 < remote_mb < pp_mb  # a rank keeps its own chunk
        assert r[8] == "0.5000", r  # bf16 payload: half the fp32 bytes per FFN assignment
    assert "15/15 rows" in out


def test_all_to_all_overlap_reports_both_layers():
    out = run_bench("all_to_all.py", "--overlap", "--tokens", "64", "--repeats", "1", "--ep", "2")
    rows = table_rows(out, "ep=2")
    assert [r[1] for r in rows] == ["(8+4)", "(8+4) + shared"]
    for r in rows:
        serial, overlapped, local = float(r[2]), float(r[3]), float(r[5])
        assert serial > 0 and overlapped > 0 and local > 0
        float(r[6])  # the hidden share is a number (its value is a timing)


def test_peers_names_every_implementation():
    out = run_bench("peers.py", "--tokens", "64", "--repeats", "1")
    for n in ("8", "16", "32"):
        rows = {r[1]: r for r in table_rows(out, n)}
        ours = rows["ours (model.moe.MoELayer)"]
        assert float(ours[2]) > 0 and float(ours[3]) > 0 and ours[4] == "1.00"
        # A peer has numbers or says why it has none; it never silently disappears.
        for peer in ("DeepSpeed MoE", "megatron-core MoELayer"):
            assert peer in rows, f"{peer} missing from the {n}-expert rows"
            cell = rows[peer][2]
            assert re.fullmatch(r"\d+", cell) or cell.startswith(("not ", "failed")), cell


def test_train_throughput_reports_a_step():
    out = run_bench("train_throughput.py", "--presets", "tiny-cpu", "--steps", "1", "--warmup", "0")
    (row,) = table_rows(out, "tiny-cpu")
    tokens_per_s = float(row[4].replace(",", ""))
    assert int(row[2]) > 0 and tokens_per_s > 0
    assert "attention" in row[6] and "experts" in row[6]


def test_memory_reports_sharded_state_and_throughput(tmp_path):
    out = run_bench(
        "memory.py",
        "--preset",
        "tiny-cpu",
        "--dps",
        "1",
        "2",
        "--steps",
        "1",
        "--rounds",
        "1",
        "--json",
        str(tmp_path / "m.json"),
    )
    one, two = table_rows(out, "1"), table_rows(out, "2")
    assert float(one[0][3]) == 1.0 and 0.99 < float(two[0][3]) <= 1.05  # fsdp at dp=2 holds half the state
    assert re.search(r"fsdp / replicate = \*\*[0-9.]+\*\*", out)
    record = json.loads((tmp_path / "m.json").read_text())
    assert {"command", "machine", "torch", "date", "state", "throughput"} <= record.keys()


def test_memory_plan_reports_every_mode_and_the_7b_plans(tmp_path):
    memory_md = ROOT / "docs" / "memory.md"
    before = memory_md.read_bytes()
    args = ["--config", "configs/tiny-cpu.yaml", "--seq-len", "16", "--micro-batch", "1"]
    out = run_bench("memory_plan.py", *args, "--json", str(tmp_path / "m.json"))
    assert memory_md.read_bytes() == before, "memory_plan.py --no-write changed docs/memory.md"
    rows = {r[0]: r for r in table_rows(out, "") if r[0] in ("none", "full", "moe", "attention")}
    assert set(rows) == {"none", "full", "moe", "attention"}
    assert all(float(rows[m][2]) < 1 for m in ("full", "moe", "attention"))
    record = json.loads((tmp_path / "m.json").read_text())
    assert record["full_ac_max_block_ratio"] <= 1.1 and record["rss"]["step"]["rss_after_step_gib"] > 0
    assert len(record["plan_7b"]) == 3 and out.count("memory plan per rank: world") == 3
