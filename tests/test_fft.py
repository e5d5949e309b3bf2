import numpy as np
import pytest
import torch

from unrollinr.fft import centred_dft_matrix, centring_phase, fft2c, fftc, ifft2c, ifftc


def _numpy_fft2c(x: np.ndarray) -> np.ndarray:
    return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))


def test_fft2c_matches_numpy_in_float64(rng):
    for shape in [(3, 16, 16), (2, 15, 20)]:
        x = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
        ours = fft2c(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(ours, _numpy_fft2c(x), atol=1e-12)
        np.testing.assert_allclose(ifft2c(torch.from_numpy(ours)).numpy(), x, atol=1e-12)


def test_centre_convention_puts_dc_at_half():
    image = torch.ones(1, 8, 9, dtype=torch.complex128)
    kspace = fft2c(image)
    assert torch.argmax(kspace.abs()).item() == 4 * 9 + 9 // 2


@pytest.mark.parametrize("shape", [(8, 6), (7, 5), (6, 9)])
def test_centring_phase_turns_the_plain_fft_into_the_centred_one_in_fft_order(rng, shape):
    x = rng.standard_normal((2, *shape)) + 1j * rng.standard_normal((2, *shape))
    expected = np.fft.ifftshift(_numpy_fft2c(x), axes=(-2, -1))
    phase = centring_phase(shape, dtype=torch.complex128).numpy()
    np.testing.assert_allclose(phase * np.fft.fft2(x, norm="ortho"), expected, atol=1e-12)
    np.testing.assert_allclose(np.abs(phase), 1.0, atol=1e-15)


def test_dft_matrix_is_the_centred_1d_fft(rng):
    n = 12
    v = rng.standard_normal((n, 3)) + 1j * rng.standard_normal((n, 3))
    matrix = centred_dft_matrix(n, dtype=torch.complex128).numpy()
    expected = np.fft.fftshift(np.fft.fft(np.fft.ifftshift(v, axes=0), axis=0, norm="ortho"), axes=0)
    np.testing.assert_allclose(matrix @ v, expected, atol=1e-12)


def test_fftc_matches_numpy_along_any_dimension_and_inverts(rng):
    x = rng.standard_normal((3, 10, 7)) + 1j * rng.standard_normal((3, 10, 7))
    for dim in (0, 1, -1):
        ours = fftc(torch.from_numpy(x), dim=dim).numpy()
        expected = np.fft.fftshift(np.fft.fft(np.fft.ifftshift(x, axes=dim), axis=dim, norm="ortho"), axes=dim)
        np.testing.assert_allclose(ours, expected, atol=1e-12)
        np.testing.assert_allclose(ifftc(torch.from_numpy(ours), dim=dim).numpy(), x, atol=1e-12)
