"""Classic reconstructions to compare against: zero-filled, CG-SENSE, L1-wavelet ESPIRiT
(sigpy) and BART ``pics`` when ``bart`` is on PATH.

All take zero-filled k-space ``(coils, ky, kx)`` and a ``(ky, kx)`` mask and return a
complex ``(ky, kx)`` image on the scale of the data. Coil maps are ``(coils, ky, kx)`` or
``(sets, coils, ky, kx)``; the images of several sets are combined as
:func:`~unrollinr.sense.combine_sets` does (sigpy's L1-wavelet takes one set).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from unrollinr.cg import conjugate_gradient
from unrollinr.fft import ifft2c
from unrollinr.metrics import root_sum_of_squares
from unrollinr.sense import SenseOp, combine_sets

logger = logging.getLogger(__name__)


def kspace_rss(kspace: np.ndarray) -> np.ndarray:
    """Root-sum-of-squares of the coil images of ``(coils, ky, kx)`` k-space, real ``(ky, kx)``."""
    return root_sum_of_squares(ifft2c(torch.from_numpy(np.ascontiguousarray(kspace))).numpy())


def zero_filled(kspace: np.ndarray) -> np.ndarray:
    """Root-sum-of-squares of the zero-filled coil images, as complex64 ``(ky, kx)``."""
    return kspace_rss(kspace).astype(np.complex64)


def _map_sets(maps: np.ndarray) -> np.ndarray:
    """``(sets, coils, ky, kx)`` from maps with or without the sets axis."""
    maps = np.asarray(maps, dtype=np.complex64)
    return maps if maps.ndim == 4 else maps[None]


def cg_sense(kspace: np.ndarray, mask: np.ndarray, maps: np.ndarray, *, iterations: int = 30,
             lam: float = 0.0) -> np.ndarray:
    """CG-SENSE: CG on ``(E^H E + lam I) x = E^H y`` from zero (early stopping regularises)."""
    op = SenseOp(torch.from_numpy(_map_sets(maps))[None], torch.from_numpy(mask)[None])
    rhs = op.adjoint(torch.from_numpy(kspace)[None])
    image = conjugate_gradient(lambda x: op.normal(x) + lam * x, rhs, max_iterations=iterations)
    return combine_sets(image)[0].numpy()


def l1_wavelet(kspace: np.ndarray, mask: np.ndarray, maps: np.ndarray, lam: float, *,
               iterations: int = 100) -> np.ndarray:
    """L1-wavelet ESPIRiT (sigpy ``L1WaveletRecon``) with weight ``lam`` on normalised data."""
    import sigpy.mri

    scale = np.abs(zero_filled(kspace)).max()
    image = sigpy.mri.app.L1WaveletRecon(
        kspace / scale, _map_sets(maps)[0], lam, weights=mask.astype(np.float32), max_iter=iterations, show_pbar=False
    ).run()
    return (np.asarray(image) * scale).astype(np.complex64)


def bart_available() -> bool:
    """Whether the ``bart`` command is on PATH."""
    return shutil.which("bart") is not None


def run_bart(arguments: list[str]) -> None:
    """Run ``bart *arguments``; ``CalledProcessError`` if it fails.

    A run killed by a signal is run once more on one OpenMP thread: BART 0.8's ``ecalib``
    crashes (SIGSEGV) now and then with several threads on small calibration regions
    (brain_16ch_96 in ``bench/robust.py``: 45 of 140 runs on two threads, none of 140 on
    one), so that an oracle over its settings would silently lose some of them."""
    command = ["bart", *arguments]
    try:
        subprocess.run(command, check=True, capture_output=True)
    except subprocess.CalledProcessError as error:
        if error.returncode >= 0:
            raise
        logger.warning("bart %s died with signal %d: running it again on one thread", arguments[0], -error.returncode)
        subprocess.run(command, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _write_cfl(path: Path, array: np.ndarray) -> None:
    dims = list(array.shape) + [1] * (16 - array.ndim)
    path.with_suffix(".hdr").write_text("# Dimensions\n" + " ".join(map(str, dims)) + "\n")
    np.asarray(array, dtype=np.complex64).T.tofile(path.with_suffix(".cfl"))


def _read_cfl(path: Path) -> np.ndarray:
    dims = [int(d) for d in path.with_suffix(".hdr").read_text().splitlines()[1].split()]
    while len(dims) > 1 and dims[-1] == 1:
        dims.pop()
    data = np.fromfile(path.with_suffix(".cfl"), dtype=np.complex64)
    return data.reshape(dims[::-1]).T


def bart_maps(kspace: np.ndarray, *, crop: float = 0.8, kernel_width: int = 6, sets: int = 1) -> np.ndarray:
    """BART ``ecalib -m sets -k kernel_width`` maps ``(sets, coils, ky, kx)``."""
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        _write_cfl(base / "ksp", kspace.transpose(2, 1, 0)[:, :, None, :])
        run_bart(["ecalib", f"-m{sets}", "-c", str(crop), "-k", str(kernel_width), str(base / "ksp"),
                  str(base / "maps")])
        maps = _read_cfl(base / "maps").reshape(*kspace.shape[:0:-1], 1, kspace.shape[0], sets)
        return maps[:, :, 0].transpose(3, 2, 1, 0).astype(np.complex64)


def _pics_image_shift(shape: tuple[int, ...]) -> tuple[int, int]:
    """How many pixels further along ``(y, x)`` BART 0.8's ``pics`` puts the image than our
    centred FFT (:mod:`unrollinr.fft`) does: one along an odd axis, none along an even one.
    ``ecalib``'s maps and ``bart fft`` follow our convention, so ``pics`` gets the maps
    rolled by this shift and its image is rolled back (measured in ``bench/HISTORY.md``)."""
    rows, columns = shape[-2:]
    return rows % 2, columns % 2


# pics flags per regulariser, and the iterations each needs to converge on normalised data
# (TV with a smaller ADMM rho than BART's default; measured in bench/HISTORY.md).
BART_REGULARIZERS = {"l1": ("-l1", "-r", "{lam}"), "tv": ("-R", "T:3:0:{lam}", "-u", "0.002")}
BART_ITERATIONS = {"l1": 100, "tv": 600}


def bart_pics(kspace: np.ndarray, maps: np.ndarray, lam: float, *, regularizer: str = "l1",
              iterations: int | None = None) -> np.ndarray:
    """BART ``pics`` on normalised data, ``(ky, kx)``: ``regularizer`` ``"l1"`` is
    ``-l1 -r lam`` (wavelet L1-ESPIRiT), ``"tv"`` is ``-R T:3:0:lam`` (TV-SENSE, ADMM).
    ``iterations`` defaults to what the regulariser needs to converge (:data:`BART_ITERATIONS`)."""
    if regularizer not in BART_REGULARIZERS:
        raise ValueError(f"unknown BART regularizer {regularizer!r}; expected one of {sorted(BART_REGULARIZERS)}")
    flags = [flag.format(lam=lam) for flag in BART_REGULARIZERS[regularizer]]
    iterations = BART_ITERATIONS[regularizer] if iterations is None else iterations
    scale = np.abs(zero_filled(kspace)).max()
    shift = _pics_image_shift(kspace.shape[1:])
    maps = np.roll(_map_sets(maps), shift, axis=(-2, -1))
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        _write_cfl(base / "ksp", (kspace / scale).transpose(2, 1, 0)[:, :, None, :])
        _write_cfl(base / "maps", maps.transpose(3, 2, 1, 0)[:, :, None, :, :])
        run_bart(["pics", "-S", *flags, "-i", str(iterations), str(base / "ksp"), str(base / "maps"),
                  str(base / "out")])
        image = _read_cfl(base / "out").reshape(kspace.shape[2], kspace.shape[1], len(maps))
    image = np.roll(image.transpose(2, 1, 0), [-s for s in shift], axis=(-2, -1))
    sets = torch.from_numpy(np.ascontiguousarray(image))[None]
    return (combine_sets(sets)[0].numpy() * scale).astype(np.complex64)
