"""Process groups for a torchrun world: world = pp x dp x tp, and dp = edp x ep (experts sharded over ep ranks,
replicated over the edp = dp / ep expert-data-parallel replicas).

Rank layout (tp fastest, as in Megatron): rank = ((pp_i * edp + edp_i) * ep + ep_i) * tp + tp_i, and the
data-parallel index is dp_i = edp_i * ep + ep_i, so an expert-parallel group is ep consecutive data-parallel ranks.
gloo on CPU and NCCL on CUDA are chosen from the device; the code paths are the same.

Data parallelism splits dp = dp_replicate x dp_shard (dp_i = replica_i * dp_shard + shard_i): replicate is
(dp, 1), fsdp (1, dp), hsdp (dp / dp_shard, dp_shard). Experts split their edp replicas the same way,
edp = edp_replicate x edp_shard with edp_shard = dp_shard / ep, so an expert-parallel group lies inside a shard
group and the experts of a layer are sharded over the ranks that hold their replicas.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from model.config import ConfigError, require
from parallel.config import DEFAULT_TIMEOUT_S, ParallelConfig


class CollectiveError(RuntimeError):
    """A rank gave up waiting for the other ranks (parallel.timeout_s passed, or a peer died) or for its own
    background checkpoint write. The message is one line naming what was waited for."""


@dataclass(frozen=True)
class ParallelDims:
    tp: int
    ep: int
    pp: int
    dp: int
    sp: bool = False  # sequence parallelism over the tp group
    pp_layers: tuple[int, ...] | None = None  # blocks per pipeline stage; None: balanced
    data_parallel: str = "replicate"  # replicate | fsdp | hsdp
    dp_shard: int = 1  # data-parallel ranks that shard one copy of the state (replicate: 1, fsdp: dp)
    reshard_after_forward: bool = True
    mixed_precision: str = "auto"  # auto | bf16 | fp32 (resolved against the device by parallel/data_parallel.py)

    @property
    def edp(self) -> int:
        return self.dp // self.ep

    @property
    def dp_replicate(self) -> int:
        return self.dp // self.dp_shard

    @property
    def edp_shard(self) -> int:
        """Expert-data-parallel ranks that shard one copy of an expert (the rest replicate it)."""
        return self.dp_shard // self.ep if self.data_parallel != "replicate" else 1

    @property
    def sharded(self) -> bool:
        """Whether parameters are managed by FSDP: any dp > 1, and fsdp/hsdp even on one rank (mixed precision).
        replicate on one rank keeps plain tensors."""
        return self.dp > 1 or self.data_parallel != "replicate"

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.tp

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int) -> ParallelDims:
        """Validate parallel.* against WORLD_SIZE; dp defaults to WORLD_SIZE / (tp * pp)."""
        cfg.validate()
        model_parallel = cfg.tp * cfg.pp
        require(
            world_size % model_parallel == 0,
            "parallel.tp",
            f"tp x pp = {cfg.tp} x {cfg.pp} = {model_parallel} does not divide WORLD_SIZE={world_size}; "
            "change tp/pp or the number of processes",
        )
        dp = cfg.dp if cfg.dp is not None else world_size // model_parallel
        require(
            dp * model_parallel == world_size,
            "parallel.dp",
            f"pp x dp x tp = {cfg.pp} x {dp} x {cfg.tp} = {dp * model_parallel} != WORLD_SIZE={world_size}; "
            "set parallel.dp to null to derive it",
        )
        require(
            dp % cfg.ep == 0,
            "parallel.ep",
            f"ep={cfg.ep} does not divide dp={dp} (experts are sharded over data-parallel ranks); "
            "use an ep that divides WORLD_SIZE / (tp x pp)",
        )
        sp = cfg.sequence_parallel and cfg.tp > 1
        if cfg.pp > 1 and sp:
            raise ConfigError("parallel.sequence_parallel: not supported together with pipeline parallelism (pp > 1)")
        dp_shard = {"replicate": 1, "fsdp": dp}.get(cfg.data_parallel, cfg.dp_shard)
        if cfg.data_parallel == "hsdp":
            require(
                dp % dp_shard == 0,
                "parallel.dp_shard",
                f"{dp_shard} does not divide dp={dp}; use a shard group size that divides dp",
            )
            require(
                dp_shard % cfg.ep == 0,
                "parallel.ep",
                f"ep={cfg.ep} does not divide parallel.dp_shard={dp_shard} (hsdp keeps each expert-parallel group "
                "inside a shard group); use an ep that divides dp_shard, or data_parallel=fsdp",
            )
        layers = tuple(cfg.pp_layers) if cfg.pp_layers else None
        return cls(
            tp=cfg.tp,
            ep=cfg.ep,
            pp=cfg.pp,
            dp=dp,
            sp=sp,
            pp_layers=layers,
            data_parallel=cfg.data_parallel,
            dp_shard=dp_shard,
            reshard_after_forward=cfg.reshard_after_forward,
            mixed_precision=cfg.mixed_precision,
        )


@dataclass
class ParallelContext:
    """Where this rank sits. Groups are None in a single process (every size is 1)."""

    dims: ParallelDims
    rank: int
    device: torch.device
    mesh: DeviceMesh | None = None  # (pp, edp, ep, tp)
    # Meshes made from `mesh` and kept here (slicing a flattened dimension from the root mesh is deprecated):
    # "dp" (edp x ep flattened), "dense" and "expert" (what data parallelism shards dense parameters and FFN
    # experts over: 1-D for fsdp, (replicate, shard) for replicate and hsdp).
    meshes: dict[str, DeviceMesh] = field(default_factory=dict)
    # How long a rank waits for the others (every process group's timeout) or for a background checkpoint write.
    timeout_s: float = DEFAULT_TIMEOUT_S
    _groups: dict[str, dist.ProcessGroup] = field(default_factory=dict, repr=False, compare=False)

    @property
    def distributed(self) -> bool:
        return self.mesh is not None

    def _coord(self, name: str) -> int:
        return 0 if self.mesh is None else self.mesh.get_local_rank(name)

    @property
    def tp_rank(self) -> int:
        return self._coord("tp")

    @property
    def ep_rank(self) -> int:
        return self._coord("ep")

    @property
    def pp_rank(self) -> int:
        return self._coord("pp")

    @property
    def dp_rank(self) -> int:
        return self._coord("edp") * self.dims.ep + self._coord("ep")

    def group(self, name: str) -> dist.ProcessGroup | None:
        """name: tp, ep, edp or dp."""
        if self.mesh is None:
            return None
        # Cached: slicing a DeviceMesh computes on its rank tensor every time, and GradSync asks every step.
        if name not in self._groups:
            self._groups[name] = (self.meshes[name] if name in self.meshes else self.mesh[name]).get_group()
        return self._groups[name]

    @property
    def tp_mesh(self) -> DeviceMesh | None:
        return None if self.mesh is None else self.mesh["tp"]

    @property
    def is_logging_rank(self) -> bool:
        return self.rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.dims.pp - 1


def world_from_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) as set by torchrun; a plain `python` run is a world of one."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init_parallel(cfg: ParallelConfig, device_type: str) -> ParallelContext:
    """Validate sizes, start the process group (gloo on CPU, NCCL on CUDA) and build the device mesh."""
    rank, local_rank, world_size = world_from_env()
    dims = ParallelDims.from_config(cfg, world_size)
    device = torch.device(device_type, local_rank) if device_type == "cuda" else torch.device(device_type)
    if world_size == 1 and not dims.sharded:
        return ParallelContext(dims, 0, device, timeout_s=cfg.timeout_s)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=cfg.timeout_s)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if world_size == 1:  # fsdp/hsdp on one rank (mixed precision): a group of one, no rendezvous needed
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            dist.init_process_group(backend, timeout=timeout)
    mesh, meshes = build_mesh(dims, device.type)
    # The mesh's sub-groups get torch's default timeout (30 min gloo, 10 min NCCL), not init_process_group's; set
    # it on each as torchtitan does. _set_pg_timeout is private but present in every supported torch (>= 2.3).
    groups = [mesh[name].get_group() for name in ("pp", "edp", "ep", "tp")]
    groups += [m.get_group(dim) for m in meshes.values() for dim in range(m.ndim)]
    for group in {id(g): g for g in groups}.values():
        dist.distributed_c10d._set_pg_timeout(timeout, group)
    dist.distributed_c10d._set_pg_timeout(timeout, None)  # an already-initialised default group, too
    return ParallelContext(dims, rank, device, mesh, meshes, cfg.timeout_s)


def build_mesh(dims: ParallelDims, device_type: str) -> tuple[DeviceMesh, dict[str, DeviceMesh]]:
    """The (pp, edp, ep, tp) mesh and the data-parallel meshes made from it (see ParallelContext.meshes)."""
    mesh = init_device_mesh(
        device_type, (dims.pp, dims.edp, dims.ep, dims.tp), mesh_dim_names=("pp", "edp", "ep", "tp")
    )
    # The data-parallel group spans edp x ep (_flatten is how torchtitan names a merged dimension too).
    dp = mesh["edp", "ep"]._flatten("dp")
    edp = mesh["edp"]
    meshes = {"dp": dp}
    if dims.data_parallel == "fsdp":
        meshes["dense"], meshes["expert"] = dp, edp
    else:  # FSDP2 reads a 2-D mesh as (replicate, shard); replicate is a shard group of one
        meshes["dense"] = dp._unflatten(0, (dims.dp_replicate, dims.dp_shard), ("dp_replicate", "dp_shard"))
        edp_replicate = dims.edp // dims.edp_shard
        meshes["expert"] = edp._unflatten(0, (edp_replicate, dims.edp_shard), ("edp_replicate", "edp_shard"))
    return mesh, meshes
