"""The online path on real data: ``simulate-raw`` (R = 8) -> ``serve`` -> ``send``, then the
PSNR/SSIM of the returned image against the fully sampled reference.

The raw file carries a noise scan, so the server prewhitens and the image comes back in
whitened units; it is scored after a least-squares intensity scale (one number), reported.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import base_parser, free_port, setup  # noqa: E402
from unrollinr_gadget.outputs import read_images  # noqa: E402
from unrollinr_gadget.pipeline import magnitude  # noqa: E402
from unrollinr_gadget.rawdata import RawFile  # noqa: E402

from unrollinr.data import load_kspace  # noqa: E402
from unrollinr.evaluate import reference_image  # noqa: E402
from unrollinr.metrics import all_metrics  # noqa: E402


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--R", type=float, default=8)
    args = parser.parse_args()
    setup(args)
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        raw = work / "raw.h5"
        unrollinr = [sys.executable, "-m", "unrollinr_gadget.cli"]
        subprocess.run([*unrollinr, "simulate-raw", str(args.data), "--R", str(args.R), "-o", str(raw)], check=True)
        port = free_port()
        server = subprocess.Popen([*unrollinr, "serve", "--port", str(port), "--output", "float",
                                   *[a for item in args.set for a in ("--set", item)]])
        try:
            time.sleep(3)
            start = time.perf_counter()
            subprocess.run([*unrollinr, "send", str(raw), "--port", str(port), "--config", "unrollinr",
                            "-o", str(work / "images.h5")], check=True)
            seconds = time.perf_counter() - start
        finally:
            server.terminate()
            server.wait(30)
        (image,) = read_images(work / "images.h5")
        print(f"{len(RawFile(raw))} acquisitions streamed; image {image.getHead().matrix_size[:2]} in {seconds:.1f} s")
    reference = reference_image(load_kspace(args.data))
    pixels = magnitude(image)
    scale = float(np.sum(pixels * reference) / np.sum(pixels * pixels))
    scores = all_metrics(reference, pixels * scale)
    print(f"R={args.R:g} online PSNR {scores['psnr']:.2f} dB SSIM {scores['ssim']:.4f} NRMSE {scores['nrmse']:.4f} "
          f"(after intensity scale {scale:.4g})")


if __name__ == "__main__":
    main()
