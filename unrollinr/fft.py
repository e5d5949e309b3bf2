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


def centring_phase(shape: tuple[int, int], *, dtype: torch.dtype = torch.complex64,
                   device: torch.device | None = None) -> torch.Tensor:
    """The phase ``(ky, kx)``, in FFT order, that centring adds to a 2D FFT: the centred
    transform :func:`fft2c` of an image, ``ifftshift``-ed back to FFT order, is this phase
    times ``fft2`` of the image unshifted. (Shifting the image by ``ceil(n / 2)`` multiplies
    its spectrum by ``exp(-2 pi i k ceil(n / 2) / n)``: ``(-1)^k`` for even ``n``.)"""
    angle = torch.zeros((), dtype=torch.float64, device=device)
    for axis, n in enumerate(shape):
        k = torch.arange(n, dtype=torch.int64, device=device)
        turns = (k * ((n + 1) // 2) % n).to(torch.float64) / n
        angle = angle + (-2 * torch.pi * turns).reshape([-1 if a == axis else 1 for a in range(len(shape))])
    return torch.polar(torch.ones_like(angle), angle).to(dtype)


def centred_dft_matrix(n: int, *, dtype: torch.dtype = torch.complex64,
                       device: torch.device | None = None) -> torch.Tensor:
    """The ``(n, n)`` matrix of the centred orthonormal 1D DFT, so that ``F @ v`` equals
    the centred FFT of ``v`` along its first dimension."""
    return fftc(torch.eye(n, dtype=dtype, device=device), dim=0)
