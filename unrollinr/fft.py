"""Centred, orthonormal Fourier transforms (DC at index ``n // 2``)."""

from __future__ import annotations

import torch

_IMAGE_DIMS = (-2, -1)


def fft2c(image: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 2D FFT over the last two dimensions.

    Parameters
    ----------
    image
        Complex tensor ``(..., y, x)``.

    Returns
    -------
    Complex k-space ``(..., ky, kx)`` with DC at ``(ky // 2, kx // 2)``.
    """
    shifted = torch.fft.ifftshift(image, dim=_IMAGE_DIMS)
    return torch.fft.fftshift(torch.fft.fft2(shifted, norm="ortho"), dim=_IMAGE_DIMS)


def ifft2c(kspace: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`fft2c`: complex ``(..., ky, kx)`` to ``(..., y, x)``."""
    shifted = torch.fft.ifftshift(kspace, dim=_IMAGE_DIMS)
    return torch.fft.fftshift(torch.fft.ifft2(shifted, norm="ortho"), dim=_IMAGE_DIMS)


def fftc(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """Centred orthonormal 1D FFT of a complex tensor along ``dim``."""
    shifted = torch.fft.ifftshift(tensor, dim=dim)
    return torch.fft.fftshift(torch.fft.fft(shifted, dim=dim, norm="ortho"), dim=dim)


def ifftc(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse of :func:`fftc` along ``dim``."""
    shifted = torch.fft.ifftshift(tensor, dim=dim)
    return torch.fft.fftshift(torch.fft.ifft(shifted, dim=dim, norm="ortho"), dim=dim)


def centred_dft_matrix(n: int, *, dtype: torch.dtype = torch.complex64,
                       device: torch.device | None = None) -> torch.Tensor:
    """The ``(n, n)`` matrix of the centred orthonormal 1D DFT, so that ``F @ v`` equals
    the centred FFT of ``v`` along its first dimension."""
    return fftc(torch.eye(n, dtype=dtype, device=device), dim=0)
