"""Make CPU training memory follow the live tensors, so the plan's estimate holds.

Why this exists: glibc's malloc raises its mmap threshold each time a large block is freed (up to
32 MB), after which activation-sized blocks come from its heaps, and memory freed there stays resident.
Measured on the default model (benchmarks/plan_memory.py), a training step then peaks 10% to over 100%
above its live tensors, growing over the first steps, worst with LoRA dropout; a fixed threshold sends
large blocks back to the OS as soon as they are freed. PyTorch has no caching allocator on CPU, so this
is the only layer that decides. It costs page faults on each fresh large block.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_MMAP_THRESHOLD = -3  # from glibc's <malloc.h>
_done: int | None = None


def release_freed_memory(threshold_bytes: int = 1 << 16) -> bool:
    """Fix glibc's mmap threshold at ``threshold_bytes``; call once, before the model loads.

    Returns False (and changes nothing) where the C library is not glibc. Safe to call again.
    """
    global _done
    if _done == threshold_bytes:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, int(threshold_bytes)) != 1:
        return False
    _done = threshold_bytes
    return True
