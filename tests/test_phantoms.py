import numpy as np
import torch

from unrollinr.fft import ifft2c
from unrollinr.phantoms import birdcage_maps, multicoil_kspace, phantom_volume
from unrollinr.variants import lower_resolution, phase_encoding_turned


def test_every_slice_of_a_volume_holds_object_and_neighbours_differ():
    for slices in (1, 2, 5):
        volume = phantom_volume(slices, 32)
        assert volume.shape == (slices, 32, 32) and volume.dtype == np.complex64
        assert all(np.abs(plane).sum() > 0.1 * np.abs(volume).sum() / slices for plane in volume)
    volume = phantom_volume(5, 32)
    assert all(not np.allclose(volume[s], volume[s + 1]) for s in range(4))


def test_multicoil_kspace_of_a_stack_is_each_image_seen_by_the_coils():
    volume = phantom_volume(2, 24)
    kspace = multicoil_kspace(volume, 3, noise=0.0)
    assert kspace.shape == (2, 3, 24, 24)
    np.testing.assert_allclose(kspace[1], multicoil_kspace(volume[1], 3, noise=0.0), atol=1e-6)
    combined = (birdcage_maps(24, 3).conj() * ifft2c(torch.from_numpy(kspace)).numpy()).sum(axis=1)
    np.testing.assert_allclose(combined, volume, atol=1e-5)


def test_a_lower_resolution_keeps_the_central_samples_about_the_centre_sample():
    kspace = np.random.default_rng(0).standard_normal((2, 96, 80)).astype(np.complex64)
    low = lower_resolution(kspace)
    assert low.shape == (2, 77, 64) and low.dtype == np.complex64
    np.testing.assert_array_equal(low[:, 77 // 2, 64 // 2], kspace[:, 48, 40])  # the centre stays the centre
    np.testing.assert_array_equal(low, kspace[:, 10:87, 8:72])


def test_turning_the_phase_encoding_transposes_every_coil_image():
    kspace = np.random.default_rng(1).standard_normal((2, 9, 6)).astype(np.complex64)
    turned = phase_encoding_turned(kspace)
    assert turned.shape == (2, 6, 9) and turned.dtype == np.complex64
    images = ifft2c(torch.from_numpy(kspace)).numpy()
    np.testing.assert_allclose(ifft2c(torch.from_numpy(turned)).numpy(), images.transpose(0, 2, 1), atol=1e-6)
