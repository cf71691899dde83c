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
    return x.is_cuda and hasattr(torch, "_grouped_mm") and compute_dtype(x) == torch.bfloat16


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype autocast would run a matmul on x in (bf16 under train.dtype=bf16, CUDA or CPU), else x's own: the
    experts' compute dtype and the dispatch payload's."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
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

    def local_weights(self) -> tuple[Tensor, Tensor]:
        """(w_up, w_down) of the experts this module computes, as plain tensors (expert parallelism keeps the
        parameters as shards of the whole layer's experts and returns the local part)."""
        return self.w_up, self.w_down

    def forward(self, x_AD: Tensor, tokens_per_expert: list[int], counts_E: Tensor | None = None) -> Tensor:
        """x_AD holds the rows of expert 0, then expert 1, ... (counts in tokens_per_expert, a host list: the loop
        slices rows with it). counts_E: the same counts on x_AD's device, if the caller has them; the grouped GEMM
        takes its offsets from them (building them from the list is a blocking host-to-device copy)."""
        w_up, w_down = self.local_weights()
        if _grouped_mm_usable(x_AD):
            return self._grouped(x_AD, tokens_per_expert, counts_E, w_up, w_down)
        # Autocast does not reach into a custom autograd node's out= GEMMs: cast here as it would (the casts are
        # differentiable, so the fp32 master weights still get their gradients) and run the node outside it.
        dtype = compute_dtype(x_AD)
        with torch.autocast(x_AD.device.type, enabled=False):
            return LoopedSwiGLU.apply(x_AD.to(dtype), w_up.to(dtype), w_down.to(dtype), tokens_per_expert)

    def _grouped(
        self, x_AD: Tensor, tokens_per_expert: list[int], counts_E: Tensor | None, w_up: Tensor, w_down: Tensor
    ) -> Tensor:
        dtype = compute_dtype(x_AD)
        if counts_E is None:
            counts_E = torch.tensor(tokens_per_expert, device=x_AD.device)  # host-to-device copy (blocking)
        offs = counts_E.cumsum(0).to(torch.int32)
        x = x_AD.to(dtype)
        h = torch._grouped_mm(x, w_up.to(dtype).transpose(-2, -1), offs=offs)
        gate, up = h.chunk(2, dim=-1)
        return torch._grouped_mm((F.silu(gate) * up).contiguous(), w_down.to(dtype).transpose(-2, -1), offs=offs)


class LoopedSwiGLU(torch.autograd.Function):
    """The experts as one autograd node: a loop over experts (never over tokens) of plain GEMMs whose results land
    in slices of preallocated buffers, forward and backward. Autograd over a per-expert graph instead builds each
    expert's weight gradient on its own and then stacks them (unbind backward: a copy of every expert weight),
    concatenates the row blocks (split/cat backward) and the gate/up halves (chunk backward): bench/peers.py
    measured those copies as the gap to DeepSpeed's per-expert modules. Saved for backward: the input and the
    [A, 2F] pre-activation only; silu(gate) * up is recomputed (an elementwise pass) rather than stored.

    Empty experts get a zero gradient (a GEMM over zero rows writes zeros), not None, so every optimizer and
    gradient reduction sees the same parameters whatever the routing. (Indexing w_up[e] per expert in an autograd
    graph instead would build a zero gradient of the whole stacked weight per expert: quadratic, 13.1 s vs 1.9 s
    for 32 experts.)"""

    @staticmethod
    def forward(ctx, x_AD: Tensor, w_up: Tensor, w_down: Tensor, tokens_per_expert: list[int]) -> Tensor:
        F_ = w_down.shape[-1]
        x_AD = x_AD.contiguous()
        h_AH = x_AD.new_empty(x_AD.shape[0], 2 * F_)
        y_AD = x_AD.new_empty(x_AD.shape[0], w_down.shape[1])
        start = 0
        for e, n in enumerate(tokens_per_expert):
            rows = slice(start, start + n)
            start += n
            torch.mm(x_AD[rows], w_up[e].t(), out=h_AH[rows])
            act = F.silu(h_AH[rows, :F_]) * h_AH[rows, F_:]
            torch.mm(act, w_down[e].t(), out=y_AD[rows])
        ctx.save_for_backward(x_AD, w_up, w_down, h_AH)
        ctx.tokens_per_expert = tokens_per_expert
        return y_AD

    @staticmethod
    def backward(ctx, grad_y_AD: Tensor) -> tuple[Tensor | None, Tensor, Tensor, None]:
        x_AD, w_up, w_down, h_AH = ctx.saved_tensors
        F_ = w_down.shape[-1]
        grad_y_AD = grad_y_AD.contiguous()
        grad_x = torch.empty_like(x_AD) if ctx.needs_input_grad[0] else None
        grad_w_up, grad_w_down = torch.empty_like(w_up), torch.empty_like(w_down)
        start = 0
        for e, n in enumerate(ctx.tokens_per_expert):
            rows = slice(start, start + n)
            start += n
            gate, up = h_AH[rows, :F_], h_AH[rows, F_:]
            silu = F.silu(gate)
            g = grad_y_AD[rows]
            torch.mm(g.t(), silu * up, out=grad_w_down[e])
            grad_act = g @ w_down[e]
            grad_h = torch.empty_like(h_AH[rows])
            torch.mul(grad_act, silu, out=grad_h[:, F_:])
            # aten's fused silu derivative (what autograd's SiluBackward runs), written into the gate half.
            torch.ops.aten.silu_backward.grad_input(grad_act * up, gate, grad_input=grad_h[:, :F_])
            torch.mm(grad_h.t(), x_AD[rows], out=grad_w_up[e])
            if grad_x is not None:
                torch.mm(grad_h, w_up[e], out=grad_x[rows])
        return grad_x, grad_w_up, grad_w_down, None


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
