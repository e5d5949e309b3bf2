"""The one reconstruction path shared by the gadget, the server and offline replay:
acquisitions (or Gadgetron buffers) in, ISMRMRD images (or per-slice failures) out."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import ismrmrd
import ismrmrd.xsd as xsd
import numpy as np

from unrollinr.config import ReconConfig
from unrollinr.recon import reconstruct_with_details
from unrollinr.safety import UNROLLINR
from unrollinr.training import FitResult
from unrollinr_gadget.assembly import SliceAssembler, SliceData, SliceKey
from unrollinr_gadget.buffers import slices_from_recon_data
from unrollinr_gadget.images import ImageFactory

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SliceFailure:
    """A slice that could not be reconstructed, with the cause to report to the client."""

    key: SliceKey
    message: str

    def __str__(self) -> str:
        return f"unrollinr: {self.key} failed: {self.message}"


Outcome = ismrmrd.Image | SliceFailure


class ReconPipeline:
    """Reconstruct slices as they complete.

    Parameters
    ----------
    header
        The ISMRMRD header of the measurement.
    config
        Reconstruction settings.
    output
        ``"uint16"``, ``"float"`` (magnitude) or ``"complex"`` images.
    device
        Torch device for the reconstruction; ``None`` picks CUDA when available.
    device_lock
        Serialises reconstructions that share one device (the server's queue).
    """

    def __init__(self, header: xsd.ismrmrdHeader, config: ReconConfig, *, output: str = "uint16",
                 device: str | None = None, device_lock: threading.Lock | None = None,
                 series_index: int = 1) -> None:
        self.config = config
        self.device = device
        self.device_lock = device_lock
        self.assembler = SliceAssembler(header)
        self.factory = ImageFactory(self.assembler.geometry, output=output, series_index=series_index)

    def add(self, acquisition: ismrmrd.Acquisition) -> list[Outcome]:
        """Take one acquisition; return the images of the slices it completes."""
        try:
            completed = self.assembler.add(acquisition)
        except ValueError as error:
            return [SliceFailure(SliceKey.of(acquisition.getHead()), str(error))]
        return [self.reconstruct(data) for data in completed]

    def add_buffers(self, recon_data) -> list[Outcome]:
        """Reconstruct every image of a Gadgetron ``ReconData`` (message 1023)."""
        try:
            slices = slices_from_recon_data(recon_data, self.assembler.geometry)
        except ValueError as error:
            return [SliceFailure(SliceKey(), f"unusable buffer: {error}")]
        return [self.reconstruct(data) for data in slices]

    def finish(self) -> list[Outcome]:
        """End of the stream: reconstruct every slice still open."""
        if self.assembler.skipped:
            logger.info("skipped non-imaging lines: %s", self.assembler.skipped)
        return [self.reconstruct(data) for data in self.assembler.finish()]

    def process(self, acquisitions: Iterable[ismrmrd.Acquisition]) -> Iterator[Outcome]:
        """Yield an image (or a failure) for each slice as soon as it is complete."""
        for acquisition in acquisitions:
            yield from self.add(acquisition)
        yield from self.finish()

    def reconstruct(self, data: SliceData) -> Outcome:
        """One slice. Any error becomes a :class:`SliceFailure`, so the exam goes on."""
        lock = self.device_lock if self.device_lock is not None else contextlib.nullcontext()
        try:
            with lock:
                image, result = reconstruct_with_details(
                    data.kspace, data.mask, config=self.config, device=self.device, progress=False,
                    calibration=(data.calibration, data.calibration_mask))
            return self.factory.make(image, data, details=image_details(result, self.factory.comment))
        except Exception as error:  # noqa: BLE001 - one failed slice must not end the exam
            logger.error("%s failed: %s", data.key, error, exc_info=logger.isEnabledFor(logging.DEBUG))
            return SliceFailure(data.key, f"{type(error).__name__}: {error}")


def image_details(result: FitResult, comment: str) -> dict[str, str]:
    """Image meta for one slice's :class:`~unrollinr.training.FitResult`: iterations, seconds,
    and what the safety net returned and why (``ImageComment`` names a fallback)."""
    verdict = result.verdicts[0]
    details = {"UnrollINRIterations": str(result.iterations), "UnrollINRSeconds": f"{result.seconds:.2f}",
               "UnrollINRReturned": verdict.returned, "UnrollINRVerdict": verdict.reason}
    if verdict.returned != UNROLLINR:
        details["ImageComment"] = f"{comment} fallback: {verdict.returned}"
    return details


def magnitude(image: ismrmrd.Image) -> np.ndarray:
    """The ``(y, x)`` magnitude of an ISMRMRD image, as float64."""
    return np.abs(np.asarray(image.data, dtype=np.complex128 if np.iscomplexobj(image.data) else np.float64)[0, 0])
