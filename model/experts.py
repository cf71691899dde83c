"""Expert kinds.

- `FFNExperts`: N SwiGLU experts as stacked weights (`w_up` [E, 2F, D] with the gate half first, `w_down`
  [E, D, F]), run over tokens already grouped by expert: one grouped matmul on CUDA in bf16, a loop over experts
  (never over tokens) elsewhere.
- `ConstantExperts`: E(x) = a1*x + a2*v with [a1, a2] = softmax(W_c x); one (W_c, v) per constant expert.
- Copy (E(x) = x) and zero (E(x) = 0) experts have no parameters; `MoELayer` handles them inline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _grouped_mm_usable(x: Tensor) -> bool:
    # torch._grouped_mm is fast on Hopper in bf16. On CPU it exists, but its backward rejects broadcast (stride-0)
    # gradients (docs/dependencies.md), so the loop over experts stays the CPU path.
    return x.is_cuda and hasattr(torch, "_grouped_mm") and _compute_dtype(x) == torch.bfloat16


def _compute_dtype(x: Tensor) -> torch.dtype:
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return x.dtype


class FFNExperts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, ffn_hidden_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.ffn_hidden_size = ffn_hidden_size
        self.w_up = nn.Parameter(torch.empty(num_experts, 2 * ffn_hidden_size, hidden_size))
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_hidden_size))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        # Decoder.init_weights re-initialises with depth scaling; this keeps a standalone layer usable.
        nn.init.normal_(self.w_up, std=std)
        nn.init.normal_(self.w_down, std=std)

    def forward(self, x_AD: Tensor, tokens_per_expert: list[int]) -> Tensor:
        """x_AD holds the rows of expert 0, then expert 1, ... (counts in tokens_per_expert, a host list)."""
        if _grouped_mm_usable(x_AD):
            return self._grouped(x_AD, tokens_per_expert)
        outs = []
        # Empty experts still run on their zero-row slice: that gives them an all-zero gradient instead of None,
        # so every optimizer and gradient reduction sees the same parameters whatever the routing.
        # unbind once: indexing w_up[e] per expert would make each backward build a zero gradient of the whole
        # stacked weight (cost quadratic in the number of experts: 13.1 s vs 1.9 s for 32 experts, bench/peers.py).
        for x_e, w_up, w_down in zip(
            torch.split(x_AD, tokens_per_expert), self.w_up.unbind(0), self.w_down.unbind(0), strict=True
        ):
            gate, up = F.linear(x_e, w_up).chunk(2, dim=-1)
            outs.append(F.linear(F.silu(gate) * up, w_down))
        return torch.cat(outs)

    def _grouped(self, x_AD: Tensor, tokens_per_expert: list[int]) -> Tensor:
        dtype = _compute_dtype(x_AD)
        offs = torch.tensor(tokens_per_expert, device=x_AD.device).cumsum(0).to(torch.int32)
        x = x_AD.to(dtype)
        h = torch._grouped_mm(x, self.w_up.to(dtype).transpose(-2, -1), offs=offs)
        gate, up = h.chunk(2, dim=-1)
        return torch._grouped_mm((F.silu(gate) * up).contiguous(), self.w_down.to(dtype).transpose(-2, -1), offs=offs)


class ConstantExperts(nn.Module):
    """n constant experts, evaluated for every token at once (2*n*D multiply-adds per token, negligible next to
    one FFN expert) so that no host sync or gather is needed to find their assignments."""

    def __init__(self, num_experts: int, hidden_size: int) -> None:
        super().__init__()
        self.w_c = nn.Parameter(torch.empty(num_experts, 2, hidden_size))
        self.v = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.normal_(self.w_c, std=std)
        nn.init.normal_(self.v, std=1.0)  # MoE++ spec: v ~ N(0, 1)

    def mix(self, x_TD: Tensor) -> Tensor:
        """[a1, a2] = softmax(W_c x) for each token and constant expert: [T, n, 2]."""
        # One [T, D] x [D, 2n] GEMM (F.linear measured faster than the equivalent einsum's bmm on CPU).
        n = self.w_c.shape[0]
        return F.linear(x_TD, self.w_c.reshape(2 * n, -1)).view(-1, n, 2).float().softmax(dim=-1)

    def forward(self, x_TD: Tensor) -> Tensor:
        """Every constant expert's output for every token, [T, n, D]: for tests and references only."""
        a = self.mix(x_TD).to(x_TD.dtype)
        return a[..., 0:1] * x_TD[:, None, :] + a[..., 1:2] * self.v[None]


class DenseFFN(nn.Module):
    """SwiGLU: w_down(silu(w_gate x) * w_up x). Separate gate/up matrices so tensor parallelism can shard each.
    The dense layers' FFN and the MoE layer's shared experts (DeepSeekMoE: K_s experts every token uses, fused
    into one FFN K_s times as wide)."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int) -> None:
        super().__init__()
        self.w_gate = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.w_up = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.w_down = nn.Linear(ffn_hidden_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))
