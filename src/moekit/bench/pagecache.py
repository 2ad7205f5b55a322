"""The operating system's page cache of a model's weight files: how much of a file it holds
(`cached_fraction`), and dropping a file from it (`drop_from_page_cache`) so that the next
reads come from the disk. Neither needs root: dropping asks the kernel to forget the clean
pages of one file (`posix_fadvise(POSIX_FADV_DONTNEED)`), which it does for pages no process
has mapped."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from collections.abc import Iterable
from pathlib import Path


def drop_from_page_cache(paths: Iterable[str | os.PathLike[str]]) -> bool:
    """Ask the kernel to drop each file's pages from the page cache; False where the system
    has no `posix_fadvise` (the files then stay cached)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages are not dropped; weight files are rarely dirty
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def cached_fraction(paths: Iterable[str | os.PathLike[str]]) -> float | None:
    """The share of the files' pages in the page cache now (mincore on a mapping of each
    file, which reads nothing), or None where that cannot be asked (not Linux)."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None or not hasattr(mmap, "PROT_READ"):
        return None
    libc = ctypes.CDLL(libc_name, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]  # fmt: skip
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    page = mmap.PAGESIZE
    cached = total = 0
    for path in paths:
        size = Path(path).stat().st_size
        if size == 0:
            continue
        pages = (size + page - 1) // page
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr is None or addr == ctypes.c_void_p(-1).value:
                return None
            try:
                vec = (ctypes.c_ubyte * pages)()
                if libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                    return None
                cached += sum(b & 1 for b in bytes(vec))
            finally:
                libc.munmap(ctypes.c_void_p(addr), size)
        finally:
            os.close(fd)
        total += pages
    return cached / total if total else None
