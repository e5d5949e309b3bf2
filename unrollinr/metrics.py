"""Image-quality metrics on magnitude images: PSNR, SSIM and NRMSE.

All take a reference and an estimate of the same ``(y, x)`` shape; complex inputs are
compared by magnitude. The dynamic range is the reference's maximum.

A root-sum-of-squares reference of noisy coils is not zero outside the object: its
background is the noise floor, a few percent of the maximum. A reconstruction that
suppresses that noise is scored by whole-image PSNR as if it had erred there.
:func:`object_support` and ``psnr(..., region=...)`` score the object alone.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

_SSIM_WINDOW = 7
_SSIM_K1, _SSIM_K2 = 0.01, 0.03
OBJECT_MAX_THRESHOLD = 0.1  # of the reference's maximum
_OBJECT_OPENING = 2
_LOG_FLOOR = 1e-6  # of the maximum, added before the log


def _magnitudes(reference: np.ndarray, estimate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    reference = np.abs(np.asarray(reference)).astype(np.float64)
    estimate = np.abs(np.asarray(estimate)).astype(np.float64)
    if reference.shape != estimate.shape:
        raise ValueError(f"shapes differ: reference {reference.shape}, estimate {estimate.shape}")
    return reference, estimate


def psnr(reference: np.ndarray, estimate: np.ndarray, region: np.ndarray | None = None) -> float:
    """Peak signal-to-noise ratio in dB, with the reference maximum as peak; the mean
    squared error over the pixels of the boolean ``region`` ``(y, x)`` only, if given."""
    reference, estimate = _magnitudes(reference, estimate)
    squared_errors = (reference - estimate) ** 2
    if region is not None:
        if region.dtype != bool or region.shape != reference.shape or not region.any():
            raise ValueError(f"region must be a non-empty boolean mask of shape {reference.shape}")
        squared_errors = squared_errors[region]
    mse = np.mean(squared_errors)
    return float(10 * np.log10(reference.max() ** 2 / mse)) if mse > 0 else float("inf")


def object_support(reference: np.ndarray) -> np.ndarray:
    """The object in a reference image ``(y, x)``, as a boolean mask.

    The threshold splits the histogram of the log magnitude in two (Otsu's): the noise
    floor and the object. It is capped at :data:`OBJECT_MAX_THRESHOLD` of the maximum,
    so that an object that fills the field of view, whose histogram has no floor, is not
    split between its bright and dark tissue. The mask is opened to drop specks of noise,
    and its holes (dark tissue, fluid) are filled."""
    magnitude = np.abs(np.asarray(reference)).astype(np.float64)
    peak = magnitude.max()
    if peak == 0:
        raise ValueError("the reference is zero everywhere: it has no object")
    threshold = min(np.exp(_otsu_threshold(np.log(magnitude + _LOG_FLOOR * peak))), OBJECT_MAX_THRESHOLD * peak)
    bright = magnitude > threshold
    return ndimage.binary_fill_holes(ndimage.binary_opening(bright, iterations=_OBJECT_OPENING))


def _otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """The bin edge that maximises the between-class variance of ``values`` (Otsu, 1979)."""
    counts, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    below = np.cumsum(counts)[:-1].astype(np.float64)
    above = counts.sum() - below
    sum_below = np.cumsum(counts * centres)[:-1]
    mean_below = sum_below / np.maximum(below, 1)
    mean_above = (np.sum(counts * centres) - sum_below) / np.maximum(above, 1)
    between = below * above * (mean_below - mean_above) ** 2
    return float(edges[1:-1][np.argmax(between)])


def nrmse(reference: np.ndarray, estimate: np.ndarray) -> float:
    """``||estimate - reference|| / ||reference||``."""
    reference, estimate = _magnitudes(reference, estimate)
    return float(np.linalg.norm(estimate - reference) / np.linalg.norm(reference))


def ssim(reference: np.ndarray, estimate: np.ndarray) -> float:
    """Mean structural similarity (Wang et al. 2004) with a 7x7 uniform window and
    sample covariances, averaged away from the borders (scikit-image's defaults)."""
    reference, estimate = _magnitudes(reference, estimate)
    data_range = reference.max()
    n = _SSIM_WINDOW**2
    cov_norm = n / (n - 1)

    def local_mean(image: np.ndarray) -> np.ndarray:
        return ndimage.uniform_filter(image, size=_SSIM_WINDOW)

    mean_r, mean_e = local_mean(reference), local_mean(estimate)
    var_r = cov_norm * (local_mean(reference * reference) - mean_r**2)
    var_e = cov_norm * (local_mean(estimate * estimate) - mean_e**2)
    cov = cov_norm * (local_mean(reference * estimate) - mean_r * mean_e)
    c1 = (_SSIM_K1 * data_range) ** 2
    c2 = (_SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mean_r * mean_e + c1) * (2 * cov + c2)) / (
        (mean_r**2 + mean_e**2 + c1) * (var_r + var_e + c2))
    pad = (_SSIM_WINDOW - 1) // 2
    return float(ssim_map[pad:-pad, pad:-pad].mean())


def all_metrics(reference: np.ndarray, estimate: np.ndarray) -> dict[str, float]:
    """``{"psnr", "ssim", "nrmse"}`` for one image."""
    return {"psnr": psnr(reference, estimate), "ssim": ssim(reference, estimate),
            "nrmse": nrmse(reference, estimate)}


def root_sum_of_squares(coil_images: np.ndarray, axis: int = 0) -> np.ndarray:
    """RSS combination of coil images along ``axis``."""
    return np.sqrt(np.sum(np.abs(coil_images) ** 2, axis=axis))
