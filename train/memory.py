"""Memory at start-up and in the logs: the plan of a run's layout against the device it runs on, `python -m train
CONFIG --plan`, and the peak memory of each logging interval.

Device memory: CUDA the device's total memory; CPU the available RAM (MemAvailable in /proc/meminfo) shared by the
ranks of this node (LOCAL_WORLD_SIZE).
"""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from model.config import ConfigError
from parallel.memory import GIB, MemoryPlan, plan_memory
from parallel.mesh import ParallelDims
from train.config import Config, micro_batches_per_step
from train.step import use_bf16_autocast


def plan_for(cfg: Config, world_size: int, device_type: str) -> MemoryPlan:
    """The memory plan of cfg on a world of `world_size` ranks of `device_type` (meta tensors only)."""
    dims = ParallelDims.from_config(cfg.parallel, world_size)
    tc = cfg.train
    return plan_memory(
        cfg.model,
        cfg.moe,
        dims,
        tc.micro_batch_size,
        cfg.data.seq_len,
        micro_batches_per_step(cfg, dims.dp),
        bf16=use_bf16_autocast(torch.device(device_type), tc.dtype),
        cuda=device_type == "cuda",
        checkpointing=tc.activation_checkpointing,
    )


def mem_available(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """Available RAM in bytes (MemAvailable), or None where /proc/meminfo does not say."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def device_capacity(device: torch.device) -> tuple[int | None, str]:
    """(bytes one rank may use, what that is), or (None, why) when unknown."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_properties(index).total_memory, f"total memory of cuda:{index}"
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    available = mem_available()
    if available is None:
        return None, "available RAM unknown (no MemAvailable in /proc/meminfo)"
    share = f" / {ranks} ranks on this node" if ranks > 1 else ""
    return available // ranks, f"available RAM{share}"


def check_fits(plan: MemoryPlan, capacity: int | None, what: str) -> None:
    """One-line ConfigError when the plan's largest rank exceeds `capacity` bytes."""
    peak = plan.peak
    if capacity is None or peak.total <= capacity:
        return
    parts = f"params {peak.params / GIB:.2f} + grads {peak.grads / GIB:.2f} + optimizer {peak.optimizer / GIB:.2f}"
    parts += f" + buffers {peak.buffers / GIB:.2f} + activations {peak.activations / GIB:.2f}"
    raise ConfigError(
        f"parallel: the memory plan needs {peak.total / GIB:.2f} GiB on a rank of pipeline stage {peak.stage} "
        f"({parts}) > {capacity / GIB:.2f} GiB ({what}); shard more (parallel.tp, parallel.pp, parallel.ep, "
        "parallel.data_parallel=fsdp with more parallel.dp), lower train.micro_batch_size or set "
        "train.activation_checkpointing=full (python -m train CONFIG --plan [overrides] shows the plan)"
    )


def planned_world_size(cfg: Config) -> int:
    """--plan: world = parallel.dp x tp x pp (dp null: WORLD_SIZE / (tp x pp) under torchrun, else 1)."""
    p = cfg.parallel
    if p.dp is not None:
        return p.dp * p.tp * p.pp
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world if world % (p.tp * p.pp) == 0 and world > 1 else p.tp * p.pp


def print_plan(cfg: Config, device_gib: float | None = None) -> int:
    """`python -m train CONFIG --plan`: the plan of cfg's layout, and whether it fits (a device of device_gib GiB,
    else this machine's device). Nothing is allocated and no process group starts."""
    device_type = cfg.train.device
    if device_type == "auto":
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    plan = plan_for(cfg, planned_world_size(cfg), device_type)
    print(plan.table())
    if device_gib is not None:
        capacity, what = int(device_gib * GIB), f"{device_gib:g} GiB device (--device-gib)"
    elif device_type == "cuda" and not torch.cuda.is_available():
        capacity, what = None, "no CUDA device here; pass --device-gib to compare"
    else:
        capacity, what = device_capacity(torch.device(device_type))
    peak = plan.peak
    verdict = "?" if capacity is None else ("fits" if peak.total <= capacity else "does NOT fit")
    budget = f"{capacity / GIB:.2f} GiB, " if capacity is not None else ""
    print(f"peak: {peak.total / GIB:.2f} GiB per rank (pipeline stage {peak.stage}); {verdict} ({budget}{what})")
    sys.stdout.flush()
    return 0


class PeakMemory:
    """Peak memory of each logging interval, the largest over all ranks. CUDA: torch's max allocated and max
    reserved bytes since the last reading (the peaks are reset at each reading). CPU: the process's peak resident set
    size (getrusage ru_maxrss), a high-water mark over the process's life that no interval can reset."""

    def __init__(self, device: torch.device, distributed: bool = False) -> None:
        self.device = device
        self.distributed = distributed
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)  # the first interval starts here

    def local(self) -> list[int]:
        if self.device.type == "cuda":
            peak = [torch.cuda.max_memory_allocated(self.device), torch.cuda.max_memory_reserved(self.device)]
            torch.cuda.reset_peak_memory_stats(self.device)
            return peak
        # ru_maxrss is in KiB on Linux, bytes on macOS.
        return [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)]

    def read(self) -> dict[str, float]:
        """{"mem_peak_gib": ..., plus "mem_reserved_gib" on CUDA} for the interval that ends now. A collective when
        distributed (logging intervals only)."""
        values = self.local()
        if self.distributed:
            t = torch.tensor(values, dtype=torch.float64, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            values = t.tolist()  # host-device sync, once per logging interval
        keys = ["mem_peak_gib", "mem_reserved_gib"]
        return {k: v / GIB for k, v in zip(keys, values, strict=False)}
