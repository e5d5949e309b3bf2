"""The self-supervised training loss: normalised l1+l2 k-space error plus an edge penalty.

The paper's loss is ``||y - Ex||_2 / ||y||_2 + ||y - Ex||_1 / ||y||_1 + lambda_s TV(x)``.
Both terms here take options that keep that loss as a special case: the l1 term can
sum each k-space location's coil vector instead of each complex entry, and the TV term
can mix in second-order differences and penalise each difference logarithmically.
"""

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


def _l1_norm(values: torch.Tensor, coil_dim: int | None) -> torch.Tensor:
    """Sum per slice of each entry's magnitude, or, with ``coil_dim``, of each coil
    vector's Euclidean norm (an l2,1 norm); ``(slices, ...)`` complex to ``(slices,)``."""
    if coil_dim is None:
        return _per_slice(values).abs().sum(dim=1)
    # (..., coils, real/imaginary) last, so that the norm reduces one contiguous run: about 2x
    # faster than reducing the two axes apart (10.7 -> 5.2 ms forward and backward at
    # 8 x 256 x 256); vector_norm's gradient is zero (not NaN) where a whole coil vector is zero
    coil_vectors = torch.view_as_real(values).movedim(coil_dim, -2).flatten(start_dim=-2)
    return _per_slice(torch.linalg.vector_norm(coil_vectors, dim=-1)).sum(dim=1)


def normalized_l1_l2(predicted: torch.Tensor, measured: torch.Tensor, *,
                     coil_dim: int | None = None) -> torch.Tensor:
    """``||y - y_hat||_2 / ||y||_2 + ||y - y_hat||_1 / ||y||_1`` per slice.

    Parameters
    ----------
    predicted, measured
        k-space ``(slices, ...)``, already restricted to the samples that count.
    coil_dim
        ``None``: the l1 norms sum the magnitude of each complex entry (the paper's loss).
        Otherwise the axis of the coils: the l1 norms sum each sample's coil-vector norm,
        so that a k-space location counts once, however its error is spread over coils.

    Returns
    -------
    ``(slices,)`` real losses.
    """
    error = predicted - measured
    l2 = _l2_norm(_per_slice(error)) / _l2_norm(_per_slice(measured))
    l1 = _l1_norm(error, coil_dim) / _l1_norm(measured, coil_dim)
    return l2 + l1


def _edge_cost(differences: torch.Tensor, log_scale: float) -> torch.Tensor:
    """Sum per slice (over all axes but the first) of ``phi(|d|)``: ``phi(t) = t``, or with ``log_scale``
    ``e`` > 0, ``e log(1 + t / e)``, which matches ``t`` for small differences and grows
    only logarithmically across edges, so that strong edges are not flattened as TV
    flattens them."""
    magnitude = differences.abs()
    if log_scale > 0:
        magnitude = log_scale * torch.log1p(magnitude / log_scale)
    return _per_slice(magnitude).sum(dim=1)


def total_variation(image: torch.Tensor, *, second_order: float = 0.0, log_scale: float = 0.0) -> torch.Tensor:
    """Anisotropic TV ``sum phi(|G x|)`` of complex images ``(slices, ..., y, x)`` (summed over
    the middle axes, e.g. sets of maps), as ``(slices,)``.

    With the defaults this is ``||G x||_1``. ``second_order`` ``w`` in [0, 1] mixes in
    second-order differences: ``(1 - w) TV1 + w TV2`` with ``TV2 = (|d_yy| + |d_xx| +
    2 |d_xy|) / 2`` summed over the Hessian's entries, so that smooth intensity ramps cost
    nothing. ``log_scale`` > 0 penalises each difference by ``phi`` of
    :func:`_edge_cost`, on the image's own scale.
    """
    dy = image[..., 1:, :] - image[..., :-1, :]
    dx = image[..., :, 1:] - image[..., :, :-1]
    first = _edge_cost(dy, log_scale) + _edge_cost(dx, log_scale)
    if second_order == 0:
        return first
    dyy = image[..., 2:, :] - 2 * image[..., 1:-1, :] + image[..., :-2, :]
    dxx = image[..., :, 2:] - 2 * image[..., :, 1:-1] + image[..., :, :-2]
    dxy = image[..., 1:, 1:] - image[..., 1:, :-1] - image[..., :-1, 1:] + image[..., :-1, :-1]
    second = (_edge_cost(dyy, log_scale) + _edge_cost(dxx, log_scale)) / 2 + _edge_cost(dxy, log_scale)
    return (1 - second_order) * first + second_order * second
