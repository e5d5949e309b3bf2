import pytest
import torch

from unrollinr.loss import normalized_l1_l2, total_variation


def test_normalized_l1_l2_by_hand():
    measured = torch.tensor([[3 + 4j, 0j]])  # ||y||_2 = 5, ||y||_1 = 5
    predicted = torch.tensor([[3 + 4j, 1j]])  # error 1 at one sample
    assert normalized_l1_l2(predicted, measured).tolist() == pytest.approx([1 / 5 + 1 / 5])


def test_total_variation_by_hand():
    image = torch.zeros(1, 3, 3, dtype=torch.complex64)
    image[0, 1, 1] = 2j
    # anisotropic: four unit differences of |2|
    assert total_variation(image).item() == pytest.approx(8.0)
    assert total_variation(torch.ones(2, 4, 4, dtype=torch.complex64)).tolist() == [0.0, 0.0]
