"""The worker process's memory: glibc allocator settings and handing freed memory back to the OS.
Both do nothing where the C library is not glibc."""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # glibc's mallopt() parameter number


def _glibc() -> ctypes.CDLL | None:
    try:
        library = ctypes.CDLL("libc.so.6")
        return library if hasattr(library, "mallopt") and hasattr(library, "malloc_trim") else None
    except OSError:
        return None


def limit_malloc_arenas(arenas: int) -> None:
    """Cap glibc's malloc arenas (it makes up to 8 per core, one per busy thread), each of
    which keeps the memory its thread freed. Call before starting threads; 0 keeps glibc's
    default. With ViT-B-32 on 2 cores, 2 arenas keep the worker about 200 MB smaller."""
    library = _glibc()
    if arenas > 0 and library is not None and library.mallopt(M_ARENA_MAX, arenas) != 1:
        log.warning("mallopt(M_ARENA_MAX, %d) was refused; the allocator keeps its default", arenas)


def return_freed_memory() -> None:
    """Hand memory freed in the heap (a dropped tower, temporaries) back to the OS."""
    library = _glibc()
    if library is not None:
        library.malloc_trim(0)
