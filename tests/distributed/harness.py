"""Run a function in N gloo processes on this machine (the CPU stand-in for a torchrun world)."""

from __future__ import annotations

import os
import socket
import sys
import traceback
from collections.abc import Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, world: int, port: int, args: tuple) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        fn(rank, world, *args)
    except BaseException:
        # Say which rank failed and why even when another rank's exit is what mp.spawn reports first. No
        # destroy_process_group here: tearing the group down under peers that are still in a collective aborts
        # them (torchtitan skips it on failure for the same reason).
        traceback.print_exc()
        sys.stderr.flush()
        raise
    if dist.is_initialized():
        dist.barrier()  # nobody destroys the group while a peer is still using it
        dist.destroy_process_group()
    # The rank is done: skip interpreter finalization, where gloo's threads were seen to abort a finished process
    # ("terminate called without an active exception": once in CI, and in 1 of 8 runs of bench/all_to_all.py).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_world(fn: Callable, world: int, *args) -> None:
    """fn(rank, world, *args) in `world` processes; an exception in any of them fails the caller."""
    mp.spawn(_entry, args=(fn, world, free_port(), args), nprocs=world, join=True)
