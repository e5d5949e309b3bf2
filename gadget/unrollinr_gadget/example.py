"""``unrollinr example``: the whole online path on a built-in phantom, no outside data.

A fully sampled multi-coil phantom is undersampled into an ISMRMRD raw file, streamed to
an ``unrollinr serve`` server on loopback exactly as a scanner would, and the images that
come back are saved and scored against the fully sampled reference.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unrollinr.baselines import zero_filled
from unrollinr.evaluate import reference_image
from unrollinr.masks import random_line_mask
from unrollinr.metrics import all_metrics
from unrollinr.phantoms import phantom_kspace
from unrollinr_gadget.client import stream_to_server
from unrollinr_gadget.outputs import write_images, write_pngs
from unrollinr_gadget.pipeline import magnitude
from unrollinr_gadget.rawdata import RawFile, simulate_raw
from unrollinr_gadget.server import ConfigResolver, UnrollINRServer
from unrollinr_gadget.settings import GadgetSettings

logger = logging.getLogger(__name__)


@dataclass
class ExampleResult:
    """Paths written and the metrics of UnrollINR and of the zero-filled image."""

    raw: Path
    images: Path
    figure: Path
    unrollinr: dict[str, float]
    zero_filled: dict[str, float]


def run_example(out: Path, settings: GadgetSettings, *, size: int = 128, coils: int = 8,
                acceleration: float = 4) -> ExampleResult:
    """Simulate, serve, send, save and score one phantom slice."""
    out.mkdir(parents=True, exist_ok=True)
    kspace = phantom_kspace(size, coils, noise=0.002, seed=0)
    mask = random_line_mask((size, size), acceleration, acs_lines=size // 8, seed=0)
    raw_path = simulate_raw(kspace, mask, out / "raw.h5", noise_scans=0)  # no prewhitening: images keep the data scale

    settings = GadgetSettings.from_properties({"output": "float"}, base=settings)
    with UnrollINRServer(("127.0.0.1", 0), ConfigResolver(base=settings)) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        replies = stream_to_server(RawFile(raw_path), "127.0.0.1", server.port, "unrollinr")
        server.shutdown()
    if replies.errors or replies.texts or not replies.images:
        raise RuntimeError(f"the server reported: {replies.errors + replies.texts}")

    images_path = out / "images.h5"
    if images_path.exists():
        images_path.unlink()
    write_images(replies.images, images_path)
    write_pngs(replies.images, out / "png")

    reference = reference_image(kspace)
    image = magnitude(replies.images[0])
    baseline = np.abs(zero_filled(kspace * mask))
    figure = _figure(reference, baseline, image, out / "reconstruction.png")
    return ExampleResult(raw=raw_path, images=images_path, figure=figure,
                         unrollinr=all_metrics(reference, image), zero_filled=all_metrics(reference, baseline))


def _figure(reference: np.ndarray, baseline: np.ndarray, image: np.ndarray, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = float(np.percentile(reference, 99.5))
    panels = [("fully sampled", reference), ("zero-filled", baseline), ("UnrollINR", image),
              ("|error| x5", 5 * np.abs(image - reference))]
    fig, axes = plt.subplots(1, 4, figsize=(12, 3.4))
    for axis, (title, picture) in zip(axes, panels, strict=True):
        axis.imshow(picture, cmap="gray", vmin=0, vmax=top)
        axis.set_title(title)
        axis.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
