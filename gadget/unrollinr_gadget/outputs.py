"""Writing received or reconstructed images: ISMRMRD image groups and PNGs."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import ismrmrd
import numpy as np

from unrollinr_gadget.hdf5 import open_dataset
from unrollinr_gadget.pipeline import magnitude


def write_images(images: Iterable[ismrmrd.Image], path: Path, *, dataset: str = "dataset") -> int:
    """Append images to ``path`` under ``image_<series index>``; return how many."""
    path.parent.mkdir(parents=True, exist_ok=True)
    images = list(images)  # made before the HDF5 lock is taken
    with open_dataset(path, dataset, create=True) as out:
        for image in images:
            out.append_image(f"image_{image.getHead().image_series_index}", image)
    return len(images)


def read_images(path: Path, *, dataset: str = "dataset") -> list[ismrmrd.Image]:
    """Every image of every ``image_*`` group of an ISMRMRD file, group by group."""
    with open_dataset(path, dataset) as source:
        groups = sorted(name for name in source.list() if name.startswith("image_"))
        return [source.read_image(group, i) for group in groups for i in range(source.number_of_images(group))]


def write_pngs(images: Iterable[ismrmrd.Image], folder: Path) -> list[Path]:
    """One grey-scale PNG per image, windowed from 0 to its 99.5th percentile."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for image in images:
        head = image.getHead()
        pixels = magnitude(image)
        top = float(np.percentile(pixels, 99.5)) or 1.0
        path = folder / f"series{head.image_series_index}_image{head.image_index:03d}_slice{head.slice}.png"
        plt.imsave(path, pixels, cmap="gray", vmin=0, vmax=top)
        paths.append(path)
    return paths
