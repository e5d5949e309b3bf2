import numpy as np
import pytest
import torch

from unrollinr.masks import radial_mask, random_line_mask
from unrollinr.sense import SenseOp, combine_sets, is_line_mask, sets_in_use


def _random_op(rng, mask: np.ndarray, slices: int = 2, coils: int = 4, device="cpu", sets: int = 2) -> SenseOp:
    shape = (slices, sets, coils, *mask.shape)
    maps = torch.from_numpy(rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).to(device)
    return SenseOp(maps, torch.from_numpy(mask).to(device))


@pytest.mark.parametrize("kind", ["lines", "radial"])
def test_adjointness_dot_product(rng, kind, device):
    mask = random_line_mask((24, 20), 4, 4, seed=1) if kind == "lines" else radial_mask((24, 20), 3, acs=4)
    op = _random_op(rng, mask, device=device)
    assert op.line_mask == (kind == "lines")
    x = torch.from_numpy(rng.standard_normal((2, 2, 24, 20)) + 1j * rng.standard_normal((2, 2, 24, 20))).to(device)
    y = torch.from_numpy(rng.standard_normal((2, 4, 24, 20)) + 1j * rng.standard_normal((2, 4, 24, 20))).to(device)
    forward = op(x)
    adjoint = op.adjoint(y)
    assert forward.shape == (2, 4, 24, 20) and adjoint.shape == (2, 2, 24, 20)
    lhs = torch.vdot(forward.flatten(), y.flatten())
    rhs = torch.vdot(x.flatten(), adjoint.flatten())
    assert torch.allclose(lhs, rhs, rtol=1e-10)


@pytest.mark.parametrize("sets", [1, 2])
@pytest.mark.parametrize("kind, shape", [("lines", (32, 16)), ("radial", (32, 16)), ("lines", (33, 17)),
                                         ("radial", (33, 17))])
def test_normal_equals_adjoint_of_forward(rng, kind, shape, sets):
    mask = random_line_mask(shape, 4, 6, seed=2) if kind == "lines" else radial_mask(shape, 3, acs=4)
    op = _random_op(rng, mask, sets=sets)
    x = torch.from_numpy(rng.standard_normal((2, sets, *shape)) + 1j * rng.standard_normal((2, sets, *shape)))
    torch.testing.assert_close(op.normal(x), op.adjoint(op(x)), rtol=1e-10, atol=1e-10)


def test_per_slice_masks_with_different_line_counts(rng):
    masks = np.stack([random_line_mask((16, 8), 2, 4, seed=0), random_line_mask((16, 8), 4, 4, seed=0)])
    maps = torch.from_numpy(rng.standard_normal((2, 1, 3, 16, 8)) + 1j * rng.standard_normal((2, 1, 3, 16, 8)))
    op = SenseOp(maps, torch.from_numpy(masks))
    x = torch.from_numpy(rng.standard_normal((2, 1, 16, 8)) + 1j * rng.standard_normal((2, 1, 16, 8)))
    assert op.line_mask
    torch.testing.assert_close(op.normal(x), op.adjoint(op(x)), rtol=1e-10, atol=1e-10)


def test_line_mask_detection():
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[2] = True
    assert is_line_mask(mask)
    mask[3, 1] = True
    assert not is_line_mask(mask)


def test_bad_shapes_are_rejected(rng):
    maps = torch.zeros(1, 1, 2, 8, 8, dtype=torch.complex64)
    with pytest.raises(ValueError, match="sets"):
        SenseOp(maps[:, 0], torch.ones(8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not match"):
        SenseOp(maps, torch.ones(8, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="complex"):
        SenseOp(maps.real, torch.ones(8, 8, dtype=torch.bool))


@pytest.mark.parametrize("shape", [(16, 12), (15, 13)])
@pytest.mark.parametrize("kind", ["lines", "radial"])
def test_measure_gives_the_measured_samples_of_the_forward_model(rng, kind, shape):
    masks = [random_line_mask(shape, 2, 4, seed=0), random_line_mask(shape, 4, 4, seed=1)]
    if kind == "radial":  # slices with different numbers of samples: the shorter one is padded
        masks = [radial_mask(shape, 2, acs=4), radial_mask(shape, 3, acs=2)]
    maps = torch.from_numpy(rng.standard_normal((2, 2, 3, *shape)) + 1j * rng.standard_normal((2, 2, 3, *shape)))
    op = SenseOp(maps, torch.from_numpy(np.stack(masks)))
    x = torch.from_numpy(rng.standard_normal((2, 2, *shape)) + 1j * rng.standard_normal((2, 2, *shape)))
    measured = op.measure(x)
    torch.testing.assert_close(measured, op.samples(op(x)), rtol=1e-10, atol=1e-10)
    # the same samples as the masked k-space: equal norms, and nothing else
    for s in range(2):
        assert torch.linalg.vector_norm(measured[s]) == pytest.approx(float(torch.linalg.vector_norm(op(x)[s])))
        assert torch.count_nonzero(measured[s]) == torch.count_nonzero(op(x)[s])


@pytest.mark.parametrize("kind", ["lines", "radial"])
def test_operators_of_the_same_maps_share_their_encoding(rng, kind):
    mask = random_line_mask((16, 12), 2, 4, seed=0) if kind == "lines" else radial_mask((16, 12), 2, acs=4)
    held = np.zeros_like(mask)
    held[np.nonzero(mask)[0][:3]] = mask[np.nonzero(mask)[0][:3]]  # a few of the measured rows or samples
    maps = torch.from_numpy(rng.standard_normal((1, 2, 3, 16, 12)) + 1j * rng.standard_normal((1, 2, 3, 16, 12)))
    train, held_out = SenseOp(maps, torch.from_numpy(mask & ~held)), SenseOp(maps, torch.from_numpy(held))
    assert train.line_mask == held_out.line_mask
    x = torch.from_numpy(rng.standard_normal((1, 2, 16, 12)) + 1j * rng.standard_normal((1, 2, 16, 12)))
    encoded = train.encode(x)
    assert torch.equal(held_out.measure(x, encoded), held_out.measure(x))
    other = SenseOp(maps, torch.from_numpy(radial_mask((16, 12), 2, acs=4) if kind == "lines" else mask | True))
    with pytest.raises(ValueError, match="is not of a"):
        other.measure(x, encoded)


def test_sets_in_use_leave_out_the_last_sets_that_are_zero_in_every_slice():
    maps = torch.zeros(2, 3, 2, 4, 4, dtype=torch.complex64)
    assert sets_in_use(maps) == 3  # nothing in use: all of them, for the caller's own error
    maps[:, 0] = 1
    assert sets_in_use(maps) == 1
    maps[1, 2, 0, 3, 3] = 1j  # one pixel of one slice's third set
    assert sets_in_use(maps) == 3


def test_combine_sets_is_root_sum_of_squares_with_the_first_sets_phase():
    images = torch.tensor([[[[3j, 0j]], [[4 + 0j, 2j]]]])  # (1 slice, 2 sets, 1, 2)
    combined = combine_sets(images)
    torch.testing.assert_close(combined, torch.tensor([[[5j, 2 + 0j]]]))
    assert torch.equal(combine_sets(images[:, :1]), images[:, 0])
