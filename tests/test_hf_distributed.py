"""A checkpoint saved under ep=2 x tp=2 or fsdp x ep=2 (4 gloo processes) exports the same folder as the same weights
saved by one process: export reads any layout into a plain CPU model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.distributed.harness import run_world
from tests.distributed.workers import tiny_model_configs

pytestmark = pytest.mark.slow


def save_same_weights(rank: int, world: int, tp: int, ep: int, ckpt_dir: str, data_parallel: str = "replicate") -> None:
    """Seed-0 weights, sharded in this layout, saved as step 1."""
    from model.transformer import Decoder
    from parallel import parallelize
    from parallel.config import ParallelConfig
    from parallel.mesh import init_parallel
    from train.checkpoint import Checkpointer
    from train.config import Config, OptimConfig
    from train.optim import build_optimizer

    ctx = init_parallel(ParallelConfig(tp=tp, ep=ep, data_parallel=data_parallel), "cpu")
    model_cfg, moe_cfg = tiny_model_configs()
    torch.manual_seed(0)
    model = parallelize(Decoder(model_cfg, moe_cfg), ctx)
    meta = {"consumed_samples": 0, "config": Config(model=model_cfg, moe=moe_cfg).to_dict()}
    Checkpointer(Path(ckpt_dir), ctx, keep_last=1).save(1, model, build_optimizer(model, OptimConfig()), meta)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def _same_folders(a: Path, b: Path) -> None:
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for name in ("config.json", "model.safetensors.index.json"):
        assert json.loads((a / name).read_text()) == json.loads((b / name).read_text())
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.parametrize(("tp", "ep", "data_parallel"), [(2, 2, "replicate"), (1, 2, "fsdp")])
def test_sharded_checkpoint_exports_the_same_folder_as_one_process(tmp_path, tp, ep, data_parallel):
    pytest.importorskip("safetensors")
    from tools.hf.export import export

    run_world(save_same_weights, 4, tp, ep, str(tmp_path / "sharded"), data_parallel)
    run_world(save_same_weights, 1, 1, 1, str(tmp_path / "single"))
    export(tmp_path / "sharded", tmp_path / "hf_sharded", log=lambda s: None)
    export(tmp_path / "single", tmp_path / "hf_single", log=lambda s: None)
    _same_folders(tmp_path / "hf_sharded", tmp_path / "hf_single")
