"""parallel.timeout_s reaches every process group of the mesh, not only the default one: a collective on an
expert-parallel sub-group whose peer never joins fails after the timeout instead of hanging."""

from datetime import timedelta

import pytest
import torch.distributed as dist

from tests.distributed.harness import run_world

pytestmark = pytest.mark.slow


def _peer_never_joins(rank: int, world: int) -> None:
    from parallel.config import ParallelConfig
    from parallel.mesh import init_parallel

    ctx = init_parallel(ParallelConfig(ep=2, timeout_s=3), "cpu")  # ep groups {0, 1} and {2, 3}
    store = dist.distributed_c10d._get_default_store()
    if rank == 0:  # rank 1, its ep peer, never enters this barrier
        with pytest.raises(RuntimeError, match="[Tt]imed out"):
            dist.barrier(group=ctx.group("ep"))
        store.set("rank0_done", "1")
    else:  # wait outside any collective until rank 0 has seen its barrier time out
        store.wait(["rank0_done"], timedelta(seconds=300))


def test_a_collective_on_a_mesh_subgroup_times_out():
    run_world(_peer_never_joins, 4)
