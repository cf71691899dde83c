"""Host memory policy of the CPU layer benchmarks: keep freed memory for reuse, as a caching allocator does.

PyTorch's CPU tensors come from glibc malloc. glibc maps every block above its mmap threshold (adaptive, at most
32 MiB by default) afresh and unmaps it on free, so such a tensor is page-faulted in on first touch every time it
is created, while a smaller one reuses heap pages. Time per byte therefore jumps at a size threshold: the vanilla
layer's [tokens x top-k, 768] buffers are above it at the paper's step sizes, most MoE++ buffers below, so with
glibc's defaults a comparison of the two layers partly measures page faults (gathering and scaling a [32768, 768]
fp32 tensor took about 2.6x as long as with reuse on a 2-core x86_64 machine). CUDA's caching allocator pays no
page faults after warm-up, so the benchmarks take the same footing on CPU unless asked not to (--default-malloc).
"""

from __future__ import annotations

import ctypes
import ctypes.util

# <malloc.h> mallopt parameters.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def reuse_freed_memory() -> bool:
    """Serve every block from glibc's heap (no per-block mmap) and never give freed heap back to the OS, in this
    process. Call before any large allocation; spawned workers must call it themselves. False where it does not
    apply (not glibc, or mallopt refused)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # musl, macOS: no mallopt
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
