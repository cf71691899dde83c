"""Whether a state may be saved is decided the same on every rank, though each rank holds different shards."""

import pytest
import torch
from torch.distributed.tensor import DTensor

from tests.distributed.harness import run_world

pytestmark = pytest.mark.slow


def nan_in_one_ranks_shard(rank: int, world: int) -> None:
    from model.experts import FFNExperts
    from model.transformer import Decoder
    from parallel import parallelize
    from parallel.config import ParallelConfig
    from parallel.mesh import init_parallel
    from tests.distributed.workers import tiny_model_configs
    from train.config import OptimConfig
    from train.optim import build_optimizer
    from train.step import state_is_finite

    # fsdp x ep2: dense parameters are FSDP shards over dp, FFN experts DTensors sharded over ep.
    ctx = init_parallel(ParallelConfig(ep=2, data_parallel="fsdp"), "cpu")
    mcfg, moecfg = tiny_model_configs()
    torch.manual_seed(0)
    model = parallelize(Decoder(mcfg, moecfg), ctx)
    opt = build_optimizer(model, OptimConfig(lr=1e-2))
    assert state_is_finite(model, opt, None, distributed=True)
    expert = next(m for m in model.modules() if isinstance(m, FFNExperts))
    dense = model.tok_embeddings.weight
    for shard in (expert.w_up, dense):
        assert isinstance(shard, DTensor), type(shard)
        local = shard.to_local()
        if rank == 1:  # only this rank's shard is broken; rank 0's own tensors are all finite
            with torch.no_grad():
                local.view(-1)[0] = float("nan")
        assert not state_is_finite(model, opt, None, distributed=True), rank
        with torch.no_grad():
            local.nan_to_num_(0.0)
        assert state_is_finite(model, opt, None, distributed=True), rank


def test_a_nan_in_one_ranks_shard_stops_the_save_on_every_rank():
    run_world(nan_in_one_ranks_shard, 2)
