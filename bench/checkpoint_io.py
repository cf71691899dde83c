"""Checkpoint save/load seconds and MB/s for a paper preset on CPU (one process), the training stall of an
asynchronous save vs a synchronous one, and what the shard checksums (checkpoint.verify) add to a save and a load.
Prints a table and writes bench/results/checkpoint_io.json.

    python bench/checkpoint_io.py [--config configs/moepp-0.6b.yaml] [--dir /tmp/moepp-ckpt-bench] [--out PATH]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.report import add_out_argument, print_table, write_results
from model.transformer import Decoder
from parallel.config import ParallelConfig
from parallel.mesh import init_parallel
from train.checkpoint import Checkpointer, init_optimizer_state, load_training_state
from train.checkpoint_integrity import shard_checksums, verify_checksums
from train.checkpoint_meta import read_meta
from train.config_load import load_config
from train.optim import build_optimizer


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/moepp-0.6b.yaml")
    parser.add_argument("--dir", default="/tmp/moepp-ckpt-bench")
    add_out_argument(parser)
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
    title = (
        f"{args.config}: {n_params / 1e9:.2f}B parameters, model + AdamW state = {size_mb:,.0f} MB on disk "
        f"(model built in {build_s:.0f} s)"
    )
    print_table(title, ["operation", "seconds", "MB/s", "training stall (s)"], rows)
    numbers = {
        "config": args.config,
        "params": n_params,
        "size_mb": size_mb,
        "build_s": build_s,
        "checksum_threads": os.cpu_count(),
        "save_sync_s": sync_s,
        "checksums_s": hash_s,
        "save_async_s": async_total,
        "save_async_stall_s": stall_s,
        "load_s": load_s,
        "verify_s": verify_s,
    }
    write_results("checkpoint_io", numbers, args.out)


if __name__ == "__main__":
    main()
