"""Meta-device initialisation (gloo, 2 and 4 processes): the single-process weights exactly, at most the rank's
shard plus one full parameter held at once, and the same training as the single process, under tp=2, ep=2 and
pp=2, and with FSDP shards (plain, strided over tensor and expert parallelism, uneven, hsdp's replicated ones)."""

import pytest

from tests.distributed import workers
from tests.distributed.harness import run_world

pytestmark = pytest.mark.slow


def test_every_layout_starts_from_the_single_process_weights():
    layouts = {"tp2": {"tp": 2}, "ep2": {"ep": 2}, "pp2": {"pp": 2}, "tp2-sp": {"tp": 2, "sequence_parallel": True}}
    run_world(workers.streamed_init, 2, layouts)


def test_fsdp_and_hsdp_shards_start_from_the_single_process_weights():
    layouts = {
        "fsdp-dp4": {"data_parallel": "fsdp"},
        "hsdp-2x2": {"data_parallel": "hsdp", "dp_shard": 2},
        "fsdp-dp4-ep2": {"data_parallel": "fsdp", "ep": 2},
        "fsdp-dp2-tp2": {"data_parallel": "fsdp", "tp": 2},
        "fsdp-dp2-pp2": {"data_parallel": "fsdp", "pp": 2},
    }
    run_world(workers.streamed_init, 4, layouts)
