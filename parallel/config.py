"""The `parallel:` section of a run config."""

from __future__ import annotations

from dataclasses import dataclass

from model.config import require


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor parallel (attention heads, dense FFN, vocabulary)
    ep: int = 1  # expert parallel: FFN experts sharded over ep ranks; must divide dp
    pp: int = 1  # pipeline stages
    pp_layers: list[int] | None = None  # decoder blocks per stage, e.g. [3, 2]; null: balanced
    dp: int | None = None  # data parallel; null: WORLD_SIZE / (tp * pp)
    sequence_parallel: bool = False

    def validate(self) -> None:
        for name in ("tp", "ep", "pp"):
            require(getattr(self, name) >= 1, f"parallel.{name}", f"must be >= 1, got {getattr(self, name)}")
        if self.dp is not None:
            require(self.dp >= 1, "parallel.dp", f"must be >= 1 or null, got {self.dp}")
