import numpy as np
import pytest
import torch

from unrollinr.cg import DataConsistency
from unrollinr.column_solve import ColumnSolver
from unrollinr.masks import random_line_mask
from unrollinr.sense import SenseOp

SHAPE = (10, 6)


def _problem(rng, device: torch.device | None = None, slices=2, coils=3, sets=2):
    """Two slices with their own line masks and ``sets`` sets of maps that vanish on some
    rows of each column (a support that differs from column to column, set to set and
    slice to slice; the second set's is smaller, as ESPIRiT's is)."""
    masks = np.stack([random_line_mask(SHAPE, 2, 2, seed=s) for s in range(slices)])
    shape = (slices, sets, coils, *SHAPE)
    maps = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
    outside = rng.random((slices, sets, *SHAPE)) < np.array([0.3, 0.7][:sets])[:, None, None]
    outside[0, :, :, 0] = True  # a column with no support at all
    maps = maps * ~outside[:, :, None]
    return SenseOp(torch.from_numpy(maps).to(device), torch.from_numpy(masks).to(device))


def _dense_system(op: SenseOp, s: int, lam: float) -> torch.Tensor:
    """``E^H E + lam I`` of slice ``s`` as a dense ``(sets * y * x, sets * y * x)`` matrix."""
    _, n_sets, n_y, n_x = op.image_shape
    n = n_sets * n_y * n_x
    columns = []
    for b in torch.eye(n, dtype=op.maps.dtype, device=op.maps.device).reshape(n, n_sets, n_y, n_x):
        image = torch.zeros(op.image_shape, dtype=op.maps.dtype, device=op.maps.device)
        image[s] = b
        columns.append(op.normal(image)[s].flatten())
    return torch.stack(columns, dim=1) + lam * torch.eye(n, dtype=op.maps.dtype, device=op.maps.device)


def _random_images(rng, op: SenseOp, device: torch.device | None = None) -> torch.Tensor:
    shape = op.image_shape
    return torch.from_numpy(rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).to(device)


# 3 coils: ``coils * K`` mostly above a column's support rows (``G_x`` is decomposed);
# 1 coil: below (``A_x A_x^H`` is)
@pytest.mark.parametrize("coils", [3, 1])
def test_exact_solve_matches_a_dense_solve(rng, device, coils):
    op = _problem(rng, device, coils=coils)
    lam = torch.tensor([0.05, 0.4], dtype=torch.float64, device=device)
    rhs = _random_images(rng, op, device)
    solution = ColumnSolver(op).solve(rhs, lam)
    assert solution.shape == rhs.shape
    for s in range(2):
        dense = torch.linalg.solve(_dense_system(op, s, float(lam[s])), rhs[s].flatten())
        torch.testing.assert_close(solution[s].flatten(), dense, rtol=1e-9, atol=1e-9)


def test_a_batch_solves_as_its_slices_alone(rng):
    op = _problem(rng)
    lam = torch.tensor([0.1, 0.2], dtype=torch.float64)
    rhs = _random_images(rng, op)
    batched = ColumnSolver(op).solve(rhs, lam)
    for s in range(2):
        alone = ColumnSolver(SenseOp(op.maps[s:s + 1], op.mask[s:s + 1])).solve(rhs[s:s + 1], lam[s:s + 1])
        torch.testing.assert_close(batched[s:s + 1], alone, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("coils", [3, 1])
def test_float32_solve_is_accurate_to_single_precision(rng, coils):
    op64 = _problem(rng, coils=coils)
    maps = op64.maps / op64.maps.abs().pow(2).sum(dim=2, keepdim=True).sqrt().clamp_min(1e-30)  # sum |S|^2 = 1
    op = SenseOp(maps.to(torch.complex64), op64.mask)
    lam = torch.tensor([0.05, 0.05])
    rhs = _random_images(rng, op).to(torch.complex64)
    solution = ColumnSolver(op).solve(rhs, lam)
    residual = op.normal(solution) + 0.05 * solution - rhs
    assert float(residual.norm() / rhs.norm()) < 1e-5


def test_exact_and_cg_data_consistency_agree_with_their_gradients(rng):
    op = _problem(rng)
    kspace = op(_random_images(rng, op))
    z = _random_images(rng, op).requires_grad_()
    lam = torch.tensor([0.05, 0.2], dtype=torch.float64, requires_grad=True)
    weights = _random_images(rng, op)
    results = []
    for dc in (DataConsistency(op, kspace, column_solver=ColumnSolver(op)),
               DataConsistency(op, kspace, iterations=300, tolerance=1e-14)):
        x = dc(z, lam)
        ((weights.conj() * x).real.sum() + x.abs().pow(2).sum()).backward()
        results.append((x.detach(), z.grad.clone(), lam.grad.clone()))
        z.grad, lam.grad = None, None
    for exact, cg in zip(*results, strict=True):
        torch.testing.assert_close(exact, cg, rtol=1e-8, atol=1e-9)


def test_exact_data_consistency_passes_gradcheck_in_complex128(rng):
    op = _problem(rng, slices=1, coils=2)
    dc = DataConsistency(op, op(_random_images(rng, op)), column_solver=ColumnSolver(op))
    z = _random_images(rng, op).requires_grad_()
    lam = torch.tensor([0.1], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(dc, (z, lam), eps=1e-6, atol=1e-6)


def test_a_mask_that_is_not_made_of_lines_is_refused(rng):
    op = _problem(rng)
    mask = op.mask.clone()
    mask[:, 0, 0] = ~mask[:, 0, 0]
    with pytest.raises(ValueError, match="whole-line mask"):
        ColumnSolver(SenseOp(op.maps, mask))


def test_the_solver_moves_with_the_model_and_stays_out_of_its_state(rng):
    op = _problem(rng)
    dc = DataConsistency(op, op(_random_images(rng, op)), column_solver=ColumnSolver(op))
    assert not any(name.startswith("column_solver") for name in dc.state_dict())
    # buffers are what Module.to(device) moves
    assert {f"column_solver.slices.{s}.{name}" for s in range(2) for name in ("basis", "eigenvalues", "rows")} <= {
        name for name, _ in dc.named_buffers()}


def test_decomposition_workers_run_single_threaded_and_restore_the_thread_count_also_on_errors():
    from concurrent.futures import ThreadPoolExecutor

    from unrollinr.column_solve import _map_on_one_thread_workers

    def count_in_a_new_thread() -> int:
        with ThreadPoolExecutor(max_workers=1) as fresh:
            return fresh.submit(torch.get_num_threads).result()

    before = torch.get_num_threads(), count_in_a_new_thread()
    assert _map_on_one_thread_workers(lambda item: (item, torch.get_num_threads()), [1, 2]) == [(1, 1), (2, 1)]

    def fail(item: int) -> int:
        raise RuntimeError("eigh failed")

    with pytest.raises(RuntimeError, match="eigh failed"):
        _map_on_one_thread_workers(fail, [1])
    assert (torch.get_num_threads(), count_in_a_new_thread()) == before
