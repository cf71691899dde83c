"""Activation checkpointing under tensor, expert and pipeline parallelism against the single-process model without
it: logits, loss, every gradient and the parameters after AdamW steps (tolerances of tests/distributed/workers.py)."""

import pytest

from tests.distributed import workers
from tests.distributed.harness import run_world

pytestmark = pytest.mark.slow


def test_every_mode_matches_single_process_under_tp2_ep2_pp2():
    run_world(workers.activation_checkpointing, 2, ["full", "moe", "attention"])
