"""The `parallel:` section of a run config."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from model.config import require

DEFAULT_TIMEOUT_S = 600.0
DATA_PARALLEL_MODES = ("replicate", "fsdp", "hsdp")
MIXED_PRECISION = ("auto", "bf16", "fp32")


@dataclass
class ParallelConfig:
    """`parallel:` the layout over processes: world = dp x tp x pp, experts over ep ranks."""

    tp: int = 1  # tensor parallel (attention heads, dense FFN, vocabulary)
    ep: int = 1  # expert parallel: FFN experts sharded over ep ranks; must divide dp
    pp: int = 1  # pipeline stages
    pp_layers: list[int] | None = None  # decoder blocks per stage, e.g. [3, 2]; null: balanced
    dp: int | None = None  # data parallel; null: WORLD_SIZE / (tp * pp)
    sequence_parallel: bool = False  # with tp > 1: norms and residuals split over the sequence too (Megatron SP)
    # Seconds any rank waits for the others in a collective, and for a checkpoint's background write, before the
    # run fails (gloo raises; NCCL's watchdog aborts the process) instead of hanging.
    timeout_s: float = DEFAULT_TIMEOUT_S
    # replicate: every dp rank holds the whole state, gradients averaged during the backward pass; fsdp: parameters,
    # gradients and optimizer state sharded over dp (ZeRO-3); hsdp: replicated across groups of dp_shard ranks and
    # sharded within a group. FFN experts are sharded over their expert-data-parallel ranks the same way.
    data_parallel: Literal["replicate", "fsdp", "hsdp"] = "replicate"
    dp_shard: int | None = None  # hsdp: ranks per shard group (e.g. the GPUs of a node); divides dp
    reshard_after_forward: bool = True  # fsdp/hsdp: free gathered parameters after forward; false: ZeRO-2-like
    # bf16: bf16 parameters for compute, fp32 master weights, optimizer state and gradient reduction (needs bf16
    # autocast, train.dtype); fp32: everything fp32; auto: bf16 on CUDA, fp32 on CPU. Applies wherever
    # parameters are managed by data parallelism (dp > 1, or fsdp/hsdp on one rank).
    mixed_precision: Literal["auto", "bf16", "fp32"] = "auto"

    def validate(self) -> None:
        for name in ("tp", "ep", "pp"):
            require(getattr(self, name) >= 1, f"parallel.{name}", f"must be >= 1, got {getattr(self, name)}")
        require(
            math.isfinite(self.timeout_s) and self.timeout_s > 0,
            "parallel.timeout_s",
            f"must be a positive number of seconds, got {self.timeout_s}",
        )
        if self.dp is not None:
            require(self.dp >= 1, "parallel.dp", f"must be >= 1 or null, got {self.dp}")
        require(
            self.data_parallel in DATA_PARALLEL_MODES,
            "parallel.data_parallel",
            f"{self.data_parallel!r} is not one of {', '.join(DATA_PARALLEL_MODES)}",
        )
        require(
            self.mixed_precision in MIXED_PRECISION,
            "parallel.mixed_precision",
            f"{self.mixed_precision!r} is not one of {', '.join(MIXED_PRECISION)}",
        )
        if self.data_parallel == "hsdp":
            require(
                self.dp_shard is not None,
                "parallel.dp_shard",
                "hsdp needs the shard group size; set parallel.dp_shard (e.g. the GPUs of one node)",
            )
            require(self.dp_shard >= 1, "parallel.dp_shard", f"must be >= 1, got {self.dp_shard}")
        else:
            require(
                self.dp_shard is None,
                "parallel.dp_shard",
                f"only used with parallel.data_parallel=hsdp (this run is {self.data_parallel}); remove it",
            )
