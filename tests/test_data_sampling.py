"""Indexed datasets in training: document split, packing, blending, restarts, data-parallel shards, config errors.

Datasets are written directly with IndexedDatasetWriter in tmp_path, with token ids that say where they came from.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from data.blend import BlendSchedule
from data.config import DataConfig, DatasetConfig
from data.indexed import IndexedDatasetWriter
from data.loader import build_data
from data.sources import TokenStream, split_by_document
from model.config import ConfigError
from train.config_load import load_config

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml"


def write_dataset(prefix, doc_lengths, first_token=0, dtype=np.int32):
    """Documents whose tokens count up from first_token across the whole dataset (so a token is its position)."""
    with IndexedDatasetWriter(prefix, dtype) as w:
        start = first_token
        for n in doc_lengths:
            w.add_document(np.arange(start, start + n))
            start += n
    return str(prefix)


def test_split_is_by_document_and_both_sides_hold_a_window():
    tokens = np.arange(1000)
    ends = np.array([100, 250, 400, 600, 610, 620, 1000])
    train, valid = split_by_document(TokenStream("s", tokens, ends), valid_fraction=0.3, seq_len=16)
    # ceil(0.3 * 7) = 3 held-out documents start at token 600: no document is on both sides.
    assert len(train) == 600 and valid[0] == 600 and len(valid) == 400
    # Held-out documents shorter than a window: more documents move to validation.
    train, valid = split_by_document(TokenStream("s", tokens, ends), valid_fraction=0.1, seq_len=390)
    assert len(train) == 600 and len(valid) == 400
    # A single document cannot be split at a boundary: its tail is held out.
    train, valid = split_by_document(TokenStream("s", tokens, np.array([1000])), valid_fraction=0.01, seq_len=16)
    assert len(train) == 983 and len(valid) == 17
    with pytest.raises(ValueError, match=r"^tiny: 20 tokens is shorter than two sequences of 17 .* data\.seq_len$"):
        split_by_document(TokenStream("tiny", np.arange(20), np.array([20])), 0.1, 16)


def test_too_short_or_empty_datasets_are_one_line_errors(tmp_path):
    short = write_dataset(tmp_path / "short", [30, 40])
    with pytest.raises(ValueError, match=rf"^{short}: 70 tokens is shorter than two sequences of 65 "):
        build_data(DataConfig(path=short, seq_len=64), seed=0)
    with IndexedDatasetWriter(tmp_path / "empty", np.uint16):
        pass  # a valid file pair with no documents
    with pytest.raises(ValueError, match=r"empty: the indexed dataset has no tokens; rebuild it"):
        build_data(DataConfig(path=str(tmp_path / "empty"), seq_len=8), seed=0)


def test_windows_pack_across_document_boundaries(tmp_path):
    prefix = write_dataset(tmp_path / "ds", [5, 3, 30, 7, 60, 40, 55])
    data = build_data(DataConfig(path=prefix, seq_len=8, valid_fraction=0.2), seed=0)
    # Every window is 9 consecutive positions of the stream (documents back to back, EOD included by the writer).
    for w in range(len(data.train[0])):
        row = data.train[0].window(w)
        assert row.tolist() == list(range(w * 8, w * 8 + 9))
    batch = data.global_batch(0, 4)
    assert batch.dtype == torch.int64 and batch.shape == (4, 9)
    assert all(torch.equal(r, torch.arange(r[0], r[0] + 9)) for r in batch)


def test_blend_schedule_is_within_one_percent_at_every_scale():
    schedule = BlendSchedule([5.0, 3.0, 2.0])  # relative weights
    n = 100_000
    picks = np.array([schedule.locate(p)[0] for p in range(n)])
    shares = np.bincount(picks, minlength=3) / n
    assert np.allclose(shares, [0.5, 0.3, 0.2], rtol=0.01)
    # Every global batch of 20 already holds the exact mix (10 / 6 / 4) up to one sample.
    counts = np.stack([np.bincount(picks[i : i + 20], minlength=3) for i in range(0, 2000, 20)])
    assert np.abs(counts - [10, 6, 4]).max() <= 1
    # Each dataset's own sample numbers run 0, 1, 2, ... without gaps or repeats, across periods too.
    for k in range(3):
        numbers = [schedule.locate(p)[1] for p in range(3 * schedule.period) if picks[p % n] == k][:50]
        assert numbers == list(range(50))
    late = [schedule.locate(p) for p in range(5 * schedule.period, 5 * schedule.period + 1000)]
    assert np.allclose(np.bincount([k for k, _ in late], minlength=3) / 1000, [0.5, 0.3, 0.2], atol=0.01)
    tiny = BlendSchedule([1.0, 1e-9])
    assert tiny.counts.tolist() == [tiny.period - 1, 1]  # a positive weight is never rounded away


def test_blended_training_stream_follows_the_weights(tmp_path):
    # Dataset k's tokens are k * 10_000 + position, so a window names its dataset.
    paths = [write_dataset(tmp_path / f"d{k}", [50] * 40, first_token=k * 10_000) for k in range(3)]
    entries = [DatasetConfig(p, w) for p, w in zip(paths, [0.6, 0.3, 0.1], strict=True)]
    cfg = DataConfig(datasets=entries, seq_len=16, valid_fraction=0.1)
    data = build_data(cfg, seed=7)
    rows = torch.cat([data.global_batch(c, 64) for c in range(0, 20_000, 64)])
    shares = np.bincount((rows[:, 0] // 10_000).numpy(), minlength=3) / len(rows)
    assert np.allclose(shares, [0.6, 0.3, 0.1], rtol=0.01)
    valid = torch.cat(data.valid_batches(batch_size=10, num_batches=1))
    assert valid.shape == (10, 17) and (valid[:, 0] // 10_000).tolist().count(0) == 6


def test_same_sequence_stream_after_a_restart_and_with_another_dp_size(tmp_path):
    paths = [write_dataset(tmp_path / f"d{k}", [37, 91, 12, 60] * 5, first_token=k * 10_000) for k in range(2)]
    cfg = DataConfig(datasets=[DatasetConfig(paths[0], 2.0), DatasetConfig(paths[1], 1.0)], seq_len=8)
    gbs, steps = 8, 40  # several epochs of both datasets
    first = build_data(cfg, seed=3)
    reference = [first.global_batch(s * gbs, gbs) for s in range(steps)]
    # "Restart" at step 17 from consumed_samples alone, in a fresh process state, now with 2 and 4 dp ranks.
    for dp in (1, 2, 4):
        resumed = build_data(cfg, seed=3)
        for s in range(17, steps):
            shards = [resumed.global_batch(s * gbs, gbs, dp_rank=r, dp_size=dp) for r in range(dp)]
            assert torch.equal(torch.cat(shards), reference[s])
    other_seed = build_data(cfg, seed=4)
    assert not torch.equal(other_seed.global_batch(0, gbs), reference[0])


def test_dp_shards_are_disjoint_and_cover_every_window_each_epoch(tmp_path):
    prefix = write_dataset(tmp_path / "ds", [33, 7, 120, 64, 81, 95] * 4)
    data = build_data(DataConfig(path=prefix, seq_len=8, valid_fraction=0.1), seed=11)
    n_windows = len(data.train[0])
    gbs, dp = 8, 4
    assert n_windows % gbs != 0  # epochs do not align with batches: the sampler must still cover each epoch
    for epoch in range(2):
        seen = []
        for position in range(epoch * n_windows, (epoch + 1) * n_windows - gbs + 1, gbs):
            per_rank = [data.global_batch(position, gbs, r, dp) for r in range(dp)]
            starts = [set((b[:, 0] // 8).tolist()) for b in per_rank]
            assert all(a.isdisjoint(b) for i, a in enumerate(starts) for b in starts[i + 1 :])
            seen += [w for b in per_rank for w in (b[:, 0] // 8).tolist()]
        tail = [data.sample(p)[0] // 8 for p in range(epoch * n_windows + len(seen), (epoch + 1) * n_windows)]
        assert sorted(seen + [int(t) for t in tail]) == list(range(n_windows))


@pytest.mark.slow
def test_training_runs_on_an_indexed_dataset_with_a_tokenizer(tmp_path):
    from data.preprocess import preprocess
    from tests.test_data_pipeline import make_docs, write_text
    from tools.train_tokenizer import train_tokenizer
    from train.trainer import run

    corpus = write_text(tmp_path / "c.txt", make_docs(300, seed=0))
    model = train_tokenizer([corpus], tmp_path / "tok", vocab_size=340)
    preprocess([corpus], model, tmp_path / "ds", progress=False)
    overrides = [
        f"data.path={tmp_path / 'ds'}",
        f"data.tokenizer={model}",
        "data.seq_len=32",
        "data.valid_fraction=0.05",
        "model.num_layers=1",
        "train.max_steps=2",
        "train.eval_interval=2",
        "train.eval_batches=1",
        "logging.interval=1",
        "logging.progress_bar=false",
        f"train.run_dir={tmp_path / 'run'}",
    ]
    cfg = load_config(TINY, overrides)
    record = run(cfg)
    assert record["step"] == 2 and np.isfinite(record["val_loss"])
    with pytest.raises(ConfigError, match=r"^data\.tokenizer: vocabulary of 340 tokens > model\.vocab_size=300; "):
        load_config(TINY, [*overrides, "model.vocab_size=300"])


def config_error(overrides, tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"train.run_dir={tmp_path}", *overrides])
    message = str(e.value)
    assert "\n" not in message
    return message


def test_data_config_errors_name_the_key_and_the_fix(tmp_path):
    good = write_dataset(tmp_path / "good", [40] * 5, dtype=np.uint16)
    msg = config_error([f"data.datasets=[{{path: {good}}}, {{path: {tmp_path}/nope, weight: 2}}]"], tmp_path)
    assert msg.startswith(f"data.datasets[1].path: {tmp_path}/nope.idx does not exist; build the dataset with")
    msg = config_error([f"data.datasets=[{{path: {good}, weight: 0}}]"], tmp_path)
    assert msg == "data.datasets[0].weight: must be positive, got 0.0"
    msg = config_error([f"data.datasets=[{{path: {good}, weight: heavy}}]"], tmp_path)
    assert msg == "data.datasets[0].weight: expected a number, got 'heavy'"
    msg = config_error([f"data.datasets={{path: {good}}}"], tmp_path)
    assert msg.startswith("data.datasets: expected a list")
    msg = config_error([f"data.path={good}", f"data.datasets=[{{path: {good}}}]"], tmp_path)
    assert msg == "data.datasets: set either data.path (one dataset) or data.datasets (a blend), not both"
    (tmp_path / "t.txt").write_text("some text\n")
    msg = config_error([f"data.datasets=[{{path: {good}}}, {{path: {tmp_path}/t.txt}}]"], tmp_path)
    assert msg.startswith("data.datasets: mixes byte-level .txt/.jsonl files with indexed datasets")
    msg = config_error([f"data.tokenizer={tmp_path}/none.model", f"data.path={good}"], tmp_path)
    assert msg.startswith(f"data.tokenizer: {tmp_path}/none.model does not exist")


def test_blend_config_round_trips_through_the_resolved_yaml(tmp_path):
    a = write_dataset(tmp_path / "a", [40] * 10, dtype=np.uint16)
    b = write_dataset(tmp_path / "b.bin", [40] * 10, dtype=np.uint16)  # a .bin path names the same prefix
    cfg = load_config(None, [f"data.datasets=[{{path: {a}, weight: 3}}, {{path: {b}}}]", "data.seq_len=16"])
    assert cfg.data.datasets == [DatasetConfig(a, 3.0), DatasetConfig(b, 1.0)]
    (tmp_path / "resolved.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    assert load_config(tmp_path / "resolved.yaml").data == cfg.data
    data = build_data(cfg.data, seed=0)
    assert data.names == [a, str(tmp_path / "b")] and data.schedule.shares.round(2).tolist() == [0.75, 0.25]
