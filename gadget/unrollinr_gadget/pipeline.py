"""The one reconstruction path shared by the gadget, the server and offline replay:
acquisitions (or Gadgetron buffers) in, ISMRMRD images (or per-slice failures) out."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeAlias

import ismrmrd
import ismrmrd.xsd as xsd
import numpy as np
import torch

from unrollinr.config import ReconConfig
from unrollinr.recon import reconstruct_together
from unrollinr.safety import UNROLLINR
from unrollinr.training import FitResult, prepare_process
from unrollinr_gadget.assembly import SliceAssembler, SliceData, SliceKey
from unrollinr_gadget.buffers import slices_from_recon_data
from unrollinr_gadget.images import ImageFactory
from unrollinr_gadget.limits import StreamLimits
from unrollinr_gadget.settings import GadgetSettings

logger = logging.getLogger(__name__)

# Slices reconstructed in one batched run at most, which bounds the run's memory.
MAX_BATCH = 8


@dataclass(frozen=True)
class SliceFailure:
    """A slice that could not be reconstructed, with the cause to report to the client."""

    key: SliceKey
    message: str

    def __str__(self) -> str:
        return f"unrollinr: {self.key} failed: {self.message}"


Outcome: TypeAlias = "ismrmrd.Image | SliceFailure"


@dataclass
class Delivery:
    """Where outcomes go: each image to ``send_image``, each failure to ``report_failure``
    (both counted). Every front end (gadget, server, replay) delivers through one."""

    send_image: Callable[[ismrmrd.Image], None]
    report_failure: Callable[[SliceFailure], None]
    images: int = 0
    failures: list[SliceFailure] = field(default_factory=list)

    def __call__(self, outcomes: Iterable[Outcome]) -> None:
        for outcome in outcomes:
            if isinstance(outcome, SliceFailure):
                self.failures.append(outcome)
                self.report_failure(outcome)
            else:
                self.send_image(outcome)
                self.images += 1


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
    series_index, uint16_scale
        The images' series, and their fixed uint16 scale (``None``: the stream's first
        image fixes it; :class:`~unrollinr_gadget.images.ImageFactory`).
    device
        Torch device for the reconstruction; ``None`` picks CUDA when available.
    device_lock
        Serialises reconstructions that share one device (the server's queue).
    limits
        The largest matrix and channel count accepted.
    """

    def __init__(self, header: xsd.ismrmrdHeader, config: ReconConfig, *, output: str = "uint16",
                 device: str | None = None, device_lock: threading.Lock | None = None,
                 series_index: int = 1, uint16_scale: float | None = None,
                 limits: StreamLimits | None = None) -> None:
        self.config = config
        self.device = device
        self.device_lock = device_lock
        self.assembler = SliceAssembler(header, limits=limits or StreamLimits())
        self.factory = ImageFactory(self.assembler.geometry, output=output, series_index=series_index,
                                    uint16_scale=uint16_scale)
        self.pending: list[SliceData] = []
        prepare_process()  # now, while the scan runs, not after its last line

    @classmethod
    def from_settings(cls, header: xsd.ismrmrdHeader, settings: GadgetSettings, *,
                      device_lock: threading.Lock | None = None, limits: StreamLimits | None = None) -> ReconPipeline:
        """The pipeline that :class:`GadgetSettings` describe."""
        return cls(header, settings.recon, output=settings.output, device=settings.device, device_lock=device_lock,
                   series_index=settings.series_index, uint16_scale=settings.uint16_scale, limits=limits)

    def add(self, acquisition: ismrmrd.Acquisition, *, defer: bool = False) -> list[Outcome]:
        """Take one acquisition; return the images of the slices it completes, or with
        ``defer`` keep those slices for :meth:`flush` (failures return at once)."""
        try:
            self.pending += self.assembler.add(acquisition)
        except ValueError as error:
            return [SliceFailure(SliceKey.of(acquisition.getHead()), str(error))]
        return [] if defer else self.flush()

    def add_buffers(self, recon_data, *, defer: bool = False) -> list[Outcome]:
        """Take every image of a Gadgetron ``ReconData`` (message 1023), as :meth:`add`."""
        try:
            self.pending += slices_from_recon_data(recon_data, self.assembler.geometry)
        except ValueError as error:
            return [SliceFailure(SliceKey(), f"unusable buffer: {error}")]
        return [] if defer else self.flush()

    def flush(self) -> list[Outcome]:
        """Reconstruct the slices kept so far, batched (at most :data:`MAX_BATCH` at once)."""
        outcomes: list[Outcome] = []
        while self.pending:
            batch, self.pending = self.pending[:MAX_BATCH], self.pending[MAX_BATCH:]
            outcomes += self.reconstruct(batch)
        return outcomes

    def drain(self) -> list[SliceData]:
        """End of the stream, without reconstructing: every slice kept or still open."""
        if self.assembler.skipped:
            logger.info("skipped lines: %s", self.assembler.skipped)
        slices, self.pending = self.pending + self.assembler.finish(), []
        return slices

    def finish(self) -> list[Outcome]:
        """End of the stream: reconstruct every slice kept or still open."""
        self.pending = self.drain()
        return self.flush()

    def process(self, acquisitions: Iterable[ismrmrd.Acquisition]) -> Iterator[Outcome]:
        """Offline: yield an image (or a failure) for each slice of a whole stream, the
        slices reconstructed in batches at the end."""
        for acquisition in acquisitions:
            yield from self.add(acquisition, defer=True)
        yield from self.finish()

    def reconstruct(self, slices: list[SliceData]) -> list[Outcome]:
        """Slices that completed together, in one batched run per image shape and number of
        sets of maps in use (each slice as alone). Any error becomes a :class:`SliceFailure`
        of its slice, so the exam goes on."""
        if not slices:
            return []
        logger.info("reconstructing %d slice(s) together, one batched run per image shape and sets of maps: %s",
                    len(slices), [str(d.key) for d in slices])
        return [slice_outcome(self.factory, data, result)
                for data, result in zip(slices, self._run(slices), strict=True)]

    def _run(self, slices: list[SliceData]) -> list[tuple[np.ndarray, FitResult] | Exception]:
        """Per slice, ``(image, result)`` or the error that stopped it. Slices that ran out
        of memory in a batch run again in halves, down to one at a time."""
        lock = self.device_lock if self.device_lock is not None else contextlib.nullcontext()
        try:
            with lock:
                results = reconstruct_together([d.kspace for d in slices], [d.mask for d in slices],
                                               [(d.calibration, d.calibration_mask) for d in slices],
                                               config=self.config, device=self.device)
        except Exception as error:  # noqa: BLE001 - one failed run must not end the exam
            results = [error] * len(slices)
        retry = [i for i, result in enumerate(results) if isinstance(result, torch.OutOfMemoryError | MemoryError)]
        if not retry or len(slices) == 1:
            return results
        _release_cached_memory()
        logger.warning("out of memory with %d slices in one run: again in smaller batches", len(slices))
        again = [slices[i] for i in retry]
        half = (len(again) + 1) // 2
        redone = self._run(again[:half]) + (self._run(again[half:]) if half < len(again) else [])
        for i, result in zip(retry, redone, strict=True):
            results[i] = result
        return results


def slice_outcome(factory: ImageFactory, data: SliceData,
                  result: tuple[np.ndarray, FitResult] | Exception) -> Outcome:
    """A slice's image from its reconstruction's result, or its failure from the error (or
    from NaN or infinite pixels, which no image type could show)."""
    if not isinstance(result, Exception) and not np.isfinite(result[0]).all():
        result = FloatingPointError("the reconstruction gave NaN or infinite pixels")
    if isinstance(result, Exception):
        logger.error("%s failed: %s", data.key, result, exc_info=logger.isEnabledFor(logging.DEBUG))
        return SliceFailure(data.key, f"{type(result).__name__}: {result}")
    image, fit = result
    return factory.make(image, data, details=image_details(fit, factory.comment))


def _release_cached_memory() -> None:
    """Hand the CUDA allocator's cached blocks back after an out-of-memory error."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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
