"""Our vanilla MoE layer vs DeepSpeed's `deepspeed.moe.layer.MoE` and megatron-core's `MoELayer`, same shapes, same
device, same run: forward and forward+backward. Prints a table and writes bench/results/peers_DEVICE.json.

    python bench/peers.py [--tokens 4096] [--repeats 3] [--device auto|cpu|cuda] [--out PATH]

Shapes: hidden 768, SwiGLU experts of width 2048, 8 / 16 / 32 experts, top-2, dropless, one process (ep 1). Every
implementation gets the same expert weights and the same router weights, so all route identically and compute the
same rows; what differs is how tokens are dispatched to experts and back. Peers are imported lazily: one that is
not installed, or cannot run on this device, is a row saying so (install them with `DS_BUILD_OPS=0 pip install -e
'.[peers]'`).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.report import add_out_argument, print_table, write_results
from bench.routing import FFN, HIDDEN, moe_config
from model.moe import MoELayer

EXPERT_COUNTS = [8, 16, 32]


class SwiGLU(nn.Module):
    """One expert for the peers' expert slots: down(silu(a) * b), [a; b] = up(x), as our FFNExperts."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(HIDDEN, 2 * FFN, bias=False)
        self.down = nn.Linear(FFN, HIDDEN, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def init_world(device: torch.device) -> None:
    """A one-process torch.distributed world: both peers insist on one."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


# Each builder returns (forward(x_TD) -> (out, aux_loss), parameters) or raises PeerUnavailable.
class PeerUnavailable(Exception):
    """The table shows the message instead of numbers."""


def build_ours(ours: MoELayer) -> tuple[Callable[[Tensor], tuple[Tensor, Tensor]], list[Tensor]]:
    def forward(x: Tensor) -> tuple[Tensor, Tensor]:
        out, _, balance, _ = ours(x, None)
        return out, balance

    return forward, list(ours.parameters())


def build_deepspeed(ours: MoELayer, device: torch.device):
    try:
        import deepspeed
        from deepspeed.moe.layer import MoE
    except ImportError:
        raise PeerUnavailable("not installed (`DS_BUILD_OPS=0 pip install deepspeed==0.19.8`)") from None
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    n = ours.num_ffn
    # Dropless, deterministic top-2 (no random token selection, no sampled second expert), like ours.
    layer = MoE(
        HIDDEN,
        SwiGLU(),
        num_experts=n,
        ep_size=1,
        k=2,
        capacity_factor=1.0,
        min_capacity=0,
        drop_tokens=False,
        use_rts=False,
        top2_2nd_expert_sampling=False,
    )
    layer.set_deepspeed_parallelism()
    with torch.no_grad():
        layer.deepspeed_moe.gate.wg.weight.copy_(ours.router.wg.weight)
        for e, expert in enumerate(layer.deepspeed_moe.experts.deepspeed_experts):
            expert.up.weight.copy_(ours.experts.w_up[e])
            expert.down.weight.copy_(ours.experts.w_down[e])
    layer.to(device)

    def forward(x: Tensor) -> tuple[Tensor, Tensor]:
        out, aux, _ = layer(x[None])
        return out[0], aux

    return forward, list(layer.parameters())


def build_megatron(ours: MoELayer, device: torch.device):
    if device.type != "cuda":
        # Measured with megatron-core 0.16.1: constructing MoELayer calls torch.cuda.Stream() (alltoall dispatcher)
        # or torch.cuda.current_device() (allgather dispatcher).
        raise PeerUnavailable("not run: needs CUDA (megatron-core's MoELayer constructs CUDA streams)")
    try:
        from megatron.core import parallel_state
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        from megatron.core.transformer.moe.moe_layer import MoELayer as MegatronMoELayer
        from megatron.core.transformer.transformer_config import TransformerConfig
    except ImportError:
        raise PeerUnavailable("not installed (`pip install megatron-core==0.16.1`)") from None
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    n = ours.num_ffn
    config = TransformerConfig(
        num_layers=1,
        hidden_size=HIDDEN,
        num_attention_heads=12,
        ffn_hidden_size=FFN,
        num_moe_experts=n,
        moe_router_topk=2,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        moe_token_dispatcher_type="alltoall",
        moe_aux_loss_coeff=0.0,
    )
    spec = get_gpt_layer_local_spec(num_experts=n, moe_grouped_gemm=False)
    layer = MegatronMoELayer(config, spec.submodules.mlp.submodules).to(device)
    with torch.no_grad():
        layer.router.weight.copy_(ours.router.wg.weight)
        for e, expert in enumerate(layer.experts.local_experts):
            expert.linear_fc1.weight.copy_(ours.experts.w_up[e])
            expert.linear_fc2.weight.copy_(ours.experts.w_down[e])

    def forward(x: Tensor) -> tuple[Tensor, Tensor]:
        out, _ = layer(x[:, None])  # Megatron wants [S, B, H]
        return out[:, 0], out.new_zeros(())

    return forward, list(layer.parameters())


def time_once(forward, params: list[Tensor], x: Tensor, backward: bool) -> float:
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    t = time.perf_counter()
    if backward:
        xg = x.detach().requires_grad_(True)
        out, aux = forward(xg)
        (out.float().square().mean() + 0.01 * aux).backward()
    else:
        with torch.no_grad():
            forward(x)
    sync()
    elapsed = time.perf_counter() - t
    for p in params:
        p.grad = None
    return elapsed * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (see bench/expert_forward.py)")
    add_out_argument(parser)
    args = parser.parse_args()
    name = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    init_world(device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    rows, cells, versions = [], [], {}
    for n in EXPERT_COUNTS:
        torch.manual_seed(0)
        ours = MoELayer(HIDDEN, moe_config(n, 0, 0, 0), FFN, has_residual=False).to(device)
        x = torch.randn(args.tokens, HIDDEN, device=device)
        impls: dict[str, tuple | str] = {}
        for name, build, build_args in (
            ("ours (model.moe.MoELayer)", build_ours, (ours,)),
            ("DeepSpeed MoE", build_deepspeed, (ours, device)),
            ("megatron-core MoELayer", build_megatron, (ours, device)),
        ):
            try:
                impls[name] = build(*build_args)
            except PeerUnavailable as e:
                impls[name] = str(e)
            except Exception as e:  # a peer that breaks is a finding, not a crash of the benchmark
                impls[name] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
        # times[name][j]: every timed run of forward (j=0) / forward+backward (j=1).
        times: dict[str, list[list[float]]] = {k: [[], []] for k, v in impls.items() if isinstance(v, tuple)}
        for rep in range(args.repeats + 1):  # the first round warms up; implementations alternate
            for name in times:
                forward, params = impls[name]
                for j, backward in enumerate((False, True)):
                    with amp or torch.autocast("cpu", enabled=False):
                        ms = time_once(forward, params, x, backward)
                    if rep:
                        times[name][j].append(ms)
            fastest = {k: [round(min(v[j], default=0)) for j in (0, 1)] for k, v in times.items()}
            print(f"{n} experts, round {rep}: fastest fwd / fwd+bwd ms {fastest}", flush=True)
        ref = times["ours (model.moe.MoELayer)"]
        for name, impl in impls.items():
            if isinstance(impl, str):
                rows.append([f"{n}", name, impl, "", "", ""])
                cells.append({"experts": n, "implementation": name, "unavailable": impl})
                continue
            # Ratios per round (runs of one round are back to back, so the machine's drifting load cancels), median.
            ratio = [statistics.median(p / o for p, o in zip(times[name][j], ref[j], strict=True)) for j in (0, 1)]
            fwd, fb = min(times[name][0]), min(times[name][1])
            rows.append([f"{n}", name, f"{fwd:.0f}", f"{fb:.0f}", f"{ratio[0]:.2f}", f"{ratio[1]:.2f}"])
            cells.append(
                {"experts": n, "implementation": name, "forward_ms": fwd, "forward_backward_ms": fb}
                | {"peer_over_ours_forward": ratio[0], "peer_over_ours_forward_backward": ratio[1]}
                | {"forward_ms_all": times[name][0], "forward_backward_ms_all": times[name][1]}
            )
    for module in ("deepspeed", "megatron.core"):
        try:
            versions[module] = __import__(module, fromlist=["__version__"]).__version__
        except Exception:
            versions[module] = "not installed"
    headers = ["experts", "implementation", "forward ms", "fwd+bwd ms", "peer/ours fwd", "peer/ours fwd+bwd"]
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    title = (
        f"One layer, {args.tokens} tokens, {device.type} {precision}, {args.repeats} rounds; ms = fastest run, "
        "peer/ours = median ratio over the rounds"
    )
    print_table(title, headers, rows)
    numbers = {"device": device.type, "dtype": precision, "tokens": args.tokens, "repeats": args.repeats}
    write_results(f"peers_{device.type}", numbers | {"versions": versions, "cells": cells}, args.out)


if __name__ == "__main__":
    main()
