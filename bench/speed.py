"""Speed benchmark on one slice (default: brain_8ch_256, R = 8, random lines).

Prints, in one run on one machine:
- seconds per training iteration (median) with the default configuration, which solves
  the data-consistency step exactly (``dc_solver`` auto on line masks), and with CG DC
  (``dc_solver=cg``);
- the floor: the ``2 x (CG iterations + 1)`` SENSE normal-operator applications that one
  CG iteration must do, timed on the same operator between the timed iterations, and the
  ratio of each iteration time to it; the same for a radial mask at the same R, where CG
  is the default and the normal operator needs 2D FFTs; and the time of the prior's
  forward and backward pass, the largest cost outside the DC step;
- the time UnrollINR needs to come within 0.3 dB of the best PSNR it reaches, against
  the wall time of BART ``ecalib`` + ``pics -l1`` (best lambda of a grid) when installed;
- peak memory of training with CG DC at 10 and at 40 CG iterations, and of the default
  configuration with 1, 2 and 4 slices batched (separate processes; on the CPU the growth
  of the resident set over the process's state before training).

The last line is machine-readable:

    floor_ratio=<a> time_to_quality_vs_bart=<b> peak_mem_ratio_40_10=<c>

``floor_ratio`` is the default configuration's iteration over the CG floor; the CG
iteration's own ratio is printed on the line above it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import QUALITY_TOLERANCE_DB, base_parser, device_name, overrides, setup, synchronize  # noqa: E402

from unrollinr import baselines  # noqa: E402
from unrollinr.config import ReconConfig  # noqa: E402
from unrollinr.data import load_kspace  # noqa: E402
from unrollinr.evaluate import L1_LAMBDAS, reference_image  # noqa: E402
from unrollinr.masks import radial_mask, random_line_mask  # noqa: E402
from unrollinr.metrics import psnr  # noqa: E402
from unrollinr.model import INRImage  # noqa: E402
from unrollinr.recon import (  # noqa: E402
    default_device,
    prepare_maps,
    reconstruct_prepared,
    reconstruct_with_details,
)
from unrollinr.sense import SenseOp  # noqa: E402


def _problem(args, config: ReconConfig):
    kspace = load_kspace(args.data)
    mask = random_line_mask(kspace.shape[1:], args.R, seed=0)
    measured = (kspace * mask).astype(np.complex64)
    return kspace, mask, measured


def iteration_and_floor_seconds(measured, mask, maps, config, device, iterations: int) -> tuple[float, float]:
    """Median seconds of one training iteration and of its floor, measured interleaved.

    After each training iteration (in the callback, outside the timed interval) the floor
    is timed once: the ``2 x (CG iterations + 1)`` normal-operator applications of one
    iteration on the same operator, and nothing else. Interleaving keeps both under the
    same machine load.
    """
    # Every timed iteration runs the full CG count, as the floor assumes.
    config = ReconConfig.from_strings({"iterations": iterations, "patience": iterations,
                                       "cg_training_iterations": config.cg_iterations}, base=config)
    op = SenseOp(torch.from_numpy(maps)[None].to(device), torch.from_numpy(mask)[None].to(device))
    image = torch.randn(op.image_shape, dtype=torch.complex64, device=device)
    applications = 2 * (config.cg_iterations + 1)
    entries: list[float] = []
    exits: list[float] = []
    floors: list[float] = []

    def time_floor(_iteration: int, _image: np.ndarray) -> None:
        synchronize(device)
        entries.append(time.perf_counter())
        for _ in range(applications):
            op.normal(image)
        synchronize(device)
        exits.append(time.perf_counter())
        floors.append(exits[-1] - entries[-1])

    reconstruct_with_details(measured, mask, csm=maps, config=config, device=device, progress=False,
                             callback=time_floor)
    steps = [entries[i + 1] - exits[i] for i in range(len(entries) - 1)]
    # the first iterations warm up caches and allocators
    return statistics.median(steps[2:]), statistics.median(floors[2:])


def prior_seconds(shape, config, device, repeats: int = 7) -> float:
    """Median time of one forward and backward pass of the prior (grid encoding + MLP) over
    every pixel: the largest part of an iteration outside the normal operator."""
    prior = INRImage(shape, config, torch.device(device), seed=config.seed)
    timings = []
    for _ in range(repeats + 2):
        synchronize(device)
        start = time.perf_counter()
        torch.view_as_real(prior()).sum().backward()
        synchronize(device)
        timings.append(time.perf_counter() - start)
    return statistics.median(timings[2:])


def time_to_quality(measured, mask, reference, config, device) -> tuple[float, float, float]:
    """(seconds to within 0.3 dB of the best PSNR, best PSNR, final PSNR), maps included."""
    trace: list[tuple[float, float]] = []
    overhead = 0.0
    start = time.perf_counter()

    def track(_: int, image: np.ndarray) -> None:
        nonlocal overhead
        tick = time.perf_counter()
        trace.append((tick - start - overhead, psnr(reference, image)))
        overhead += time.perf_counter() - tick

    image, _ = reconstruct_with_details(measured, mask, config=config, device=device, progress=False, callback=track)
    best = max(p for _, p in trace)
    reached = next(t for t, p in trace if p >= best - QUALITY_TOLERANCE_DB)
    return reached, best, psnr(reference, image)


def bart_time(measured, reference) -> tuple[float, float, float]:
    """(seconds of ecalib + pics at the best lambda, that lambda, its PSNR)."""
    maps = baselines.bart_maps(measured)
    scores = {lam: psnr(reference, baselines.bart_pics(measured, maps, lam)) for lam in L1_LAMBDAS}
    best = max(scores, key=scores.get)
    start = time.perf_counter()
    baselines.bart_pics(measured, baselines.bart_maps(measured), best)
    return time.perf_counter() - start, best, scores[best]


def peak_memory(args, cg_iterations: int, maps_file: Path, slices: int = 1, dc_solver: str | None = None) -> float:
    """Peak memory (MiB) of a separate process training 5 iterations on ``slices`` copies of
    the slice from given maps, so that the peak is the training's, not the maps'."""
    command = [sys.executable, __file__, "--measure-memory", str(cg_iterations), "--data", str(args.data),
               "--R", str(args.R), "--threads", str(args.threads), "--maps", str(maps_file),
               "--slices", str(slices)]
    if args.device:
        command += ["--device", args.device]
    for item in args.set + ([f"dc_solver={dc_solver}"] if dc_solver else []):
        command += ["--set", item]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])["peak_mib"]


def measure_memory(args, config: ReconConfig) -> None:
    _, mask, measured = _problem(args, config)
    maps = np.load(args.maps)
    device = torch.device(args.device) if args.device else default_device()
    config = ReconConfig.from_strings({"iterations": 5, "cg_iterations": args.measure_memory,
                                       "cg_training_iterations": args.measure_memory}, base=config)
    batch = [np.repeat(a[None], args.slices, axis=0) for a in (measured, mask, maps)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        reconstruct_prepared(*batch, config, device=device, progress=False)
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        # Reset the resident high-water mark (Linux), so imports and loading do not count.
        Path("/proc/self/clear_refs").write_text("5")
        baseline = _status_mib("VmRSS")
        reconstruct_prepared(*batch, config, device=device, progress=False)
        peak = _status_mib("VmHWM") - baseline
    print(json.dumps({"peak_mib": peak}))


def _status_mib(field: str) -> float:
    """A memory figure from /proc/self/status, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} is not in /proc/self/status")


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--R", type=float, default=8)
    parser.add_argument("--timing-iterations", type=int, default=25)
    parser.add_argument("--measure-memory", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--maps", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--slices", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    setup(args)
    config = ReconConfig.from_strings(overrides(args))
    if args.measure_memory is not None:
        measure_memory(args, config)
        return
    device = torch.device(args.device) if args.device else default_device()
    kspace, mask, measured = _problem(args, config)
    reference = reference_image(kspace)
    print(f"data {args.data.name} {kspace.shape}, R={args.R:g}, device {device_name(args.device)}")
    _, maps = prepare_maps(measured, mask, None, config)

    iteration, floor = iteration_and_floor_seconds(measured, mask, maps, config, device, args.timing_iterations)
    cg_config = ReconConfig.from_strings({"dc_solver": "cg"}, base=config)
    cg_iteration, cg_floor = iteration_and_floor_seconds(measured, mask, maps, cg_config, device,
                                                         args.timing_iterations)
    radial = radial_mask(kspace.shape[1:], args.R)
    radial_measured = (kspace * radial).astype(np.complex64)
    _, radial_maps = prepare_maps(radial_measured, radial, None, config)
    radial_iteration, radial_floor = iteration_and_floor_seconds(radial_measured, radial, radial_maps, config,
                                                                 device, args.timing_iterations)
    prior = prior_seconds(mask.shape, config, device)
    applications = 2 * (config.cg_iterations + 1)
    print(f"training iteration with CG DC ({config.cg_iterations} CG iterations): {cg_iteration * 1e3:.1f} ms "
          f"(median); floor, {applications} normal-operator applications: {cg_floor * 1e3:.1f} ms; "
          f"ratio {cg_iteration / cg_floor:.2f}")
    print(f"training iteration, default configuration (dc_solver={config.dc_solver}): {iteration * 1e3:.1f} ms "
          f"(median); the CG floor timed beside it: {floor * 1e3:.1f} ms; ratio {iteration / floor:.2f}")
    print(f"radial mask (CG DC, 2D FFTs): training iteration {radial_iteration * 1e3:.1f} ms (median); "
          f"its floor {radial_floor * 1e3:.1f} ms; ratio {radial_iteration / radial_floor:.2f}")
    print(f"the prior's forward and backward (grid + MLP over {mask.size} pixels): "
          f"{prior * 1e3:.1f} ms ({prior / floor:.2f} of the CG floor)")

    reached, best, final = time_to_quality(measured, mask, reference, config, device)
    print(f"UnrollINR: within {QUALITY_TOLERANCE_DB} dB of its best PSNR ({best:.2f} dB) after {reached:.1f} s; "
          f"final image {final:.2f} dB")
    if baselines.bart_available():
        bart_seconds, lam, bart_psnr = bart_time(measured, reference)
        ratio = reached / bart_seconds
        print(f"BART ecalib + pics -l1 -r {lam:g}: {bart_seconds:.1f} s, {bart_psnr:.2f} dB; "
              f"time-to-quality ratio {ratio:.1f}")
    else:
        ratio = float("nan")
        print("BART is not installed: no time-to-quality ratio")

    with tempfile.TemporaryDirectory() as folder:
        maps_file = Path(folder) / "maps.npy"
        np.save(maps_file, maps)
        peak_10, peak_40 = (peak_memory(args, n, maps_file, dc_solver="cg") for n in (10, 40))
        by_slices = {n: peak_memory(args, config.cg_iterations, maps_file, n) for n in (1, 2, 4)}
    print(f"peak memory with CG DC: {peak_10:.0f} MiB with 10 CG iterations, {peak_40:.0f} MiB with 40")
    print("peak memory of the default configuration by slices batched: "
          + ", ".join(f"{n}: {mib:.0f} MiB" for n, mib in by_slices.items()))
    print(f"floor_ratio={iteration / floor:.2f} time_to_quality_vs_bart={ratio:.2f} "
          f"peak_mem_ratio_40_10={peak_40 / peak_10:.3f}")


if __name__ == "__main__":
    main()
