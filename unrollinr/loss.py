"""The self-supervised training loss: normalised l1+l2 k-space error plus total variation."""

from __future__ import annotations

import torch


def _per_slice(values: torch.Tensor) -> torch.Tensor:
    return values.flatten(start_dim=1)


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
    l2 = torch.linalg.vector_norm(error, dim=1) / torch.linalg.vector_norm(reference, dim=1)
    l1 = error.abs().sum(dim=1) / reference.abs().sum(dim=1)
    return l2 + l1


def total_variation(image: torch.Tensor, *, isotropic: bool = False) -> torch.Tensor:
    """TV ``||G x||_1`` of complex images ``(slices, y, x)``, as ``(slices,)``.

    Anisotropic: ``sum |d_y x| + |d_x x|``; isotropic: ``sum sqrt(|d_y x|^2 + |d_x x|^2)``
    (forward differences, the last row and column padded by replication).
    """
    dy = image[:, 1:, :] - image[:, :-1, :]
    dx = image[:, :, 1:] - image[:, :, :-1]
    if not isotropic:
        return dy.abs().sum(dim=(-2, -1)) + dx.abs().sum(dim=(-2, -1))
    dy = torch.nn.functional.pad(dy.abs().square(), (0, 0, 0, 1))
    dx = torch.nn.functional.pad(dx.abs().square(), (0, 1, 0, 0))
    return (dy + dx + 1e-12).sqrt().sum(dim=(-2, -1))
