"""Checkpoint save/load seconds and MB/s for a paper preset on CPU (one process), the training stall of an
asynchronous save vs a synchronous one, and what the shard checksums (checkpoint.verify) add to a save and a load.
Prints a table and writes the "Checkpoint I/O" section of docs/benchmarks.md.

    python bench/checkpoint_io.py [--config configs/moepp-0.6b.yaml] [--dir /tmp/moepp-ckpt-bench]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.report import markdown_table, write_section
from model.transformer import Decoder
from parallel.config import ParallelConfig
from parallel.mesh import init_parallel
from train.checkpoint import Checkpointer, init_optimizer_state, load_training_state, read_meta
from train.checkpoint_integrity import shard_checksums, verify_checksums
from train.config import load_config
from train.optim import build_optimizer


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/moepp-0.6b.yaml")
    parser.add_argument("--dir", default="/tmp/moepp-ckpt-bench")
    parser.add_argument("--no-write", action="store_true", help="print only, leave docs/benchmarks.md alone")
    args = parser.parse_args()

    cfg = load_config(args.config)
    ctx = init_parallel(ParallelConfig(), "cpu")
    torch.manual_seed(0)
    t = time.perf_counter()
    model = Decoder(cfg.model, cfg.moe)
    optimizer = build_optimizer(model, cfg.optim)
    init_optimizer_state(model, optimizer)
    build_s = time.perf_counter() - t
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    meta = {"consumed_samples": 0, "config": cfg.to_dict()}

    rows = []
    t = time.perf_counter()
    path = Checkpointer(root / "sync", ctx, keep_last=1, verify=False).save(1, model, optimizer, meta)
    sync_s = time.perf_counter() - t
    size_mb = dir_bytes(path) / 1e6
    rows.append(["save (sync), no checksums", f"{sync_s:.1f}", f"{size_mb / sync_s:,.0f}", f"{sync_s:.1f}"])
    t = time.perf_counter()
    checksums = shard_checksums(path)  # what checkpoint.verify adds to every save, on rank 0
    hash_s = time.perf_counter() - t
    rows.append(["+ shard checksums", f"{hash_s:.1f}", f"{size_mb / hash_s:,.0f}", f"{hash_s:.1f}"])

    ckpt = Checkpointer(root / "async", ctx, keep_last=1, async_save=True)
    t = time.perf_counter()
    ckpt.save(1, model, optimizer, meta)
    stall_s = time.perf_counter() - t  # training would continue from here
    ckpt.finish()
    async_total = time.perf_counter() - t
    rows.append(
        ["save (async, with checksums)", f"{async_total:.1f}", f"{size_mb / async_total:,.0f}", f"{stall_s:.1f}"]
    )

    t = time.perf_counter()
    load_training_state(path, model, optimizer, ctx, verify=False)
    load_s = time.perf_counter() - t
    rows.append(["load, unverified", f"{load_s:.1f}", f"{size_mb / load_s:,.0f}", "-"])
    t = time.perf_counter()
    verify_checksums(path, {**read_meta(path), "checksums": checksums}, ctx)
    verify_s = time.perf_counter() - t
    rows.append(["+ checksum verification", f"{verify_s:.1f}", f"{size_mb / verify_s:,.0f}", "-"])
    shutil.rmtree(root, ignore_errors=True)

    n_params = model.num_params()
    table = markdown_table(["operation", "seconds", "MB/s", "training stall (s)"], rows)
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
    body = (
        f"`python bench/checkpoint_io.py --config {args.config}` on {machine}, {datetime.date.today()}; one process, "
        f"{n_params / 1e9:.2f}B parameters, model + AdamW state = {size_mb:,.0f} MB on disk "
        f"(model built in {build_s:.0f} s).\n\n{table}\n\n"
        "The stall is how long the training loop is blocked: the whole save when synchronous, only the staging "
        "copy when asynchronous (the write then overlaps training). Shard checksums (`checkpoint.verify: true`, "
        f"the default) add {hash_s / sync_s:.0%} to a synchronous save and {verify_s / load_s:.0%} to a load "
        f"(CRC-32 of every file, {os.cpu_count()} threads; each file is read once more)."
    )
    print(body)
    if not args.no_write:
        write_section(f"Checkpoint I/O ({Path(args.config).stem}, CPU)", body)


if __name__ == "__main__":
    main()
