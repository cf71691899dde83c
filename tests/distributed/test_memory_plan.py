"""The memory plan against the tensors a layout really holds (gloo, 2 and 4 processes)."""

import pytest

from tests.distributed import workers
from tests.distributed.harness import run_world

pytestmark = pytest.mark.slow


def test_plan_equals_local_tensor_sizes_under_tp2_ep2_pp2():
    layouts = {"tp2": {"tp": 2}, "ep2": {"ep": 2}, "pp2": {"pp": 2}, "tp2-sp": {"tp": 2, "sequence_parallel": True}}
    run_world(workers.memory_plan_matches_tensors, 2, layouts)


def test_plan_equals_the_shards_of_fsdp_and_hsdp():
    """The sharding parallel/data_parallel.py applies: dense parameters over the shard group (padded where they do
    not split evenly), FFN experts of an expert-parallel layer over their expert shard group on dim 0, or on a weight
    dim when the local experts do not split evenly (6 experts, ep 2: 3 per rank over 2), FFN experts of a layer
    without expert parallelism like any dense parameter (6 over 4 ranks: dim 0, padded)."""
    layouts = {
        "fsdp-dp4": {"data_parallel": "fsdp"},
        "fsdp-dp4-experts6": {"data_parallel": "fsdp", "experts": 6},
        "fsdp-dp4-ep2": {"data_parallel": "fsdp", "ep": 2},
        "fsdp-dp4-ep2-experts6": {"data_parallel": "fsdp", "ep": 2, "experts": 6},
        "hsdp-2x2-ep2": {"data_parallel": "hsdp", "dp_shard": 2, "ep": 2},
        "fsdp-dp2-tp2": {"data_parallel": "fsdp", "tp": 2},
        "fsdp-dp2-pp2": {"data_parallel": "fsdp", "pp": 2},
        "replicate-dp4": {},
    }
    run_world(workers.memory_plan_matches_tensors, 4, layouts)
