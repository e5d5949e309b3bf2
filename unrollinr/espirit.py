"""ESPIRiT coil maps (Uecker et al. 2014) from a rectangular calibration region, in PyTorch.

sigpy's ``EspiritCalib`` calibrates on a centred *square* window. With line
undersampling the ACS block is short in ``ky`` and long in ``kx`` (e.g. 11 x 256), so a
square window keeps only 11 x 11 samples and the calibration matrix has too few rows
(49 blocks for 200 unknowns with a 5x5 kernel on 8 coils); its maps then have holes and
weak eigenvalues. Calibrating on the whole ACS rectangle (capped at
``max_calib`` samples per side) uses the same algorithm on all of the data:

1. the calibration matrix of all ``kernel x kernel`` blocks, across coils;
2. its rows with singular values above ``thresh * s_max`` span the signal subspace;
3. in image space, each pixel's ``C x C`` operator ``sum_k a_k a_k^H`` has eigenvalue 1
   where the data are consistent; its leading eigenvector is the coil map there, and
   where a second eigenvalue is close to 1 too (the object wraps, or is cut at the edge
   of the field of view), its eigenvector is a second set of maps.

The operator's entries are products of two kernels of width ``k`` in image space, so
their spectra fit in ``2k - 1`` samples: they are computed on a ``2k x 2k`` grid and
interpolated to the image matrix exactly, by zero-padding in k-space.

The normalisation follows sigpy and BART, so ``crop`` thresholds mean the same.
"""

from __future__ import annotations

import torch

from unrollinr.fft import fft2c, ifft2c

_KERNEL_CHUNK = 32


def _calibration_matrix(calib: torch.Tensor, kernel: int) -> torch.Tensor:
    """``(blocks, coils * kernel * kernel)`` from calibration data ``(coils, cy, cx)``."""
    blocks = calib.unfold(1, kernel, 1).unfold(2, kernel, 1)  # (C, by, bx, k, k)
    n_coils = calib.shape[0]
    return blocks.permute(1, 2, 0, 3, 4).reshape(-1, n_coils * kernel * kernel)


def _image_space_kernels(kernels: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Zero-pad ``(K, C, k, k)`` kernels to ``(K, C, y, x)`` (centred) and transform to image space."""
    n_y, n_x = shape
    k = kernels.shape[-1]
    padded = kernels.new_zeros(*kernels.shape[:2], n_y, n_x)
    y0, x0 = n_y // 2 - k // 2, n_x // 2 - k // 2
    padded[..., y0:y0 + k, x0:x0 + k] = kernels
    return ifft2c(padded)


def _pixel_operators(kernels: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """``sum_k a_k a_k^H`` per pixel, ``(y, x, coils, coils)``, for ``(K, coils, k, k)`` kernels,
    without the normalisation."""
    n_coils, width = kernels.shape[1], kernels.shape[-1]
    small = (min(shape[0], 2 * width), min(shape[1], 2 * width))
    operator = kernels.new_zeros(*small, n_coils, n_coils)
    for start in range(0, kernels.shape[0], _KERNEL_CHUNK):
        image_kernels = _image_space_kernels(kernels[start:start + _KERNEL_CHUNK], small)
        operator += torch.einsum("kcyx,kdyx->yxcd", image_kernels, image_kernels.conj())
    if small == shape:
        return operator
    spectrum = fft2c(operator.permute(2, 3, 0, 1))
    padded = spectrum.new_zeros(n_coils, n_coils, *shape)
    y0, x0 = shape[0] // 2 - small[0] // 2, shape[1] // 2 - small[1] // 2
    padded[..., y0:y0 + small[0], x0:x0 + small[1]] = spectrum
    # Each kernel's image scales as 1 / sqrt(pixels), so the products as 1 / pixels; the
    # orthonormal interpolation scales by sqrt(small pixels / pixels).
    scale = (small[0] * small[1] / (shape[0] * shape[1])) ** 0.5
    return ifft2c(padded).permute(2, 3, 0, 1) * scale


def espirit(
    calib: torch.Tensor,
    shape: tuple[int, int],
    *,
    kernel_width: int = 6,
    thresh: float = 0.02,
    sets: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ESPIRiT maps from the leading ``sets`` eigenvectors, and their eigenvalues.

    Parameters
    ----------
    calib
        Fully sampled calibration k-space ``(coils, cy, cx)``, any rectangle.
    shape
        Image matrix ``(y, x)`` of the maps.
    sets
        How many eigenvectors per pixel to keep, largest eigenvalue first: 1 is SENSE's one
        set of maps; 2 adds the second, which is non-zero where the coil signals of one
        pixel fit no single sensitivity vector (wrap-around, an object cut at the edge of
        the field of view: "soft SENSE").

    Returns
    -------
    ``maps`` ``(sets, coils, y, x)`` with unit norm over coils and each set's phase relative
    to coil 0, and ``eigenvalues`` ``(sets, y, x)`` (about 1 where a set explains the
    data, 0 where it does not).
    """
    n_coils = calib.shape[0]
    if min(calib.shape[1:]) <= kernel_width:
        raise ValueError(f"calibration region {tuple(calib.shape[1:])} must exceed the kernel width {kernel_width}")
    if not 1 <= sets <= n_coils:
        raise ValueError(f"sets must be between 1 and the number of coils ({n_coils}), got {sets}")
    matrix = _calibration_matrix(calib, kernel_width)
    _, singular, right = torch.linalg.svd(matrix, full_matrices=False)
    kept = right[singular > thresh * singular[0]]
    kernels = kept.reshape(-1, n_coils, kernel_width, kernel_width)

    n_y, n_x = shape
    operator = _pixel_operators(kernels, shape) * ((n_y * n_x) / kernel_width**2)
    # Hermitian per pixel: eigh gives every eigenvector at once (and faster than power iterations)
    eigenvalues, vectors = torch.linalg.eigh(operator)  # ascending
    eigenvalues = eigenvalues.flip(-1)[..., :sets].permute(2, 0, 1)
    maps = vectors.flip(-1)[..., :sets].permute(3, 2, 0, 1)  # (sets, coils, y, x)
    tiny = torch.finfo(eigenvalues.dtype).tiny
    reference_phase = maps[:, :1] / maps[:, :1].abs().clamp_min(tiny)
    return maps * reference_phase.conj(), eigenvalues
