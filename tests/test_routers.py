"""The router family on hand-made inputs: Mixtral top-k, Expert-Token Resonance, Switch / z-loss / sequence-wise /
locality losses, aux-loss-free bias, global-batch balance and shared experts. Every expected value is computed by
hand here, independently of model/balance.py."""

import math

import pytest
import torch
import torch.nn.functional as F

from model.config import BalanceTerm, ConfigError, EtrConfig, ModelConfig, MoEConfig, RouterConfig
from model.moe import MoELayer
from model.routers import EtrRouter, Router, build_router
from model.routers.capacity import expert_choice_mask
from model.routers.etr import grap_vectors
from model.transformer import Decoder
from train.config_load import load_config
from train.step import after_optimizer_step

TOL = dict(atol=1e-6, rtol=1e-5)


def plain_router(cfg: MoEConfig) -> Router:
    """A router whose weight is the identity (D == E): each token's input is its router logits."""
    n = cfg.num_total_experts
    router = build_router(n, cfg, has_residual=False)
    with torch.no_grad():
        router.wg.weight.copy_(torch.eye(n))
    return router


def vanilla(**kw) -> MoEConfig:
    base = dict(num_zero_experts=0, num_copy_experts=0, num_constant_experts=0, gating_residual=False)
    return MoEConfig(**{**base, **kw})


ALL = torch.ones(1, dtype=torch.bool)


# --- topk / Mixtral -----------------------------------------------------------------------------------------------


def test_topk_router_gates_raw_probabilities_and_mixtral_renormalises():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.5, 3.0, 0.2]])
    raw = plain_router(vanilla(num_experts=4, top_k=2, router=RouterConfig(kind="topk")))(logits, None)
    mix = plain_router(vanilla(num_experts=4, top_k=2, router=RouterConfig(kind="topk", mixtral_gating=True)))(
        logits, None
    )
    p = logits.softmax(-1)
    assert raw.expert_idx_TK.tolist() == [[0, 1], [2, 1]] == mix.expert_idx_TK.tolist()
    torch.testing.assert_close(raw.gates_TK, torch.stack([p[0, [0, 1]], p[1, [2, 1]]]), **TOL)
    # Mixtral: softmax over the two chosen logits: e^2/(e^2+e^1) for token 0.
    e = math.e
    torch.testing.assert_close(mix.gates_TK[0], torch.tensor([e**2 / (e**2 + e), e / (e**2 + e)]), **TOL)
    torch.testing.assert_close(mix.gates_TK.sum(-1), torch.ones(2), **TOL)


# --- losses ---------------------------------------------------------------------------------------------------------


def test_switch_loss_by_hand():
    cfg = vanilla(num_experts=3, top_k=1, balance=[BalanceTerm("switch", 0.01)])
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [3.0, 0.0, 1.0], [0.0, 0.0, 0.5]])
    route = plain_router(cfg)(logits, None)
    p = logits.softmax(-1)
    f = torch.tensor([2, 1, 1]) / 4  # top choices 0, 1, 0, 2
    expected = 3 * (f * p.mean(0)).sum()
    torch.testing.assert_close(route.aux_terms["switch"], expected, **TOL)
    torch.testing.assert_close(route.aux_loss, 0.01 * expected, **TOL)


def test_z_loss_by_hand():
    cfg = vanilla(num_experts=3, top_k=1, balance=[BalanceTerm("zloss")])
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    route = plain_router(cfg)(logits, None)
    lse = [math.log(math.e + math.e**2 + math.e**3), math.log(3.0)]
    expected = (lse[0] ** 2 + lse[1] ** 2) / 2
    assert route.aux_terms["zloss"].item() == pytest.approx(expected, rel=1e-6)
    assert route.aux_loss.item() == pytest.approx(1e-3 * expected, rel=1e-6)  # the kind's default coefficient


def test_sequence_wise_loss_by_hand():
    cfg = vanilla(num_experts=2, top_k=1, balance=[BalanceTerm("seq", 1.0)])
    # Two sequences of two tokens; sequence 0 sends both tokens to expert 0, sequence 1 one to each.
    logits = torch.tensor([[1.0, 0.0], [2.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    route = plain_router(cfg)(logits, None, num_sequences=2)
    p = logits.softmax(-1)
    # f_i = E/(K S) * count_i; P_i = mean probability over the sequence.
    f0, P0 = torch.tensor([2 / 2 * 2, 0.0]), p[:2].mean(0)
    f1, P1 = torch.tensor([2 / 2 * 1, 2 / 2 * 1]), p[2:].mean(0)
    expected = ((f0 * P0).sum() + (f1 * P1).sum()) / 2
    torch.testing.assert_close(route.aux_terms["seq"], expected, **TOL)


def test_locality_loss_is_kl_to_the_node_local_experts():
    from model.balance import locality_loss

    P = torch.tensor([0.4, 0.3, 0.2, 0.1])
    everywhere = locality_loss(P, torch.ones(4, dtype=torch.bool))
    assert everywhere.item() == pytest.approx(sum(p * math.log(p / 0.25) for p in P.tolist()), rel=1e-6)
    local = torch.tensor([True, True, False, False])
    u = [0.99 / 2, 0.99 / 2, 0.01 / 2, 0.01 / 2]
    want = sum(p * math.log(p / q) for p, q in zip(P.tolist(), u, strict=True))
    assert locality_loss(P, local).item() == pytest.approx(want, rel=1e-6)
    # Mass on the local experts lowers it.
    assert locality_loss(torch.tensor([0.45, 0.45, 0.05, 0.05]), local) < locality_loss(P, local)


def test_several_terms_add_with_their_coefficients():
    cfg = MoEConfig(
        num_experts=2,
        num_zero_experts=1,
        num_copy_experts=0,
        num_constant_experts=0,
        top_k=1,
        gating_residual=False,
        balance=[BalanceTerm("heterogeneous", 0.5), BalanceTerm("switch", 0.25), BalanceTerm("zloss", 2.0)],
    )
    route = plain_router(cfg)(torch.randn(6, 3), None)
    t = route.aux_terms
    want = 0.5 * t["heterogeneous"] + 0.25 * t["switch"] + 2.0 * t["zloss"]
    torch.testing.assert_close(route.aux_loss, want, **TOL)


# --- Expert-Token Resonance -----------------------------------------------------------------------------------------


def etr_cfg(**kw) -> MoEConfig:
    etr = kw.pop("etr", EtrConfig())
    return vanilla(**{"num_experts": 4, "top_k": 1, "router": RouterConfig(kind="etr", etr=etr), **kw})


def test_grap_vectors_are_orthogonal_group_indicators():
    w = grap_vectors(4, 8)
    assert torch.equal(w[1], torch.tensor([0, 0, 0.5, 0.5, 0, 0, 0, 0]))  # n/d = 4/8 on group 1
    gram = w @ w.t()
    assert torch.equal(gram, torch.diag(torch.diagonal(gram)))  # mutually orthogonal


def test_etr_affinity_is_cosine_and_threshold_picks_l():
    cfg = etr_cfg(top_k=2, etr=EtrConfig(threshold=0.5))
    router = EtrRouter(8, cfg)
    assert not list(router.parameters())  # nothing learned
    x = torch.tensor([[3.0, 3.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]])
    route = router(x, None)
    group = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])
    want = torch.stack([x[:, g].sum(-1) / (x.norm(dim=-1) * math.sqrt(2)) for g in group], dim=1)
    torch.testing.assert_close(route.logits_TE, want, **TOL)
    # Token 0: best affinity 6/(sqrt(20) sqrt2) = 0.95 >= 0.5, so l = 1; token 1: 2/(2 sqrt2) = 0.71, also l = 1.
    assert route.kept_TK.tolist() == [[True, False], [True, False]]
    assert route.gates_TK[0, 0].item() == pytest.approx(want[0, 0].item(), rel=1e-6) and route.gates_TK[0, 1] == 0
    high = EtrRouter(8, etr_cfg(top_k=2, etr=EtrConfig(threshold=0.9)))(x, None)
    assert high.kept_TK.tolist() == [[True, False], [True, True]]  # token 1 needs a second expert to reach 0.9


def test_expert_choice_keeps_the_highest_affinity_tokens_up_to_capacity():
    expert = torch.tensor([0, 0, 1, 0, 0, 2, 3])  # 3 = never chosen (sentinel for E = 3)
    score = torch.tensor([0.1, 0.9, 0.5, 0.9, 0.3, 0.2, 0.8])
    keep = expert_choice_mask(expert, score, capacity=2, num_experts=3)
    # Expert 0 holds tokens 0,1,3,4 with scores .1,.9,.9,.3: keeps 1 and 3 (tie at .9 broken by index).
    assert keep.tolist() == [False, True, True, True, False, True, False]


def test_etr_capacity_is_respected_exactly_in_training_only():
    cfg = etr_cfg(capacity_factor=0.5)
    router = EtrRouter(8, cfg)
    x = torch.randn(64, 8)
    route = router(x, None)
    C = math.ceil(0.5 * 64 * 1 / 4)
    counts = torch.bincount(route.expert_idx_TK[route.kept_TK], minlength=4)
    chosen = torch.bincount(route.expert_idx_TK[:, 0], minlength=4)
    assert torch.equal(counts, chosen.clamp(max=C))  # every expert keeps min(chosen, C): exactly C when over
    # The kept tokens of each expert are its highest-affinity ones.
    aff = route.logits_TE.gather(1, route.expert_idx_TK)[:, 0]
    for e in range(4):
        mine = route.expert_idx_TK[:, 0] == e
        if chosen[e] > C:
            assert aff[mine & route.kept_TK[:, 0]].min() >= aff[mine & ~route.kept_TK[:, 0]].max()
    router.eval()
    assert router(x, None).kept_TK.all()  # evaluation is dropless


def test_etr_lower_bound_schedule_recomputes_every_k_steps():
    cfg = etr_cfg(
        capacity_factor=4.0, etr=EtrConfig(capacity_schedule="lower_bound", min_capacity_factor=0.5, recompute_every=2)
    )
    router = EtrRouter(8, cfg)
    x = torch.randn(32, 8)
    route = router(x, None)
    delta = route.logits_TE.gather(1, route.expert_idx_TK).mean().item()
    router.after_step(stepped=True)
    assert router.etr_state[0].item() == 4.0  # step 1: not yet
    router(x, None)
    router.after_step(stepped=True)
    bound = math.exp(8 * delta**2 / (2 - delta**2))
    assert router.etr_state[0].item() == pytest.approx(min(max(bound, 0.5), 4.0), rel=1e-6)
    assert "etr_state" in router.state_dict()  # resumes exactly


# --- aux-loss-free bias ---------------------------------------------------------------------------------------------


def test_aux_free_bias_steers_selection_but_never_the_gates():
    cfg = vanilla(num_experts=4, top_k=1, balance=[BalanceTerm("aux_free_bias", 0.1)])
    router = plain_router(cfg)
    assert "expert_bias_E" in router.state_dict() and "expert_bias_E" not in dict(router.named_parameters())
    logits = torch.tensor([[2.0, 1.0, 0.0, 0.0]])
    with torch.no_grad():
        router.expert_bias_E.copy_(torch.tensor([0.0, 0.5, 0.0, 0.0]))
    route = router(logits, None)
    p = logits.softmax(-1)
    assert route.expert_idx_TK.item() == 1  # p0 - p1 = 0.40 < 0.5 bias
    assert route.gates_TK.item() == pytest.approx(p[0, 1].item(), rel=1e-6)  # unbiased probability


def test_aux_free_bias_update_direction_and_no_gradient():
    cfg = vanilla(num_experts=4, top_k=1, balance=[BalanceTerm("switch"), BalanceTerm("aux_free_bias", 0.01)])
    router = plain_router(cfg)
    opt = torch.optim.SGD(router.parameters(), lr=1.0)
    # Expert 0 takes 6 of 8 tokens, expert 1 two, experts 2 and 3 none.
    logits = torch.full((8, 4), -1.0)
    logits[:6, 0] = 3.0
    logits[6:, 1] = 3.0
    route = router(logits, None)
    route.aux_loss.backward()
    opt.step()
    after_optimizer_step(router, stepped=True)
    assert router.expert_bias_E.tolist() == pytest.approx([-0.01, 0.0, 0.01, 0.01])  # load 2 == the mean: no move
    assert router.expert_bias_E.grad is None
    router.expert_bias_E.zero_()
    router(logits, None)
    after_optimizer_step(router, stepped=False)  # a skipped step only clears
    assert router.expert_bias_E.abs().sum() == 0 and router.step_load.totals.abs().sum() == 0


def test_aux_free_bias_target_is_the_heterogeneous_balance_with_zero_computation_experts():
    from model.balance import balanced_load_share

    share = balanced_load_share(num_ffn=4, num_total=6, tau=0.5)
    # FFN experts get tau / (tau*4 + 2) = 0.125, zero-computation experts 1 / 4 = 0.25 (spec §4).
    assert share.tolist() == pytest.approx([0.125] * 4 + [0.25] * 2)


# --- global-batch balance -------------------------------------------------------------------------------------------


def test_global_batch_scope_counts_every_micro_batch_so_far():
    cfg = vanilla(num_experts=3, top_k=1, balance=[BalanceTerm("switch", 1.0)], balance_scope="global_batch")
    router = plain_router(cfg)
    a = torch.tensor([[3.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, 3.0, 0.0], [0.0, 0.0, 3.0]])
    router(a, None)
    second = router(b, None)
    f = torch.tensor([2, 1, 1]) / 4  # both micro-batches
    torch.testing.assert_close(second.aux_terms["switch"], 3 * (f * b.softmax(-1).mean(0)).sum(), **TOL)
    after_optimizer_step(router, stepped=True)
    fresh = router(b, None)  # the next step starts over
    torch.testing.assert_close(
        fresh.aux_terms["switch"], 3 * (torch.tensor([0, 0.5, 0.5]) * b.softmax(-1).mean(0)).sum(), **TOL
    )


def test_global_batch_scope_equals_the_concatenated_batch_in_one_process():
    """Two equal micro-batches: the mean of their losses (global scope, last micro-batch's f) has the gradient of the
    single loss on the concatenated batch, since f is a constant and P is linear in the tokens."""
    torch.manual_seed(0)
    cfg = vanilla(num_experts=3, top_k=1, balance=[BalanceTerm("switch", 1.0)], balance_scope="global_batch")
    x = torch.randn(8, 3)
    ref = plain_router(cfg)
    whole = ref(x, None).aux_terms["switch"]
    split = plain_router(cfg)
    split(x[:4], None)  # the first micro-batch sees only itself; the check is on the last one
    last = split(x[4:], None)
    f = torch.bincount(x.argmax(-1), minlength=3) / 8
    torch.testing.assert_close(last.aux_terms["switch"], 3 * (f * x[4:].softmax(-1).mean(0)).sum(), **TOL)
    torch.testing.assert_close(whole, 3 * (f * x.softmax(-1).mean(0)).sum(), **TOL)


# --- shared experts -------------------------------------------------------------------------------------------------


def test_shared_experts_add_a_dense_ffn_every_token_uses():
    cfg = MoEConfig(num_experts=4, top_k=2, shared_experts=2, expert_ffn_hidden_size=3, gating_residual=False)
    layer = MoELayer(6, cfg, ffn_hidden_size=5, has_residual=False)
    assert layer.shared.w_up.weight.shape == (2 * 3, 6)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(5, 6)
    out, *_ = layer(x, None)
    s = layer.shared
    want_shared = (F.silu(x @ s.w_gate.weight.T) * (x @ s.w_up.weight.T)) @ s.w_down.weight.T
    shared, layer.shared = layer.shared, None
    routed, *_ = layer(x, None)
    layer.shared = shared
    torch.testing.assert_close(out, routed + want_shared, **TOL)


def test_decoder_with_every_router_kind_trains_a_step():
    mcfg = ModelConfig(vocab_size=32, hidden_size=16, num_layers=2, num_heads=2, ffn_hidden_size=16, max_seq_len=8)
    for router in (RouterConfig(kind="topk", mixtral_gating=True), RouterConfig(kind="etr")):
        moe = MoEConfig(
            num_experts=4,
            top_k=1,
            gating_residual=False,
            router=router,
            capacity_factor=1.0,
            shared_experts=1,
            balance=[BalanceTerm("switch"), BalanceTerm("zloss"), BalanceTerm("seq"), BalanceTerm("aux_free_bias")],
        )
        model = Decoder(mcfg, moe)
        out = model(torch.randint(0, 32, (2, 8)))
        (F.cross_entropy(out.logits_BSV.flatten(0, 1), torch.randint(0, 32, (16,))) + out.aux_loss).backward()
        assert set(model.aux_terms(out)) == {"switch", "zloss", "seq"}
        after_optimizer_step(model, stepped=True)
        biases = [m.expert_bias_E for m in model.modules() if isinstance(m, Router)]
        assert biases and all(b.abs().sum() > 0 for b in biases)


# --- configuration --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["moe.router.kind=switchy"], "moe.router.kind"),
        (["moe.router.kind=topk"], "moe.gating_residual"),  # the residual belongs to the moepp router
        (["moe.router.mixtral_gating=true"], "moe.router.mixtral_gating"),
        (["moe.balance=[{kind: switch}, {kind: switch}]"], "moe.balance"),
        (["moe.balance=[{kind: nope}]"], "moe.balance[0].kind"),
        (["moe.balance_scope=everything"], "moe.balance_scope"),
        (
            ["moe.router.kind=etr", "moe.gating_residual=false", "moe.router.etr.capacity_schedule=lower_bound"],
            "moe.capacity_factor",
        ),
    ],
)
def test_bad_router_config_is_a_one_line_error_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    message = str(e.value)
    assert message.startswith(key) and "\n" not in message, message
