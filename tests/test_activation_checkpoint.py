"""Activation checkpointing (single process): every mode gives the losses, gradients, router state and parameters of
the model without it, and keeps fewer bytes for the backward pass (counted exactly with saved_tensors_hooks)."""

import contextlib
import copy

import pytest
import torch

from model.config import BalanceTerm, EtrConfig, ModelConfig, MoEConfig, RouterConfig
from model.routers import Router
from model.transformer import Decoder
from parallel.activation_checkpoint import apply_activation_checkpointing, is_checkpointed
from parallel.saved_tensors import SavedActivationBytes
from train.config import OptimConfig
from train.optim import build_optimizer
from train.step import after_optimizer_step, lm_loss, local_forward_backward, train_step

MODES = ["full", "moe", "attention"]
NO_AMP = contextlib.nullcontext()


def configs(variant: str) -> tuple[ModelConfig, MoEConfig]:
    """moepp: gating residual across a dense layer, shared experts, capacity dropping, the global-batch balance loss,
    z-loss and the aux-free bias (every router accumulator). etr: expert choice with the lower-bound capacity
    schedule, which accumulates the chosen affinities."""
    model = ModelConfig(
        vocab_size=64, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, ffn_hidden_size=48, max_seq_len=16
    )
    moe = MoEConfig(num_experts=8, top_k=2, expert_ffn_hidden_size=24, every_n_layers=2, capacity_factor=1.0)
    if variant == "moepp":
        moe.shared_experts = 1
        moe.balance_scope = "global_batch"
        terms = (("heterogeneous", 0.01), ("zloss", 1e-3), ("aux_free_bias", 0.01))
        moe.balance = [BalanceTerm(kind, coeff) for kind, coeff in terms]
    else:
        moe.router = RouterConfig(kind="etr", etr=EtrConfig(capacity_schedule="lower_bound", recompute_every=1))
        moe.gating_residual = False
        moe.balance = [BalanceTerm("switch", 0.01)]
    return model, moe


def batches(n: int) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [list(torch.randint(0, 64, (4, 13), generator=g).split(2)) for _ in range(n)]


def routers(model: torch.nn.Module) -> list[Router]:
    return [m for m in model.modules() if isinstance(m, Router)]


@pytest.mark.parametrize("variant", ["moepp", "etr"])
@pytest.mark.parametrize("mode", MODES)
def test_every_mode_equals_the_model_without_checkpointing(mode, variant):
    torch.manual_seed(0)
    ref = Decoder(*configs(variant))
    ckpt = copy.deepcopy(ref)
    wrapped = apply_activation_checkpointing(ckpt, mode)
    assert wrapped and all(is_checkpointed(ckpt.get_submodule(n)) for n in wrapped)
    # Names are unchanged: optimizer, gradient reduction and checkpoints see the same model.
    assert [n for n, _ in ckpt.named_parameters()] == [n for n, _ in ref.named_parameters()]
    step0, *steps = batches(4)

    # One step's forward and backward over two micro-batches, by hand: the router accumulators (counted once per
    # forward, not again when the forward is recomputed), the loss and every gradient.
    got, want = local_forward_backward(ckpt, step0, NO_AMP), local_forward_backward(ref, step0, NO_AMP)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    for r_got, r_want in zip(routers(ckpt), routers(ref), strict=True):
        assert r_want.step_load.totals.sum() > 0
        assert torch.equal(r_got.step_load.totals, r_want.step_load.totals)
        assert torch.equal(r_got.balance.global_counts, r_want.balance.global_counts)
    for (name, p_got), (_, p_want) in zip(ckpt.named_parameters(), ref.named_parameters(), strict=True):
        torch.testing.assert_close(p_got.grad, p_want.grad, rtol=1e-6, atol=1e-8, msg=lambda m, n=name: f"{n}: {m}")
    for model in (ref, ckpt):
        model.zero_grad(set_to_none=True)
        after_optimizer_step(model, stepped=False)

    # Three AdamW steps: parameters and the between-step router state (aux-free bias, ETR capacity factor).
    optim = OptimConfig(lr=1e-2)
    opt_ref, opt_ckpt = build_optimizer(ref, optim), build_optimizer(ckpt, optim)
    for micro in steps:
        r, c = train_step(ref, opt_ref, micro, 1.0), train_step(ckpt, opt_ckpt, micro, 1.0)
        torch.testing.assert_close(c.loss, r.loss, rtol=1e-6, atol=0)
    for (name, p_got), (_, p_want) in zip(ckpt.named_parameters(), ref.named_parameters(), strict=True):
        torch.testing.assert_close(p_got, p_want, rtol=1e-6, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
    for (name, b_got), (_, b_want) in zip(ckpt.named_buffers(), ref.named_buffers(), strict=True):
        assert torch.equal(b_got, b_want), name


def saved_bytes(model: Decoder, tokens: torch.Tensor) -> SavedActivationBytes:
    with SavedActivationBytes(model) as saved:
        out = model(tokens[:, :-1])
        loss = lm_loss(out, tokens[:, 1:]) + out.aux_loss
    loss.backward()  # the graph is complete and usable
    return saved


def test_checkpointing_keeps_fewer_bytes_for_backward():
    torch.manual_seed(0)
    base = Decoder(*configs("moepp"))
    tokens = batches(1)[0][0]
    saved = {}
    for mode in ["none", *MODES]:
        model = copy.deepcopy(base)
        apply_activation_checkpointing(model, mode)
        saved[mode] = saved_bytes(model, tokens)
    none = saved["none"]
    for mode in MODES:
        assert saved[mode].total < none.total, mode
        # What is saved outside the checkpointed regions (embedding, head, loss) does not change.
        assert saved[mode].other == none.other
    # moe drops the experts' [A, 2F] pre-activations of MoE layers only; attention drops q/k/v/scores of every block.
    dense, moe_layers = ["layers.1"], ["layers.0", "layers.2"]
    for name in moe_layers:
        assert saved["moe"].per_block[name] < none.per_block[name]
    for name in dense:
        assert saved["moe"].per_block[name] == none.per_block[name]
    assert all(saved["attention"].per_block[n] < none.per_block[n] for n in dense + moe_layers)
    # full: a block keeps at most its inputs (the residual stream and the router logits it receives).
    for name, nbytes in saved["full"].per_block.items():
        assert 0 < nbytes <= 1.1 * saved["full"].block_inputs[name], (name, nbytes)
        assert nbytes < none.per_block[name] / 10


def test_evaluation_runs_the_plain_forward():
    torch.manual_seed(0)
    ref = Decoder(*configs("moepp")).eval()
    ckpt = copy.deepcopy(ref)
    apply_activation_checkpointing(ckpt, "full")
    tokens = batches(1)[0][0]
    with torch.no_grad():
        assert torch.equal(ckpt(tokens).logits_BSV, ref(tokens).logits_BSV)
