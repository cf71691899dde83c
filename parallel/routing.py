"""The routers' communication over process groups: `GroupRouterComm`, the distributed `RouterComm`
(model/routers/comm.py), which `install_router_comm` hands to every router of a parallelized model.

- sum_statistics: under sequence parallelism a tp rank routes only its slice of the sequence, so the balance
  statistics are summed over tp (identity backward) and the loss equals the single-process one.
- sum_over_data_parallel: global-batch balance sums selection counts over data-parallel ranks (forward, no autograd).
- sum_step_load: the aux-free bias and the ETR capacity schedule use the load of the whole step: summed over
  data-parallel ranks and, under sequence parallelism, over tp (whose ranks route different tokens).
- gather_assignments: ETR expert choice ranks the assignments of the whole data-parallel batch, so each rank sees
  every data-parallel rank's (expert, affinity) pairs in rank order ([T*K, 2] floats per rank, tiny next to the
  token all-to-all). Over dp rather than only ep, so the decisions are those of the single process on the
  concatenated batch for every layout (ep, edp x ep, or plain dp alike).
The ETR locality loss also needs which FFN experts live on this node (zero-computation experts are replicated, so
always local): `node_local_experts`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from model.routers import Router, RouterComm
from parallel.mesh import ParallelContext


class SumOverGroup(torch.autograd.Function):
    """All-reduce (sum) whose backward is the identity: every rank computes the same loss from the summed
    statistics, and each keeps the gradient of its own contribution (summed later over tp with the parameters)."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:  # type: ignore[override]
        y = x.clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad, None


def _sum_over(t: Tensor, groups: list[dist.ProcessGroup]) -> Tensor:
    t = t.detach().clone()
    for g in groups:
        dist.all_reduce(t, group=g)
    return t


@dataclass
class GroupRouterComm(RouterComm):
    """None / empty: no other rank shares that part of the batch, and the method is the identity."""

    statistics_group: dist.ProcessGroup | None = None  # tp under sequence parallelism
    dp_group: dist.ProcessGroup | None = None
    step_groups: list[dist.ProcessGroup] = field(default_factory=list)  # every rank that routes other tokens

    def sum_statistics(self, stats: Tensor) -> Tensor:
        return stats if self.statistics_group is None else SumOverGroup.apply(stats, self.statistics_group)

    def sum_over_data_parallel(self, counts: Tensor) -> Tensor:
        return counts if self.dp_group is None else _sum_over(counts, [self.dp_group])

    def sum_step_load(self, totals: Tensor) -> Tensor:
        return _sum_over(totals, self.step_groups) if self.step_groups else totals

    def gather_assignments(self, expert_A: Tensor, score_A: Tensor) -> tuple[Tensor, Tensor, int]:
        if self.dp_group is None:
            return expert_A, score_A, 0
        size, rank = dist.get_world_size(self.dp_group), dist.get_rank(self.dp_group)
        # One gather for both: expert ids are small integers, exact in the scores' float dtype.
        pairs = torch.stack([expert_A.to(score_A.dtype), score_A], dim=1).detach().contiguous()
        # Every rank of the group routes the same number of tokens (equal micro-batches), so equal shapes.
        parts = [torch.empty_like(pairs) for _ in range(size)]
        dist.all_gather(parts, pairs, group=self.dp_group)
        both = torch.cat(parts)
        return both[:, 0].long(), both[:, 1], rank * pairs.shape[0]


def node_local_experts(num_experts: int, num_total: int, ep_group: dist.ProcessGroup) -> Tensor:
    """[E] bool: FFN experts whose ep rank shares this rank's node (LOCAL_WORLD_SIZE ranks a node), plus every
    zero-computation expert."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
    ep = dist.get_world_size(ep_group)
    local = num_experts // ep
    my_node = dist.get_rank() // per_node
    mask = torch.ones(num_total, dtype=torch.bool)
    for e in range(num_experts):
        owner = dist.get_global_rank(ep_group, e // local)
        mask[e] = owner // per_node == my_node
    return mask


def install_router_comm(model: nn.Module, ctx: ParallelContext) -> None:
    """Give every router of this rank's model the communication of ctx's layout."""
    d = ctx.dims
    dp_group = ctx.group("dp") if d.dp > 1 else None
    sp_group = ctx.group("tp") if d.sp else None
    # The ranks that route other tokens: data-parallel ranks, and tp ranks under sequence parallelism.
    comm = GroupRouterComm(sp_group, dp_group, [g for g in (dp_group, sp_group) if g is not None])
    for router in model.modules():
        if not isinstance(router, Router):
            continue
        router.comm = comm
        if "locality" in router.balance.weights and d.ep > 1:
            cfg = router.cfg
            local = node_local_experts(cfg.num_experts, cfg.num_total_experts, ctx.group("ep"))
            router.balance.local_mask_E.copy_(local)
