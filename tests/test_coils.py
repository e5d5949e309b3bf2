import numpy as np
import pytest
import torch

from unrollinr.coils import (
    CalibrationError,
    apply_coil_matrix,
    coil_compression_matrix,
    espirit_maps,
    find_calibration_region,
    prewhitening_matrix,
)
from unrollinr.masks import random_line_mask
from unrollinr.phantoms import birdcage_maps, phantom_image, phantom_kspace


def test_calibration_region_of_a_line_mask():
    mask = random_line_mask((64, 40), 4, acs_lines=10, seed=0)
    region = find_calibration_region(mask)
    assert region.ky[0] <= 27 and region.ky[1] >= 37 and region.kx == (0, 40)


def test_calibration_region_of_a_2d_mask_is_fully_sampled():
    mask = np.zeros((32, 32), dtype=bool)
    mask[12:20, 10:22] = True
    mask[16, :] = True  # a line through the centre does not widen the region
    region = find_calibration_region(mask)
    assert mask[region.ky[0]:region.ky[1], region.kx[0]:region.kx[1]].all()
    assert region.shape == (8, 12)


def test_missing_centre_is_a_calibration_error():
    mask = np.zeros((32, 32), dtype=bool)
    mask[::4] = True
    mask[16] = False
    with pytest.raises(CalibrationError, match="centre is not sampled"):
        find_calibration_region(mask)


def test_too_few_acs_lines_is_a_calibration_error(phantom_48):
    mask = random_line_mask((48, 48), 4, acs_lines=4, seed=0)
    with pytest.raises(CalibrationError, match="too small"):
        espirit_maps(phantom_48 * mask, mask)


def test_rectangular_espirit_maps_have_no_holes_in_the_object_and_match_the_truth(device):
    _check_maps_against_the_truth("rectangular", device)


def test_sigpy_espirit_maps_have_no_holes_in_the_object_and_match_the_truth():
    _check_maps_against_the_truth("sigpy", "cpu")


def _check_maps_against_the_truth(method: str, device: str | torch.device) -> None:
    size, coils = 64, 8
    image = phantom_image(size)
    true_maps = birdcage_maps(size, coils)
    kspace = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(true_maps * image, axes=(-2, -1)), norm="ortho"),
                             axes=(-2, -1)).astype(np.complex64)
    mask = random_line_mask((size, size), 3, acs_lines=16, seed=0)
    sets = espirit_maps(kspace * mask, mask, crop=0.8, method=method, device=device)
    assert sets.dtype == np.complex64 and sets.shape == (1, coils, size, size)
    maps = sets[0]
    inside = np.abs(image) > 0.05
    energy = np.sum(np.abs(maps) ** 2, axis=0)
    assert (energy[inside] > 0.99).all()
    # maps equal the truth up to one phase per pixel
    correlation = np.abs(np.sum(maps.conj() * true_maps, axis=0))
    assert np.median(correlation[inside]) > 0.98


def test_coil_compression_keeps_the_signal(phantom_48):
    compressed = apply_coil_matrix(coil_compression_matrix(phantom_48, 4), phantom_48)
    assert compressed.shape == (4, 48, 48)
    energy = np.linalg.norm(compressed) / np.linalg.norm(phantom_48)
    assert energy > 0.95
    with pytest.raises(ValueError, match="cannot compress"):
        coil_compression_matrix(phantom_48, 9)


def test_prewhitening_decorrelates_noise(rng):
    mixing = np.array([[1.0, 0.0], [0.8, 0.3]]) + 1j * np.array([[0.0, 0.0], [0.1, 0.0]])
    white = (rng.standard_normal((2, 20000)) + 1j * rng.standard_normal((2, 20000))) / np.sqrt(2)
    noise = mixing @ white
    whitened = prewhitening_matrix(noise) @ noise
    covariance = whitened @ whitened.conj().T / whitened.shape[1]
    np.testing.assert_allclose(covariance, np.eye(2), atol=0.03)


def test_espirit_rejects_a_kernel_wider_than_the_calibration():
    from unrollinr.espirit import espirit

    with pytest.raises(ValueError, match="must exceed"):
        espirit(torch.zeros(2, 5, 40, dtype=torch.complex64), (40, 40), kernel_width=6)


def test_kernel_width_shrinks_to_fit_few_acs_lines():
    from unrollinr.coils import CalibrationRegion, fitting_kernel_width

    assert fitting_kernel_width(CalibrationRegion(ky=(0, 12), kx=(0, 256)), 6) == 6
    assert fitting_kernel_width(CalibrationRegion(ky=(0, 11), kx=(0, 256)), 6) == 6
    assert fitting_kernel_width(CalibrationRegion(ky=(0, 8), kx=(0, 256)), 6) == 4
    with pytest.raises(CalibrationError, match="at least 5 ACS lines"):
        fitting_kernel_width(CalibrationRegion(ky=(0, 4), kx=(0, 256)), 6)


@pytest.mark.parametrize("shape", [(40, 40), (33, 50), (10, 64)])
def test_pixel_operators_interpolated_from_a_small_grid_equal_the_full_computation(rng, shape):
    from unrollinr.espirit import _image_space_kernels, _pixel_operators

    kernels = torch.from_numpy(rng.standard_normal((7, 3, 5, 5)) + 1j * rng.standard_normal((7, 3, 5, 5)))
    image_kernels = _image_space_kernels(kernels, shape)
    direct = torch.einsum("kcyx,kdyx->yxcd", image_kernels, image_kernels.conj())
    torch.testing.assert_close(_pixel_operators(kernels, shape), direct, rtol=1e-10, atol=1e-12)


def test_a_second_set_of_maps_appears_only_where_the_object_wraps():
    """Half the phase-encode field of view folds the phantom onto itself: one sensitivity
    vector per pixel no longer explains the coil signals there, and ESPIRiT's second
    eigenvector becomes a second set of maps. The whole field of view needs none."""
    kspace = phantom_kspace(64, 8, noise=0.002, seed=0)
    wrapped = kspace[:, ::2] * np.sqrt(2)
    full_mask = random_line_mask((64, 64), 2, acs_lines=12, seed=0)
    wrapped_mask = random_line_mask((32, 64), 2, acs_lines=12, seed=0)
    whole = espirit_maps(kspace * full_mask, full_mask, sets=2, crop=0.85)
    assert whole.shape == (2, 8, 64, 64) and not whole[1].any()
    maps = espirit_maps(wrapped * wrapped_mask, wrapped_mask, sets=2, crop=0.85)
    assert maps.shape == (2, 8, 32, 64)
    second = np.sum(np.abs(maps[1]) ** 2, axis=0)
    assert 0.1 < (second > 0.99).mean() < 0.6  # the folded band, not everywhere
    # both sets are unit-norm vectors, orthogonal where both exist
    overlap = np.abs(np.sum(maps[0].conj() * maps[1], axis=0))
    assert overlap[second > 0.99].max() < 1e-3
