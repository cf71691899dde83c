"""Token streams -> (seq_len + 1)-token windows -> deterministic, resumable, data-parallel batches.

A batch is addressed by `consumed_samples` (how many windows the whole run has used), so resuming, or changing
the data-parallel size, continues the same sample sequence: rank r of dp takes its slice of every global batch.
Only data-parallel ranks differ; tensor/expert-parallel ranks of one replica pass the same dp_rank and get the
same rows. Global position p -> (dataset, sample number) by the blend schedule -> window through that dataset's
seeded per-epoch permutation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from data.blend import BlendSchedule
from data.errors import DataError
from data.sources import check_token_ids, load_stream, split_by_document
from data.synthetic import SyntheticCorpus


class WindowDataset:
    """Non-overlapping windows of seq_len + 1 tokens (the last token of one window starts the next). Windows run
    across document boundaries: the EOD token between documents is an ordinary token of the stream."""

    def __init__(self, tokens: np.ndarray, seq_len: int, name: str = "dataset") -> None:
        if len(tokens) < seq_len + 1:
            raise DataError(
                f"{name}: {len(tokens)} tokens is shorter than one sequence of {seq_len + 1}; "
                "use more data or a smaller data.seq_len"
            )
        self.tokens = tokens
        self.seq_len = seq_len
        self.name = name

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def window(self, idx: int) -> np.ndarray:
        start = idx * self.seq_len
        return self.tokens[start : start + self.seq_len + 1]


class ShuffledSampler:
    """Sample number -> window index, through a fresh permutation per epoch derived from the seed (and `stream`,
    which gives each blended dataset its own order)."""

    def __init__(self, num_samples: int, seed: int, stream: tuple[int, ...] = ()) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.stream = stream
        self._epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def index(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_samples)
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, *self.stream, epoch]).permutation(self.num_samples)
            self._epoch = epoch
        return int(self._perm[offset])


@dataclass
class TrainData:
    train: list[WindowDataset]
    valid: list[WindowDataset]
    schedule: BlendSchedule
    samplers: list[ShuffledSampler]
    corpus: SyntheticCorpus | None  # set for the synthetic corpus: knows its entropy and easy tokens
    names: list[str] = field(default_factory=list)

    def sample(self, position: int) -> np.ndarray:
        """The window at global sample position `position` of the run."""
        k, n = self.schedule.locate(position)
        return self.train[k].window(self.samplers[k].index(n))

    def global_batch(
        self, consumed_samples: int, global_batch_size: int, dp_rank: int = 0, dp_size: int = 1
    ) -> torch.Tensor:
        """This data-parallel rank's share of the global batch starting at consumed_samples: [G/dp, seq_len+1]."""
        per_rank = global_batch_size // dp_size
        start = consumed_samples + dp_rank * per_rank
        rows = np.stack([self.sample(start + i) for i in range(per_rank)])
        return torch.from_numpy(rows.astype(np.int64, copy=False))

    def valid_batches(self, batch_size: int, num_batches: int) -> list[torch.Tensor]:
        """Fixed validation batches, the same at every evaluation: the held-out windows in blend proportions."""
        count = min(sum(len(v) for v in self.valid), batch_size * num_batches)
        rows: list[np.ndarray] = []
        # One period beyond `count` gives every dataset with held-out windows left another turn; a dataset whose
        # few held-out windows are used up simply stops contributing.
        for position in range(count + self.schedule.period):
            if len(rows) == count:
                break
            k, n = self.schedule.locate(position)
            if n < len(self.valid[k]):
                rows.append(self.valid[k].window(n))
        stacked = np.stack(rows).astype(np.int64, copy=False)
        return [torch.from_numpy(stacked[i : i + batch_size]) for i in range(0, len(rows), batch_size)]


def dataset_entries(data_cfg: Any) -> list[tuple[str, float]]:
    """(path, weight) of every configured dataset: data.path alone, or the data.datasets list."""
    if data_cfg.path is not None:
        return [(data_cfg.path, 1.0)]
    return [(d.path, d.weight) for d in data_cfg.datasets]


def build_data(data_cfg: Any, seed: int, vocab_size: int | None = None) -> TrainData:
    """From the `data:` section: the synthetic corpus (no path, no datasets), or one or more datasets, each a
    byte-level .txt/.jsonl file or an indexed dataset prefix, blended by weight. With vocab_size, every dataset's
    token ids are checked against it as the dataset is opened."""
    seq_len = data_cfg.seq_len
    entries = dataset_entries(data_cfg)
    if not entries:
        s = data_cfg.synthetic
        corpus = SyntheticCorpus.build(s.num_words, s.max_tail, s.zipf_exponent, seed)
        train_tokens = corpus.generate(s.num_tokens, seed)
        valid_tokens = corpus.generate(max(int(s.num_tokens * data_cfg.valid_fraction), 64 * (seq_len + 1)), seed + 1)
        train = [WindowDataset(train_tokens, seq_len, name="synthetic corpus")]
        valid = [WindowDataset(valid_tokens, seq_len, name="synthetic corpus (validation)")]
        return TrainData(train, valid, BlendSchedule([1.0]), [ShuffledSampler(len(train[0]), seed)], corpus)
    train, valid, names = [], [], []
    for path, _ in entries:
        stream = load_stream(path, data_cfg.jsonl_key)
        if vocab_size is not None:
            check_token_ids(stream, vocab_size)
        train_tokens, valid_tokens = split_by_document(stream, data_cfg.valid_fraction, seq_len)
        train.append(WindowDataset(train_tokens, seq_len, name=stream.name))
        valid.append(WindowDataset(valid_tokens, seq_len, name=f"{stream.name} (validation split)"))
        names.append(stream.name)
    # One dataset keeps the single-stream order (seed, epoch); blended datasets each get their own stream.
    samplers = [ShuffledSampler(len(t), seed, stream=() if len(train) == 1 else (k,)) for k, t in enumerate(train)]
    return TrainData(train, valid, BlendSchedule([w for _, w in entries]), samplers, None, names)
