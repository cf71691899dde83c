"""What the dispatcher's overlap hides: an expert-parallel MoE++ layer's forward + backward with the all-to-alls
asynchronous (the zero-computation experts, and shared experts when configured, computed while rows and gradients
are in flight) against the same layer waiting for every all-to-all at once. Run by `bench/all_to_all.py --overlap`.

Each rank routes its own tokens with controlled routing (bench/routing.py) at the FFN share a tau gives; FFN experts
are a pass-through, so the layer is routing, the all-to-alls and the local experts. Per rank: layer ms with overlap
on and off (alternating pairs after a barrier; fastest run of each), local ms = the zero-computation (+ shared)
experts' forward + backward alone on the same tokens and routing, and hidden = median over the pairs of (off - on),
over local: the share of the local work taken off the layer's time.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor
from torch.distributed.device_mesh import init_device_mesh

from bench.allocator import reuse_freed_memory
from bench.routing import FFN, HIDDEN, balanced_assignments, control, ffn_share, moe_config
from model.moe import MoELayer
from parallel.expert_parallel import apply_expert_parallel

# (name, FFN experts, zero, copy, constant, shared experts): the paper's (8+4) layer, and the same with one shared
# expert of a fine-grained expert's width (FFN / 4, as DeepSeekMoE's shared experts are fine-grained experts).
VARIANTS = [("(8+4)", 8, 1, 1, 2, 0), ("(8+4) + shared", 8, 1, 1, 2, 1)]
TAU = 0.75


class PassThroughExperts(torch.nn.Module):
    def forward(self, x_AD: Tensor, tokens_per_expert: list[int], counts_E: Tensor | None = None) -> Tensor:
        return x_AD


def build_layer(n_ffn: int, n_zero: int, n_copy: int, n_const: int, shared: int) -> MoELayer:
    cfg = moe_config(n_ffn, n_zero, n_copy, n_const, TAU)
    cfg.shared_experts = shared
    cfg.expert_ffn_hidden_size = FFN // 4 if shared else FFN
    torch.manual_seed(0)  # the same weights on every rank
    layer = MoELayer(HIDDEN, cfg, FFN, has_residual=True)
    apply_expert_parallel(layer, init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("ep",)))
    layer.experts = PassThroughExperts()
    return layer


def layer_ms(layer: MoELayer, x: Tensor, prev: Tensor, overlap: bool) -> float:
    layer.dispatcher.overlap = overlap
    x = x.detach().requires_grad_()
    dist.barrier()
    t = time.perf_counter()
    out = layer(x, prev)[0]
    out.square().sum().backward()
    return (time.perf_counter() - t) * 1e3


def local_ms(layer: MoELayer, x: Tensor, prev: Tensor) -> float:
    """The zero-computation (+ shared) experts' forward + backward on this rank's tokens, nothing else."""
    with torch.no_grad():
        route = layer.router(x, prev)
    x = x.detach().requires_grad_()
    t = time.perf_counter()
    out = layer.zero_computation_output(x, route.expert_idx_TK, route.gates_TK)
    if layer.shared is not None:
        out = out + layer.shared(x)
    out.square().sum().backward()
    return (time.perf_counter() - t) * 1e3


def worker(rank: int, world: int, port: int, tokens: int, repeats: int, reuse: bool, out_path: str) -> None:
    if reuse:
        reuse_freed_memory()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cells = []
    try:
        for name, n_ffn, n_zero, n_copy, n_const, shared in VARIANTS:
            layer = build_layer(n_ffn, n_zero, n_copy, n_const, shared)
            n_zc = n_zero + n_copy + n_const
            torch.manual_seed(100 + rank)  # each rank holds different tokens
            x = torch.randn(tokens, HIDDEN)
            prev = torch.randn(tokens, n_ffn + n_zc)
            control(layer, balanced_assignments(tokens, n_ffn, n_zc, ffn_share(TAU, n_ffn, n_zc), seed=rank))
            layer_ms(layer, x, prev, True)  # warm-up
            layer_ms(layer, x, prev, False)
            on, off, local = [], [], []
            for _ in range(repeats):
                on.append(layer_ms(layer, x, prev, True))
                off.append(layer_ms(layer, x, prev, False))
                local.append(local_ms(layer, x, prev))
            # The two runs of a pair are back to back, so the median of the pair differences and ratios is robust
            # to slow patches of a shared machine; the ms columns keep the fastest run of each kind.
            saved = statistics.median(b - a for a, b in zip(on, off, strict=True))
            ratio = statistics.median(a / b for a, b in zip(on, off, strict=True))
            mine = torch.tensor([min(on), min(off), statistics.median(local), saved, ratio], dtype=torch.float64)
            dist.all_reduce(mine)
            on_ms, off_ms, loc_ms, saved_ms, ratio = (mine / world).tolist()
            cells.append(
                {"layer": name, "on_ms": on_ms, "off_ms": off_ms, "local_ms": loc_ms, "saved_ms": saved_ms}
                | {"ratio": ratio}
            )
            if rank == 0:
                print(f"ep={world} {name}: {cells[-1]}", flush=True)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        raise
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        Path(out_path).write_text(json.dumps(cells))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter finalization, where gloo's threads were seen to abort a finished worker


def run_ep(world: int, tokens: int, repeats: int, reuse: bool) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "overlap.json")
        mp.spawn(worker, args=(world, port, tokens, repeats, reuse, out), nprocs=world, join=True)
        return json.loads(Path(out).read_text())


def table_rows(world: int, cells: list[dict]) -> list[list[str]]:
    rows = []
    for c in cells:
        hidden = c["saved_ms"] / c["local_ms"]
        rows.append(
            [
                f"ep={world}",
                c["layer"],
                f"{c['off_ms']:.1f}",
                f"{c['on_ms']:.1f}",
                f"{c['ratio']:.3f}",
                f"{c['local_ms']:.1f}",
                f"{hidden:.2f}",
            ]
        )
    return rows


HEADERS = ["ep", "layer", "serial ms", "overlapped ms", "overlapped / serial", "local experts ms", "hidden"]
