"""Synthetic multi-coil data for examples, tests and benchmarks: Shepp-Logan phantoms with
a smooth phase, seen by birdcage coil sensitivities, with complex Gaussian noise."""

from __future__ import annotations

import numpy as np
import torch

from unrollinr.fft import fft2c


def _smooth_phase(size: int) -> np.ndarray:
    """``(size, size)`` complex64 unit-modulus linear phase ramp."""
    y, x = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    return np.exp(1j * np.pi / 4 * (x + 0.5 * y)).astype(np.complex64)


def phantom_image(size: int) -> np.ndarray:
    """Modified Shepp-Logan ``(size, size)`` complex64 image with a smooth phase."""
    import sigpy

    magnitude = np.abs(sigpy.shepp_logan((size, size))).astype(np.float32)
    return (magnitude * _smooth_phase(size)).astype(np.complex64)


def phantom_volume(slices: int, size: int) -> np.ndarray:
    """``(slices, size, size)`` complex64: axial slices of the 3D modified Shepp-Logan
    phantom, spread over the middle half of its extent (so that every slice holds
    object and neighbouring slices differ, as in an exam), with a smooth phase."""
    import sigpy

    # every other plane of a 4x finer sampling along z, starting a quarter of the way in
    volume = np.abs(sigpy.shepp_logan((4 * slices, size, size))).astype(np.float32)
    middle = volume[slices: 3 * slices: 2]
    return (middle * _smooth_phase(size)).astype(np.complex64)


def birdcage_maps(size: int, coils: int) -> np.ndarray:
    """``(coils, size, size)`` birdcage coil sensitivities normalised so ``sum |S|^2 = 1``."""
    import sigpy.mri

    maps = sigpy.mri.birdcage_maps((coils, size, size), r=1.2).astype(np.complex64)
    return (maps / np.sqrt(np.sum(np.abs(maps) ** 2, axis=0, keepdims=True))).astype(np.complex64)


def multicoil_kspace(images: np.ndarray, coils: int, *, noise: float = 0.002, seed: int = 0) -> np.ndarray:
    """Fully sampled, centred k-space of square ``images`` ``(..., size, size)`` seen by
    :func:`birdcage_maps`, as ``(..., coils, size, size)`` complex64.

    ``noise`` is the standard deviation of the complex noise relative to the largest
    k-space magnitude of the whole array.
    """
    size = images.shape[-1]
    coil_images = birdcage_maps(size, coils) * images[..., None, :, :]
    kspace = fft2c(torch.from_numpy(coil_images)).numpy()
    rng = np.random.default_rng(seed)
    sigma = noise * np.abs(kspace).max()
    kspace = kspace + sigma * (rng.standard_normal(kspace.shape) + 1j * rng.standard_normal(kspace.shape)) / np.sqrt(2)
    return kspace.astype(np.complex64)


def phantom_kspace(size: int = 64, coils: int = 8, *, noise: float = 0.002, seed: int = 0) -> np.ndarray:
    """Fully sampled, centred multi-coil k-space ``(coils, size, size)`` of :func:`phantom_image`,
    with noise as in :func:`multicoil_kspace`."""
    return multicoil_kspace(phantom_image(size), coils, noise=noise, seed=seed)
