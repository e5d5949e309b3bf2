"""The public reconstruction entry point for one 2D multi-coil slice."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from unrollinr.coils import (
    CalibrationError,
    apply_coil_matrix,
    coil_compression_matrix,
    espirit_maps,
    find_calibration_region,
)
from unrollinr.config import ReconConfig
from unrollinr.sense import SenseOp
from unrollinr.training import FitResult, fit

logger = logging.getLogger(__name__)


def default_device() -> torch.device:
    """CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def mask_from_kspace(kspace: np.ndarray) -> np.ndarray:
    """The ``(ky, kx)`` sampling mask of zero-filled k-space ``(coils, ky, kx)``: non-zero samples."""
    return np.abs(kspace).sum(axis=0) > 0


def _validate(kspace: np.ndarray, mask: np.ndarray | None, csm: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    kspace = np.asarray(kspace)
    if kspace.ndim != 3:
        raise ValueError(f"kspace must be (coils, ky, kx), got shape {kspace.shape}")
    if not np.iscomplexobj(kspace):
        raise ValueError(f"kspace must be complex, got {kspace.dtype}")
    if not np.isfinite(kspace).all():
        raise ValueError("kspace contains NaN or infinite values")
    mask = mask_from_kspace(kspace) if mask is None else np.asarray(mask)
    if mask.shape != kspace.shape[1:]:
        raise ValueError(f"mask shape {mask.shape} does not match kspace (ky, kx) {kspace.shape[1:]}")
    if mask.dtype != bool:
        raise ValueError(f"mask must be boolean, got {mask.dtype}")
    if not mask.any():
        raise ValueError("the mask samples nothing")
    if csm is not None and np.shape(csm) != kspace.shape:
        raise ValueError(f"csm shape {np.shape(csm)} does not match kspace {kspace.shape}")
    return (kspace * mask).astype(np.complex64), mask


def prepare_maps(kspace: np.ndarray, mask: np.ndarray, csm: np.ndarray | None, config: ReconConfig, *,
                 calibration: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Coil compression (if configured) and ESPIRiT maps (unless given).

    Parameters
    ----------
    kspace, mask
        The imaging data ``(coils, ky, kx)`` and its ``(ky, kx)`` mask.
    calibration
        Optional separate calibration data ``(coils, ky, kx)`` and mask, e.g. separate ACS
        lines; by default the ACS region of ``kspace`` itself.

    Returns
    -------
    ``(kspace, maps)``, both ``(coils, ky, kx)`` complex64 after compression.
    """
    calib_kspace, calib_mask = (kspace, mask) if calibration is None else calibration
    if config.coil_compression and config.coil_compression < kspace.shape[0]:
        if csm is not None:
            raise ValueError("coil_compression cannot be combined with given coil maps")
        matrix = coil_compression_matrix(calib_kspace, config.coil_compression)
        kspace, calib_kspace = apply_coil_matrix(matrix, kspace), apply_coil_matrix(matrix, calib_kspace)
    if csm is None:
        csm = espirit_maps(calib_kspace, calib_mask, calib_width=config.espirit_calib_width,
                           kernel_width=config.espirit_kernel_width, thresh=config.espirit_thresh,
                           crop=config.espirit_crop)
    return kspace, np.asarray(csm, dtype=np.complex64)


def _protected_rows(mask: np.ndarray) -> np.ndarray:
    """``(ky, kx)``: the ACS rows of ``mask``, never held out; empty when there is no ACS."""
    protected = np.zeros_like(mask)
    try:
        region = find_calibration_region(mask)
    except CalibrationError:
        return protected
    protected[region.ky[0]:region.ky[1], :] = True
    return protected


def reconstruct_with_details(kspace: np.ndarray, mask: np.ndarray | None = None, *, csm: np.ndarray | None = None,
                             config: ReconConfig | None = None, device: str | torch.device | None = None,
                             progress: bool | None = None,
                             calibration: tuple[np.ndarray, np.ndarray] | None = None,
                             callback: Callable[[int, np.ndarray], None] | None = None) -> tuple[np.ndarray, FitResult]:
    """:func:`reconstruct`, also returning the :class:`FitResult` (history, timings, prior image).

    ``calibration`` optionally gives separate ACS data ``(coils, ky, kx)`` and its mask
    for the coil maps (see :func:`prepare_maps`). ``callback(iteration, image)`` sees the
    ``(ky, kx)`` image of each training iteration on the scale of the data.
    """
    config = ReconConfig() if config is None else config
    kspace, mask = _validate(kspace, mask, csm)
    device = default_device() if device is None else torch.device(device)
    kspace, maps = prepare_maps(kspace, mask, csm, config, calibration=calibration)
    protected = _protected_rows(mask)

    maps_t = torch.from_numpy(maps).unsqueeze(0).to(device)
    mask_t = torch.from_numpy(mask).unsqueeze(0).to(device)
    op = SenseOp(maps_t, mask_t)
    kspace_t = torch.from_numpy(kspace).unsqueeze(0).to(device)
    scale = float(op.adjoint(kspace_t).abs().max())
    if scale == 0:
        raise ValueError("the coil maps and data give an all-zero image: check the maps' support")
    on_iteration = None
    if callback is not None:
        def on_iteration(iteration: int, x: torch.Tensor) -> None:
            callback(iteration, (x[0] * scale).cpu().numpy())
    result = fit(op, kspace_t / scale, config, progress=progress,
                 protected=torch.from_numpy(protected).to(device), callback=on_iteration)
    image = (result.image[0] * scale).cpu().numpy().astype(np.complex64)
    return image, result


def reconstruct(kspace: np.ndarray, mask: np.ndarray | None = None, *, csm: np.ndarray | None = None,
                config: ReconConfig | None = None, device: str | torch.device | None = None) -> np.ndarray:
    """Reconstruct one undersampled multi-coil Cartesian slice with UnrollINR.

    Parameters
    ----------
    kspace
        ``(coils, ky, kx)`` complex k-space, centred (DC at ``n // 2``), zero where not sampled.
    mask
        ``(ky, kx)`` boolean sampling mask; ``None`` takes the non-zero samples.
    csm
        Optional ``(coils, ky, kx)`` coil maps; without them ESPIRiT runs on the ACS region.
    config
        :class:`~unrollinr.config.ReconConfig`; ``None`` is the default configuration.
    device
        Torch device; ``None`` picks CUDA when available, else the CPU.

    Returns
    -------
    ``(ky, kx)`` complex64 image on the scale of the data (``sum |S|^2 = 1`` maps).
    """
    image, _ = reconstruct_with_details(kspace, mask, csm=csm, config=config, device=device)
    return image
