"""Scale-out: one 8-slice exam replayed in-process (its slices batched), as Ray tasks on a
local Ray with 2 workers, and through a distributed Gadgetron (a main server and two worker
servers, each slice on a worker, our gadget behind ``unrollinr listen``) when one is built
in ``~/.cache/gadgetron`` (``GADGETRON_PREFIX``). Prints each wall time and its ratio to
in-process. The exam is built from a phantom, so no data set is needed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import free_port  # noqa: E402
from unrollinr_gadget.rawdata import simulate_raw  # noqa: E402
from unrollinr_gadget.replay import replay_in_process, replay_jobs  # noqa: E402
from unrollinr_gadget.settings import GadgetSettings  # noqa: E402

from unrollinr.masks import random_line_mask  # noqa: E402
from unrollinr.phantoms import phantom_kspace  # noqa: E402

PREFIX = Path(os.environ.get("GADGETRON_PREFIX", Path.home() / ".cache" / "gadgetron"))
CHAIN = Path(__file__).resolve().parents[1] / "chains" / "unrollinr_distributed.xml"


def _wait_for_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def distributed_gadgetron(raw: Path, work: Path, properties: list[str]) -> float:
    """Seconds for ``gadgetron_ismrmrd_client`` to get the exam back through two workers."""
    main, workers, listener = free_port(), [free_port(), free_port()], free_port()
    chain = f"bench_scale_{os.getpid()}.xml"
    config = PREFIX / "share" / "gadgetron" / "config" / chain
    config.write_text(CHAIN.read_text().replace('<connect port="18000"/>', f'<connect port="{listener}"/>'))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{PREFIX / 'bin'}:{os.environ['PATH']}",
               LD_LIBRARY_PATH=str(PREFIX / "lib"), OMP_WAIT_POLICY="PASSIVE",
               GADGETRON_REMOTE_WORKER_COMMAND="echo " + json.dumps([f"127.0.0.1:{p}" for p in workers]))
    log = (work / "gadgetron.log").open("wb")
    commands = [[str(PREFIX / "bin" / "gadgetron"), "-p", str(port), "-d", "true"] for port in (main, *workers)]
    commands.append([sys.executable, "-m", "unrollinr_gadget.cli", "listen", "--port", str(listener),
                     *[a for item in properties for a in ("--set", item)]])
    processes = [subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT) for command in commands]
    try:
        for port in (main, *workers, listener):
            _wait_for_port(port)
        start = time.perf_counter()
        subprocess.run([str(PREFIX / "bin" / "gadgetron_ismrmrd_client"), "-f", str(raw), "-c", chain,
                        "-p", str(main), "-o", str(work / "gadgetron.h5")], env=env, check=True,
                       capture_output=True, timeout=3600)
        return time.perf_counter() - start
    finally:
        for process in processes:
            process.terminate()
            process.wait(60)
        log.close()
        config.unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--size", type=int, default=64, help="matrix side")
    parser.add_argument("--coils", type=int, default=8)
    parser.add_argument("--R", type=float, default=4)
    parser.add_argument("--workers", type=int, default=2, help="Ray workers (CPUs) and Gadgetron workers")
    parser.add_argument("--set", action="append", metavar="NAME=VALUE", default=[], help="a setting (repeatable)")
    args = parser.parse_args()
    settings = GadgetSettings.from_properties(dict(item.split("=", 1) for item in args.set))

    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        kspace = np.stack([phantom_kspace(args.size, args.coils, seed=s) for s in range(args.slices)])
        masks = np.stack([random_line_mask((args.size, args.size), args.R, acs_lines=max(10, args.size // 8), seed=s)
                          for s in range(args.slices)])
        raw = simulate_raw(kspace, masks, work / "exam.h5", order="interleaved", noise_scans=0)

        start = time.perf_counter()
        replay_in_process(replay_jobs([raw], work / "here.h5"), settings)
        seconds = {"in_process": time.perf_counter() - start}

        import ray
        from unrollinr_gadget.ray_replay import replay_on_ray

        start = time.perf_counter()
        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
        replay_on_ray(replay_jobs([raw], work / "ray.h5"), settings)
        seconds["ray"] = time.perf_counter() - start
        ray.shutdown()

        if (PREFIX / "bin" / "gadgetron").exists() and args.workers == 2:
            seconds["gadgetron"] = distributed_gadgetron(raw, work, args.set)

    labels = {"in_process": "in-process (slices batched)", "ray": f"Ray, {args.workers} workers (start included)",
              "gadgetron": "distributed Gadgetron, 2 workers"}
    print(f"{args.slices} slices of {args.size}x{args.size}, {args.coils} coils, R {args.R:g}, "
          f"{os.cpu_count()} CPUs")
    for name, value in seconds.items():
        print(f"{labels[name]:40s} {value:7.1f} s  x{value / seconds['in_process']:.2f}")
    print(" ".join(f"{name}_s={value:.1f}" for name, value in seconds.items()))


if __name__ == "__main__":
    main()
