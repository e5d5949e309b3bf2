"""Synthetic multi-coil data for examples and tests: a Shepp-Logan phantom with smooth
birdcage coil sensitivities and complex Gaussian noise."""

from __future__ import annotations

import numpy as np
import torch

from unrollinr.fft import fft2c


def phantom_image(size: int) -> np.ndarray:
    """Modified Shepp-Logan ``(size, size)`` complex64 image with a smooth phase."""
    import sigpy

    magnitude = np.abs(sigpy.shepp_logan((size, size))).astype(np.float32)
    y, x = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    phase = np.exp(1j * np.pi / 4 * (x + 0.5 * y)).astype(np.complex64)
    return (magnitude * phase).astype(np.complex64)


def birdcage_maps(size: int, coils: int) -> np.ndarray:
    """``(coils, size, size)`` birdcage coil sensitivities normalised so ``sum |S|^2 = 1``."""
    import sigpy.mri

    maps = sigpy.mri.birdcage_maps((coils, size, size), r=1.2).astype(np.complex64)
    return (maps / np.sqrt(np.sum(np.abs(maps) ** 2, axis=0, keepdims=True))).astype(np.complex64)


def phantom_kspace(size: int = 64, coils: int = 8, *, noise: float = 0.002, seed: int = 0) -> np.ndarray:
    """Fully sampled, centred multi-coil k-space ``(coils, size, size)`` of the phantom.

    ``noise`` is the standard deviation of the complex noise relative to the k-space maximum.
    """
    image = phantom_image(size)
    coil_images = birdcage_maps(size, coils) * image
    kspace = fft2c(torch.from_numpy(coil_images)).numpy()
    rng = np.random.default_rng(seed)
    sigma = noise * np.abs(kspace).max()
    kspace = kspace + sigma * (rng.standard_normal(kspace.shape) + 1j * rng.standard_normal(kspace.shape)) / np.sqrt(2)
    return kspace.astype(np.complex64)
