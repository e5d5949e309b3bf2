import math

import pytest
import torch

from unrollinr.loss import normalized_l1_l2, total_variation
from unrollinr.sense import SenseOp


def test_normalized_l1_l2_by_hand():
    measured = torch.tensor([[3 + 4j, 0j]])  # ||y||_2 = 5, ||y||_1 = 5
    predicted = torch.tensor([[3 + 4j, 1j]])  # error 1 at one sample
    assert normalized_l1_l2(predicted, measured).tolist() == pytest.approx([1 / 5 + 1 / 5])


def test_coil_l1_sums_each_samples_coil_vector():
    measured = torch.tensor([[[3 + 0j], [4j]]])  # (slices, coils, samples): one sample, |y| = 5 over coils
    predicted = measured + torch.tensor([[[1 + 0j], [0j]]])  # error 1 in coil 0 only
    assert normalized_l1_l2(predicted, measured).tolist() == pytest.approx([1 / 5 + 1 / 7])
    assert normalized_l1_l2(predicted, measured, coil_dim=1).tolist() == pytest.approx([1 / 5 + 1 / 5])


def _sense_case(line_mask: bool) -> tuple[SenseOp, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    maps = torch.randn(1, 1, 3, 8, 6, dtype=torch.complex128, generator=generator)
    mask = torch.zeros(8, 6, dtype=torch.bool)
    if line_mask:
        mask[[1, 4, 5]] = True
    else:
        mask[1, 2] = mask[4, :3] = mask[6, 5] = True
    image = torch.randn(1, 1, 8, 6, dtype=torch.complex128, generator=generator)
    return SenseOp(maps, mask), image, torch.randn(1, 3, 8, 6, dtype=torch.complex128, generator=generator)


@pytest.mark.parametrize("line_mask", [True, False], ids=["lines", "2d"])
def test_coil_l1_on_the_sense_layouts_sums_each_k_space_location(line_mask):
    op, image, kspace = _sense_case(line_mask)
    predicted, measured = op.measure(image), op.samples(kspace)
    sampled = kspace * op.mask.unsqueeze(1)
    error = op.coil_kspace(image) * op.mask.unsqueeze(1) - sampled
    by_location = error.abs().pow(2).sum(dim=1).sqrt().sum() / sampled.abs().pow(2).sum(dim=1).sqrt().sum()
    l2 = error.abs().pow(2).sum().sqrt() / sampled.abs().pow(2).sum().sqrt()
    loss = normalized_l1_l2(predicted, measured, coil_dim=op.sample_coil_dim)
    assert loss.item() == pytest.approx((l2 + by_location).item(), rel=1e-10)


def test_coil_l1_gradient_is_finite_where_the_error_vanishes():
    op, image, kspace = _sense_case(line_mask=False)
    image.requires_grad_(True)
    exact = op.coil_kspace(image.detach())  # the image fits every sample: zero error everywhere
    normalized_l1_l2(op.measure(image), op.samples(exact), coil_dim=op.sample_coil_dim).sum().backward()
    assert torch.isfinite(torch.view_as_real(image.grad)).all()


def test_total_variation_by_hand():
    image = torch.zeros(1, 3, 3, dtype=torch.complex64)
    image[0, 1, 1] = 2j
    # anisotropic: four unit differences of |2|
    assert total_variation(image).item() == pytest.approx(8.0)
    assert total_variation(torch.ones(2, 4, 4, dtype=torch.complex64)).tolist() == [0.0, 0.0]
    # log penalty: each difference of 2 costs e log(1 + 2 / e)
    assert total_variation(image, log_scale=0.5).item() == pytest.approx(4 * 0.5 * math.log(5))
    # second order: |d_yy| = |d_xx| = 4 at the centre, |d_xy| = 2 in four places -> (4 + 4) / 2 + 8
    assert total_variation(image, second_order=1.0).item() == pytest.approx(12.0)
    assert total_variation(image, second_order=0.5).item() == pytest.approx(0.5 * 8 + 0.5 * 12)


def test_second_order_tv_does_not_penalise_ramps():
    rows, cols = torch.meshgrid(torch.arange(5.0), torch.arange(4.0), indexing="ij")
    ramp = ((1 + 0.5j) * rows + 2 * cols).to(torch.complex64)[None]
    assert total_variation(ramp).item() > 0
    assert total_variation(ramp, second_order=1.0).item() == pytest.approx(0.0, abs=1e-5)


def test_total_variation_sums_the_sets_of_each_slice():
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 2, 5, 4, dtype=torch.complex64, generator=generator)
    per_set = [total_variation(images[:, s], second_order=0.5, log_scale=0.1) for s in range(2)]
    torch.testing.assert_close(total_variation(images, second_order=0.5, log_scale=0.1), per_set[0] + per_set[1])


def test_log_penalty_is_tv_for_small_differences_and_cheaper_on_edges():
    image = torch.zeros(1, 1, 3, dtype=torch.complex64)
    image[0, 0, 1] = 1e-4
    assert total_variation(image, log_scale=0.1).item() == pytest.approx(total_variation(image).item(), rel=1e-3)
    image[0, 0, 1] = 1.0
    assert total_variation(image, log_scale=0.1).item() < 0.3 * total_variation(image).item()
