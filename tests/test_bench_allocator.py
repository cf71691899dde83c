"""bench/allocator.py: after reuse_freed_memory() a large tensor comes from glibc's heap (not a fresh mmap) and its
memory stays in the heap after it is freed. Checked with glibc's own counters (mallinfo2), in a fresh process so
that the policy does not leak into the test session."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import ctypes, ctypes.util, json, sys
sys.path.insert(0, sys.argv[1])
import torch
from bench.allocator import reuse_freed_memory

FIELDS = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in FIELDS]
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = MallInfo2

def counters():
    info = libc.mallinfo2()
    return {"mmapped": info.hblkhd, "heap": info.arena}

SIZE = 64 << 20
out = {}
x = torch.ones(SIZE, dtype=torch.uint8)
out["default_alive"] = counters()
del x
out["reuse"] = reuse_freed_memory()
y = torch.ones(SIZE, dtype=torch.uint8)
out["reuse_alive"] = counters()
del y
out["reuse_freed"] = counters()
print(json.dumps(out))
"""


def _has_mallinfo2() -> bool:
    name = ctypes.util.find_library("c")
    return name is not None and hasattr(ctypes.CDLL(name), "mallinfo2")


@pytest.mark.skipif(not _has_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2)")
def test_reuse_freed_memory_serves_large_tensors_from_the_heap_and_keeps_them():
    size = 64 << 20
    res = subprocess.run([sys.executable, "-c", PROBE, str(ROOT)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    # glibc's defaults: a 64 MiB block is its own mapping.
    assert out["default_alive"]["mmapped"] >= size
    assert out["reuse"] is True
    # With the policy: no mapping for it, the heap holds it instead, and keeps it after it is freed.
    assert out["reuse_alive"]["mmapped"] < size
    assert out["reuse_alive"]["heap"] >= size
    assert out["reuse_freed"]["heap"] >= size
