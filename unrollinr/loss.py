"""The self-supervised training loss: normalised l1+l2 k-space error plus total variation."""

from __future__ import annotations

import torch


def _per_slice(values: torch.Tensor) -> torch.Tensor:
    return values.flatten(start_dim=1)


def _l2_norm(values: torch.Tensor) -> torch.Tensor:
    """Euclidean norm per slice of ``(slices, n)`` complex values, as ``(slices,)``.

    Taken over the real view: ``vector_norm`` on complex tensors is about 60x slower on the
    CPU (4.5 ms against 0.07 ms for 8 x 256 x 256 samples).
    """
    return torch.linalg.vector_norm(torch.view_as_real(values).flatten(start_dim=1), dim=1)


def normalized_l1_l2(predicted: torch.Tensor, measured: torch.Tensor) -> torch.Tensor:
    """``||y - y_hat||_2 / ||y||_2 + ||y - y_hat||_1 / ||y||_1`` per slice.

    Parameters
    ----------
    predicted, measured
        k-space ``(slices, ...)``, already restricted to the samples that count.

    Returns
    -------
    ``(slices,)`` real losses.
    """
    error = _per_slice(predicted - measured)
    reference = _per_slice(measured)
    l2 = _l2_norm(error) / _l2_norm(reference)
    l1 = error.abs().sum(dim=1) / reference.abs().sum(dim=1)
    return l2 + l1


def total_variation(image: torch.Tensor) -> torch.Tensor:
    """Anisotropic TV ``||G x||_1`` of complex images ``(slices, y, x)``, as ``(slices,)``."""
    dy = (image[:, 1:, :] - image[:, :-1, :]).abs().sum(dim=(-2, -1))
    dx = (image[:, :, 1:] - image[:, :, :-1]).abs().sum(dim=(-2, -1))
    return dy + dx
