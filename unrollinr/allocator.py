"""Keep the memory torch frees on the CPU inside the process, where glibc's malloc runs.

Every training step allocates and frees the same large buffers: the MLP's activations
and their gradients (``(y * x, 64)`` float32, 16 MiB at 256 x 256), the coil images of a
2D-mask CG step. glibc serves a buffer above its mmap threshold from a fresh mapping and
unmaps it when it is freed, and returns freed memory at the top of its heap to the kernel
beyond its trim threshold; either way the next step's first touch of every page faults
again. Raising both thresholds (fixed values also stop glibc from adjusting them) lets
the heap reuse those pages: with the MLP's ReLUs in place, 256 x 256 slices took 4-27%
less time on this project's 2-core CPU, for up to a quarter more peak memory
(bench/HISTORY.md).

The setting is process-wide, so it is made once, and never where the user chose glibc's
malloc settings (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, or malloc tunables
in ``GLIBC_TUNABLES``), nor where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os

logger = logging.getLogger(__name__)

# mallopt's parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD_BYTES = 256 << 20
"""Buffers up to this size come from the heap instead of a mapping of their own."""
TRIM_THRESHOLD_BYTES = 256 << 20
"""Free memory at the top of the heap kept for reuse, up to this size."""

_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def _user_chose_malloc_settings() -> bool:
    return any(name in os.environ for name in _USER_SETTINGS) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "")


@functools.cache
def retain_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (once); whether they are set."""
    if _user_chose_malloc_settings():
        logger.debug("malloc settings left as the environment sets them")
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it, and glibc's mallopt takes these numbers
    except (OSError, AttributeError, TypeError):
        logger.debug("not glibc (%s): malloc settings left alone", name)
        return False
    done = (libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
            and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1)
    logger.debug("glibc mmap and trim thresholds %s", "raised" if done else "not accepted")
    return done
