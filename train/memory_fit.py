"""Sizes that cannot fit, refused before anything is allocated: each tensor a size key makes every process allocate
in full, checked against the memory this machine has available."""

from __future__ import annotations

import os

from data.config import DataConfig
from model.config import ModelConfig, require

# Peak bytes per position x head dimension while the RoPE tables are built (float64 angles, their concatenation and
# the two fp32 tables), and per token of the synthetic corpus (one small array per word before the concatenation,
# then the int64 stream); both measured.
ROPE_BYTES_PER_ENTRY = 24
SYNTHETIC_BYTES_PER_TOKEN = 64


def available_memory_bytes() -> int | None:
    """Memory this machine can still give (Linux MemAvailable), else its physical memory; None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(m: ModelConfig, data: DataConfig) -> None:
    """Each tensor a size key makes every process allocate in full (the model is built whole on the host before it
    is sharded or moved) must fit in the memory available, so an absurd size fails here, in one line, instead of
    deep inside an allocation or after minutes of filling swap."""
    available = available_memory_bytes()
    if available is None:
        return
    needs = [
        ("model.vocab_size", m.vocab_size, 2 * m.vocab_size * m.hidden_size * 4, "the fp32 embedding and output head"),
        ("model.max_seq_len", m.max_seq_len, m.max_seq_len * m.head_dim * ROPE_BYTES_PER_ENTRY, "the RoPE tables"),
    ]
    if not data.paths:
        n = data.synthetic.num_tokens
        needs.append(("data.synthetic.num_tokens", n, n * SYNTHETIC_BYTES_PER_TOKEN, "the synthetic corpus"))
    for key, value, need, what in needs:
        require(
            need <= available,
            key,
            f"{value} needs {need / 2**30:,.1f} GiB for {what}, more than the {available / 2**30:,.1f} GiB of "
            "memory available; lower it",
        )
