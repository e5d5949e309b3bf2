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
