"""Exact data-consistency solves for whole-line masks, one image column at a time.

When whole ``ky`` lines are sampled, ``E^H E`` never mixes image columns: on column ``x``
it is the ``(y, y)`` matrix

    G_x = Q * (S_x^H S_x)        (element-wise product)

where ``Q = P^H P`` projects onto the sampled rows of the centred DFT along ``y`` and
``S_x`` ``(coils, y)`` holds the coil maps on that column. With several sets of maps the
unknowns of a column are its pixels of every set, ``(sets * y)``: ``S_x`` is then
``(coils, sets * y)`` and ``P`` is tiled over the sets. ``G_x = A_x^H A_x`` for ``A_x``
``(coils * K, sets * y)``, the rows ``P diag(S_x[c])`` of every coil; with few coils and
few lines ``A_x A_x^H`` is the smaller matrix, and is decomposed instead. One
eigendecomposition ``G_x = U diag(mu) U^H`` per column, computed once per scan, then gives
``(G_x + lambda I)^-1 b = b / lambda + U diag(1 / (mu + lambda) - 1 / lambda) U^H b``
for any ``lambda``: two batched matrix-vector products instead of a CG loop, and the
exact solution rather than an approximation after a fixed number of iterations.

Only rows where some coil map is non-zero take part (elsewhere ``G`` vanishes and the
solution is ``b / lambda``), and eigenvalues below ``CUTOFF_EPSILONS`` machine epsilons
of the largest are dropped: they are rounding noise (an error of at most that many
epsilons over ``lambda``, relative, in their components).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar, cast

import torch
from torch import nn

from unrollinr.sense import SenseOp

CUTOFF_EPSILONS = 10
T = TypeVar("T")
R = TypeVar("R")


class ColumnSolver(nn.Module):
    """``(E^H E + lambda I)^-1`` for a :class:`SenseOp` with a whole-line mask.

    Each slice keeps its own decomposition (:class:`_SliceColumns`), at its own size: a
    slice gets the same result alone or in a batch, and a batch holds no padding.

    Memory: ``x * rows * rank`` complex values per slice, where ``rows`` is the largest
    number of image rows inside the maps' support on one of its columns and ``rank`` the
    largest number of eigenvalues kept (at most ``rows``).
    """

    def __init__(self, op: SenseOp) -> None:
        super().__init__()
        if not op.line_mask:
            raise ValueError("exact column solves need a whole-line mask (every ky line fully sampled or empty)")
        n_slices, n_sets, n_coils, n_y, n_x = op.maps.shape
        # unknowns of a column: (set, y) pairs
        maps = op.maps.permute(0, 4, 2, 1, 3).reshape(n_slices, n_x, n_coils, n_sets * n_y)
        sampled_rows = op.rows.repeat(1, 1, n_sets)  # P tiled over the sets: (slices, K, sets * y)
        self.slices = nn.ModuleList(_SliceColumns(maps[s], sampled_rows[s]) for s in range(n_slices))

    def solve(self, rhs: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """Solve ``(E^H E + lam I) x = rhs`` for ``rhs`` ``(slices, sets, y, x)`` and per-slice
        ``lam`` ``(slices,)``."""
        n_slices, n_sets, n_y, n_x = rhs.shape
        columns = rhs.reshape(n_slices, n_sets * n_y, n_x)
        parts = cast(list[_SliceColumns], list(self.slices))
        solved = torch.stack([part.solve(columns[s], lam[s]) for s, part in enumerate(parts)])
        return solved.reshape(rhs.shape)


class _SliceColumns(nn.Module):
    """One slice's column decompositions, from :func:`_decompose_slice`, as non-persistent
    buffers: they move with the module and stay out of its state dict (they follow from
    the operator)."""

    rows: torch.Tensor
    eigenvalues: torch.Tensor
    basis: torch.Tensor

    def __init__(self, maps: torch.Tensor, sampled_rows: torch.Tensor) -> None:  # (x, coils, n), (K, n)
        super().__init__()
        rows, eigenvalues, basis = _decompose_slice(maps, sampled_rows)
        self.register_buffer("rows", rows, persistent=False)  # (x, rows)
        self.register_buffer("eigenvalues", eigenvalues, persistent=False)  # (x, rank)
        self.register_buffer("basis", basis, persistent=False)  # (x, rows, rank)
        self.n_y = maps.shape[-1]

    def solve(self, rhs: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """Solve for one slice: ``rhs`` ``(sets * y, x)``, ``lam`` a scalar tensor; returns ``(sets * y, x)``."""
        # A zero row appended to every column: padded support rows point at it, so gathers
        # read zeros there and scatters land outside the image.
        columns = torch.nn.functional.pad(rhs.transpose(0, 1), (0, 1))  # (x, y + 1)
        lam = lam.to(self.eigenvalues.dtype)
        on_support = torch.gather(columns, -1, self.rows)  # (x, rows)
        # Row vectors times matrices (b^T U rather than U^T b) run several times faster as
        # batched products here; U^H b = conj(conj(b)^T U).
        coefficients = (on_support.conj().unsqueeze(-2) @ self.basis).squeeze(-2).conj()  # (x, rank)
        coefficients = coefficients * (1 / (self.eigenvalues + lam) - 1 / lam)
        correction = (coefficients.unsqueeze(-2) @ self.basis.transpose(-2, -1)).squeeze(-2)  # (x, rows)
        solution = (columns / lam).scatter_add(-1, self.rows, correction)
        return solution[:, : self.n_y].transpose(0, 1)


def _decompose_slice(maps: torch.Tensor, sampled_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eigendecompose one slice's column matrices on the maps' support.

    Parameters
    ----------
    maps
        ``(x, coils, n)`` coil maps by column, ``n`` unknowns per column (``sets * y``).
    sampled_rows
        ``(K, n)`` ``P``: the sampled rows of the centred DFT along ``y``, tiled over the sets.

    Returns
    -------
    ``rows`` ``(x, n_rows)``: the support rows of each column, padded with ``y``;
    ``eigenvalues`` ``(x, rank)``, ascending, 0 where dropped; ``basis`` ``(x, n_rows, rank)``:
    the eigenvectors on the support rows.
    """
    n_y = maps.shape[-1]
    inside = maps.abs().sum(dim=1) > 0  # (x, y)
    sizes = inside.sum(dim=-1)  # support rows per column
    n_rows = max(1, int(sizes.max()))
    order = torch.argsort((~inside).to(torch.uint8), dim=-1, stable=True)[:, :n_rows]  # support rows first
    valid = torch.gather(inside, -1, order)
    support_maps = torch.gather(maps, -1, order[:, None, :].expand(-1, maps.shape[1], -1)) * valid[:, None, :]
    # On CUDA, torch's batched eigh loops over matrices larger than 32 x 32, one at a time
    # (pytorch/pytorch#175585, #174674), and recent releases are slower still (#183806):
    # the decomposition runs on the CPU, once per scan, and what is kept moves to the device.
    mu, basis = _decompose_by_support_size(support_maps.cpu(), sampled_rows.cpu(), order.cpu(), sizes.cpu())
    precision = torch.finfo(mu.dtype)
    kept = mu > CUTOFF_EPSILONS * precision.eps * mu.amax().clamp_min(precision.tiny)
    rank = max(1, int(kept.sum(dim=-1).max()))
    # A dropped eigenvalue set to 0 contributes nothing: 1 / (0 + lam) - 1 / lam = 0.
    eigenvalues = torch.where(kept, mu, 0)[:, -rank:]
    # contiguous copies where eigenvalues were dropped, so that their eigenvectors are freed
    return (torch.where(valid, order, n_y), eigenvalues.contiguous().to(maps.device),
            basis[:, :, -rank:].contiguous().to(maps.device))


def _decompose_by_support_size(maps: torch.Tensor, sampled_rows: torch.Tensor, order: torch.Tensor,
                               sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigendecompose ``G_x = A_x^H A_x`` for every column ``x``, where ``A_x`` ``(coils * K,
    n)`` stacks ``P_x diag(S_x[c])`` over the coils, and column ``x`` is non-zero only in its
    leading ``sizes[x]`` unknowns; each is decomposed at that size (columns of one size
    together): a round object's edge columns are short, and decomposing every column at
    the largest size took 1.3x (256^2, 8 coils) to 1.8x (384^2, 12 coils) as long.

    Where ``A_x`` has fewer rows than unknowns (few coils, few lines: ``coils * K < n``)
    ``G_x``'s non-zero eigenvalues are those of the smaller ``A_x A_x^H`` ``(coils * K,
    coils * K)``, and its eigenvectors ``A_x^H u / sqrt(mu)``. The pulseq phantom's wider
    maps (4 coils, two sets over its 256 rows: n = 512) took 5.2 s instead of 17.3 at R = 4
    (K = 64) and 0.7 s instead of 15.8 at R = 12, on one thread.

    The size groups run on ``torch.get_num_threads()`` threads of one core each: torch's
    batched CPU ``eigh`` decomposes one matrix after another, and its own threads speed one
    matrix up far less (at 100-330 rows on 2 cores: 1.56 s on 2 threads, 1.16 s as two
    groups at a time on one thread each).

    Parameters
    ----------
    maps
        ``(x, coils, n)`` the maps on each column's support rows, zero beyond ``sizes``.
    sampled_rows
        ``(K, N)`` ``P``, over all ``N`` unknowns of a column.
    order
        ``(x, n)`` the unknowns (indices into ``N``) that ``maps`` holds, support first.
    sizes
        ``(x,)`` support rows per column.

    Returns eigenvalues ``(x, k)``, ascending, and eigenvectors ``(x, n, k)``, for the
    largest ``k`` any column has: each column's come last, after zeros.
    """
    n, (n_coils, n_sampled) = maps.shape[-1], (maps.shape[1], sampled_rows.shape[0])
    projector = sampled_rows.mH @ sampled_rows  # Q = P^H P, (N, N), gathered for each group below
    groups = [(size, sizes == size) for size in sizes.unique().tolist() if size > 0]

    def decompose(group: tuple[int, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        size, columns = group
        group_maps, support = maps[columns][..., :size], order[columns][:, :size]
        if n_coils * n_sampled < size:
            group_rows = sampled_rows[:, support].transpose(0, 1)  # (columns, K, size)
            encoding = (group_rows[:, None] * group_maps[:, :, None]).flatten(1, 2)  # (columns, coils * K, size)
            return _eigh_through_gram(encoding)
        return torch.linalg.eigh(projector[support[:, :, None], support[:, None, :]] * (group_maps.mH @ group_maps))

    parts = _map_on_one_thread_workers(decompose, groups)
    width = max((values.shape[-1] for values, _ in parts), default=1)
    eigenvalues = maps.new_zeros((maps.shape[0], width), dtype=maps.real.dtype)
    eigenvectors = maps.new_zeros((maps.shape[0], n, width))
    for (size, columns), (values, vectors) in zip(groups, parts, strict=True):
        k = values.shape[-1]
        eigenvalues[columns, width - k:] = values
        eigenvectors[columns, :size, width - k:] = vectors
    return eigenvalues, eigenvectors


def _eigh_through_gram(encoding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues ``(b, m)``, ascending, and eigenvectors ``(b, n, m)`` of ``A^H A`` for
    ``A`` ``(b, m, n)`` with ``m < n``, from ``eigh`` of ``A A^H``: the vector of
    eigenvalue ``mu`` is ``A^H u / sqrt(mu)``; zero where ``mu`` is not positive. (Its
    error grows as ``eps * max(mu) / mu``; over the solve's ``mu / lambda^2`` weight that
    stays ``eps * max(mu) / lambda^2``, as for ``eigh`` of ``A^H A``.)"""
    mu, vectors = torch.linalg.eigh(encoding @ encoding.mH)
    scale = torch.where(mu > 0, mu.clamp_min(torch.finfo(mu.dtype).tiny).rsqrt(), 0)
    return mu, (encoding.mH @ vectors) * scale[:, None, :]


def _map_on_one_thread_workers(function: Callable[[T], R], items: list[T]) -> list[R]:
    """``[function(item) for item in items]`` on ``torch.get_num_threads()`` worker threads
    whose torch ops run on one thread each. ``torch.set_num_threads`` sets the calling
    thread's count and the one new threads start with; both are restored afterwards."""
    workers = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(function, items))
    finally:
        torch.set_num_threads(workers)
