"""The speed issue's GPU targets, on synthetic data; runs on any device.

1. One slice of 368 x 368 with 15 coils (the paper's knee matrix) at R = 8: seconds for
   the whole reconstruction with the default configuration, ESPIRiT maps included, and
   its PSNR; and the PSNR of the slow configuration (CG data consistency with 20 CG
   iterations from the first step, ``--slow-iterations`` Adam iterations: the paper's
   setting up to its 6000 iterations), which the default must match within 0.3 dB.
2. An exam of 20 slices of 384 x 384 with 12 coils (the paper's prospective protocol) at
   R = 8, every slice trained in one batched run on one device: seconds for the maps (per
   slice, on the same device) and for the training, and the PSNR of each slice.

Data: slices of the 3D Shepp-Logan phantom with a smooth phase, birdcage coils and
complex noise (``unrollinr.phantoms``), random line masks with Table I's ACS lines
scaled to the matrix, a different mask per slice. Reference: the noise-free phantom's
magnitude (the RSS of the noise-free coil images: the maps have ``sum |S|^2 = 1``), since
the RSS of the noisy data is a poor one here: at 368^2 with 15 coils it scores 25.1 dB
against the truth, and a denoised reconstruction scores above the fully sampled data. The
last line is machine-readable:

    slice_seconds=<a> exam_seconds=<b> slow_minus_default_db=<c>

(``nan`` for a part that was skipped).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import device_name, overrides, synchronize  # noqa: E402

from unrollinr.config import ReconConfig  # noqa: E402
from unrollinr.masks import random_line_mask  # noqa: E402
from unrollinr.metrics import psnr  # noqa: E402
from unrollinr.phantoms import multicoil_kspace, phantom_volume  # noqa: E402
from unrollinr.recon import default_device, prepare_slices, reconstruct_prepared  # noqa: E402


def undersampled_exam(slices: int, size: int, coils: int, acceleration: float
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The noise-free magnitude images ``(slices, size, size)``, the masks ``(slices, size, size)``
    and the undersampled k-space ``(slices, coils, size, size)``, zero where not sampled."""
    images = phantom_volume(slices, size)
    kspace = multicoil_kspace(images, coils, seed=0)
    masks = np.stack([random_line_mask((size, size), acceleration, seed=s) for s in range(slices)])
    return np.abs(images), masks, (kspace * masks[:, None]).astype(np.complex64)


def timed_reconstruction(measured: np.ndarray, masks: np.ndarray, config: ReconConfig, device: torch.device
                         ) -> tuple[np.ndarray, float, float]:
    """Reconstruct all slices in one batched run: images ``(slices, y, x)``, seconds for the
    maps and seconds for the training (its set-up included)."""
    synchronize(device)
    start = time.perf_counter()
    data, masks, maps = prepare_slices(measured, masks, config, device=device)
    maps_seconds = time.perf_counter() - start
    start = time.perf_counter()
    images, _ = reconstruct_prepared(data, masks, maps, config, device=device, progress=False)
    synchronize(device)
    return images, maps_seconds, time.perf_counter() - start


def psnrs(truth: np.ndarray, images: np.ndarray) -> list[float]:
    """PSNR of each slice's image ``(slices, y, x)`` against its truth."""
    return [psnr(reference, image) for reference, image in zip(truth, images, strict=True)]


def one_slice(args: argparse.Namespace, config: ReconConfig, device: torch.device) -> tuple[float, float]:
    """Seconds for one slice and the slow configuration's PSNR minus the default's."""
    truth, masks, measured = undersampled_exam(1, args.slice_size, args.slice_coils, args.R)
    images, maps_seconds, train_seconds = timed_reconstruction(measured, masks, config, device)
    seconds = maps_seconds + train_seconds
    quality = psnrs(truth, images)[0]
    print(f"one slice {args.slice_size}^2, {args.slice_coils} coils, R={args.R:g}: {seconds:.1f} s "
          f"(maps {maps_seconds:.1f} s, training {train_seconds:.1f} s), PSNR {quality:.2f} dB")
    if args.slow_iterations == 0:
        return seconds, float("nan")
    slow = ReconConfig.from_strings({"dc_solver": "cg", "cg_training_iterations": config.cg_iterations,
                                     "iterations": args.slow_iterations,
                                     "patience": args.slow_iterations}, base=config)
    slow_images, slow_maps, slow_train = timed_reconstruction(measured, masks, slow, device)
    slow_quality = psnrs(truth, slow_images)[0]
    print(f"slow configuration (CG DC, {args.slow_iterations} iterations): {slow_maps + slow_train:.1f} s, "
          f"PSNR {slow_quality:.2f} dB; default minus slow {quality - slow_quality:+.2f} dB")
    return seconds, slow_quality - quality


def exam(args: argparse.Namespace, config: ReconConfig, device: torch.device) -> float:
    """Seconds for the whole exam, all slices batched."""
    truth, masks, measured = undersampled_exam(args.exam_slices, args.exam_size, args.exam_coils, args.R)
    images, maps_seconds, train_seconds = timed_reconstruction(measured, masks, config, device)
    seconds = maps_seconds + train_seconds
    values = psnrs(truth, images)
    print(f"exam of {args.exam_slices} slices {args.exam_size}^2, {args.exam_coils} coils, R={args.R:g}, batched: "
          f"{seconds:.1f} s (maps {maps_seconds:.1f} s, training {train_seconds:.1f} s); PSNR median "
          f"{statistics.median(values):.2f} dB, range {min(values):.2f}-{max(values):.2f}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--set", action="append", metavar="NAME=VALUE", default=[],
                        help="override one ReconConfig field (repeatable)")
    parser.add_argument("--R", type=float, default=8)
    parser.add_argument("--slice-size", type=int, default=368)
    parser.add_argument("--slice-coils", type=int, default=15)
    parser.add_argument("--slow-iterations", type=int, default=1000, help="0 skips the slow configuration")
    parser.add_argument("--exam-slices", type=int, default=20, help="0 skips the exam")
    parser.add_argument("--exam-size", type=int, default=384)
    parser.add_argument("--exam-coils", type=int, default=12)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = ReconConfig.from_strings(overrides(args))
    device = torch.device(args.device) if args.device else default_device()
    print(f"device {device_name(args.device)}, torch {torch.__version__}")
    slice_seconds, slow_gap = one_slice(args, config, device)
    exam_seconds = exam(args, config, device) if args.exam_slices else float("nan")
    print(f"slice_seconds={slice_seconds:.1f} exam_seconds={exam_seconds:.1f} slow_minus_default_db={slow_gap:.2f}")


if __name__ == "__main__":
    main()
