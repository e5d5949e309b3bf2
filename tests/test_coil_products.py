import numpy as np
import pytest
import torch

from unrollinr.coil_products import CoilProducts
from unrollinr.masks import random_line_mask
from unrollinr.sense import SenseOp


def _sparse_sets(rng, slices: int = 2, coils: int = 3, shape: tuple[int, int] = (12, 10)) -> torch.Tensor:
    """Maps ``(slices, 3, coils, y, x)``: set 0 everywhere in slice 0 and on rows 2-9, columns
    1-7 of slice 1, set 1 on a patch of slice 0 only, set 2 nowhere."""
    full = (slices, 3, coils, *shape)
    maps = torch.from_numpy(rng.standard_normal(full) + 1j * rng.standard_normal(full))
    maps[:, 1] = 0
    maps[0, 1, :, 3:6, 2:5] = torch.from_numpy(rng.standard_normal((coils, 3, 3)) + 0j)
    maps[:, 2] = 0
    maps[1, 0, :, :2] = 0
    maps[1, 0, :, 10:] = 0
    maps[1, 0, ..., :1] = 0
    maps[1, 0, ..., 8:] = 0
    return maps


@pytest.mark.parametrize("layout", ["coils, y, x", "y, coils, x"])
def test_products_on_the_support_boxes_equal_the_full_products(rng, layout):
    maps = _sparse_sets(rng)
    coil_axis, y_axis, x_axis = (1, 2, 3) if layout == "coils, y, x" else (2, 1, 3)
    laid_out = maps if coil_axis == 1 else maps.permute(0, 1, 3, 2, 4)
    products = CoilProducts(laid_out, coil_axis=coil_axis, y_axis=y_axis, x_axis=x_axis)
    whole = (slice(0, 12), slice(0, 10))
    assert products.boxes == [[(0, whole), (1, (slice(3, 6), slice(2, 5)))], [(0, (slice(2, 10), slice(1, 8)))]]
    images = torch.from_numpy(rng.standard_normal((2, 3, 12, 10)) + 1j * rng.standard_normal((2, 3, 12, 10)))
    torch.full(laid_out[:, 0].shape, torch.nan, dtype=laid_out.dtype)  # freed at once: NaNs for expand to reuse
    coil_images = products.expand(images)
    torch.testing.assert_close(coil_images, (laid_out * images.unsqueeze(coil_axis + 1)).sum(dim=1))
    torch.testing.assert_close(products.contract(coil_images),
                               (laid_out.conj() * coil_images.unsqueeze(1)).sum(dim=coil_axis + 1))


@pytest.mark.parametrize("product", ["expand", "contract"])
def test_each_products_gradient_is_the_other_product(rng, product):
    products = CoilProducts(_sparse_sets(rng, coils=4), coil_axis=1, y_axis=2, x_axis=3)
    shape = (2, 3, 12, 10) if product == "expand" else (2, 4, 12, 10)  # (slices, sets | coils, y, x)
    values = torch.from_numpy(rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).requires_grad_(True)
    assert torch.autograd.gradcheck(getattr(products, product), (values,))


def test_a_sense_operator_with_empty_and_partial_sets_keeps_its_adjoint(rng):
    maps = _sparse_sets(rng, coils=4, shape=(24, 20))
    x = torch.from_numpy(rng.standard_normal((2, 3, 24, 20)) + 1j * rng.standard_normal((2, 3, 24, 20)))
    for mask in (random_line_mask((24, 20), 4, 4, seed=1), rng.random((24, 20)) < 0.4):
        op = SenseOp(maps, torch.from_numpy(np.asarray(mask)))
        torch.testing.assert_close(op.normal(x), op.adjoint(op(x)), rtol=1e-10, atol=1e-10)

