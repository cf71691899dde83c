"""The memory plan against the tensors a layout really holds (gloo, 2 processes)."""

import pytest

from tests.distributed import workers
from tests.distributed.harness import run_world

pytestmark = pytest.mark.slow


def test_plan_equals_local_tensor_sizes_under_tp2_ep2_pp2():
    layouts = {"tp2": {"tp": 2}, "ep2": {"ep": 2}, "pp2": {"pp": 2}, "tp2-sp": {"tp": 2, "sequence_parallel": True}}
    run_world(workers.memory_plan_matches_tensors, 2, layouts)
