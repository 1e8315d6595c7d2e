"""Process settings for the workers that run a stage's parts (docs/architecture.md, "Workers").

glibc's malloc serves every block over 32 MB with a fresh `mmap` and unmaps it on free, so each
large tensor of a CPU forward (a batch of feature maps: demo_resnet's stem output for 92 images
at 128 px is 96 MB) is new memory that the kernel must fault in and zero, page by page. Measured
on demo_resnet at 128 px, one thread: a forward to layer4 took 3.2 ms per image, of which about
half was those page faults; with freed memory kept for reuse it took 1.6 ms (the same as under
tcmalloc), and the whole cafe stage ran 1.6x faster (docs/scale.md §1, "The allocator and patch stems").
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

# mallopt's parameter numbers (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# free memory at the heap's top that glibc keeps before giving it back: mallopt's largest int
_KEEP_BYTES = 2**31 - 1


@functools.cache
def keep_freed_memory() -> bool:
    """Make this process's malloc keep freed memory for reuse instead of returning it to the
    operating system (glibc on Linux: no mmap for large blocks, no trimming of the heap).

    [choice] A stage worker's peak memory is reached on its first batches and needed again on
    every later one, so keeping it costs nothing that the worker would not hold anyway; the
    process's resident size stays at its peak until it exits. Where mmap is off glibc still
    falls back to it when the heap cannot grow, so no allocation fails for it.

    Returns whether the settings were applied: False on a platform without glibc (macOS, musl),
    where the process keeps its allocator's defaults.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success, 0 for a parameter this libc does not know
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))
