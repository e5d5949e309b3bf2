"""Shared fixtures: seeded small data, and a device fixture that adds CUDA where present."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from unrollinr.phantoms import phantom_kspace


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request: pytest.FixtureRequest) -> torch.device:
    return torch.device(request.param)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def phantom_48() -> np.ndarray:
    """Fully sampled ``(8, 48, 48)`` phantom k-space."""
    return phantom_kspace(48, 8, noise=0.002, seed=0)


@pytest.fixture(scope="session")
def raw_phantom(tmp_path_factory) -> Path:
    """A two-slice ISMRMRD raw file: noise scan, 2x readout oversampling, embedded ACS."""
    from unrollinr_gadget.rawdata import simulate_raw

    from unrollinr.masks import random_line_mask

    kspace = np.stack([phantom_kspace(48, 4, seed=0), phantom_kspace(48, 4, seed=1)[:, ::-1].copy()])
    mask = random_line_mask((48, 48), 3, acs_lines=12, seed=0)
    return simulate_raw(kspace, mask, tmp_path_factory.mktemp("raw") / "phantom.h5", oversampling=2)


FAST_PROPERTIES = {"iterations": "30", "cg_iterations": "5", "seed": "0"}


def reconstruct_with_a_broken_prior(measured: np.ndarray, mask: np.ndarray):
    """One training step from a prior made to fail (its last layer scaled 1000 times, so
    that it proposes a huge image of nonsense), with a held-out share; returns
    ``(images, result, config)`` of :func:`~unrollinr.recon.reconstruct_prepared`."""
    from unrollinr import ReconConfig
    from unrollinr.coils import espirit_maps
    from unrollinr.recon import reconstruct_prepared

    data, masks, maps = measured[None], mask[None], espirit_maps(measured, mask)[None]
    config = ReconConfig(iterations=1, mlp_precision="float32", holdout_fraction=0.15)
    _, fitted = reconstruct_prepared(data, masks, maps, config)
    broken = {name: value * 1000 if name.startswith("priors.0.mlp.4") else value
              for name, value in fitted.parameters.items()}
    images, result = reconstruct_prepared(data, masks, maps, config, initial_parameters=broken)
    return images, result, config
