"""The grid encoding against hand-computed cases of tiny-cuda-nn's rules."""

import pytest
import torch

from unrollinr.hashgrid import GridEncoding, grid_levels, interpolation_corners, make_grid_encoding


def test_level_geometry_follows_tcnn():
    levels = grid_levels({"otype": "HashGrid", "n_levels": 3, "base_resolution": 16, "per_level_scale": 1.5,
                          "log2_hashmap_size": 10})
    # scale = 16 * 1.5**l - 1; resolution = ceil(scale) + 1; size = min(next_multiple(res^2, 8), 2^10)
    assert [lv.scale for lv in levels] == pytest.approx([15.0, 23.0, 35.0])
    assert [lv.resolution for lv in levels] == [16, 24, 36]
    assert [lv.size for lv in levels] == [256, 576, 1024]
    assert [lv.dense for lv in levels] == [True, True, False]


def test_table_size_is_rounded_to_multiples_of_eight():
    (level,) = grid_levels({"n_levels": 1, "base_resolution": 5, "log2_hashmap_size": 19})
    assert (level.resolution, level.size, level.dense) == (5, 32, True)  # 25 -> 32


def test_dense_corners_and_weights_by_hand():
    (level,) = grid_levels({"n_levels": 1, "base_resolution": 4, "log2_hashmap_size": 4})
    assert (level.scale, level.resolution, level.size, level.dense) == (3.0, 4, 16, True)
    # u = (0.5, 0.25): p = (0.5 * 3 + 0.5, 0.25 * 3 + 0.5) = (2.0, 1.25) -> cell (2, 1), fraction (0, 0.25)
    indices, weights = interpolation_corners(level, torch.tensor([[0.5, 0.25]]))
    assert indices.tolist() == [[2 + 1 * 4, 3 + 1 * 4, 2 + 2 * 4, 3 + 2 * 4]]
    assert weights[0].tolist() == pytest.approx([0.75, 0.0, 0.25, 0.0])


def test_dense_index_wraps_past_the_last_column_like_tcnn():
    (level,) = grid_levels({"n_levels": 1, "base_resolution": 4, "log2_hashmap_size": 4})
    # u = (1, 0): p = (3.5, 0.5) -> cell (3, 0); its +x corner (4, 0) has index 4 = (0, 1)
    indices, weights = interpolation_corners(level, torch.tensor([[1.0, 0.0]]))
    assert indices.tolist() == [[3, 4, 7, 8]]
    assert weights[0].tolist() == pytest.approx([0.25, 0.25, 0.25, 0.25])


def test_hashed_index_by_hand():
    # 2654435761 = 0x9E3779B1, so modulo 256 the y prime is 0xB1 = 177.
    (level,) = grid_levels({"n_levels": 1, "base_resolution": 32, "log2_hashmap_size": 8})
    assert not level.dense and level.size == 256
    # u chosen so that p = u * 31 + 0.5 lands on cell (3, 5) with fraction (0.5, 0.5)
    u = torch.tensor([[3.0 / 31, 5.0 / 31]])
    indices, weights = interpolation_corners(level, u)
    by_hand = [(3 ^ (5 * 177 % 256)) % 256, (4 ^ (5 * 177 % 256)) % 256,
               (3 ^ (6 * 177 % 256)) % 256, (4 ^ (6 * 177 % 256)) % 256]
    assert by_hand[0] == 118
    assert indices.tolist() == [by_hand]
    assert weights[0].tolist() == pytest.approx([0.25] * 4, abs=1e-6)


def test_negative_inputs_wrap_as_unsigned():
    (level,) = grid_levels({"n_levels": 1, "base_resolution": 32, "log2_hashmap_size": 8})
    indices, _ = interpolation_corners(level, torch.tensor([[-1.0 / 31 - 0.5 / 31, 0.0]]))
    # p_x = -1 -> cell x = -1 -> uint32 4294967295; hashed with y = 0
    assert indices[0, 0].item() == (2**32 - 1) % 256


@pytest.mark.parametrize("log2_size", [6, 2])
def test_features_are_bilinear_sums_of_table_entries_and_gradients_flow(log2_size, device):
    config = {"otype": "HashGrid", "n_levels": 3, "n_features_per_level": 2, "log2_hashmap_size": log2_size,
              "base_resolution": 4, "per_level_scale": 2.0}
    encoding = GridEncoding(config, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        encoding.table.normal_()
    coords = torch.rand(50, 2, generator=torch.Generator().manual_seed(1))
    # the reference: each corner's table entry times its weight, on the CPU
    expected = []
    for number, level in enumerate(encoding.levels):
        idx, w = interpolation_corners(level, coords)
        table = encoding.table[encoding.offsets[number]:encoding.offsets[number + 1]]
        expected.append((table[idx] * w.unsqueeze(-1)).sum(dim=1))
    expected = torch.cat(expected, dim=1)
    weights = torch.randn(50, 6)
    (expected * weights).sum().backward()
    expected_grad = encoding.table.grad.clone()
    encoding.table.grad = None

    encoding.to(device)
    features = encoding(coords.to(device))
    assert features.shape == (50, 6) and features.device.type == device.type
    torch.testing.assert_close(features.cpu(), expected.detach())
    (features * weights.to(device)).sum().backward()
    torch.testing.assert_close(encoding.table.grad.cpu(), expected_grad)

    matrix, matrix_t = encoding.interpolation_matrices(coords.to(device))
    torch.testing.assert_close(matrix_t.to_dense(), matrix.to_dense().t())
    if log2_size == 2:  # 4 entries per level: corners of one cell share entries, merged in one row
        assert int(matrix.crow_indices().diff().min()) < 4


def test_encodings_of_one_geometry_and_coordinates_share_their_interpolation_plan():
    from unrollinr import hashgrid
    from unrollinr.model import pixel_coordinates

    config = {"otype": "HashGrid", "n_levels": 4, "log2_hashmap_size": 8, "base_resolution": 4, "per_level_scale": 2.0}
    first, second = (GridEncoding(config, generator=torch.Generator().manual_seed(seed)) for seed in (0, 1))
    coords = pixel_coordinates((20, 24))
    first(coords)
    second(coords.clone())  # the same coordinates in another tensor
    assert first._plan is second._plan
    for built, shared in zip(first.interpolation_matrices(coords), first._plan, strict=True):
        assert torch.equal(built.to_dense(), shared.to_dense())
    other_size = GridEncoding(config)
    other_size(pixel_coordinates((20, 20)))
    other_levels = GridEncoding({**config, "n_levels": 3})
    other_levels(coords)
    assert len({id(e._plan) for e in (first, other_size, other_levels)}) == 3
    assert len(hashgrid._plans) <= hashgrid.PLAN_CACHE_SIZE


def test_initialisation_is_uniform_in_1e_minus_4():
    encoding = GridEncoding({"n_levels": 4, "log2_hashmap_size": 10}, generator=torch.Generator().manual_seed(0))
    assert encoding.table.abs().max() <= 1e-4
    assert encoding.table.abs().max() > 0.9e-4


def test_cpu_uses_the_torch_implementation():
    encoding = make_grid_encoding({"n_levels": 2}, torch.device("cpu"))
    assert isinstance(encoding, GridEncoding)
    with pytest.raises(ValueError, match="CUDA"):
        make_grid_encoding({"n_levels": 2}, torch.device("cpu"), backend="tcnn")


@pytest.mark.cuda
@pytest.mark.parametrize("otype, log2_size", [("HashGrid", 12), ("HashGrid", 19), ("DenseGrid", 19)])
def test_tcnn_matches_the_torch_implementation_on_cuda(otype, log2_size):
    pytest.importorskip("tinycudann")
    config = {"otype": otype, "n_levels": 8 if otype == "HashGrid" else 1, "n_features_per_level": 2,
              "log2_hashmap_size": log2_size, "base_resolution": 8 if otype == "HashGrid" else 96,
              "per_level_scale": 1.5 if otype == "HashGrid" else 1.0}
    device = torch.device("cuda")
    fused = make_grid_encoding(config, device, backend="tcnn")
    ours = make_grid_encoding(config, device, backend="torch")
    with torch.no_grad():  # entries of magnitude ~1, so a wrong index or weight shows
        fused.encoding.params.uniform_(-1.0, 1.0)
        ours.table.copy_(fused.encoding.params.reshape(ours.table.shape).float())
    coords = torch.rand(4096, 2, device=device)
    torch.testing.assert_close(fused(coords).float(), ours(coords), atol=4e-3, rtol=2e-3)  # fp16 output
