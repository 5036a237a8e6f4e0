"""Keep freed host memory in the process for reuse (glibc malloc), for training on CPU.

glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh mmap and returns it to the
kernel on free. A CPU training step allocates many such tensors (the embedding's dense gradient, ZeRO's gradient
buckets, the optimizer's temporaries over the flat fp32 partition), so each one page-faults on first touch: on a
loaded 2-core machine that cost more than the step's matrix products (docs/performance.md, "Step profile").
Turning mmap off and never trimming the heap lets freed blocks be reused as they are; the price is that the
process keeps its peak heap until it exits, which a training process reaches in its first step anyway.
"""
from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse; False where the C library has no mallopt (not glibc, not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
