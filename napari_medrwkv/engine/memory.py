"""Freed memory kept for the next tensor instead of handed back to the OS (glibc's malloc).

A forward pass on the CPU frees and allocates the same activations on every call.  By
default glibc maps each block above an adaptive threshold (at most 32 MiB) afresh with
``mmap``, gives the free top of its heap back to the OS, and gives every new thread an
arena of its own whose heaps hold at most 64 MiB (larger blocks are mapped afresh again).
Either way the next pass writes to new pages, one page fault per 4 KiB: ``segment`` with
``rwkv_unet_t`` on a 512x512 image took ~75,000 faults per call (300 MB mapped afresh), a
quarter of its time, on the main thread and on a worker thread (the widgets' case) alike
(``bench/memory.py``; ``bench/RESULTS.md``, "Kept memory", 2026-11-24).

:func:`retain_freed_memory` raises both thresholds and keeps one arena for the threads
created after it, as the allocators PyTorch recommends for CPU inference (jemalloc,
tcmalloc) do by design.  The process then keeps up to 1 GiB of freed memory between calls
instead of returning it (its peak grew by ~10%, 650 to 720 MB, in that benchmark; after 72
calls on images of varied sizes it held ~230 MB more than glibc's default).  Few-shot
fine-tuning on a worker thread gains too (~18%).  ``MEDRWKV_RETAIN_MEMORY=0`` leaves malloc
as it is.  Other C libraries (macOS, Windows, musl) are left alone.
"""
import ctypes
import functools
import os
import sys

RETAIN_ENV = "MEDRWKV_RETAIN_MEMORY"

# mallopt parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

_MMAP_THRESHOLD = 256 << 20    # blocks below this come from the heap, reused after free
_TRIM_THRESHOLD = 1 << 30      # free memory at the heap's top kept up to this much
_ARENA_MAX = 1                 # threads share the main heap, which has no 64 MiB limit


@functools.cache
def retain_freed_memory() -> bool:
    """Tells glibc's malloc to keep freed memory for reuse; once per process.

    Returns True where the settings are in effect (Linux with glibc, not switched off by
    ``MEDRWKV_RETAIN_MEMORY=0``).  Call it early: threads that already allocated keep the
    arena they have.
    """
    return _apply()


def _apply() -> bool:
    if os.environ.get(RETAIN_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    libc = _glibc()
    if libc is None:
        return False
    return all(libc.mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, _MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD), (_M_ARENA_MAX, _ARENA_MAX)))


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version     # glibc only: musl and others have no such symbol
        libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        libc.mallopt.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc
