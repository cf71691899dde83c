"""Router hooks for the ranks that hold other parts of a batch (see model/router.py's module docstring).

- dp_reducer: global-batch balance sums selection counts over data-parallel ranks (forward, no autograd).
- step_reducer: the aux-free bias and the ETR capacity schedule use the load of the whole step: summed over
  data-parallel ranks and, under sequence parallelism, over tp (whose ranks route different tokens).
- group_gather: ETR expert choice ranks the assignments of the whole data-parallel batch, so each rank sees every
  data-parallel rank's (expert, affinity) pairs in rank order ([T*K, 2] floats per rank, tiny next to the token
  all-to-all). Over dp rather than only ep, so the decisions are those of the single process on the concatenated
  batch for every layout (ep, edp x ep, or plain dp alike).
- local_mask_E: the ETR locality loss needs which FFN experts live on this node (zero-computation experts are
  replicated, so always local).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor, nn

from model.router import Router
from parallel.mesh import ParallelContext


def _sum_over(groups: list[dist.ProcessGroup]):
    def reduce(t: Tensor) -> Tensor:
        t = t.detach().clone()
        for g in groups:
            dist.all_reduce(t, group=g)
        return t

    return reduce


def _gather_over(group: dist.ProcessGroup):
    size, rank = dist.get_world_size(group), dist.get_rank(group)

    def gather(t: Tensor) -> tuple[Tensor, int]:
        # Every rank of the group routes the same number of tokens (equal micro-batches), so equal shapes.
        parts = [torch.empty_like(t) for _ in range(size)]
        dist.all_gather(parts, t.detach().contiguous(), group=group)
        return torch.cat(parts), rank * t.shape[0]

    return gather


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


def install_router_hooks(model: nn.Module, ctx: ParallelContext) -> None:
    d = ctx.dims
    dp_group = ctx.group("dp") if d.dp > 1 else None
    # The ranks that route other tokens: data-parallel ranks, and tp ranks under sequence parallelism.
    step_groups = [g for g in (dp_group, ctx.group("tp") if d.sp else None) if g is not None]
    for router in model.modules():
        if not isinstance(router, Router):
            continue
        if dp_group is not None:
            router.dp_reducer = _sum_over([dp_group])
        if step_groups:
            router.step_reducer = _sum_over(step_groups)
        if router.kind == "etr" and dp_group is not None:
            router.group_gather = _gather_over(dp_group)
        if router.kind == "etr" and d.ep > 1:
            cfg = router.cfg
            router.local_mask_E = node_local_experts(cfg.num_experts, cfg.num_total_experts, ctx.group("ep")).to(
                router.local_mask_E.device
            )
