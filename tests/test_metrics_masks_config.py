import numpy as np
import pytest
from scipy import ndimage

from unrollinr.config import ReconConfig
from unrollinr.masks import (
    acceleration_of,
    make_mask,
    paper_acs_lines,
    radial_mask,
    random_line_mask,
    spiral_mask,
    uniform_line_mask,
)
from unrollinr.metrics import nrmse, object_support, psnr, ssim
from unrollinr.phantoms import phantom_image


def test_ssim_matches_scikit_image(rng):
    metrics = pytest.importorskip("skimage.metrics")
    reference = rng.random((40, 50))
    estimate = np.abs(reference + 0.1 * rng.standard_normal((40, 50)))  # metrics compare magnitudes
    expected = metrics.structural_similarity(reference, estimate, data_range=reference.max())
    assert ssim(reference, estimate) == pytest.approx(expected, rel=1e-6)


def test_psnr_and_nrmse_by_hand():
    reference = np.zeros((4, 4))
    reference[0, 0] = 2.0
    estimate = reference.copy()
    estimate[1, 1] = 0.5  # mse = 0.25 / 16
    assert psnr(reference, estimate) == pytest.approx(10 * np.log10(4 / (0.25 / 16)))
    assert nrmse(reference, estimate) == pytest.approx(0.5 / 2.0)
    assert psnr(reference, reference) == float("inf")
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(reference, estimate[:2])


def test_psnr_on_a_region_averages_its_pixels_alone():
    reference = np.zeros((4, 4))
    reference[0, 0] = 2.0
    estimate = reference.copy()
    estimate[1, 1] = 0.5
    region = np.zeros((4, 4), dtype=bool)
    region[1] = True  # 4 pixels, one of them wrong
    assert psnr(reference, estimate, region=region) == pytest.approx(10 * np.log10(4 / (0.25 / 4)))
    assert psnr(reference, estimate, region=~region) == float("inf")
    with pytest.raises(ValueError, match="region"):
        psnr(reference, estimate, region=np.zeros((4, 4), dtype=bool))
    with pytest.raises(ValueError, match="region"):
        psnr(reference, estimate, region=region.astype(int))  # indices, not a mask


def test_object_support_is_the_object_without_the_noise_floor(rng):
    phantom = np.abs(phantom_image(64))
    noise = 0.03 * phantom.max() * np.abs(rng.standard_normal((64, 64)) + 1j * rng.standard_normal((64, 64)))
    support = object_support(phantom + noise)
    head = phantom > 0
    assert support[head].mean() > 0.97  # the dark ventricles inside are filled in
    assert support[~head].mean() < 0.03  # the noise floor outside is not the object
    # tissue that fills the field of view, bright and dark: no floor to split off
    smooth = ndimage.gaussian_filter(rng.random((48, 48)), 3)
    tissue = 0.2 + (smooth - smooth.min()) / np.ptp(smooth)
    assert object_support(tissue).mean() > 0.99
    with pytest.raises(ValueError, match="no object"):
        object_support(np.zeros((4, 4)))


@pytest.mark.parametrize("acceleration,acs_368", [(6, 18), (8, 16), (10, 12)])
def test_random_line_masks_follow_table_one(acceleration, acs_368):
    mask = random_line_mask((368, 100), acceleration, seed=3)
    rows = mask[:, 0]
    assert (mask == mask[:, :1]).all()
    assert rows.sum() == round(368 / acceleration)
    assert rows[184 - acs_368 // 2: 184 - acs_368 // 2 + acs_368].all()
    assert paper_acs_lines(acceleration, 368) == acs_368
    assert paper_acs_lines(acceleration, 256) == round(acs_368 * 256 / 368)


def test_masks_are_seeded():
    assert (random_line_mask((64, 8), 4, seed=1) == random_line_mask((64, 8), 4, seed=1)).all()
    assert not (random_line_mask((64, 8), 4, seed=1) == random_line_mask((64, 8), 4, seed=2)).all()


def test_uniform_mask_is_equispaced():
    rows = uniform_line_mask((64, 4), 4, acs_lines=4)[:, 0]
    assert rows[32::4].all() and rows[30:34].all()


@pytest.mark.parametrize("builder", [radial_mask, spiral_mask])
def test_2d_masks_reach_about_the_requested_acceleration(builder):
    mask = builder((128, 128), 10)
    assert 8 <= acceleration_of(mask) <= 12
    assert mask[56:72, 56:72].all()  # ACS square
    assert not (mask == mask[:, :1]).all()


def test_make_mask_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown mask kind"):
        make_mask("poisson", (16, 16), 4)


def test_config_from_strings_parses_and_validates():
    config = ReconConfig.from_strings({"iterations": "50", "lam": "0.02", "tv": "false", "zero_outside_maps": "yes",
                                       "preset": "prospective"})
    assert config.iterations == 50 and config.lam == 0.02 and config.tv is False and config.lam_s == 2.0
    on_top = ReconConfig.from_strings({"preset": "prospective"}, base=ReconConfig(iterations=7))
    assert (on_top.iterations, on_top.lam, on_top.lam_s) == (7, 0.05, 2.0)
    with pytest.raises(ValueError, match="unknown reconstruction setting"):
        ReconConfig.from_strings({"iteration": "5"})
    with pytest.raises(ValueError, match="'iterations' expects int"):
        ReconConfig.from_strings({"iterations": "many"})
    with pytest.raises(ValueError, match="lam must be positive"):
        ReconConfig.from_strings({"lam": "-1"})
    with pytest.raises(ValueError, match="unknown preset"):
        ReconConfig.preset("fast")


def test_settings_may_be_named_with_their_section_and_automatic_is_none():
    from unrollinr.config import SECTIONS

    config = ReconConfig.from_strings({"dc.lam": "0.02", "loss.lam_s": "0.5", "training.iterations": "auto",
                                       "maps.coil_compression": "0", "prior.hash_log2_size": "none", "seed": "3"})
    assert (config.lam, config.lam_s, config.seed) == (0.02, 0.5, 3)
    assert config.iterations is None and config.coil_compression is None and config.hash_log2_size is None
    assert ReconConfig.from_strings({"training.iterations": "40"}).iterations == 40
    with pytest.raises(ValueError, match="unknown reconstruction setting 'loss.lam'"):
        ReconConfig.from_strings({"loss.lam": "0.1"})
    import dataclasses

    assert sorted(name for names in SECTIONS.values() for name in names) == sorted(
        field.name for field in dataclasses.fields(ReconConfig))


def test_grid_config_reaches_the_image_size():
    grid = ReconConfig().grid_config(256)
    assert grid["otype"] == "HashGrid"
    finest = grid["base_resolution"] * grid["per_level_scale"] ** (grid["n_levels"] - 1)
    assert finest == pytest.approx(256)
    dense = ReconConfig(encoding="DenseGrid").grid_config(64)
    assert dense["n_levels"] == 1 and dense["base_resolution"] == 64


def test_auto_hash_table_holds_the_finest_level_with_at_most_four_cells_per_entry():
    for size, log2_size in ((64, 14), (256, 14), (257, 15), (368, 16), (512, 16), (600, 17)):
        config = ReconConfig().grid_config(size)
        assert config["log2_hashmap_size"] == log2_size
        assert size**2 <= 4 * 2**log2_size and (log2_size == 14 or size**2 > 2 * 2**log2_size)
    assert ReconConfig(hash_log2_size=12).grid_config(368)["log2_hashmap_size"] == 12
    with pytest.raises(ValueError, match="hash_log2_size"):
        ReconConfig(hash_log2_size=-1)


def test_auto_iterations_by_image_size():
    config = ReconConfig()
    assert config.iterations is None and ReconConfig(iterations=0).iterations is None  # 0: the older spelling
    assert [config.training_iterations(size) for size in (48, 256, 257, 384)] == [200, 200, 300, 300]
    assert ReconConfig(iterations=7).training_iterations(384) == 7
    with pytest.raises(ValueError, match="iterations must not be negative"):
        ReconConfig(iterations=-1)


def test_a_retry_runs_as_long_as_the_first_run_unless_capped():
    assert [ReconConfig().retry_steps(size) for size in (48, 384)] == [200, 300]
    assert ReconConfig(retry_iterations=100).retry_steps(384) == 100
    assert ReconConfig(iterations=50, retry_iterations=100).retry_steps(384) == 50
    assert ReconConfig.from_strings({"training.retry_iterations": "auto"}).retry_iterations is None


def test_the_wider_maps_retry_runs_fifty_steps_unless_the_first_run_is_shorter():
    assert [ReconConfig().wider_maps_steps(size) for size in (48, 384)] == [50, 50]
    assert ReconConfig(iterations=30).wider_maps_steps(48) == 30
    assert ReconConfig(iterations=80, wider_maps_iterations=None).wider_maps_steps(48) == 80
    assert ReconConfig.from_strings({"maps.wider_maps_iterations": "auto"}).wider_maps_iterations is None


def test_the_refinement_on_every_sample_is_a_share_of_the_held_out_steps():
    assert [ReconConfig().refine_steps(n) for n in (200, 300, 45)] == [20, 30, 4]
    assert ReconConfig.from_strings({"training.refine_fraction": "0"}).refine_steps(200) == 0
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="refine_fraction"):
            ReconConfig(refine_fraction=bad)


def test_tv_off_needs_the_background_zeroed():
    with pytest.raises(ValueError, match="zero_outside_maps"):
        ReconConfig(tv=False)
    assert ReconConfig(tv=False, zero_outside_maps=True).tv is False


def test_loss_options_are_validated():
    with pytest.raises(ValueError, match="tv_second_order"):
        ReconConfig(tv_second_order=1.5)
    with pytest.raises(ValueError, match="tv_log_scale"):
        ReconConfig(tv_log_scale=-0.1)
    paper = ReconConfig.from_strings({"tv_second_order": "0", "tv_log_scale": "0", "coil_l1": "false"})
    assert (paper.tv_second_order, paper.tv_log_scale, paper.coil_l1) == (0.0, 0.0, False)


def test_training_runs_at_most_the_inference_cg_iterations():
    import torch

    from unrollinr.sense import SenseOp
    from unrollinr.training import build_model

    op = SenseOp(torch.ones(1, 1, 2, 8, 8, dtype=torch.complex64), torch.ones(1, 8, 8, dtype=torch.bool))
    kspace = torch.ones(1, 2, 8, 8, dtype=torch.complex64)
    assert build_model(ReconConfig(cg_iterations=20, cg_training_iterations=5), op, kspace).dc.iterations == 5
    assert build_model(ReconConfig(cg_iterations=3, cg_training_iterations=5), op, kspace).dc.iterations == 3
    with pytest.raises(ValueError, match="cg_training_iterations must be at least 1"):
        ReconConfig(cg_training_iterations=0)
