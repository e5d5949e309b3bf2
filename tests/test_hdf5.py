"""Threads that read and write ISMRMRD files at once, as ``unrollinr serve``'s sessions do."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# Three threads read one raw file while three write their own, for 8 s. Without one lock
# over HDF5 (h5py 3.16 with HDF5 2.0), 4 of 5 such runs ended with SIGSEGV.
STRESS = textwrap.dedent("""
    import sys, threading, time
    from pathlib import Path
    from unrollinr.masks import random_line_mask
    from unrollinr.phantoms import phantom_kspace
    from unrollinr_gadget.rawdata import RawFile, simulate_raw

    folder, seconds = Path(sys.argv[1]), float(sys.argv[2])
    kspace, mask = phantom_kspace(32, 4), random_line_mask((32, 32), 2, acs_lines=8)
    source = simulate_raw(kspace, mask, folder / "source.h5")
    stop = time.monotonic() + seconds
    counts = []

    def read():
        count = 0
        while time.monotonic() < stop:
            raw = RawFile(source)
            raw.header()
            count += sum(1 for _ in raw.acquisitions())
        counts.append(count)

    def write(index):
        count = 0
        while time.monotonic() < stop:
            count += len(RawFile(simulate_raw(kspace, mask, folder / f"written{index}.h5")))
        counts.append(count)

    threads = [threading.Thread(target=read) for _ in range(3)]
    threads += [threading.Thread(target=write, args=(index,)) for index in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print("acquisitions", min(counts))
""")


def test_threads_reading_and_writing_raw_files_at_once_do_not_crash_the_process(tmp_path):
    result = subprocess.run([sys.executable, "-c", STRESS, str(tmp_path), "8"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.split()[-1]) > 0  # every thread got through its files
