"""A reconstruction without coil maps: the coil images under joint total variation.

Where the field of view cuts the object at every edge, no coil maps that ESPIRiT can
estimate explain the data (its model is smooth and periodic; ``bench/HISTORY.md``), and
every SENSE-type image fails. The coil images themselves need no maps. Their edges are the
object's, in every coil at the same place, so they are reconstructed together with a
*joint* TV penalty (the gradient's norm over coils and directions, summed over pixels):

    min_x  1/2 ||M F x - y||_2^2 + weight * m * sum_pixels ||grad x||_2

over the coil images ``x`` ``(coils, y, x)``, where ``m`` is the maximum of the
zero-filled root-sum-of-squares image, so that ``weight`` does not depend on the data's
scale. It is solved with the primal-dual algorithm of Chambolle and Pock: the data term's
proximal step is exact in k-space for a Cartesian mask, and the dual step projects each
pixel's gradient onto a ball.
"""

from __future__ import annotations

import torch

from unrollinr.fft import fft2c, ifft2c

# ||grad||^2 <= 8 for forward differences in 2D; the primal and dual steps are 1 / sqrt(8).
_STEP = 8 ** -0.5
# Primal-dual iterations by default: close to 800 on the robustness cases where the image
# is returned (bench/HISTORY.md, "The calibrationless fallback").
ITERATIONS = 200


def _gradient(images: torch.Tensor) -> torch.Tensor:
    """Forward differences of ``(..., y, x)`` images, zero at the last row / column:
    ``(..., 2, y, x)``."""
    gradient = images.new_zeros(*images.shape[:-2], 2, *images.shape[-2:])
    gradient[..., 0, :-1, :] = images[..., 1:, :] - images[..., :-1, :]
    gradient[..., 1, :, :-1] = images[..., :, 1:] - images[..., :, :-1]
    return gradient


def _divergence(field: torch.Tensor) -> torch.Tensor:
    """The negative adjoint of :func:`_gradient`: ``(..., 2, y, x)`` to ``(..., y, x)``."""
    along_y, along_x = field[..., 0, :, :], field[..., 1, :, :]
    result = torch.zeros_like(along_y)
    result[..., :-1, :] += along_y[..., :-1, :]
    result[..., 1:, :] -= along_y[..., :-1, :]
    result[..., :, :-1] += along_x[..., :, :-1]
    result[..., :, 1:] -= along_x[..., :, :-1]
    return result


def joint_tv_coil_images(kspace: torch.Tensor, mask: torch.Tensor, *, weight: float,
                         iterations: int = ITERATIONS) -> torch.Tensor:
    """Coil images from undersampled k-space, without coil maps (see the module's docstring).

    Parameters
    ----------
    kspace
        ``(coils, ky, kx)`` complex, centred, zero where not sampled.
    mask
        ``(ky, kx)`` boolean sampling mask.
    weight
        The joint TV weight, relative to the zero-filled root-sum-of-squares maximum.
    iterations
        Primal-dual iterations.

    Returns
    -------
    ``(coils, y, x)`` complex coil images on the scale of ``kspace``; their k-space agrees
    with ``kspace`` on the sampled locations up to the TV trade-off.
    """
    sampled = mask.to(kspace.real.dtype)
    measured = kspace * sampled
    images = ifft2c(measured)
    radius = weight * float(torch.linalg.vector_norm(images, dim=0).amax())
    if radius == 0:
        return images
    extrapolated = images.clone()
    dual = _gradient(images).zero_()
    for _ in range(iterations):
        dual = dual + _STEP * _gradient(extrapolated)
        # each pixel's gradient, over coils and both directions, onto the ball of the weight
        norms = torch.linalg.vector_norm(dual, dim=(0, 1), keepdim=True)
        dual = dual / torch.clamp(norms / radius, min=1)
        # the data term's proximal step, exact in k-space
        spectrum = fft2c(images + _STEP * _divergence(dual))
        updated = ifft2c((spectrum + _STEP * measured) / (1 + _STEP * sampled))
        extrapolated = 2 * updated - images
        images = updated
    return images
