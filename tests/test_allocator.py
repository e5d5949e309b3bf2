"""glibc keeps the buffers torch frees once :func:`retain_freed_memory` has run.

Each case runs in a fresh interpreter: the setting is process-wide, and the test process
has already trained.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

# Prints whether the thresholds were raised, then how many bytes of separately mapped
# blocks a 16 MiB torch buffer adds (glibc's mallinfo2().hblkhd).
_PROBE = """
import ctypes, ctypes.util
import torch
from unrollinr.allocator import retain_freed_memory

class MallocInfo(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = MallocInfo
print(retain_freed_memory())
before = libc.mallinfo2().hblkhd
buffer = torch.ones(16 << 20, dtype=torch.uint8)
print(libc.mallinfo2().hblkhd - before)
"""


def _probe(**environment: str) -> tuple[bool, int]:
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("MALLOC_") and name != "GLIBC_TUNABLES"}
    output = subprocess.run([sys.executable, "-c", _PROBE], env={**env, **environment}, capture_output=True,
                            text=True, check=True).stdout.split()
    return output[0] == "True", int(output[1])


def test_a_training_sized_buffer_comes_from_the_heap_once_freed_memory_is_retained() -> None:
    raised, mapped = _probe()
    assert raised
    assert mapped == 0


def test_malloc_settings_from_the_environment_are_left_alone() -> None:
    raised, mapped = _probe(MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    assert not raised
    assert mapped >= 16 << 20
