"""The hot path reads the device from the host only where it must: once per MoE layer (the expert group sizes),
plus the per-step finite-gradient check, forward and backward, for every router kind. On CUDA each of these calls
makes the host wait for the device; tests/host_syncs.py counts them on any device."""

import dataclasses

import pytest
import torch

from model.config import BalanceTerm, EtrConfig, RouterConfig
from model.transformer import Decoder
from tests.distributed.workers import tiny_model_configs
from tests.host_syncs import HostSyncCounter
from train.config import OptimConfig
from train.optim import build_optimizer
from train.step import train_step


def variant(name: str):
    model, moe = tiny_model_configs(capacity=0.8 if name.endswith("capacity") else None)
    if name.startswith("topk"):
        moe = dataclasses.replace(
            moe,
            router=RouterConfig(kind="topk", mixtral_gating=True),
            gating_residual=False,
            shared_experts=1,
            balance=[BalanceTerm("switch", 0.01), BalanceTerm("zloss", 1e-3), BalanceTerm("aux_free_bias", 1e-3)],
        )
    if name.startswith("etr"):
        moe = dataclasses.replace(
            moe,
            router=RouterConfig(kind="etr", etr=EtrConfig(locality_coeff=0.01)),
            gating_residual=False,
            top_k=1,
            balance=[BalanceTerm("switch", 0.01)],
        )
    return model, moe


@pytest.mark.parametrize("name", ["moepp", "moepp-capacity", "topk-shared", "etr-capacity"])
def test_one_host_sync_per_moe_layer_in_a_training_step(name):
    model_cfg, moe_cfg = variant(name)
    torch.manual_seed(0)
    model = Decoder(model_cfg, moe_cfg)
    opt = build_optimizer(model, OptimConfig(lr=1e-2))
    batch = torch.randint(0, model_cfg.vocab_size, (6, 13))
    micro = list(batch.split(2))
    train_step(model, opt, micro, 1.0)  # first-call work is not the steady state
    with HostSyncCounter() as syncs:
        result = train_step(model, opt, micro, 1.0)
    if name.endswith("capacity"):  # the capacity path must really run
        assert sum(int(s.dropped) for s in result.routing) > 0
    moe_layers = sum(moe_cfg.is_moe_layer(i) for i in range(model_cfg.num_layers))
    assert syncs.by_file() == {
        "tolist @ model/dispatch.py": moe_layers * len(micro),  # the expert group sizes
        "_local_scalar_dense @ train/step.py": 1,  # skip a non-finite step on every rank alike
    }, dict(syncs.where)


def test_counter_sees_syncing_calls_forward_and_backward():
    x = torch.arange(4)
    with HostSyncCounter() as syncs:
        torch.bincount(x)
        x.tolist()
        torch.repeat_interleave(x, x)
        torch.repeat_interleave(x, x, output_size=6)  # sized by the caller: no sync
        x.to(torch.float32)  # a dtype, not a device: no copy between host and device
        y = torch.ones(4, requires_grad=True)
        y[x > 1].sum().backward()  # mask indexing, and index_put with the mask in the backward
        torch.tensor([1, 2])
    assert sorted(k.split(" @ ")[0] for k in syncs.where.elements()) == sorted(
        ["bincount", "tolist", "repeat_interleave", "index", "index_put", "tensor"]
    )
