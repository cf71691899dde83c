"""Synthetic corpus (known entropy), byte-level text fallback, windows and deterministic data-parallel batches."""

import json
from collections import Counter

import numpy as np
import pytest
import torch

from data.config import DataConfig, SyntheticConfig
from data.loader import ShuffledSampler, WindowDataset, build_data
from data.synthetic import SyntheticCorpus
from data.text import EOD_ID, encode_documents, read_documents


def empirical_conditional_entropy(stream: np.ndarray) -> float:
    """H(next | previous) from bigram counts, nats per token."""
    pairs = Counter(zip(stream[:-1].tolist(), stream[1:].tolist(), strict=True))
    prev = Counter(stream[:-1].tolist())
    n = len(stream) - 1
    return -sum(c / n * np.log(c / prev[a]) for (a, _), c in pairs.items())


def test_synthetic_entropy_formula_matches_the_generated_stream():
    corpus = SyntheticCorpus.build(num_words=32, max_tail=5, zipf_exponent=1.0, seed=3)
    stream = corpus.generate(400_000, seed=3)
    assert len(stream) == 400_000 and stream.max() < corpus.vocab_used and stream.min() >= 1
    # The stream is first-order Markov, so the bigram conditional entropy is the entropy rate (up to sampling).
    assert empirical_conditional_entropy(stream) == pytest.approx(corpus.entropy_per_token, rel=0.02)
    # Easy tokens (tails) are fully determined by the previous token.
    tails = ~corpus.is_head(stream[1:])
    successors = {}
    for a, b in zip(stream[:-1][tails].tolist(), stream[1:][tails].tolist(), strict=True):
        assert successors.setdefault(a, b) == b


def test_synthetic_stream_is_deterministic_in_the_seed():
    c1 = SyntheticCorpus.build(16, 3, 1.0, seed=1)
    c2 = SyntheticCorpus.build(16, 3, 1.0, seed=1)
    assert np.array_equal(c1.generate(1000, 5), c2.generate(1000, 5))
    assert not np.array_equal(c1.generate(1000, 5), c1.generate(1000, 6))


def test_text_and_jsonl_byte_fallback(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("first doc\nline two\n\nsecond doc\n")
    docs = read_documents(txt)
    # The newline that ends a document's last line belongs to the blank-line separator (or the end of the file).
    assert docs == ["first doc\nline two", "second doc"]
    tokens = encode_documents(docs)
    assert tokens[len(b"first doc\nline two")] == EOD_ID and tokens[-1] == EOD_ID
    assert bytes(tokens[:9].astype(np.uint8)) == b"first doc"

    jl = tmp_path / "b.jsonl"
    jl.write_text(json.dumps({"text": "héllo"}) + "\n\n" + json.dumps({"text": "x"}) + "\n")
    assert read_documents(jl) == ["héllo", "x"]
    jl.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="b.jsonl:1: no string field 'text'"):
        read_documents(jl)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="empty.txt: no documents"):
        read_documents(empty)


def test_dataset_shorter_than_one_sequence_is_a_one_line_error():
    with pytest.raises(ValueError, match="tiny.txt: 5 tokens is shorter than one sequence of 9"):
        WindowDataset(np.arange(5), seq_len=8, name="tiny.txt")


def test_windows_overlap_by_one_token_and_sampler_covers_each_epoch():
    ds = WindowDataset(np.arange(41), seq_len=8)
    assert len(ds) == 5
    assert ds.window(1).tolist() == list(range(8, 17))
    sampler = ShuffledSampler(len(ds), seed=0)
    epoch0 = [sampler.index(p) for p in range(5)]
    epoch1 = [sampler.index(p) for p in range(5, 10)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(5)) and epoch0 != epoch1


def test_data_parallel_shards_are_disjoint_slices_of_the_same_global_batch():
    data = build_data(
        DataConfig(seq_len=16, synthetic=SyntheticConfig(num_words=8, max_tail=2, num_tokens=20_000)), seed=0
    )
    full = data.global_batch(consumed_samples=32, global_batch_size=8)
    shards = [data.global_batch(32, 8, dp_rank=r, dp_size=4) for r in range(4)]
    assert torch.equal(torch.cat(shards), full)
    again = build_data(
        DataConfig(seq_len=16, synthetic=SyntheticConfig(num_words=8, max_tail=2, num_tokens=20_000)), seed=0
    )
    assert torch.equal(again.global_batch(32, 8), full)  # resumable: a batch depends only on consumed_samples
