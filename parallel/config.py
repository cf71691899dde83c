"""The `parallel:` section of a run config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from model.config import require

DATA_PARALLEL_MODES = ("replicate", "fsdp", "hsdp")


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor parallel (attention heads, dense FFN, vocabulary)
    ep: int = 1  # expert parallel: FFN experts sharded over ep ranks; must divide dp
    pp: int = 1  # pipeline stages
    pp_layers: list[int] | None = None  # decoder blocks per stage, e.g. [3, 2]; null: balanced
    dp: int | None = None  # data parallel; null: WORLD_SIZE / (tp * pp)
    sequence_parallel: bool = False
    # replicate: every dp rank holds the whole state, gradients averaged during the backward pass; fsdp: parameters,
    # gradients and optimizer state sharded over dp (ZeRO-3); hsdp: replicated across groups of dp_shard ranks and
    # sharded within a group. FFN experts are sharded over their expert-data-parallel ranks the same way.
    data_parallel: Literal["replicate", "fsdp", "hsdp"] = "replicate"
    dp_shard: int | None = None  # hsdp: ranks per shard group (e.g. the GPUs of a node); divides dp

    def validate(self) -> None:
        for name in ("tp", "ep", "pp"):
            require(getattr(self, name) >= 1, f"parallel.{name}", f"must be >= 1, got {getattr(self, name)}")
        if self.dp is not None:
            require(self.dp >= 1, "parallel.dp", f"must be >= 1 or null, got {self.dp}")
        require(
            self.data_parallel in DATA_PARALLEL_MODES,
            "parallel.data_parallel",
            f"{self.data_parallel!r} is not one of {', '.join(DATA_PARALLEL_MODES)}",
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
