import math

import pytest
import torch

from unrollinr.cg import DataConsistency, conjugate_gradient
from unrollinr.masks import random_line_mask
from unrollinr.sense import SenseOp


def _small_problem(rng, slices=2, shape=(8, 6), coils=3, sets=2):
    """A problem with ``sets`` sets of random maps; images are ``(slices, sets, *shape)``."""
    mask = torch.from_numpy(random_line_mask(shape, 2, 2, seed=3))
    shape_c = (slices, sets, coils, *shape)
    maps = torch.from_numpy(rng.standard_normal(shape_c) + 1j * rng.standard_normal(shape_c))
    op = SenseOp(maps, mask)
    kspace = op(_random(rng, op.image_shape))
    return op, kspace


def _random(rng, shape) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal(shape) + 1j * rng.standard_normal(shape))


def _dense_normal(op: SenseOp, s: int) -> torch.Tensor:
    image_shape = op.image_shape[1:]
    n = math.prod(image_shape)
    basis = torch.eye(n, dtype=torch.complex128).reshape(n, *image_shape)
    columns = []
    for b in basis:
        image = torch.zeros(op.image_shape, dtype=torch.complex128)
        image[s] = b
        columns.append(op.normal(image)[s].flatten())
    return torch.stack(columns, dim=1)


def test_cg_matches_direct_solve(rng):
    op, kspace = _small_problem(rng)
    lam = torch.tensor([0.05, 0.3], dtype=torch.float64)
    rhs = op.adjoint(kspace)
    solution = conjugate_gradient(lambda x: op.normal(x) + lam[:, None, None, None] * x, rhs, max_iterations=200,
                                  tolerance=1e-13)
    for s in range(2):
        a = _dense_normal(op, s) + lam[s] * torch.eye(96, dtype=torch.complex128)
        direct = torch.linalg.solve(a, rhs[s].flatten())
        torch.testing.assert_close(solution[s].flatten(), direct, rtol=1e-9, atol=1e-9)


def test_cg_warm_start_and_tolerance_stop_early(rng):
    op, kspace = _small_problem(rng)
    rhs = op.adjoint(kspace)
    calls = []

    def apply_a(x):
        calls.append(1)
        return op.normal(x) + 0.1 * x

    exact = conjugate_gradient(apply_a, rhs, max_iterations=200, tolerance=1e-12)
    calls.clear()
    warm = conjugate_gradient(apply_a, rhs, exact, max_iterations=200, tolerance=1e-6)
    assert len(calls) == 1  # only the initial residual: already converged
    torch.testing.assert_close(warm, exact)


def test_implicit_backward_matches_autograd_through_unrolled_cg(rng):
    op, kspace = _small_problem(rng)
    iterations = 200
    dc = DataConsistency(op, kspace, iterations=iterations, tolerance=1e-14)
    z = _random(rng, op.image_shape).requires_grad_()
    lam = torch.tensor([0.05, 0.2], dtype=torch.float64, requires_grad=True)
    weights = _random(rng, op.image_shape)

    def loss_of(x):
        return (weights.conj() * x).real.sum() + x.abs().pow(2).sum()

    loss_of(dc(z, lam)).backward()
    implicit = (z.grad.clone(), lam.grad.clone())
    z.grad = None
    lam.grad = None

    rhs = dc.adjoint_measurement + lam[:, None, None, None] * z
    unrolled = conjugate_gradient(lambda x: op.normal(x) + lam[:, None, None, None] * x, rhs, max_iterations=96)
    loss_of(unrolled).backward()
    torch.testing.assert_close(implicit[0], z.grad, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(implicit[1], lam.grad, rtol=1e-7, atol=1e-9)


def test_implicit_backward_passes_gradcheck_in_complex128(rng):
    op, kspace = _small_problem(rng, slices=1, shape=(6, 4), coils=2)
    dc = DataConsistency(op, kspace, iterations=100, tolerance=1e-15)
    z = _random(rng, op.image_shape).requires_grad_()
    lam = torch.tensor([0.1], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(dc, (z, lam), eps=1e-6, atol=1e-6)


def test_backward_stores_no_cg_intermediates(rng):
    """The autograd graph holds z, lambda and x only, whatever the CG iteration count."""
    op, kspace = _small_problem(rng)
    z = torch.zeros(op.image_shape, dtype=torch.complex128, requires_grad=True)
    lam = torch.full((2,), 0.1, dtype=torch.float64, requires_grad=True)
    for iterations in (5, 50):
        x = DataConsistency(op, kspace, iterations=iterations)(z, lam)
        assert len(x.grad_fn.saved_tensors) == 3


@pytest.mark.parametrize("warm_start", [False, True])
def test_warm_start_gives_the_same_solution(rng, warm_start):
    op, kspace = _small_problem(rng)
    dc = DataConsistency(op, kspace, iterations=100, tolerance=1e-12, warm_start=warm_start)
    z = torch.zeros(op.image_shape, dtype=torch.complex128)
    lam = torch.full((2,), 0.1, dtype=torch.float64)
    first = dc(z, lam)
    second = dc(z + 0.01, lam)
    reference = DataConsistency(op, kspace, iterations=100, tolerance=1e-12)(z + 0.01, lam)
    torch.testing.assert_close(second, reference, rtol=1e-8, atol=1e-8)
    assert first.shape == (2, 2, 8, 6)


def test_warm_starts_carry_the_normal_product_across_a_change_of_lambda(rng):
    """A warm-started solve starts from the last solve's ``E^H E x`` (adjusted for the new
    lambda) instead of applying the operator to it once more, and solves the new system."""
    op, kspace = _small_problem(rng)
    normal_calls = []
    normal = op.normal
    op.normal = lambda image: normal_calls.append(1) or normal(image)  # counts, then applies the real operator
    z = _random(rng, op.image_shape)
    dc = DataConsistency(op, kspace, iterations=5, warm_start=True)
    dc(z, torch.full((2,), 0.1, dtype=torch.float64))
    assert len(normal_calls) == 5  # from zeros: no product to start from
    for step in range(1, 60):  # lambda and z change every solve, as in training, then stay
        changes = min(step, 20)
        lam = torch.tensor([0.1 + 0.01 * changes, 0.2 - 0.002 * changes], dtype=torch.float64)
        x = dc(z + 0.01 * changes, lam)
    assert len(normal_calls) == 60 * 5
    # the carried products lead the warm-started solves to the last system's solution
    del op.normal
    reference = DataConsistency(op, kspace, iterations=200, tolerance=1e-13)(z + 0.2, lam)
    torch.testing.assert_close(x, reference, rtol=1e-9, atol=1e-9)
    carried = dc._warm_starts.forward
    torch.testing.assert_close(carried.normal, op.normal(carried.solution), rtol=1e-9, atol=1e-9)


def test_a_converged_slice_stays_put_while_others_iterate(rng):
    op, kspace = _small_problem(rng)
    lam = torch.full((2,), 0.1, dtype=torch.float64)
    rhs = op.adjoint(kspace)
    rhs[0] = 0
    solution = conjugate_gradient(lambda x: op.normal(x) + lam[:, None, None, None] * x, rhs, max_iterations=30)
    assert torch.equal(solution[0], torch.zeros_like(solution[0]))
    second = SenseOp(op.maps[1:], op.mask[1:])
    alone = conjugate_gradient(lambda x: second.normal(x) + lam[1] * x, rhs[1:], max_iterations=30)
    torch.testing.assert_close(solution[1:], alone)


def test_cg_takes_lazily_conjugated_inputs(rng):
    op, kspace = _small_problem(rng)
    rhs = op.adjoint(kspace)

    def apply_a(x):
        return op.normal(x) + 0.1 * x

    expected = conjugate_gradient(apply_a, rhs, rhs, max_iterations=10)
    conjugated = rhs.conj().resolve_conj().conj()  # the same values behind a lazy conjugation bit
    assert conjugated.is_conj()
    torch.testing.assert_close(conjugate_gradient(apply_a, conjugated, conjugated, max_iterations=10), expected)
