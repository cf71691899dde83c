"""Sharded data parallelism (parallel.data_parallel: replicate | fsdp | hsdp) against the single-process model.

Each case: logits, loss, every gradient (as full tensors) and the global norm of one step at rtol 1e-4 / atol 1e-5,
then the parameters after 3 AdamW steps of two micro-batches per rank at rtol 1e-3 / atol 1e-4 (fp32;
tests/distributed/workers.py says why). Under fsdp/hsdp also the sharded state: parameters + AdamW moments per rank
add up to the single-process total over a shard group, each rank holds <= 1.05 x total / dp_shard, and the FFN
experts' local shards hold 1 / (ep x expert shard group) of the experts. fsdp dp2 and dp4, hsdp 2x2 and fsdp with
ep2, tp2 and pp2 also run with activation checkpointing (`ac`, against the single-process model without it). The
layouts of one world size share a spawn.
"""

import pytest

from tests.distributed import workers
from tests.distributed.harness import run_world

pytestmark = pytest.mark.slow

WORLD_2 = {
    "fsdp-dp2": {"data_parallel": "fsdp"},
    "fsdp-dp2-zero2": {"data_parallel": "fsdp", "reshard_after_forward": False},
    "fsdp-dp2-ep2-bf16": {"data_parallel": "fsdp", "ep": 2, "bf16": True},  # mixed precision (workers.py)
    # Activation checkpointing recomputes inside FSDP units (the parameters gathered again for the backward pass).
    "fsdp-dp2-ac-full": {"data_parallel": "fsdp", "ac": "full"},
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
    # The layouts above with activation checkpointing, one mode each: `full` recomputes a block's all-to-alls and
    # its FFN experts' FSDP unit inside the block's, `moe` the experts only, `attention` the attention only.
    "fsdp-dp4-ac-attention": {"data_parallel": "fsdp", "ac": "attention"},
    "hsdp-2x2-ac-moe": {"data_parallel": "hsdp", "dp_shard": 2, "ac": "moe"},
    "fsdp-dp4-ep2-ac-full": {"data_parallel": "fsdp", "ep": 2, "ac": "full"},
    "fsdp-dp2-tp2-ac-moe": {"data_parallel": "fsdp", "tp": 2, "ac": "moe"},
    "fsdp-dp2-pp2-ac-full": {"data_parallel": "fsdp", "pp": 2, "pipeline": (4, 1), "ac": "full"},
}


def test_fsdp_world_2_matches_single_process():
    run_world(workers.layouts, 2, WORLD_2)


def test_fsdp_hsdp_replicate_world_4_match_single_process():
    run_world(workers.layouts, 4, WORLD_4)
