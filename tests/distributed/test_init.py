"""Meta-device initialisation under tp=2, ep=2 and pp=2 (gloo, 2 processes): the single-process weights exactly, at
most the rank's shard plus one full parameter held at once, and the same training as the single process."""

import pytest

from tests.distributed import workers
from tests.distributed.harness import run_world

pytestmark = pytest.mark.slow


def test_every_layout_starts_from_the_single_process_weights():
    layouts = {"tp2": {"tp": 2}, "ep2": {"ep": 2}, "pp2": {"pp": 2}, "tp2-sp": {"tp": 2, "sequence_parallel": True}}
    run_world(workers.streamed_init, 2, layouts)
