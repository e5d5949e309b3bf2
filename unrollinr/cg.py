"""Conjugate gradient and the data-consistency step with an implicit backward pass.

The data-consistency step solves, per slice,
``(E^H E + lambda I) x = E^H y + lambda z``,
by CG or, for whole-line masks, exactly (:mod:`unrollinr.column_solve`). The solve has no
trainable parameters, so the backward pass solves the same Hermitian system once more for
the incoming gradient instead of storing CG's intermediates: memory does not grow with
the number of CG iterations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from unrollinr.column_solve import ColumnSolver
from unrollinr.sense import SenseOp

Operator = Callable[[torch.Tensor], torch.Tensor]


def _real_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Inner product per slice of real tensors ``(slices, ...)``, as ``(slices,)``.

    A per-row reduction, so a slice gets the same value alone or in a batch.
    """
    return (a * b).flatten(start_dim=1).sum(dim=1)


def _slice_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Real part of ``<a, b>`` per slice: complex ``(slices, ...)`` pairs to ``(slices,)``."""
    return _real_dot(torch.view_as_real(a), torch.view_as_real(b))


def per_slice(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(slices,)`` values shaped to broadcast against ``like`` ``(slices, ...)``."""
    return values.reshape(-1, *([1] * (like.ndim - 1)))


def conjugate_gradient(
    apply_a: Operator,
    rhs: torch.Tensor,
    initial: torch.Tensor | None = None,
    *,
    max_iterations: int = 20,
    tolerance: float = 0.0,
) -> torch.Tensor:
    """Solve ``A x = rhs`` for a Hermitian positive-definite ``A``, independently per slice.

    Parameters
    ----------
    apply_a
        Callable applying ``A`` to ``(slices, ...)`` images, e.g. ``(slices, sets, y, x)``.
    rhs
        Right-hand side ``(slices, ...)``.
    initial
        Warm start, shaped as ``rhs``; zeros when ``None``.
    max_iterations
        Upper bound on CG iterations.
    tolerance
        Stop once every slice has ``||r|| <= tolerance * ||rhs||``; 0 runs all iterations.

    Returns
    -------
    The solution, shaped as ``rhs``.
    """
    return conjugate_gradient_with_product(apply_a, rhs, initial, max_iterations=max_iterations,
                                           tolerance=tolerance)[0]


def conjugate_gradient_with_product(
    apply_a: Operator,
    rhs: torch.Tensor,
    initial: torch.Tensor | None = None,
    initial_product: torch.Tensor | None = None,
    *,
    max_iterations: int = 20,
    tolerance: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`conjugate_gradient`, which also returns ``A x`` of the solution ``x``: ``rhs``
    less CG's residual, which CG updates alongside ``x`` (where applying ``A`` once more would
    cost a whole operator application). ``initial_product`` is ``A initial`` where the caller
    has it (a previous solve's product, adjusted for a change of ``A``); it is then not
    computed."""
    # CG runs on real views (slices, ..., 2): each update is one fused multiply-add.
    rhs_real = torch.view_as_real(rhs.resolve_conj())
    if initial is None:
        x = torch.zeros_like(rhs_real)
        residual = rhs_real
    else:
        initial = initial.resolve_conj()
        x = torch.view_as_real(initial)
        if initial_product is None:
            initial_product = apply_a(initial)
        residual = rhs_real - torch.view_as_real(initial_product.resolve_conj())
    direction = residual
    residual_norm2 = _real_dot(residual, residual)
    stop_norm2 = (tolerance**2) * _real_dot(rhs_real, rhs_real)
    tiny = torch.finfo(rhs_real.dtype).tiny
    for _ in range(max_iterations):
        # The check synchronises with the device, so it runs only when there is a tolerance.
        if tolerance > 0 and bool((residual_norm2 <= stop_norm2).all()):
            break
        a_direction = torch.view_as_real(apply_a(torch.view_as_complex(direction)))
        curvature = _real_dot(direction, a_direction)
        # A converged slice has zero residual and direction: its step and beta are 0 / tiny = 0.
        step = per_slice(residual_norm2 / curvature.clamp_min(tiny), x)
        x = torch.addcmul(x, step, direction)
        residual = torch.addcmul(residual, step, a_direction, value=-1)
        new_norm2 = _real_dot(residual, residual)
        beta = per_slice(new_norm2 / residual_norm2.clamp_min(tiny), x)
        direction = torch.addcmul(residual, beta, direction)
        residual_norm2 = new_norm2
    return torch.view_as_complex(x), torch.view_as_complex(rhs_real - residual)


@dataclass
class _WarmStart:
    """A solve's solution ``x`` ``(slices, sets, y, x)`` and ``E^H E x``, to start the next solve from."""

    solution: torch.Tensor
    normal: torch.Tensor


@dataclass
class _WarmStarts:
    """The last forward solve and the last backward solve."""

    forward: _WarmStart | None = None
    adjoint: _WarmStart | None = None


class _ImplicitSolve(torch.autograd.Function):
    """``x = (E^H E + lambda I)^-1 (E^H y + lambda z)`` with the implicit backward."""

    @staticmethod
    def forward(ctx, z, lam, dc):  # type: ignore[override]
        with torch.no_grad():
            x = dc.solve_forward(dc.adjoint_measurement + per_slice(lam, z) * z, lam)
        ctx.dc = dc
        ctx.save_for_backward(z, lam, x)
        return x

    @staticmethod
    def backward(ctx, grad_x):  # type: ignore[override]
        z, lam, x = ctx.saved_tensors
        dc = ctx.dc
        with torch.no_grad():
            v = dc.solve_adjoint(grad_x, lam)
        grad_z = per_slice(lam, v).to(v.dtype) * v if ctx.needs_input_grad[0] else None
        grad_lam = _slice_dot(v, z - x) if ctx.needs_input_grad[1] else None
        return grad_z, grad_lam, None


class DataConsistency(nn.Module):
    """The data-consistency step for a fixed operator and measurement.

    Parameters
    ----------
    op
        The SENSE operator.
    kspace
        Measured k-space ``(slices, coils, ky, kx)``.
    iterations
        CG iterations per solve (forward and backward each).
    tolerance
        Relative residual at which CG stops early.
    warm_start
        Start each solve from the previous call's solution (forward and backward separately),
        and from its ``E^H E x``, which CG carries along, so that the start's residual costs no
        application of the operator.
    column_solver
        Solve exactly with this :class:`ColumnSolver` of ``op`` instead of by CG (the CG
        settings, warm starts included, are then unused).
    """

    adjoint_measurement: torch.Tensor

    def __init__(self, op: SenseOp, kspace: torch.Tensor, *, iterations: int = 20,
                 tolerance: float = 0.0, warm_start: bool = False,
                 column_solver: ColumnSolver | None = None) -> None:
        super().__init__()
        self.op = op
        self.register_buffer("adjoint_measurement", op.adjoint(kspace))
        self.iterations = iterations
        self.tolerance = tolerance
        self.warm_start = warm_start and column_solver is None
        self._warm_starts = _WarmStarts()
        self.column_solver = column_solver

    def _solve(self, rhs: torch.Tensor, lam: torch.Tensor,
               start: _WarmStart | None) -> tuple[torch.Tensor, _WarmStart | None]:
        """Solve ``(E^H E + lam I) x = rhs`` for ``(slices, sets, y, x)`` with per-slice ``lam``
        ``(slices,)``: exactly with the column solver, else by CG from ``start``. Returns the
        solution and, with warm starts, the start of the next solve of its kind."""
        if self.column_solver is not None:
            return self.column_solver.solve(rhs, lam), None
        shift = per_slice(lam.to(rhs.real.dtype), torch.view_as_real(rhs))

        def shifted(normal: torch.Tensor, image: torch.Tensor, sign: int = 1) -> torch.Tensor:
            """``normal + sign * lam * image`` for complex images."""
            return torch.view_as_complex(torch.addcmul(torch.view_as_real(normal), shift, torch.view_as_real(image),
                                                       value=sign))

        def apply_a(image: torch.Tensor) -> torch.Tensor:
            return shifted(self.op.normal(image), image)

        # E^H E of the start is the last solve's, carried along its iterations: only lam changed.
        initial_product = None if start is None else shifted(start.normal, start.solution)
        solution, product = conjugate_gradient_with_product(
            apply_a, rhs, None if start is None else start.solution, initial_product,
            max_iterations=self.iterations, tolerance=self.tolerance)
        if not self.warm_start:
            return solution, None
        return solution, _WarmStart(solution, shifted(product, solution, sign=-1))

    def solve_forward(self, rhs: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """The forward solve, from the last one's solution with warm starts (then kept for the next)."""
        solution, self._warm_starts.forward = self._solve(rhs, lam, self._warm_starts.forward)
        return solution

    def solve_adjoint(self, grad: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """The backward (adjoint) solve, warm-started likewise from the last backward solve."""
        solution, self._warm_starts.adjoint = self._solve(grad, lam, self._warm_starts.adjoint)
        return solution

    def forward(self, z: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """Image ``z`` ``(slices, sets, y, x)`` and ``lam`` ``(slices,)`` to the DC image, shaped as ``z``."""
        return _ImplicitSolve.apply(z, lam, self)
