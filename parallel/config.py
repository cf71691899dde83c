"""The `parallel:` section of a run config."""

from __future__ import annotations

import math
from dataclasses import dataclass

from model.config import require

DEFAULT_TIMEOUT_S = 600.0


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
