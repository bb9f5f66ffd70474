"""The CPU allocator `sftlab train` runs with, and the switch that makes freed tensors go back to the OS.

PyTorch has no caching allocator on CPU: every tensor is a ``posix_memalign(64)`` from the C library.
With glibc's default settings, blocks up to its (self-raising, at most 32 MB) mmap threshold come from
its heap, and the heap keeps freed tensors resident. glibc (2.36 measured here) also does not give a
freed tensor's block to a later tensor of the same size: an aligned request asks the heap for 112 bytes
more than the block (alignment + minimum chunk), and the alignment remainders it splits off wait in its
per-thread cache, where they keep freed neighbours from merging (glibc bug 30723, whose fix "Enable
merging of remainders in memalign" came after 2.36). So training's repeated same-size temporaries take
fresh heap; :mod:`sftlab.plan.heap` models how much, and `sftlab plan` counts it under ``malloc="glibc"``.

By default `sftlab train` on a CPU (:func:`keep_freed_pages`) also tells glibc never to trim its heap
and fixes the mmap threshold at its dynamic maximum (32 MB): glibc's default trims the heap's top once
backward has freed a step's activations, and the next forward faults the same pages in again (measured
770,000-940,000 minor page faults in 30 default LoRA steps, 490,000 without trimming, 1.10x faster, the
same peak RSS: trimming only ever lowers memory after the peak; benchmarks/RESULTS.md).

``SFTLAB_MALLOC=lean`` (:func:`release_freed_memory`) fixes the mmap threshold at 64 KiB instead, so
large blocks are mapped and unmapped per tensor and the process follows its live tensors, at the price
of page faults on each fresh block (measured 1.8x slower LoRA steps, benchmarks/RESULTS.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1  # from glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3
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


def _mallopt():
    if not sys.platform.startswith("linux") or glibc_version() is None:
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt


def keep_freed_pages() -> bool:
    """glibc keeps its heap's freed pages (never trims) and maps only blocks of 32 MB and more (setting
    any threshold ends glibc's self-raising one, so this fixes it at that one's maximum). Call once,
    before the model loads; False (nothing changed) where the C library is not glibc."""
    global _done
    mallopt = _mallopt()
    if mallopt is None:
        return False
    _done = None
    return mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1 and mallopt(_M_MMAP_THRESHOLD, 32 * 2**20) == 1


def release_freed_memory(threshold_bytes: int = 1 << 16) -> bool:
    """Fix glibc's mmap threshold at ``threshold_bytes``; call once, before the model loads.

    Returns False (and changes nothing) where the C library is not glibc. Safe to call again.
    """
    global _done
    if _done == threshold_bytes:
        return True
    mallopt = _mallopt()
    if mallopt is None or mallopt(_M_MMAP_THRESHOLD, int(threshold_bytes)) != 1:
        return False
    _done = threshold_bytes
    return True
