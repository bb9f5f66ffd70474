"""The CPU allocator `sftlab train` runs with, and the switch that makes freed tensors go back to the OS.

PyTorch has no caching allocator on CPU: every tensor is a ``posix_memalign(64)`` from the C library.
With glibc's default settings, blocks up to its (self-raising, at most 32 MB) mmap threshold come from
its heap, and the heap keeps freed tensors resident. glibc (2.36 measured here) also does not give a
freed tensor's block to a later tensor of the same size: an aligned request asks the heap for 112 bytes
more than the block (alignment + minimum chunk), and the alignment remainders it splits off wait in its
per-thread cache, where they keep freed neighbours from merging (glibc bug 30723, whose fix "Enable
merging of remainders in memalign" came after 2.36). So training's repeated same-size temporaries take
fresh heap; :mod:`sftlab.plan.heap` models how much, and `sftlab plan` counts it under ``malloc="glibc"``.

``SFTLAB_MALLOC=lean`` (:func:`release_freed_memory`) fixes the mmap threshold at 64 KiB instead, so
large blocks are mapped and unmapped per tensor and the process follows its live tensors, at the price
of page faults on each fresh block (measured 1.8x slower LoRA steps, benchmarks/RESULTS.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_MMAP_THRESHOLD = -3  # from glibc's <malloc.h>
_done: int | None = None
MALLOCS = ("glibc", "lean", "other")


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the running glibc; None where the C library is not glibc."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    except (AttributeError, ValueError, OSError):
        return None
    major, minor = (version.split(".") + ["0"])[:2]
    return (int(major), int(minor)) if name == "glibc" else None


def train_malloc() -> str:
    """The malloc `sftlab train` runs with here on a CPU: ``"lean"`` (glibc, ``SFTLAB_MALLOC=lean``),
    ``"glibc"`` (glibc's default settings, train's default) or ``"other"`` (not glibc: nothing modelled)."""
    if glibc_version() is None:
        return "other"
    return "lean" if os.environ.get("SFTLAB_MALLOC", "").lower() == "lean" else "glibc"


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
