"""Blending several datasets by weight, with random access by sample position.

A fixed schedule of PERIOD slots says which dataset each global sample position draws from. Dataset k gets
n_k = round(w_k * PERIOD) slots (largest remainder, at least one for every positive weight) and its slots are
spread evenly over the period (the j-th at (j + 0.5) / n_k), so every prefix of the stream - every global batch,
not just the whole run - holds each dataset within about one sample of its share. Position p is period
p // PERIOD, slot p % PERIOD: O(1) lookup, so a resumed run jumps straight to consumed_samples.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PERIOD = 1 << 16


class BlendSchedule:
    def __init__(self, weights: Sequence[float], period: int = PERIOD) -> None:
        w = np.asarray(weights, dtype=np.float64)
        if len(w) == 0 or not np.all(w > 0) or not np.all(np.isfinite(w)):
            raise ValueError(f"blend weights must be positive and finite, got {list(weights)}")
        if len(w) > period:
            raise ValueError(f"cannot blend {len(w)} datasets with a period of {period} slots")
        self.period = period
        self.counts = _largest_remainder(w / w.sum(), period)
        # Slot times (j + 0.5) / n_k for every dataset, merged in time order; ties go to the lower dataset index.
        dataset = np.repeat(np.arange(len(w)), self.counts)
        within = np.concatenate([np.arange(n) for n in self.counts])
        times = (within + 0.5) / self.counts[dataset]
        order = np.lexsort((dataset, times))
        self._dataset = dataset[order]
        self._within = within[order]

    @property
    def shares(self) -> np.ndarray:
        """The long-run fraction of samples each dataset contributes (weights rounded to 1/period)."""
        return self.counts / self.period

    def locate(self, position: int) -> tuple[int, int]:
        """Global sample position -> (dataset index, that dataset's own sample number)."""
        cycle, slot = divmod(position, self.period)
        k = int(self._dataset[slot])
        return k, cycle * int(self.counts[k]) + int(self._within[slot])


def _largest_remainder(shares: np.ndarray, total: int) -> np.ndarray:
    exact = shares * total
    counts = np.maximum(np.floor(exact).astype(np.int64), 1)
    while counts.sum() < total:
        counts[np.argmax(exact - counts)] += 1
    while counts.sum() > total:  # only when the "at least one" floor pushed it over
        counts[np.argmax(np.where(counts > 1, counts - exact, -np.inf))] -= 1
    return counts
