"""Load on ``unrollinr serve``: N clients at once on loopback, each streaming a multi-slice
exam (slices interleaved line by line, as a 2D FSE scans them), against one server process.

Prints the sessions completed, the images received against those expected, the errors,
the wall time, and the server's peak resident memory (``VmHWM``). Nothing may be lost.
The exams are built from a phantom (``--size``, ``--coils``), so no data set is needed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import free_port  # noqa: E402
from unrollinr_gadget.client import Replies, stream_to_server  # noqa: E402
from unrollinr_gadget.rawdata import RawFile, simulate_raw  # noqa: E402

from unrollinr.masks import random_line_mask  # noqa: E402
from unrollinr.phantoms import phantom_kspace  # noqa: E402


def peak_memory_mb(pid: int) -> float:
    """A process's peak resident set (``VmHWM``), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def exam(path: Path, size: int, coils: int, slices: int, R: float, seed: int) -> RawFile:
    """A ``slices``-slice exam, interleaved, each slice its own phantom and mask."""
    kspace = np.stack([phantom_kspace(size, coils, seed=seed + s) for s in range(slices)])
    masks = np.stack([random_line_mask((size, size), R, acs_lines=max(10, size // 8), seed=seed + s)
                      for s in range(slices)])
    return RawFile(simulate_raw(kspace, masks, path, order="interleaved", seed=seed))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--slices", type=int, default=4, help="slices per exam")
    parser.add_argument("--size", type=int, default=64, help="matrix side")
    parser.add_argument("--coils", type=int, default=8)
    parser.add_argument("--R", type=float, default=4)
    parser.add_argument("--set", action="append", metavar="NAME=VALUE", default=[],
                        help="server setting (repeatable), e.g. iterations=100")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        exams = [exam(work / f"exam{c}.h5", args.size, args.coils, args.slices, args.R, seed=10 * c)
                 for c in range(args.clients)]
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "unrollinr_gadget.cli", "serve", "--port", str(port),
                                   "--save-raw", str(work / "raw"), "--max-connections", str(args.clients),
                                   *[a for item in args.set for a in ("--set", item)]])
        replies: list[Replies | None] = [None] * args.clients
        try:
            time.sleep(5)

            def client(index: int) -> None:
                replies[index] = stream_to_server(exams[index], "127.0.0.1", port, "unrollinr")

            start = time.perf_counter()
            threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            seconds = time.perf_counter() - start
            peak = peak_memory_mb(server.pid)
        finally:
            server.terminate()
            server.wait(120)
        saved = len(list((work / "raw").glob("*.h5")))

    completed = sum(r is not None and r.closed for r in replies)
    received = sum(len(r.images) for r in replies if r is not None)
    errors = [text for r in replies if r is not None for text in r.errors + r.texts]
    expected = args.clients * args.slices
    print(f"{args.clients} clients x {args.slices} slices of {args.size}x{args.size}, {args.coils} coils, R {args.R:g}")
    for text in errors:
        print(f"error: {text}")
    print(f"sessions_completed={completed}/{args.clients} images={received}/{expected} errors={len(errors)} "
          f"raw_files_saved={saved} wall_s={seconds:.1f} server_peak_mb={peak:.0f}")


if __name__ == "__main__":
    main()
