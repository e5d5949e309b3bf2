"""Coil-side preprocessing: ACS detection, ESPIRiT maps, coil compression, prewhitening.

Arrays here are NumPy, k-space ``(coils, ky, kx)`` centred, masks ``(ky, kx)`` boolean.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from unrollinr.espirit import espirit

logger = logging.getLogger(__name__)


# Calibration extent per side used by default (BART's default calibration size is 24).
MAX_CALIBRATION = 32
MIN_KERNEL_WIDTH = 3


class CalibrationError(ValueError):
    """The data hold no usable calibration (ACS) region."""


@dataclass(frozen=True)
class CalibrationRegion:
    """The fully sampled centre: half-open ranges along ``ky`` and ``kx``."""

    ky: tuple[int, int]
    kx: tuple[int, int]

    @property
    def shape(self) -> tuple[int, int]:
        """``(ky lines, kx samples)``."""
        return (self.ky[1] - self.ky[0], self.kx[1] - self.kx[0])

    def centred_square_width(self, shape: tuple[int, int]) -> int:
        """The largest width ``w`` whose centred ``w x w`` window (sigpy's ``resize``
        convention: starting at ``n // 2 - w // 2``) lies inside this region."""
        width = min(self.shape)
        while width > 0:
            inside = all(
                lo <= n // 2 - width // 2 and n // 2 - width // 2 + width <= hi
                for (lo, hi), n in zip((self.ky, self.kx), shape, strict=True)
            )
            if inside:
                return width
            width -= 1
        return 0


def _run_around(sampled: np.ndarray, centre: int) -> tuple[int, int]:
    """The contiguous run of ``True`` in a 1D array that contains ``centre``."""
    if not sampled[centre]:
        return (centre, centre)
    lo = centre
    while lo > 0 and sampled[lo - 1]:
        lo -= 1
    hi = centre + 1
    while hi < len(sampled) and sampled[hi]:
        hi += 1
    return (lo, hi)


def find_calibration_region(mask: np.ndarray) -> CalibrationRegion:
    """The fully sampled rectangle around the k-space centre of a ``(ky, kx)`` mask.

    Raises :class:`CalibrationError` when the centre itself is not sampled.
    """
    mask = np.asarray(mask, dtype=bool)
    n_y, n_x = mask.shape
    ky = _run_around(mask[:, n_x // 2], n_y // 2)
    kx = _run_around(mask[n_y // 2, :], n_x // 2)
    # shrink symmetrically until the rectangle is fully sampled (needed for 2D masks)
    while ky[1] > ky[0] and kx[1] > kx[0] and not mask[ky[0]:ky[1], kx[0]:kx[1]].all():
        if ky[1] - ky[0] >= kx[1] - kx[0]:
            ky = (ky[0] + 1, ky[1] - 1) if ky[1] - ky[0] > 1 else (ky[0], ky[0])
        else:
            kx = (kx[0] + 1, kx[1] - 1) if kx[1] - kx[0] > 1 else (kx[0], kx[0])
    region = CalibrationRegion(ky=ky, kx=kx)
    if min(region.shape) == 0:
        raise CalibrationError("the k-space centre is not sampled: no ACS region to estimate coil maps from")
    return region


def espirit_maps(
    kspace: np.ndarray,
    mask: np.ndarray,
    *,
    calib_width: int = 0,
    kernel_width: int = 6,
    thresh: float = 0.02,
    crop: float = 0.8,
    fill_holes: bool = True,
    method: str = "rectangular",
    sets: int = 1,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """ESPIRiT coil maps from the ACS region: one set, or more (soft SENSE).

    Parameters
    ----------
    kspace
        ``(coils, ky, kx)`` centred k-space, zero where not sampled.
    mask
        ``(ky, kx)`` sampling mask; the ACS region is found from it.
    calib_width
        Largest calibration extent per side; 0 means :data:`MAX_CALIBRATION` for the
        rectangular method and the largest centred square for sigpy's.
    crop
        Eigenvalue threshold below which each set of maps is zeroed (the background, and
        for the second set every pixel that one sensitivity vector explains). Holes inside
        the first set's support are filled, so that the maps never vanish inside the object.
    method
        ``"rectangular"`` (:func:`unrollinr.espirit.espirit` on the whole ACS rectangle) or
        ``"sigpy"`` (sigpy's ``EspiritCalib`` on the largest centred square; one set only).
    sets
        How many sets of maps (:func:`unrollinr.espirit.espirit`). Each set after the first
        is non-zero only where its eigenvalue passes ``crop``, that is where the data call
        for it (nowhere, for an object well inside the field of view).
    device
        Torch device the rectangular method computes on (sigpy's runs on the CPU).

    Returns
    -------
    ``(sets, coils, ky, kx)`` complex64 maps with ``sum |S|^2`` 1 inside each set's support,
    0 outside.
    """
    region = find_calibration_region(mask)
    kernel_width = fitting_kernel_width(region, kernel_width)
    kspace = np.asarray(kspace, dtype=np.complex64)
    if method == "rectangular":
        maps, eigenvalues = _rectangular_espirit(kspace, region, calib_width or MAX_CALIBRATION, kernel_width, thresh,
                                                 sets, torch.device(device))
    elif method == "sigpy":
        if sets != 1:
            raise ValueError("sigpy's ESPIRiT gives one set of maps; use method 'rectangular' for more")
        maps, eigenvalues = _sigpy_espirit(kspace, region, calib_width, kernel_width, thresh)
    else:
        raise ValueError(f"unknown ESPIRiT method {method!r}; expected 'rectangular' or 'sigpy'")
    support = eigenvalues > crop
    if fill_holes:
        support[0] = ndimage.binary_fill_holes(support[0])
    for s in range(1, len(support)):
        logger.debug("ESPIRiT: set %d of maps on %.1f%% of the image", s + 1, 100 * support[s].mean())
    return (maps * support[:, None]).astype(np.complex64)


def fitting_kernel_width(region: CalibrationRegion, kernel_width: int) -> int:
    """The ESPIRiT kernel width for an ACS region: at most ``kernel_width``, and small
    enough that the kernel fits the region at least as many times as it is wide in each
    direction (``width <= (lines + 1) // 2``). With 8 ACS lines a 6-wide kernel fits only 3
    times in ``ky``; its maps then cover 30% of the head (measured), a 4-wide one 74%.
    """
    fitting = min(kernel_width, (min(region.shape) + 1) // 2)
    if fitting < MIN_KERNEL_WIDTH:
        raise CalibrationError(
            f"the ACS region ({region.shape[0]} x {region.shape[1]}) is too small for ESPIRiT: "
            f"at least {2 * MIN_KERNEL_WIDTH - 1} ACS lines are needed")
    if fitting < kernel_width:
        logger.info("ESPIRiT kernel width %d for %d ACS lines (asked for %d)", fitting, region.shape[0], kernel_width)
    return fitting


def _centred_subrange(bounds: tuple[int, int], centre: int, width: int) -> slice:
    """At most ``width`` samples of ``bounds``, as centred on ``centre`` as the bounds allow."""
    lo, hi = bounds
    if hi - lo <= width:
        return slice(lo, hi)
    start = min(max(centre - width // 2, lo), hi - width)
    return slice(start, start + width)


def _rectangular_espirit(kspace: np.ndarray, region: CalibrationRegion, max_side: int, kernel_width: int,
                         thresh: float, sets: int, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    _, n_y, n_x = kspace.shape
    rows = _centred_subrange(region.ky, n_y // 2, max_side)
    cols = _centred_subrange(region.kx, n_x // 2, max_side)
    logger.debug("ESPIRiT: ACS %s, calibrating on %d x %d", region.shape, rows.stop - rows.start,
                 cols.stop - cols.start)
    calib = torch.from_numpy(np.ascontiguousarray(kspace[:, rows, cols])).to(device)
    maps, eigenvalues = espirit(calib, (n_y, n_x), kernel_width=kernel_width, thresh=thresh, sets=sets)
    return maps.cpu().numpy(), eigenvalues.cpu().numpy()


def _sigpy_espirit(kspace: np.ndarray, region: CalibrationRegion, calib_width: int, kernel_width: int,
                   thresh: float) -> tuple[np.ndarray, np.ndarray]:
    import sigpy.mri

    fitting = region.centred_square_width(kspace.shape[1:])
    width = min(calib_width, fitting) if calib_width else fitting
    if width < 2 * kernel_width - 1:
        raise CalibrationError(f"no centred square calibration window of at least {2 * kernel_width - 1} "
                               f"fits the ACS region {region.shape}")
    maps, eigenvalues = sigpy.mri.app.EspiritCalib(
        kspace, calib_width=width, thresh=thresh, kernel_width=kernel_width, crop=0.0,
        output_eigenvalue=True, show_pbar=False).run()
    return np.asarray(maps)[None], np.asarray(eigenvalues).reshape(1, *kspace.shape[1:])


def coil_compression_matrix(kspace: np.ndarray, n_virtual: int) -> np.ndarray:
    """The ``(n_virtual, coils)`` SVD coil-compression matrix of ``(coils, ...)`` k-space.

    It comes from the sampled data themselves (all non-zero samples).
    """
    n_coils = kspace.shape[0]
    if not 0 < n_virtual <= n_coils:
        raise ValueError(f"cannot compress {n_coils} coils to {n_virtual}")
    samples = kspace.reshape(n_coils, -1)
    samples = samples[:, np.abs(samples).sum(axis=0) > 0]
    left, _, _ = np.linalg.svd(samples, full_matrices=False)
    return left[:, :n_virtual].conj().T.astype(np.complex64)


def apply_coil_matrix(matrix: np.ndarray, kspace: np.ndarray) -> np.ndarray:
    """``matrix @ kspace`` over the coil axis: ``(v, c)`` and ``(c, ...)`` to ``(v, ...)``."""
    return np.einsum("vc,c...->v...", matrix, kspace).astype(np.complex64)


def prewhitening_matrix(noise: np.ndarray) -> np.ndarray:
    """The ``(coils, coils)`` matrix that whitens coil noise, from noise samples ``(coils, samples)``.

    Applied as ``W @ data``, it gives data whose coil noise is uncorrelated with unit variance.
    """
    noise = np.asarray(noise).reshape(noise.shape[0], -1)
    covariance = noise @ noise.conj().T / max(noise.shape[1] - 1, 1)
    cholesky = np.linalg.cholesky(covariance)
    return np.linalg.inv(cholesky).astype(np.complex64)
