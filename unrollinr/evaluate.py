"""Retrospective comparison of UnrollINR with the classic reconstructions.

Fully sampled k-space is undersampled with a chosen mask at several accelerations; each
method reconstructs from the same data and coil maps, and is scored against the
root-sum-of-squares of the fully sampled data.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from unrollinr import baselines
from unrollinr.coils import find_calibration_region, fitting_kernel_width
from unrollinr.config import ReconConfig
from unrollinr.masks import make_mask
from unrollinr.metrics import all_metrics
from unrollinr.recon import prepare_maps, reconstruct

logger = logging.getLogger(__name__)
T = TypeVar("T")

L1_LAMBDAS = (0.0003, 0.001, 0.003, 0.01, 0.03)
# Each converged TV run takes ~30 s at 256^2, so a shorter grid than for l1
TV_LAMBDAS = (0.0003, 0.001, 0.003, 0.01)
# The paper's ablations, the paper's loss in place of ours, and the pixel-image control
# that shows what the INR itself adds.
ABLATIONS: dict[str, dict[str, Any]] = {
    "paper's loss (TV, l1 per coil entry)": {"tv_second_order": 0.0, "tv_log_scale": 0.0, "coil_l1": False},
    "w/o R (CG-SENSE)": {"regularizer": "none", "dc_solver": "cg"},
    "w/o DC (INR alone)": {"data_consistency": False},
    "w/o TV": {"tv": False, "zero_outside_maps": True},
    "DenseGrid (DINER-like)": {"encoding": "DenseGrid"},
    "pixel-image control": {"regularizer": "pixel"},
}
METHOD_ORDER = ("zero-filled", "CG-SENSE", "L1-ESPIRiT", "BART L1-ESPIRiT", "BART TV-SENSE", "UnrollINR")


@dataclass
class MethodResult:
    """One method at one acceleration: metrics, wall time, the image and its tuning."""

    method: str
    acceleration: float
    psnr: float
    ssim: float
    nrmse: float
    seconds: float
    image: np.ndarray = field(repr=False)
    setting: str = ""


def reference_image(kspace: np.ndarray) -> np.ndarray:
    """RSS of the fully sampled ``(coils, ky, kx)`` k-space, ``(ky, kx)``."""
    return baselines.kspace_rss(kspace)


def _timed(run: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, float]:
    start = time.perf_counter()
    result = run(*args, **kwargs)
    return result, time.perf_counter() - start


def _score(method: str, acceleration: float, reference: np.ndarray, image: np.ndarray, seconds: float,
           setting: str = "") -> MethodResult:
    scores = all_metrics(reference, image)
    logger.info("R=%g %-16s PSNR %.2f SSIM %.4f (%.1f s) %s", acceleration, method, scores["psnr"],
                scores["ssim"], seconds, setting)
    return MethodResult(method, acceleration, seconds=seconds, image=np.asarray(image), setting=setting, **scores)


def _best_over(method: str, acceleration: float, reference: np.ndarray, lambdas: Sequence[float],
               run: Callable[[float], np.ndarray]) -> MethodResult:
    """Oracle tuning: the lambda with the highest PSNR against the reference."""
    candidates = []
    for lam in lambdas:
        image, seconds = _timed(run, lam)
        candidates.append(_score(method, acceleration, reference, image, seconds, f"lambda={lam:g}"))
    return max(candidates, key=lambda r: r.psnr)


def evaluate(
    kspace: np.ndarray,
    accelerations: Sequence[float],
    *,
    config: ReconConfig | None = None,
    mask_kind: str = "random",
    seed: int = 0,
    l1_lambdas: Sequence[float] = L1_LAMBDAS,
    use_bart: bool | None = None,
    device: str | None = None,
) -> list[MethodResult]:
    """Run every method at every acceleration on fully sampled ``(coils, ky, kx)`` k-space."""
    config = ReconConfig() if config is None else config
    use_bart = baselines.bart_available() if use_bart is None else use_bart
    reference = reference_image(kspace)
    results: list[MethodResult] = []
    for acceleration in accelerations:
        mask = make_mask(mask_kind, kspace.shape[1:], acceleration, seed=seed)
        measured = (kspace * mask).astype(np.complex64)
        (measured_cc, maps), map_seconds = _timed(prepare_maps, measured, mask, None, config)
        results.append(_score("zero-filled", acceleration, reference, *_timed(baselines.zero_filled, measured)))
        image, seconds = _timed(baselines.cg_sense, measured_cc, mask, maps, iterations=10)
        results.append(_score("CG-SENSE", acceleration, reference, image, seconds + map_seconds))
        results.append(_best_over("L1-ESPIRiT", acceleration, reference, l1_lambdas,
                                  functools.partial(baselines.l1_wavelet, measured_cc, mask, maps)))
        if use_bart:
            # BART gets the kernel width our ESPIRiT uses for this many ACS lines
            kernel = fitting_kernel_width(find_calibration_region(mask), config.espirit_kernel_width)
            bart_maps, bart_map_seconds = _timed(baselines.bart_maps, measured, kernel_width=kernel)
            best = _best_over("BART L1-ESPIRiT", acceleration, reference, l1_lambdas,
                              functools.partial(baselines.bart_pics, measured, bart_maps))
            best.seconds += bart_map_seconds
            results.append(best)
            # TV alone, the regulariser UnrollINR's loss adds, with BART's solver and maps
            best = _best_over("BART TV-SENSE", acceleration, reference, TV_LAMBDAS,
                              functools.partial(baselines.bart_pics, measured, bart_maps, regularizer="tv"))
            best.seconds += bart_map_seconds
            results.append(best)
        image, seconds = _timed(reconstruct, measured_cc, mask, csm=maps, config=config, device=device)
        results.append(_score("UnrollINR", acceleration, reference, image, seconds + map_seconds))
    return results


def evaluate_ablations(kspace: np.ndarray, acceleration: float, *, config: ReconConfig | None = None,
                       variants: dict[str, dict] | None = None, mask_kind: str = "random", seed: int = 0,
                       device: str | None = None) -> list[MethodResult]:
    """UnrollINR variants (default: :data:`ABLATIONS`) on the same data and coil maps."""
    config = ReconConfig() if config is None else config
    variants = ABLATIONS if variants is None else variants
    reference = reference_image(kspace)
    mask = make_mask(mask_kind, kspace.shape[1:], acceleration, seed=seed)
    measured, maps = prepare_maps((kspace * mask).astype(np.complex64), mask, None, config)
    results = []
    for name, overrides in variants.items():
        variant = dataclasses.replace(config, **overrides)
        image, seconds = _timed(reconstruct, measured, mask, csm=maps, config=variant, device=device)
        results.append(_score(name, acceleration, reference, image, seconds))
    return results


def write_tables(results: Sequence[MethodResult], out_dir: Path) -> tuple[Path, Path]:
    """Write ``results.md`` and ``results.csv`` (PSNR, SSIM, NRMSE, seconds per method and R)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / "results.csv", out_dir / "results.md"
    columns = ["R", "method", "psnr_db", "ssim", "nrmse", "seconds", "setting"]
    rows = [[f"{r.acceleration:g}", r.method, f"{r.psnr:.2f}", f"{r.ssim:.4f}", f"{r.nrmse:.4f}",
             f"{r.seconds:.1f}", r.setting] for r in results]
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return md_path, csv_path


def write_figure(results: Sequence[MethodResult], reference: np.ndarray, path: Path,
                 *, zoom: tuple[slice, slice] | None = None, error_gain: float = 5.0) -> Path:
    """A figure like the paper's Fig. 2: per R, a row of images with a zoomed inset and a
    row of absolute error maps (times ``error_gain``), with PSNR/SSIM under each image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    accelerations = sorted({r.acceleration for r in results})
    methods = [m for m in METHOD_ORDER if any(r.method == m for r in results)]
    n_y, n_x = reference.shape
    zoom = zoom or (slice(n_y * 3 // 8, n_y * 5 // 8), slice(n_x * 3 // 8, n_x * 5 // 8))
    scale = float(np.abs(reference).max())
    fig, axes = plt.subplots(2 * len(accelerations), len(methods) + 1,
                             figsize=(2.2 * (len(methods) + 1), 4.4 * len(accelerations)), squeeze=False)
    for row, acceleration in enumerate(accelerations):
        image_axes, error_axes = axes[2 * row], axes[2 * row + 1]
        image_axes[0].imshow(np.abs(reference), cmap="gray", vmin=0, vmax=scale)
        image_axes[0].set_title("reference", fontsize=8)
        image_axes[0].set_ylabel(f"R = {acceleration:g}")
        error_axes[0].imshow(np.abs(reference)[zoom], cmap="gray", vmin=0, vmax=scale)
        error_axes[0].set_title("zoom", fontsize=8)
        for column, method in enumerate(methods, start=1):
            match = [r for r in results if r.method == method and r.acceleration == acceleration]
            if not match:
                continue
            result = match[0]
            magnitude = np.abs(result.image)
            axis = image_axes[column]
            axis.imshow(magnitude, cmap="gray", vmin=0, vmax=scale)
            inset = axis.inset_axes([0.6, 0.6, 0.4, 0.4])
            inset.imshow(magnitude[zoom], cmap="gray", vmin=0, vmax=scale)
            inset.set_xticks([])
            inset.set_yticks([])
            axis.set_title(method, fontsize=8)
            axis.set_xlabel(f"{result.psnr:.2f} dB / {result.ssim:.4f}", fontsize=7)
            error_axes[column].imshow(np.abs(magnitude - np.abs(reference)) * error_gain, cmap="inferno",
                                      vmin=0, vmax=scale)
        for axis in list(image_axes) + list(error_axes):
            axis.set_xticks([])
            axis.set_yticks([])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
