"""Fully sampled k-space ``(coils, ky, kx)`` as an everyday scan's field of view would give
it: the object cut at the field of view's edges, or wrapped onto itself; or as a scan at a
lower matrix, or with the phase encoding along the other axis, would. ``bench/robust.py``
and the tests check the reconstruction on them."""

from __future__ import annotations

import numpy as np
import torch

from unrollinr.fft import fft2c, ifft2c
from unrollinr.masks import centre_range


def _central_half(kspace: np.ndarray, *, rows: bool) -> np.ndarray:
    """The k-space of the central half of the field of view along x, and along y too with
    ``rows``: an object cut at those edges."""
    images = ifft2c(torch.from_numpy(np.ascontiguousarray(kspace))).numpy()
    n_y, n_x = kspace.shape[-2:]
    y = slice(n_y // 4, n_y // 4 + n_y // 2) if rows else slice(None)
    cut = np.ascontiguousarray(images[..., y, n_x // 4: n_x // 4 + n_x // 2])
    return fft2c(torch.from_numpy(cut)).numpy().astype(np.complex64)


def cut_readout(kspace: np.ndarray) -> np.ndarray:
    """The central half of x: the object cut at both readout edges (what readout-oversampling
    removal gives when the head is wider than the field of view)."""
    return _central_half(kspace, rows=False)


def small_fov(kspace: np.ndarray) -> np.ndarray:
    """The central half of x and of y: the object cut at every edge."""
    return _central_half(kspace, rows=True)


def pe_wrap(kspace: np.ndarray) -> np.ndarray:
    """Every other phase-encode line: half the PE field of view, so that the object wraps
    (scaled to keep the image level)."""
    return (np.ascontiguousarray(kspace[:, ::2, :]) * np.sqrt(2)).astype(np.complex64)


def lower_resolution(kspace: np.ndarray, fraction: float = 0.8) -> np.ndarray:
    """The central ``fraction`` of ky and of kx, about the centre sample: the same field of
    view scanned at a lower matrix (of odd size, as often as not)."""
    rows, columns = (centre_range(n, round(fraction * n)) for n in kspace.shape[-2:])
    return np.ascontiguousarray(kspace[..., rows, columns]).astype(np.complex64)


def phase_encoding_turned(kspace: np.ndarray) -> np.ndarray:
    """``(coils, kx, ky)``: readout and phase encoding swapped, the scan prescribed with its
    phase encoding along the other axis (the image transposed)."""
    return np.ascontiguousarray(np.swapaxes(kspace, -2, -1)).astype(np.complex64)
