"""Loading fully sampled k-space for retrospective work."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def load_kspace(path: str | Path) -> np.ndarray:
    """Fully sampled, centred k-space ``(coils, ky, kx)`` complex64 from a ``.npz`` (key ``kspace``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    with np.load(path) as archive:
        if "kspace" not in archive.files:
            raise ValueError(f"{path} has no 'kspace' array (found {archive.files})")
        kspace = archive["kspace"]
    if kspace.ndim != 3 or not np.iscomplexobj(kspace):
        raise ValueError(f"{path}: 'kspace' must be complex (coils, ky, kx), got {kspace.dtype} {kspace.shape}")
    return kspace.astype(np.complex64)
