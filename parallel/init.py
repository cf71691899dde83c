"""Building the model for a layout without ever holding the whole of it: parameters are created on the meta device,
`parallelize` shards them (still meta), then each rank allocates only its shard and initialises it one full
parameter at a time, keeping its slice.

Initial values do not depend on the layout: parameter `name` is drawn by the model's own `Decoder.init_parameter`
from a generator seeded with (train.seed, name), so a single process and every layout start from the same weights
(on one device type; CPU and CUDA generators differ). Peak memory while initialising: the rank's shard (and the
buffers, built for real by the modules) plus the largest single parameter.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from model.config import ModelConfig, MoEConfig
from model.transformer import Decoder
from parallel.mesh import ParallelContext


def parameter_seed(seed: int, name: str) -> int:
    """A 63-bit seed for parameter `name`, the same on every rank and in every layout."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside create their parameters on the meta device (each is moved there as it is registered, so
    at most one parameter's storage exists at a time, and is never written: initialisation on meta does nothing),
    while their buffers (RoPE tables, router state) are built for real by the modules' own code."""

    def to_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> nn.Parameter | None:
        if param is None or param.is_meta:
            return None
        return nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)

    handle = nn.modules.module.register_module_parameter_registration_hook(to_meta)
    try:
        yield
    finally:
        handle.remove()


def build_model(
    model_cfg: ModelConfig, moe_cfg: MoEConfig, ctx: ParallelContext, seed: int, compile_backend: str | None = None
) -> Decoder:
    """The model for ctx's layout on ctx.device: built with meta parameters, parallelized (its blocks compiled by
    `compile_backend`, if any), then this rank's shard materialised and initialised."""
    from parallel import parallelize

    with parameters_on_meta():
        model = Decoder(model_cfg, moe_cfg)
    parallelize(model, ctx, compile_backend=compile_backend)
    init_local_shards(model, seed, ctx)
    return model


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _slice_of(full: Tensor, param: Tensor) -> Tensor:
    """This rank's part of the full tensor, as a view (no copy). Every sharded parameter is a DTensor (tensor
    parallel, FFN experts on the ep mesh, FSDP shards, and their combinations); the rest are whole."""
    if not isinstance(param, DTensor):
        if param.shape != full.shape:
            raise RuntimeError(f"a plain {tuple(param.shape)} parameter is not the whole {tuple(full.shape)} one")
        return full
    mesh, view = param.device_mesh, full
    coord = mesh.get_coordinate()
    plain, strided = [], []
    for dim, placement in enumerate(param.placements):
        if placement.is_replicate() or mesh.size(dim) == 1:
            continue
        if isinstance(placement, _StridedShard):  # (not a Shard subclass in every torch version: test it first)
            strided.append((dim, placement))
        elif isinstance(placement, Shard):
            plain.append((dim, placement))
        else:
            raise RuntimeError(f"cannot slice a parameter placed as {param.placements}")
    # Shards split in mesh order; a strided shard (FSDP over a dim tensor or expert parallelism already split)
    # splits what the later mesh dims left, so it comes last. Each split is torch.chunk's, as DTensor and FSDP2
    # shard (a rank past the last chunk holds an empty slice).
    for dim, placement in plain + strided[::-1]:
        chunks = view.chunk(mesh.size(dim), dim=placement.dim)
        i = coord[dim]
        view = chunks[i] if i < len(chunks) else view.narrow(placement.dim, 0, 0)
    return view


@torch.no_grad()
def init_local_shards(model: Decoder, seed: int, ctx: ParallelContext) -> None:
    """Allocate this rank's parameters on ctx.device and initialise them from the full parameters, one at a time."""
    device = ctx.device
    with torch.device("meta"):
        full_model = Decoder(model.cfg, model.moe_cfg)  # names, full shapes and init_parameter
    full_shapes = {name: p.shape for name, p in full_model.named_parameters()}
    # to_empty allocates every parameter (the shard) and would leave the buffers uninitialised: keep them.
    buffers = {name: b for name, b in model.named_buffers()}
    model.to_empty(device=device)
    for module_name, module in model.named_modules():
        for name in list(module._buffers):
            if module._buffers[name] is not None:
                module._buffers[name] = buffers[f"{module_name}.{name}" if module_name else name].to(device)
    for name, param in model.named_parameters():
        full = torch.empty(full_shapes[name], dtype=param.dtype, device=device)
        generator = torch.Generator(device=device).manual_seed(parameter_seed(seed, name))
        full_model.init_parameter(name, full, generator)
        local = _local(param)
        part = _slice_of(full, param)
        if part.shape != local.shape:
            raise RuntimeError(f"{name}: slice {tuple(part.shape)} of the full parameter != local {tuple(local.shape)}")
        local.copy_(part)
        del full, part
