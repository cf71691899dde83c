"""The embedded default corpus: tokens of known, mixed difficulty and a known loss floor.

The stream is a sequence of i.i.d. *words*. A word is a head token drawn from a Zipf distribution over
`num_words` heads (hard: entropy H(p)) followed by that head's fixed tail of 0..max_tail tokens (easy: each tail
token, and the token after it, is fully determined by the previous token). Tail tokens are unique to their word,
so the process is first-order Markov and its entropy rate is exactly H(p) / E[word length] nats per token:
the cross-entropy floor a model can reach. A router that learns "easy tokens need no FFN" sends the positions
whose next token is a tail token to zero-computation experts.

Token ids: 0 is reserved (end of document / padding, unused here), heads are 1..num_words, tails follow.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SyntheticCorpus:
    head_probs: np.ndarray  # [W]
    tails: list[np.ndarray]  # tail token ids of each word
    vocab_used: int

    @classmethod
    def build(cls, num_words: int, max_tail: int, zipf_exponent: float, seed: int) -> SyntheticCorpus:
        # The word list depends on the seed only, never on the stream length, so train and valid share it.
        rng = np.random.default_rng([seed, 0])
        ranks = np.arange(1, num_words + 1, dtype=np.float64)
        probs = ranks**-zipf_exponent
        probs /= probs.sum()
        lengths = rng.integers(0, max_tail + 1, size=num_words)
        tails, next_id = [], 1 + num_words
        for n in lengths:
            tails.append(np.arange(next_id, next_id + n, dtype=np.int64))
            next_id += int(n)
        return cls(probs, tails, next_id)

    @property
    def mean_word_length(self) -> float:
        return float(sum(p * (1 + len(t)) for p, t in zip(self.head_probs, self.tails, strict=True)))

    @property
    def entropy_per_token(self) -> float:
        """The entropy rate in nats per token: head entropy spread over the tokens of a word. It is the expected
        cross-entropy of a model that knows the process; one batch's loss scatters around it, also below."""
        p = self.head_probs[self.head_probs > 0]
        return float(-(p * np.log(p)).sum()) / self.mean_word_length

    def is_head(self, tokens: np.ndarray) -> np.ndarray:
        return (tokens >= 1) & (tokens <= len(self.head_probs))

    def generate(self, num_tokens: int, seed: int) -> np.ndarray:
        """A stream of at least num_tokens tokens (int64), deterministic in seed."""
        rng = np.random.default_rng([seed, 1])
        n_words = int(num_tokens / self.mean_word_length * 1.1) + 16
        heads = rng.choice(len(self.head_probs), size=n_words, p=self.head_probs)
        pieces = [np.concatenate(([h + 1], self.tails[h])) for h in heads]
        stream = np.concatenate(pieces)
        while len(stream) < num_tokens:  # astronomically rare with the 10% margin; kept for correctness
            stream = np.concatenate([stream, self.generate(num_tokens - len(stream), seed + 1)])
        return stream[:num_tokens]
