"""The router interface: one class per policy, checkpoint keys per kind, the balance statistics' layout, and the
RouterComm seam (a stand-in comm in one process plays a second rank that routes the very same tokens)."""

import pytest
import torch

from model.config import BalanceTerm, EtrConfig, MoEConfig, RouterConfig
from model.routers import EtrRouter, MoEppRouter, RouterComm, TopKRouter, build_router
from model.routers.statistics import BalanceStatistics


def vanilla(**kw) -> MoEConfig:
    base = dict(num_zero_experts=0, num_copy_experts=0, num_constant_experts=0, gating_residual=False)
    return MoEConfig(**{**base, **kw})


class TwinRankComm(RouterComm):
    """Two ranks that route identical tokens: every sum doubles, the gather repeats this rank's assignments, and
    this rank is the second of the two."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def sum_statistics(self, stats):
        self.calls.append("sum_statistics")
        return stats * 2

    def sum_over_data_parallel(self, counts):
        self.calls.append("sum_over_data_parallel")
        return counts * 2

    def sum_step_load(self, totals):
        self.calls.append("sum_step_load")
        return totals * 2

    def gather_assignments(self, expert_A, score_A):
        self.calls.append("gather_assignments")
        return torch.cat([expert_A, expert_A]), torch.cat([score_A, score_A]), expert_A.numel()


@pytest.mark.parametrize(
    ("cfg", "has_residual", "cls", "keys"),
    [
        (MoEConfig(num_experts=4, top_k=2), True, MoEppRouter, {"wg.weight", "gate_map.weight"}),
        (
            MoEConfig(num_experts=4, top_k=2, router=RouterConfig(two_layer=True)),
            False,
            MoEppRouter,
            {"wg.0.weight", "wg.2.weight"},
        ),
        (
            vanilla(num_experts=4, top_k=2, router=RouterConfig(kind="topk"), balance=[BalanceTerm("aux_free_bias")]),
            False,
            TopKRouter,
            {"wg.weight", "expert_bias_E"},
        ),
        (
            vanilla(
                num_experts=4,
                top_k=1,
                capacity_factor=1.0,
                router=RouterConfig(kind="etr", etr=EtrConfig(capacity_schedule="lower_bound")),
            ),
            False,
            EtrRouter,
            {"etr_state"},
        ),
    ],
)
def test_each_kind_builds_its_policy_and_saves_exactly_its_own_state(cfg, has_residual, cls, keys):
    router = build_router(8, cfg, has_residual)
    assert type(router) is cls
    # Checkpoints and the Hugging Face weight rules name these keys; statistics buffers are never saved.
    assert set(router.state_dict()) == keys


def test_an_etr_layer_with_a_gating_residual_is_refused():
    with pytest.raises(ValueError, match="no gating residual"):
        build_router(8, vanilla(num_experts=4, top_k=1, router=RouterConfig(kind="etr")), has_residual=True)


def test_balance_statistics_pack_and_unpack_by_name():
    T, E, B = 6, 3, 2
    probs = torch.rand(T, E).softmax(-1)
    idx = torch.tensor([[0], [0], [1], [2], [2], [2]])
    stats = BalanceStatistics.measure(probs.log(), probs, idx, torch.ones_like(idx, dtype=torch.bool), B, True, True)
    assert stats.counts_E.tolist() == [2, 1, 3] and stats.tokens.item() == T and stats.tokens.dim() == 0
    assert stats.seq_counts_BE.tolist() == [[2, 1, 0], [0, 0, 3]]
    torch.testing.assert_close(stats.seq_prob_sum_BE, torch.stack([probs[:3].sum(0), probs[3:].sum(0)]))
    flat = stats.pack()
    assert flat.shape == (E + E + 1 + 1 + B * E + B * E,)
    back = stats.unpack(flat * 10)
    for name in ("counts_E", "prob_sum_E", "tokens", "zsq_sum", "seq_counts_BE", "seq_prob_sum_BE"):
        a, b = getattr(stats, name), getattr(back, name)
        assert a.shape == b.shape, name
        torch.testing.assert_close(b, a * 10, msg=name)
    assert BalanceStatistics.measure(probs, probs, idx, idx >= 0, 1, False, False).pack().shape == (2 * E + 1,)


def test_two_identical_ranks_route_and_balance_as_one():
    """Summed over two ranks with the same tokens, the shares f and P and so every balance term are those of one."""
    cfg = vanilla(
        num_experts=4,
        top_k=2,
        balance=[BalanceTerm("switch"), BalanceTerm("zloss"), BalanceTerm("seq"), BalanceTerm("aux_free_bias", 0.1)],
        balance_scope="global_batch",
    )
    torch.manual_seed(0)
    alone, twins = build_router(8, cfg, False), build_router(8, cfg, False)
    twins.load_state_dict(alone.state_dict())
    twins.comm = comm = TwinRankComm()
    x = torch.randn(10, 8)
    one, two = alone(x, None, num_sequences=2), twins(x, None, num_sequences=2)
    assert comm.calls == ["sum_statistics", "sum_over_data_parallel"]
    torch.testing.assert_close(two.aux_loss, one.aux_loss)
    assert one.aux_terms.keys() == two.aux_terms.keys() == {"switch", "zloss", "seq"}
    # Twice the load moves the bias by the same signs: the update reads the load of every rank.
    alone.after_step(stepped=True)
    twins.after_step(stepped=True)
    assert comm.calls[-1] == "sum_step_load"
    assert torch.equal(alone.expert_bias_E, twins.expert_bias_E) and alone.expert_bias_E.abs().sum() > 0


def test_etr_expert_choice_counts_the_other_rank_and_keeps_this_ranks_slice():
    cfg = vanilla(num_experts=4, top_k=1, capacity_factor=0.5, router=RouterConfig(kind="etr"), balance=[])
    x = torch.randn(16, 8)
    alone, twins = EtrRouter(8, cfg), EtrRouter(8, cfg)
    twins.comm = comm = TwinRankComm()
    kept = twins(x, None).kept_TK
    assert comm.calls == ["gather_assignments"]
    # The capacity counts the twin's tokens too (32), and this rank, the second, keeps what one process routing
    # both ranks' tokens keeps of the second half.
    doubled = alone(torch.cat([x, x]), None).kept_TK
    assert torch.equal(kept, doubled[16:])
