"""Sharded data parallelism (parallel.data_parallel: replicate | fsdp | hsdp) against the single-process model.

Each case: logits, loss, every gradient (as full tensors) and the global norm of one step at rtol 1e-4 / atol 1e-5,
then the parameters after 3 AdamW steps of two micro-batches per rank at rtol 1e-3 / atol 1e-4 (fp32;
tests/distributed/workers.py says why). Under fsdp/hsdp also the sharded state: parameters + AdamW moments per rank
add up to the single-process total over a shard group, each rank holds <= 1.05 x total / dp_shard, and the FFN
experts' local shards hold 1 / (ep x expert shard group) of the experts. The layouts of one world size share a spawn.
"""

import pytest

from tests.distributed import workers
from tests.distributed.harness import run_world

pytestmark = pytest.mark.slow

WORLD_2 = {
    "fsdp-dp2": {"data_parallel": "fsdp"},
    "fsdp-dp2-zero2": {"data_parallel": "fsdp", "reshard_after_forward": False},
    "fsdp-dp2-ep2-bf16": {"data_parallel": "fsdp", "ep": 2, "bf16": True},  # mixed precision (workers.py)
}
WORLD_4 = {
    "fsdp-dp4": {"data_parallel": "fsdp"},
    "hsdp-2x2": {"data_parallel": "hsdp", "dp_shard": 2},
    "fsdp-dp4-ep2": {"data_parallel": "fsdp", "ep": 2},  # experts: 2 of 8 per rank (ep 2 x expert shards 2)
    "hsdp-2x2-ep2": {"data_parallel": "hsdp", "dp_shard": 2, "ep": 2},
    "fsdp-dp2-tp2": {"data_parallel": "fsdp", "tp": 2},
    "fsdp-dp2-pp2": {"data_parallel": "fsdp", "pp": 2, "pipeline": (4, 1)},
    # Gradients reduced during the backward pass, across replicas in the last micro-batch's backward only.
    "replicate-dp4": {"data_parallel": "replicate"},
    "replicate-dp2-pp2": {"data_parallel": "replicate", "pp": 2, "pipeline": (4, 1)},
}


def test_fsdp_world_2_matches_single_process():
    run_world(workers.layouts, 2, WORLD_2)


def test_fsdp_hsdp_replicate_world_4_match_single_process():
    run_world(workers.layouts, 4, WORLD_4)
