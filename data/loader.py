"""Token streams -> (seq_len + 1)-token windows -> deterministic, resumable, data-parallel batches.

A batch is addressed by `consumed_samples` (how many windows the whole run has used), so resuming, or changing
the data-parallel size, continues the same sample sequence: rank r of dp takes its slice of every global batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from data.synthetic import SyntheticCorpus
from data.text import encode_documents, read_documents


class WindowDataset:
    """Non-overlapping windows of seq_len + 1 tokens (the last token of one window starts the next)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, name: str = "dataset") -> None:
        if len(tokens) < seq_len + 1:
            raise ValueError(
                f"{name}: {len(tokens)} tokens is shorter than one sequence of {seq_len + 1}; "
                "use more data or a smaller data.seq_len"
            )
        self.tokens = tokens
        self.seq_len = seq_len

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def window(self, idx: int) -> np.ndarray:
        start = idx * self.seq_len
        return self.tokens[start : start + self.seq_len + 1]


class ShuffledSampler:
    """Sample position p -> window index, through a fresh permutation per epoch derived from the seed."""

    def __init__(self, num_samples: int, seed: int) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self._epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def index(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_samples)
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            self._epoch = epoch
        return int(self._perm[offset])


@dataclass
class TrainData:
    train: WindowDataset
    valid: WindowDataset
    sampler: ShuffledSampler
    corpus: SyntheticCorpus | None  # set for the synthetic corpus: knows the loss floor and easy tokens

    def global_batch(
        self, consumed_samples: int, global_batch_size: int, dp_rank: int = 0, dp_size: int = 1
    ) -> torch.Tensor:
        """This data-parallel rank's share of the global batch starting at consumed_samples: [G/dp, seq_len+1]."""
        per_rank = global_batch_size // dp_size
        start = consumed_samples + dp_rank * per_rank
        rows = [self.train.window(self.sampler.index(start + i)) for i in range(per_rank)]
        return torch.from_numpy(np.stack(rows))

    def valid_batches(self, batch_size: int, num_batches: int) -> list[torch.Tensor]:
        """Fixed validation batches (the first windows of the held-out stream), the same at every evaluation."""
        count = min(len(self.valid), batch_size * num_batches)
        rows = np.stack([self.valid.window(i) for i in range(count)])
        return [torch.from_numpy(rows[i : i + batch_size]) for i in range(0, count, batch_size)]


def build_data(data_cfg, seed: int) -> TrainData:
    """From the `data:` section: the synthetic corpus (data.path null) or a byte-tokenised text/JSONL file."""
    seq_len = data_cfg.seq_len
    if data_cfg.path is None:
        s = data_cfg.synthetic
        corpus = SyntheticCorpus.build(s.num_words, s.max_tail, s.zipf_exponent, seed)
        train_tokens = corpus.generate(s.num_tokens, seed)
        valid_tokens = corpus.generate(max(int(s.num_tokens * data_cfg.valid_fraction), 64 * (seq_len + 1)), seed + 1)
    else:
        corpus = None
        docs = read_documents(data_cfg.path, data_cfg.jsonl_key)
        n_valid = int(len(docs) * data_cfg.valid_fraction)
        if n_valid == 0 or n_valid == len(docs):
            # Too few documents to split by document: hold out the stream's tail instead.
            tokens = encode_documents(docs)
            cut = max(len(tokens) - max(int(len(tokens) * max(data_cfg.valid_fraction, 0.01)), seq_len + 1), 0)
            train_tokens, valid_tokens = tokens[:cut], tokens[cut:]
        else:
            train_tokens, valid_tokens = encode_documents(docs[:-n_valid]), encode_documents(docs[-n_valid:])
    train = WindowDataset(train_tokens, seq_len, name=data_cfg.path or "synthetic corpus")
    valid = WindowDataset(valid_tokens, seq_len, name=f"{data_cfg.path or 'synthetic corpus'} (validation split)")
    return TrainData(train, valid, ShuffledSampler(len(train), seed), corpus)
