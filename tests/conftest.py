"""Shared fixtures: seeded small data, and a device fixture that adds CUDA where present."""

from __future__ import annotations

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
