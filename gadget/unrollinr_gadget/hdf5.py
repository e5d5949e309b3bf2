"""One lock for every HDF5 file this package reads or writes.

h5py is meant to serialise HDF5 calls from several threads by itself, but h5py 3.16 with
HDF5 2.0 can end the process with SIGSEGV when two threads use HDF5 at once: measured here
with one thread reading a raw file while another wrote one (two runs in three crashed within
20 s), and reported upstream (h5py issue 2920). ``unrollinr serve`` runs one thread per
session and each saves its raw data to an ISMRMRD file when it ends, so two sessions ending
together could take the server, and every exam in it, down. Every ISMRMRD file is opened,
used and closed through :func:`open_dataset` and :data:`HDF5_LOCK`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

import ismrmrd

HDF5_LOCK = threading.RLock()


@contextlib.contextmanager
def open_dataset(path: str | Path, dataset: str, *, create: bool = False) -> Iterator[ismrmrd.Dataset]:
    """An ISMRMRD dataset, opened, used and closed while holding :data:`HDF5_LOCK`."""
    with HDF5_LOCK:
        opened = ismrmrd.Dataset(str(path), dataset, create_if_needed=create)
        try:
            yield opened
        finally:
            opened.close()
