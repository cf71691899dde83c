"""The MoE++ layer on hand-made inputs: expert kinds, gate conventions, gating residuals, balance loss, capacity."""

import math

import pytest
import torch
import torch.nn.functional as F

from model.config import MoEConfig, RouterConfig
from model.dispatch import LocalDispatcher
from model.experts import ConstantExperts, FFNExperts
from model.moe import MoELayer
from model.routers.capacity import capacities, capacity_mask

TOL = dict(atol=1e-6, rtol=1e-5)  # fp32, same operations in a different order


class RecordingDispatcher(LocalDispatcher):
    def __init__(self):
        self.calls = []

    def dispatch(self, x_TD, token_idx_A, tokens_per_expert_E, payload_dtype):
        result = super().dispatch(x_TD, token_idx_A, tokens_per_expert_E, payload_dtype)
        self.calls.append((result.x_AD.wait().shape[0], list(result.tokens_per_expert)))
        return result


def identity_router_layer(cfg: MoEConfig, dim: int, ffn: int = 3) -> MoELayer:
    """A layer whose router weight is the identity, so each token's input *is* its router logits (D == E)."""
    assert dim == cfg.num_total_experts
    layer = MoELayer(dim, cfg, ffn_hidden_size=ffn, has_residual=False)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
        layer.router.wg.weight.copy_(torch.eye(dim))
    return layer


def swiglu(x, w_up, w_down):
    gate, up = (x @ w_up.T).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w_down.T


def test_ffn_experts_grouped_rows_match_per_expert_swiglu():
    experts = FFNExperts(3, hidden_size=4, ffn_hidden_size=5)
    torch.nn.init.normal_(experts.w_up)
    torch.nn.init.normal_(experts.w_down)
    x = torch.randn(6, 4)
    counts = [2, 0, 4]
    y = experts(x, counts)
    expected = torch.cat(
        [swiglu(x[:2], experts.w_up[0], experts.w_down[0]), swiglu(x[2:], experts.w_up[2], experts.w_down[2])]
    )
    torch.testing.assert_close(y, expected, **TOL)
    y.sum().backward()
    # The empty expert gets a zero gradient, not None, so optimizers and reductions see every parameter.
    assert experts.w_up.grad is not None and experts.w_up.grad[1].abs().sum() == 0
    assert experts.w_up.grad[0].abs().sum() > 0


def test_ffn_experts_gradients_match_autograd_reference():
    # The CPU path is a hand-written autograd node (model.experts.LoopedSwiGLU): every gradient must equal autograd
    # through the plain per-expert formula, empty experts (first, middle, last) included.
    torch.manual_seed(0)
    experts = FFNExperts(5, hidden_size=6, ffn_hidden_size=7)
    torch.nn.init.normal_(experts.w_up)
    torch.nn.init.normal_(experts.w_down)
    counts = [0, 3, 0, 5, 0]
    x = torch.randn(8, 6, requires_grad=True)
    grad_out = torch.randn(8, 6)
    (experts(x, counts) * grad_out).sum().backward()

    x_ref = x.detach().clone().requires_grad_(True)
    w_up = experts.w_up.detach().clone().requires_grad_(True)
    w_down = experts.w_down.detach().clone().requires_grad_(True)
    y_ref = torch.cat([swiglu(x_ref[:3], w_up[1], w_down[1]), swiglu(x_ref[3:], w_up[3], w_down[3])])
    (y_ref * grad_out).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, **TOL)
    torch.testing.assert_close(experts.w_up.grad, w_up.grad, **TOL)
    torch.testing.assert_close(experts.w_down.grad, w_down.grad, **TOL)
    for e in (0, 2, 4):
        assert experts.w_up.grad[e].abs().sum() == 0 and experts.w_down.grad[e].abs().sum() == 0
    # No rows at all: still a zero gradient for every expert, and an empty output.
    experts.zero_grad(set_to_none=True)
    y = experts(torch.randn(0, 6, requires_grad=True), [0] * 5)
    assert y.shape == (0, 6)
    y.sum().backward()
    assert experts.w_up.grad is not None and experts.w_up.grad.abs().sum() == 0


def test_ffn_experts_follow_autocast_bf16():
    # train.dtype=bf16 runs the model under autocast; the hand-written expert node must compute in bf16 as F.linear
    # would, and still hand fp32 gradients to the fp32 weights.
    torch.manual_seed(0)
    experts = FFNExperts(2, hidden_size=16, ffn_hidden_size=8)
    torch.nn.init.normal_(experts.w_up, std=0.5)
    torch.nn.init.normal_(experts.w_down, std=0.5)
    x = torch.randn(6, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = experts(x, [4, 2])
    assert y.dtype == torch.bfloat16
    expected = torch.cat(
        [swiglu(x[:4], experts.w_up[0], experts.w_down[0]), swiglu(x[4:], experts.w_up[1], experts.w_down[1])]
    )
    # bf16 keeps ~3 significant digits: close to fp32 at that precision, but not equal to it.
    scale = expected.abs().max().item()
    torch.testing.assert_close(y.float(), expected, atol=2e-2 * scale, rtol=2e-2)
    assert not torch.equal(y.float(), expected)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and experts.w_up.grad.dtype == torch.float32


def test_constant_expert_formula_by_hand():
    const = ConstantExperts(1, hidden_size=2)
    with torch.no_grad():
        const.w_c.copy_(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]))
        const.v.copy_(torch.tensor([[10.0, 20.0]]))
    x = torch.tensor([[math.log(3.0), 0.0]])
    # W_c x = [ln 3, 0] -> softmax = [0.75, 0.25]; E(x) = 0.75 x + 0.25 v
    expected = 0.75 * x + 0.25 * torch.tensor([[10.0, 20.0]])
    torch.testing.assert_close(const(x)[:, 0], expected, **TOL)


def test_each_expert_kind_output_and_zero_expert_receives_nothing():
    # E = 2 FFN + 1 constant + 1 copy + 2 zero = 6 = D; logits = x.
    cfg = MoEConfig(
        num_experts=2, num_constant_experts=1, num_copy_experts=1, num_zero_experts=2, top_k=2, gating_residual=False
    )
    layer = identity_router_layer(cfg, dim=6)
    rec = RecordingDispatcher()
    layer.dispatcher = rec
    big, small = 5.0, 4.0
    x = torch.full((4, 6), -3.0)
    x[0, 4], x[0, 5] = big, small  # {zero, zero}
    x[1, 3], x[1, 2] = big, small  # {copy, constant}
    x[2, 0], x[2, 4] = big, small  # {ffn0, zero}
    x[3, 1], x[3, 0] = big, small  # {ffn1, ffn0}
    out, logits, _, stats = layer(x, None)
    probs = x.softmax(-1)
    a = layer.constant.mix(x)[:, 0]  # [T, 2]
    v = layer.constant.v[0]
    w_up, w_down = layer.experts.w_up, layer.experts.w_down

    torch.testing.assert_close(out[0], torch.zeros(6), **TOL)
    torch.testing.assert_close(out[1], probs[1, 3] * x[1] + probs[1, 2] * (a[1, 0] * x[1] + a[1, 1] * v), **TOL)
    torch.testing.assert_close(out[2], probs[2, 0] * swiglu(x[2], w_up[0], w_down[0]), **TOL)
    torch.testing.assert_close(
        out[3], probs[3, 1] * swiglu(x[3], w_up[1], w_down[1]) + probs[3, 0] * swiglu(x[3], w_up[0], w_down[0]), **TOL
    )
    # Only the three FFN assignments reached the dispatcher: expert 0 gets tokens 2 and 3, expert 1 token 3.
    assert rec.calls == [(3, [2, 1])]
    assert stats.expert_counts_E.tolist() == [2, 1, 1, 1, 2, 1]
    torch.testing.assert_close(logits, x)  # no residual, identity router


def test_gate_conventions_by_hand():
    # E = 2 FFN + 1 copy + 1 zero; logits = log of unnormalised probabilities.
    cfg = MoEConfig(
        num_experts=2, num_constant_experts=0, num_copy_experts=1, num_zero_experts=1, top_k=2, gating_residual=False
    )
    x = torch.log(
        torch.tensor(
            [
                [4.0, 3.0, 2.0, 1.0],  # probs .4 .3 .2 .1 -> top2 = ffn0, ffn1
                [1.0, 3.0, 1.0, 5.0],
            ]
        )
    )  # probs .1 .3 .1 .5 -> top2 = zero, ffn1
    paper = identity_router_layer(cfg, dim=4).router
    route = paper(x, None)
    assert route.expert_idx_TK.tolist() == [[0, 1], [3, 1]]
    torch.testing.assert_close(route.gates_TK, torch.tensor([[0.4, 0.3], [0.5, 0.3]]), **TOL)

    cfg.router = RouterConfig(gate_convention="release")
    release = identity_router_layer(cfg, dim=4).router
    route = release(x, None)
    torch.testing.assert_close(route.gates_TK, torch.tensor([[0.4 / 0.7, 0.3 / 0.7], [0.0, 1.0]]), **TOL)


def test_logits_std_norm_scales_scores_but_not_the_residual():
    cfg = MoEConfig(
        num_experts=2,
        num_constant_experts=0,
        num_copy_experts=1,
        num_zero_experts=1,
        top_k=2,
        gating_residual=False,
        router=RouterConfig(logits_std_norm=True, target_std=2.0),
    )
    router = identity_router_layer(cfg, dim=4).router
    x = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    route = router(x, None)
    torch.testing.assert_close(route.logits_TE, x)
    std = x.std(dim=-1, keepdim=True)  # unbiased
    torch.testing.assert_close(route.probs_TE, (x / (std / 2.0)).softmax(-1), **TOL)


def test_gating_residual_recurrence_over_three_layers():
    cfg = MoEConfig(num_experts=4, top_k=2)
    d = 8
    layers = [MoELayer(d, cfg, ffn_hidden_size=6, has_residual=i > 0) for i in range(3)]
    assert layers[0].router.gate_map is None  # the first MoE layer has no residual term and no gate_map
    xs = [torch.randn(5, d) for _ in range(3)]
    prev = None
    got = []
    for layer, x in zip(layers, xs, strict=True):
        _, prev, _, _ = layer(x, prev)
        got.append(prev)
    w = [layer.router.wg.weight for layer in layers]
    g1 = xs[0] @ w[0].T
    g2 = xs[1] @ w[1].T + g1 @ layers[1].router.gate_map.weight.T
    g3 = xs[2] @ w[2].T + g2 @ layers[2].router.gate_map.weight.T
    for a, b in zip(got, [g1, g2, g3], strict=True):
        torch.testing.assert_close(a, b, **TOL)
    with pytest.raises(ValueError, match="no previous router logits"):
        layers[1](xs[1], None)


def test_two_layer_router_shape_and_formula():
    cfg = MoEConfig(num_experts=4, top_k=2, gating_residual=False, router=RouterConfig(two_layer=True))
    layer = MoELayer(8, cfg, ffn_hidden_size=6, has_residual=False)
    first, _, second = layer.router.wg
    assert first.weight.shape == (8 * 8, 8) and second.weight.shape == (8, 64)
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer.router.logits(x, None), torch.tanh(x @ first.weight.T) @ second.weight.T)


def test_balance_loss_by_hand():
    cfg = MoEConfig(
        num_experts=2,
        num_constant_experts=0,
        num_copy_experts=0,
        num_zero_experts=1,
        top_k=1,
        tau=0.5,
        gating_residual=False,
    )
    router = identity_router_layer(cfg, dim=3).router
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.5, 0.1, 0.4]])
    idx = torch.tensor([[0], [1], [2], [0]])
    f = [2 / 4, 1 / 4, 1 / 4]
    p = [1.4 / 4, 1.3 / 4, 1.3 / 4]
    eta = [1.0, 1.0, 0.5]
    expected = sum(e * fi * pi for e, fi, pi in zip(eta, f, p, strict=True))
    total, terms = router.balance(probs.log(), probs, idx, torch.ones_like(idx, dtype=torch.bool), 1, router.comm)
    assert terms["heterogeneous"].item() == pytest.approx(expected, rel=1e-6)
    assert total.item() == pytest.approx(0.01 * expected, rel=1e-6)  # the default coefficient


def test_capacity_formula_and_dropping_priority():
    cfg = MoEConfig(
        num_experts=8,
        num_zero_experts=1,
        num_copy_experts=1,
        num_constant_experts=2,
        top_k=2,
        tau=0.75,
        capacity_factor=1.1,
    )
    caps = capacities(cfg, 100)
    # A = 200, denom = 0.75*8 + 4 = 10: C_ffn = ceil(1.1*0.75*200/10) = 17, C_zc = ceil(1.1*200/10) = 22
    assert caps.tolist() == [17] * 8 + [22] * 4

    # 10 tokens, all first choices on expert 0 and all second choices on expert 1: A = 20, denom 10,
    # C_ffn = ceil(1.1*0.75*2) = 2. First choices win over second choices, then earlier tokens.
    idx = torch.stack([torch.zeros(10, dtype=torch.long), torch.ones(10, dtype=torch.long)], dim=1)
    kept = capacity_mask(idx, cfg)
    assert kept[:, 0].tolist() == [True, True] + [False] * 8
    assert kept[:, 1].tolist() == [True, True] + [False] * 8
    idx[0, 0], idx[0, 1] = 1, 0
    # Queues: expert 0 = [t1..t9 first choices, t0 second choice]; expert 1 = [t0 first, t1..t9 second choices].
    kept = capacity_mask(idx, cfg)
    assert kept[:, 0].tolist() == [True, True, True] + [False] * 7
    assert kept[:, 1].tolist() == [False, True] + [False] * 8


def test_dropped_assignments_contribute_nothing_and_are_counted():
    cfg = MoEConfig(
        num_experts=2,
        num_constant_experts=0,
        num_copy_experts=1,
        num_zero_experts=1,
        top_k=1,
        gating_residual=False,
        capacity_factor=0.5,
    )
    layer = identity_router_layer(cfg, dim=4)
    x = torch.full((8, 4), -2.0)
    x[:, 1] = 3.0  # every token's first choice is FFN expert 1
    # A = 8, denom = 0.75*2 + 2 = 3.5: C_ffn = ceil(0.5*0.75*8/3.5) = 1 -> 7 of 8 assignments are dropped.
    out, _, _, stats = layer(x, None)
    assert stats.dropped.item() == 7 and stats.expert_counts_E.tolist() == [0, 1, 0, 0]
    assert out[0].abs().sum() > 0
    torch.testing.assert_close(out[1:], torch.zeros(7, 4))


def reference_topk_moe(x, router_w, w_up, w_down, k):
    """A plain top-k MoE, token by token: raw softmax gates of the top-k experts (paper convention)."""
    out = torch.zeros_like(x)
    probs = (x @ router_w.T).softmax(-1)
    for t in range(x.shape[0]):
        top_p, top_i = probs[t].topk(k)
        for p, e in zip(top_p, top_i, strict=True):
            out[t] += p * swiglu(x[t], w_up[e], w_down[e])
    return out


def test_moepp_without_zero_computation_experts_is_a_plain_topk_moe():
    cfg = MoEConfig(
        num_experts=4, num_zero_experts=0, num_copy_experts=0, num_constant_experts=0, top_k=2, gating_residual=False
    )
    layer = MoELayer(8, cfg, ffn_hidden_size=6, has_residual=False)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(16, 8)
    out, _, _, _ = layer(x, None)
    ref = reference_topk_moe(x, layer.router.wg.weight, layer.experts.w_up, layer.experts.w_down, k=2)
    torch.testing.assert_close(out, ref, **TOL)


def test_gradients_reach_router_gate_map_constant_and_v():
    cfg = MoEConfig(num_experts=4, top_k=2)
    first = MoELayer(8, cfg, ffn_hidden_size=6, has_residual=False)
    second = MoELayer(8, cfg, ffn_hidden_size=6, has_residual=True)
    for layer in (first, second):
        for p in layer.parameters():
            torch.nn.init.normal_(p, std=0.5)
        with torch.no_grad():  # bias the router towards the constant experts so they are surely used
            layer.router.wg.weight[cfg.num_experts : cfg.num_experts + 2] += 1.0
    x = torch.randn(64, 8, requires_grad=True)
    h, logits, bal1, _ = first(x, None)
    out, _, bal2, stats = second(h, logits)
    (out.square().mean() + bal1 + bal2).backward()
    assert stats.expert_counts_E[4:6].sum() > 0
    for name, p in [
        ("router.wg", second.router.wg.weight),
        ("gate_map", second.router.gate_map.weight),
        ("constant.w_c", second.constant.w_c),
        ("constant.v", second.constant.v),
        ("experts.w_up", second.experts.w_up),
        ("first router", first.router.wg.weight),
    ]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_scale_input_by_topk_is_not_in_place():
    cfg = MoEConfig(
        num_experts=2,
        num_constant_experts=0,
        num_copy_experts=1,
        num_zero_experts=1,
        top_k=2,
        gating_residual=False,
        scale_input_by_topk=True,
    )
    layer = identity_router_layer(cfg, dim=4)
    x = torch.full((1, 4), -3.0)
    x[0, 2], x[0, 3] = 5.0, 4.0  # {copy, zero}: output = gate_copy * (K * x)
    x.requires_grad_(True)
    x_before = x.detach().clone()
    out, _, _, _ = layer(x, None)
    probs = x_before.softmax(-1)
    torch.testing.assert_close(out[0], probs[0, 2] * 2 * x_before[0], **TOL)
    torch.testing.assert_close(x.detach(), x_before)
    out.sum().backward()
    assert x.grad is not None


def test_dispatched_rows_are_in_the_compute_dtype_and_gradients_stay_fp32():
    # Under bf16 autocast the rows handed to the experts (and, under expert parallelism, to the all-to-all) are
    # bf16; the layer's input and router still get fp32 gradients, summed over a token's assignments in fp32.
    cfg = MoEConfig(num_experts=4, num_constant_experts=1, num_copy_experts=1, num_zero_experts=1, top_k=2)
    layer = MoELayer(16, cfg, ffn_hidden_size=8, has_residual=False)
    payloads = []

    class Spy(LocalDispatcher):
        def dispatch(self, x_TD, token_idx_A, tokens_per_expert_E, payload_dtype):
            result = super().dispatch(x_TD, token_idx_A, tokens_per_expert_E, payload_dtype)
            payloads.append(result.x_AD.wait().dtype)
            return result

    layer.dispatcher = Spy()
    x = torch.randn(12, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _, _, stats = layer(x, None)
    out.float().square().sum().backward()
    assert payloads == [torch.bfloat16]
    assert x.grad.dtype == torch.float32 and layer.router.wg.weight.grad.dtype == torch.float32
    assert stats.a2a.sent == 0  # nothing crosses a wire on one device
    layer.zero_grad()
    x.grad = None
    layer(x, None)  # fp32 without autocast
    assert payloads[-1] == torch.float32
