"""Data pipeline speed: preprocessing MB/s with 1 and 2 workers, loader tokens/s vs training tokens/s (tiny-cpu),
and preprocessing throughput per input format and tokenizer kind.

    python bench/data_pipeline.py [--data-dir DIR] [--config configs/tiny-cpu.yaml] [--steps 20]
        [--formats-vocab 8192] [--no-formats] [--out PATH]

Trains a BPE tokenizer of the config's vocabulary size on the *.txt files of --data-dir, preprocesses them into an
indexed dataset (median of --repeats runs per worker count; wall time including worker start-up), times
`TrainData.global_batch` on it at the config's global batch and sequence length, and trains the config on it for
--steps steps. The loader must never be the bottleneck: the table reports loader / training tokens/s. Then
(bench/preprocess_formats.py) the same documents are converted to .txt/.jsonl/.jsonl.gz/.jsonl.zst/.parquet in a
temporary folder and preprocessed with a sentencepiece, a tokenizer.json and a .tiktoken tokenizer of
--formats-vocab ids, with 1 and 2 workers. Prints the tables and writes bench/results/data_pipeline.json. Runs in
a few minutes on 2 CPU cores for a few MB of text; never run by the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Only light modules at the top: preprocessing spawns workers, and a spawned worker re-imports this module, so
# torch (data.loader, train.*) is imported inside the functions that need it.
from bench import preprocess_formats
from bench.report import add_out_argument, print_table, write_results
from data.preprocess import preprocess
from tools.train_tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def time_preprocessing(
    inputs: list[Path], model: Path, out: Path, workers: int, repeats: int
) -> tuple[float, float, int]:
    """(median MB/s, CPU cores kept busy, tokens) over `repeats` runs. Cores busy = CPU seconds of this process and
    its workers over wall seconds: on a shared machine it shows whether a second worker found a free core."""
    rates, busy, tokens = [], [], 0
    for _ in range(repeats):
        cpu0 = _cpu_seconds()
        r = preprocess(inputs, model, out / f"w{workers}", workers=workers, progress=False)
        rates.append(r.mb_per_s)
        busy.append((_cpu_seconds() - cpu0) / r.seconds)
        tokens = r.tokens
    return statistics.median(rates), statistics.median(busy), tokens


def _cpu_seconds() -> float:
    # Worker processes count once they have exited (the pool is closed when preprocess() returns).
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def time_loader(data, global_batch_size: int, seq_len: int, seconds: float = 3.0) -> float:
    """Tokens/s of global_batch() (one rank holding the whole global batch), over a fixed wall-time budget."""
    consumed, batches = 0, 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        data.global_batch(consumed, global_batch_size)
        consumed += global_batch_size
        batches += 1
    return batches * global_batch_size * seq_len / (time.perf_counter() - start)


def time_training(config: str, overrides: list[str], run_dir: Path) -> float:
    """Median tokens/s of the logged intervals after the first (which includes warm-up)."""
    from train.config_load import load_config
    from train.trainer import run

    cfg = load_config(ROOT / config, overrides)
    run(cfg)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    return statistics.median(rates[1:] or rates)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"), help="folder of *.txt inputs")
    p.add_argument("--config", default="configs/tiny-cpu.yaml")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--formats-vocab", type=int, default=8192, help="vocabulary of the per-format/kind tokenizers")
    p.add_argument("--no-formats", action="store_true", help="skip the per-format/kind preprocessing table")
    add_out_argument(p)
    args = p.parse_args()
    from data.loader import build_data
    from train.config_load import load_config

    inputs = sorted(Path(args.data_dir).glob("*.txt"))
    if not inputs:
        sys.exit(f"error: {args.data_dir}: no *.txt files; pass --data-dir with text files")
    cfg = load_config(ROOT / args.config)
    seq_len, gbs, vocab = cfg.data.seq_len, cfg.train.global_batch_size, cfg.model.vocab_size
    total_mb = sum(f.stat().st_size for f in inputs) / 1e6
    load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory(prefix="moepp-data-bench-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        model = train_tokenizer(inputs, tmp / "tok", vocab_size=vocab)
        tok_seconds = time.perf_counter() - t0
        mbs, busy = {}, {}
        for workers in (1, 2):
            mbs[workers], busy[workers], tokens = time_preprocessing(inputs, model, tmp, workers, args.repeats)
        prefix = tmp / "w1"
        data = build_data(load_config(ROOT / args.config, [f"data.path={prefix}"]).data, cfg.train.seed)
        loader_tps = time_loader(data, gbs, seq_len)
        run_dir = tmp / "run"
        overrides = [
            f"data.path={prefix}",
            f"data.tokenizer={model}",
            f"train.max_steps={args.steps}",
            "logging.interval=5",
            "logging.progress_bar=false",
            "train.eval_interval=0",
            f"train.run_dir={run_dir}",
        ]
        train_tps = time_training(args.config, overrides, run_dir)
        formats = None if args.no_formats else time_formats(inputs, tmp / "formats", args.formats_vocab, args.repeats)

    rows = [
        [f"tokenizer training (BPE, vocab {vocab})", f"{tok_seconds:.2f} s for {total_mb:.2f} MB"],
        ["preprocessing, 1 worker", f"{mbs[1]:.2f} MB/s ({busy[1]:.1f} cores busy)"],
        ["preprocessing, 2 workers", f"{mbs[2]:.2f} MB/s ({busy[2]:.1f} cores busy)"],
        ["dataset", f"{tokens:,} tokens ({total_mb * 1e6 / tokens:.2f} bytes/token)"],
        [f"loader `global_batch` ({gbs} x {seq_len + 1} tokens)", f"{loader_tps:,.0f} tokens/s"],
        [f"training {Path(args.config).stem} ({args.steps} steps)", f"{train_tps:,.0f} tokens/s"],
        ["loader / training", f"{loader_tps / train_tps:,.0f}x"],
    ]
    print_table(f"Data pipeline, {total_mb:.2f} MB of text", ["measurement", "result"], rows)
    results = {
        "load_average_at_start": load_before,
        "versions": library_versions(),
        "inputs": {f.name: f.stat().st_size for f in inputs},
        "pipeline": {
            "tokenizer": f"sentencepiece BPE, vocab {vocab}",
            "tokenizer_training_s": tok_seconds,
            "preprocessing_mb_per_s": {str(w): mbs[w] for w in (1, 2)},
            "preprocessing_cores_busy": {str(w): busy[w] for w in (1, 2)},
            "dataset_tokens": tokens,
            "loader_tokens_per_s": loader_tps,
            "training_tokens_per_s": train_tps,
            "training_config": args.config,
            "training_steps": args.steps,
        },
    }
    if formats is not None:
        cells, differ, (headers, cell_rows) = formats
        title = (
            f"Preprocessing by input format and tokenizer ({args.formats_vocab:,} ids): text MB/s / tokens/s, "
            f"median of {args.repeats}"
        )
        print_table(title, headers, cell_rows)
        same = "identical" if not differ else f"NOT identical ({', '.join(differ)} differ)"
        print(f"Per tokenizer, the .bin/.idx of every format and worker count: {same}.\n")
        results["preprocessing"] = {
            "vocab_size": args.formats_vocab,
            "repeats": args.repeats,
            "identical_across_formats_and_workers": not differ,
            "cells": preprocess_formats.cells_json(cells),
        }
    write_results("data_pipeline", results, args.out)


def time_formats(inputs: list[Path], out: Path, vocab: int, repeats: int) -> tuple[list, list[str], tuple]:
    """(cells, the outputs that differ from the others of their tokenizer, the table's headers and rows)."""
    out.mkdir()
    shards = preprocess_formats.write_formats(inputs, out)
    tokenizers = preprocess_formats.build_tokenizers(inputs, out, vocab)
    workers = (1, 2)
    cells = preprocess_formats.run_cells(shards, tokenizers, out, workers, repeats)
    differ = preprocess_formats.check_identical(out, cells)
    return cells, differ, preprocess_formats.table_rows(cells, workers)


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    names = ("sentencepiece", "tokenizers", "tiktoken", "pyarrow", "zstandard", "numpy")
    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


if __name__ == "__main__":
    main()
