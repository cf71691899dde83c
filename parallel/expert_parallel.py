"""Expert parallelism: FFN experts sharded over the ep group, tokens moved by an all-to-all that skips
zero-computation experts.

`MoELayer` hands a dispatcher only its FFN assignments, sorted by global expert id; experts are sharded
contiguously (rank r owns experts [r*L, (r+1)*L)), so the sorted rows are already grouped by destination rank.
Copy/constant/zero experts are replicated on every rank and computed where the token lives, so their assignments
never enter the all-to-all: its volume is the FFN share of the vanilla volume.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from model.dispatch import AllToAllBytes, DispatchResult, Pending
from model.experts import FFNExperts
from model.moe import MoELayer
from parallel.async_all_to_all import AsyncAllToAll


class AllToAllDispatcher:
    """overlap: launch both all-to-alls asynchronously and return pending tensors (the layer's local work runs while
    the rows move, forward and backward); False waits at once, the serial reference for benchmarks."""

    def __init__(self, group: dist.ProcessGroup, num_experts: int, overlap: bool = True) -> None:
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        self.num_local = num_experts // self.ep_size
        self.overlap = overlap

    def dispatch(
        self, x_TD: Tensor, token_idx_A: Tensor, tokens_per_expert_E: Tensor, payload_dtype: torch.dtype
    ) -> DispatchResult:
        ep, L, me = self.ep_size, self.num_local, self.ep_rank
        # recv[src * L + l]: rows rank `src` sends to my local expert l.
        recv_counts = torch.empty_like(tokens_per_expert_E)
        dist.all_to_all_single(recv_counts, tokens_per_expert_E, group=self.group)
        # host-device sync: the one per layer. Split sizes must be host ints for the all-to-all and the groups.
        counts = torch.cat([tokens_per_expert_E, recv_counts]).tolist()
        send, recv = counts[: ep * L], counts[ep * L :]
        send_splits = [sum(send[r * L : (r + 1) * L]) for r in range(ep)]
        recv_splits = [sum(recv[r * L : (r + 1) * L]) for r in range(ep)]
        n_send, n_recv = sum(send_splits), sum(recv_splits)

        # Gathered in x_TD's dtype, then cast: the wire carries the compute dtype, and the gather's backward
        # still sums a token's assignment gradients in fp32.
        x_send = x_TD[token_idx_A[:n_send]].to(payload_dtype)
        flight = AsyncAllToAll(x_send, recv_splits, send_splits, self.group, self.overlap)
        # While the rows move: received rows are grouped by (source rank, local expert); experts want them grouped
        # by local expert.
        local_expert = torch.arange(ep * L, device=x_TD.device) % L
        row_expert = torch.repeat_interleave(local_expert, recv_counts, output_size=n_recv)
        by_expert = torch.argsort(row_expert, stable=True)
        back = torch.empty_like(by_expert)
        back[by_expert] = torch.arange(n_recv, device=x_TD.device)
        tokens_per_local = [sum(recv[r * L + e] for r in range(ep)) for e in range(L)]
        # A rank's own chunk (send_splits[me] == recv_splits[me] rows) is part of the collective's buffers but
        # never leaves the rank: counted in sent/received, not in the remote figures.
        row_bytes = x_TD.shape[1] * payload_dtype.itemsize
        traffic = AllToAllBytes(
            dispatch_sent=n_send * row_bytes,
            dispatch_received=n_recv * row_bytes,
            dispatch_sent_remote=(n_send - send_splits[me]) * row_bytes,
            dispatch_received_remote=(n_recv - recv_splits[me]) * row_bytes,
        )
        rows = Pending(lambda: flight.wait()[by_expert])
        if not self.overlap:
            rows.wait()
        return DispatchResult(
            rows,
            tokens_per_local,
            recv_counts.view(ep, L).sum(0),
            state={"back": back, "send_splits": send_splits, "recv_splits": recv_splits},
            traffic=traffic,
        )

    def combine(self, y_AD: Tensor, dispatched: DispatchResult) -> Pending:
        """The expert outputs (in their own dtype: the compute dtype) go home by the reverse all-to-all."""
        s, t = dispatched.state, dispatched.traffic
        row_bytes = y_AD.shape[1] * y_AD.element_size()
        mine = s["recv_splits"][self.ep_rank]
        n_out, n_home = sum(s["recv_splits"]), sum(s["send_splits"])
        t.combine_sent, t.combine_received = n_out * row_bytes, n_home * row_bytes
        t.combine_sent_remote, t.combine_received_remote = (n_out - mine) * row_bytes, (n_home - mine) * row_bytes
        flight = AsyncAllToAll(y_AD[s["back"]], s["send_splits"], s["recv_splits"], self.group, self.overlap)
        home = Pending(flight.wait)
        if not self.overlap:
            home.wait()
        return home


class ExpertShard(FFNExperts):
    """This rank's contiguous slice of a layer's FFN experts. The parameters are DTensors sharded on dim 0 over
    the ep mesh, so they keep their global shape (checkpoints, gradient norms and data-parallel sharding see the
    whole layer); the experts compute on the local slice."""

    def local_weights(self) -> tuple[Tensor, Tensor]:
        return self.w_up.to_local(), self.w_down.to_local()


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Keep this rank's contiguous slice of every MoE layer's FFN experts and install the all-to-all dispatcher.
    Router, constant/copy/zero experts stay replicated."""
    group = ep_mesh.get_group()
    ep_size, ep_rank = dist.get_world_size(group), dist.get_rank(group)
    for layer in model.modules():
        if not isinstance(layer, MoELayer):
            continue
        experts = layer.experts
        local = experts.num_experts // ep_size
        sl = slice(ep_rank * local, (ep_rank + 1) * local)
        for name in ("w_up", "w_down"):
            shard = getattr(experts, name).detach()[sl].clone()
            setattr(experts, name, nn.Parameter(DTensor.from_local(shard, ep_mesh, [Shard(0)], run_check=False)))
        experts.__class__ = ExpertShard  # same state, local compute (FSDP swaps classes the same way)
        experts.num_experts = local
        layer.dispatcher = AllToAllDispatcher(group, layer.num_ffn)
