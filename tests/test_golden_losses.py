"""The default `make train` run (configs/tiny-cpu.yaml) keeps its losses: its first 10 steps, logged at every step,
equal the recorded values. Any change to the model, router, initialisation, data order or optimizer that moves the
default run fails here; a deliberate change records the new values (and says why in its commit)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from train.config_load import load_config
from train.trainer import run

ROOT = Path(__file__).resolve().parents[1]
# configs/tiny-cpu.yaml, train.exit_at_step=10 (the same schedule as the full 300 steps), 2 CPU threads.
GOLDEN = [
    6.2772650718688965,
    6.226070404052734,
    6.1651105880737305,
    6.0532426834106445,
    5.932400703430176,
    5.819546699523926,
    5.70975399017334,
    5.606555938720703,
    5.419558525085449,
    5.313724517822266,
]


@pytest.mark.slow
def test_default_make_train_losses_are_unchanged(tmp_path):
    overrides = [
        "train.exit_at_step=10",
        "logging.interval=1",
        f"train.run_dir={tmp_path}",
        "logging.progress_bar=false",
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the thread count the values were recorded with (CPU reductions may split by it)
    try:
        run(load_config(ROOT / "configs" / "tiny-cpu.yaml", overrides))
    finally:
        torch.set_num_threads(threads)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    # Relative 1e-5: far below any change of behaviour, above the last-bit noise of a different CPU's kernels.
    assert losses == pytest.approx(GOLDEN, rel=1e-5, abs=0)
