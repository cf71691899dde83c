"""Shard checksums in a distributed load: each rank hashes a share of the files, and a damaged shard that only
one rank hashed is refused by every rank (none is left waiting in dcp.load's collectives)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed import workers
from tests.distributed.harness import run_world

pytestmark = pytest.mark.slow


def refuse_damaged_shard(rank: int, world: int, ckpt_dir: str, damaged: str) -> None:
    from model.transformer import Decoder
    from parallel import parallelize
    from parallel.config import ParallelConfig
    from parallel.mesh import init_parallel
    from train.checkpoint import load_training_state
    from train.checkpoint_safety import CheckpointError

    ctx = init_parallel(ParallelConfig(ep=2), "cpu")
    mcfg, moecfg = workers.tiny_model_configs()
    model = parallelize(Decoder(mcfg, moecfg), ctx)
    try:
        load_training_state(Path(ckpt_dir) / "step_00000001", model, None, ctx)
    except CheckpointError as e:
        assert f"{damaged}: CRC-32" in str(e), str(e)
    else:
        raise AssertionError(f"rank {rank} loaded a checkpoint with a damaged {damaged}")


def test_a_shard_damaged_in_one_ranks_share_is_refused_by_all(tmp_path):
    run_world(workers.save_layout, 2, 1, 2, str(tmp_path))  # ep=2: one shard file per rank
    step = tmp_path / "step_00000001"
    names = sorted(f.name for f in step.iterdir() if f.name != "meta.json")
    damaged = names[1::2][0]  # hashed by rank 1 only
    data = bytearray((step / damaged).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (step / damaged).write_bytes(bytes(data))
    run_world(refuse_damaged_shard, 2, str(tmp_path), damaged)
