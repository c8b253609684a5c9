"""The CPU heap of a training process: keep freed memory for the next step.

glibc's malloc hands blocks above its mmap threshold (128 KiB at first, raised as such
blocks are freed) straight to the OS when they are freed, and returns the heap's free top
above its trim threshold. A training step frees and allocates the same activations every
step, so the kernel then maps, zeroes and faults in every page of them again: measured
20-40 thousand minor page faults a step for the `tiny` model on 2 cores. Raising both
thresholds keeps those blocks in the heap: under a thousand faults a step, and steps 6-11%
faster in bf16 and up to 6% in fp32 (`train/allocator.py`'s figures are in the README).

The cost: freed memory up to 1 GiB stays with the process (its peak use, held rather than
given back between steps) and blocks above 32 MiB (glibc's largest mmap threshold) are still
mapped afresh. The setting is process-wide and outlives the training run that made it.
"""

from __future__ import annotations

import ctypes
import functools

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
TRIM_THRESHOLD = 1 << 30


@functools.cache
def _mallopt():
    """glibc's `mallopt`, or None where the C library is another (musl, macOS). (Under an
    LD_PRELOADed malloc, such as jemalloc, glibc's thresholds are set and change nothing.)"""
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols, its C library's among them
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version"):  # glibc only: others differ or lack it
        return None
    fn = libc.mallopt
    fn.argtypes, fn.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return fn


def available() -> bool:
    """Whether this process's C library is glibc, whose heap `keep_freed_memory` tunes."""
    return _mallopt() is not None


def keep_freed_memory() -> bool:
    """Raise glibc's mmap threshold to 32 MiB and its trim threshold to 1 GiB, so a training
    step's freed activations stay in the heap for the next one. Returns whether it was set
    (False: not glibc, or glibc refused a value)."""
    mallopt = _mallopt()
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) & bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
