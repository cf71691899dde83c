"""Meta-device initialisation (single process): each parameter comes from the model's own init drawing from a
generator seeded by (seed, name), buffers are the modules' own, and no more than the model plus its largest
parameter is ever held. Layout independence is tested in tests/distributed/test_init.py."""

import torch

from model.config import ModelConfig, MoEConfig
from model.transformer import Decoder
from parallel.config import ParallelConfig
from parallel.init import build_model, parameter_seed
from parallel.mesh import init_parallel
from tests.memory_tracking import LiveStorage

MODEL = ModelConfig(
    vocab_size=64, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, ffn_hidden_size=48, max_seq_len=16
)
MOE = MoEConfig(num_experts=8, top_k=2, expert_ffn_hidden_size=24, every_n_layers=2, shared_experts=1)


def single():
    return init_parallel(ParallelConfig(), "cpu")


def test_each_parameter_is_the_models_own_init_from_its_own_seed():
    model = build_model(MODEL, MOE, single(), seed=5)
    plain = Decoder(MODEL, MOE)
    for name, p in plain.named_parameters():
        plain.init_parameter(name, p.data, torch.Generator().manual_seed(parameter_seed(5, name)))
    got = dict(model.named_parameters())
    assert got.keys() == dict(plain.named_parameters()).keys()
    for name, want in plain.named_parameters():
        assert torch.equal(got[name], want), name
        assert got[name].requires_grad
    for (name, b), (_, want) in zip(model.named_buffers(), plain.named_buffers(), strict=True):
        assert torch.equal(b, want), name
    # The model's own rules: unit norm gains, depth-scaled output projections, N(0, 1) constant vectors.
    assert torch.equal(got["layers.0.attention_norm.weight"], torch.ones(32))
    assert got["layers.0.ffn.constant.v"].std() > 0.5 > got["layers.0.attention.wo.weight"].std() * 10


def test_seeds_differ_by_parameter_and_by_run_seed():
    a = dict(build_model(MODEL, MOE, single(), seed=5).named_parameters())
    b = dict(build_model(MODEL, MOE, single(), seed=6).named_parameters())
    assert not torch.equal(a["layers.0.attention.wq.weight"], b["layers.0.attention.wq.weight"])
    assert not torch.equal(a["layers.0.attention.wq.weight"], a["layers.1.attention.wq.weight"])
    assert parameter_seed(5, "x") == parameter_seed(5, "x") != parameter_seed(5, "y")


def test_initialisation_holds_the_model_plus_its_largest_parameter_at_most():
    with LiveStorage() as live:
        model = build_model(MODEL, MOE, single(), seed=5)
    params = [4 * p.numel() for p in model.parameters()]
    buffers = sum(b.untyped_storage().nbytes() for b in model.buffers())
    assert live.peak <= sum(params) + buffers + max(params) + 4096, (live.peak, sum(params), max(params))
    assert live.peak >= sum(params)  # the tracker sees the parameters it was built to see
    out = model(torch.randint(0, 64, (2, 12)))
    assert torch.isfinite(out.logits_BSV).all()
