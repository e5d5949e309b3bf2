"""Turning a stream of ISMRMRD acquisitions into per-slice k-space, as it arrives.

Noise scans that come before the first line give the prewhitening matrix, which holds
for the whole stream; noise scans are never imaged. Navigator, phase
correction and other non-imaging lines are skipped, as are lines of any encoding space
but the first (``encoding_space_ref``); readout oversampling is removed;
each line is placed by its ``kspace_encode_step_1`` relative to the encoding centre.
Separate and embedded ACS lines are collected for the coil maps. Slices, contrasts,
repetitions, sets, phases and averages are kept apart, and a slice is handed out as
soon as its ``ACQ_LAST_IN_SLICE`` line arrives (or at the end of the stream).

Slices are reconstructed at the encoded pixel size; :meth:`EncodingGeometry.to_recon_space`
then takes each image to the recon space's matrix and field of view (phase oversampling
cropped; finer recon pixels interpolated band-limited), as Gadgetron's
``GenericReconFieldOfViewAdjustmentGadget`` does.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field

import ismrmrd
import ismrmrd.xsd as xsd
import numpy as np
import torch

from unrollinr.coils import prewhitening_matrix
from unrollinr.fft import fftc, ifftc
from unrollinr_gadget.limits import LimitExceeded, StreamLimits

logger = logging.getLogger(__name__)

SKIPPED_FLAGS = {
    ismrmrd.ACQ_IS_NAVIGATION_DATA: "navigator",
    ismrmrd.ACQ_IS_PHASECORR_DATA: "phase correction",
    ismrmrd.ACQ_IS_RTFEEDBACK_DATA: "real-time feedback",
    ismrmrd.ACQ_IS_HPFEEDBACK_DATA: "high-priority feedback",
    ismrmrd.ACQ_IS_DUMMYSCAN_DATA: "dummy scan",
    ismrmrd.ACQ_IS_SURFACECOILCORRECTIONSCAN_DATA: "surface coil correction",
    ismrmrd.ACQ_IS_PHASE_STABILIZATION_REFERENCE: "phase stabilisation reference",
    ismrmrd.ACQ_IS_PHASE_STABILIZATION: "phase stabilisation",
}


@dataclass(frozen=True, order=True)
class SliceKey:
    """The counters that keep images apart."""

    slice: int = 0
    contrast: int = 0
    repetition: int = 0
    set: int = 0
    phase: int = 0
    average: int = 0

    @classmethod
    def of(cls, head: ismrmrd.AcquisitionHeader) -> SliceKey:
        """The key of an acquisition header."""
        idx = head.idx
        return cls(idx.slice, idx.contrast, idx.repetition, idx.set, idx.phase, idx.average)

    def __str__(self) -> str:
        return ", ".join(f"{name} {value}" for name, value in vars(self).items() if value) or "slice 0"


# The counters that number images, fastest first, as the header's encodingLimits name them.
IMAGE_COUNTERS = ("slice", "contrast", "phase", "set", "average", "repetition")


def _fov_mm(space: xsd.encodingSpaceType) -> tuple[float, float, float]:
    """A space's field of view in mm (0 where the header leaves it out)."""
    fov = space.fieldOfView_mm
    if fov is None:
        return 0.0, 0.0, 0.0
    return float(fov.x or 0.0), float(fov.y or 0.0), float(fov.z or 0.0)


def _counter_size(limits: xsd.encodingLimitsType, name: str) -> int:
    """How many values a counter takes, from the header (1 if it does not say)."""
    limit = getattr(limits, name, None)
    return int(limit.maximum) + 1 if limit is not None and limit.maximum is not None else 1


@dataclass
class SliceData:
    """One complete slice: imaging k-space and mask, calibration k-space and mask, all
    ``(coils, ky, kx)`` / ``(ky, kx)`` with readout oversampling removed
    (``kx = readout_x``), and a reference header."""

    key: SliceKey
    kspace: np.ndarray
    mask: np.ndarray
    calibration: np.ndarray
    calibration_mask: np.ndarray
    reference: ismrmrd.AcquisitionHeader


@functools.lru_cache(maxsize=4)  # every image of a stream needs the same two
def _interpolation_matrix(n: int, size: int, ratio: float) -> np.ndarray:
    """``(size, n)`` complex128, read-only: the band-limited (periodic sinc) interpolation
    of ``n`` image samples at ``size`` points ``1 / ratio`` samples apart, sample ``n // 2``
    at point ``size // 2``; the image that the ``n`` k-space samples of a centred FFT give
    there.
    Points farther apart than the samples (``ratio < 1``) keep only the central
    ``round(n * ratio)`` k-space samples, which their spacing can hold."""
    frequencies = (np.arange(n) - n // 2) / n  # cycles per sample
    if ratio < 1:
        kept = max(1, round(n * ratio))
        frequencies = frequencies[n // 2 - kept // 2: n // 2 - kept // 2 + kept]
    analysis = np.exp(-2j * np.pi * np.outer(frequencies, np.arange(n) - n // 2))
    synthesis = np.exp(2j * np.pi * np.outer((np.arange(size) - size // 2) / ratio, frequencies))
    matrix = synthesis @ analysis / n
    matrix.setflags(write=False)
    return matrix


def _pixel_ratio(encoded_fov: float, encoded_size: int, recon_fov: float, recon_size: int) -> float:
    """Encoded pixel size over recon pixel size along one axis (1 where a field of view is
    not given: the two spaces then share their pixel size)."""
    if not all(math.isfinite(fov) and fov > 0 for fov in (encoded_fov, recon_fov)):
        return 1.0
    return (encoded_fov / encoded_size) / (recon_fov / recon_size)


@dataclass(frozen=True)
class EncodingGeometry:
    """The parts of the ISMRMRD header that place samples on the grid.

    ``pixel_ratio_x`` and ``pixel_ratio_y`` are the encoded pixel size over the recon
    pixel size: above 1 where the recon space interpolates (Siemens' interpolation, or a
    phase resolution below 100%), 1 where the two share their pixel size.
    """

    encoded_x: int
    n_ky: int
    recon_x: int
    recon_y: int
    ky_centre: int
    recon_fov: tuple[float, float, float]
    counter_sizes: tuple[int, ...] = (1,) * len(IMAGE_COUNTERS)
    pixel_ratio_x: float = 1.0
    pixel_ratio_y: float = 1.0

    @property
    def readout_x(self) -> int:
        """Samples per line once readout oversampling is removed: the encoded pixels that
        span the recon field of view (at most ``encoded_x``)."""
        return max(1, min(self.encoded_x, round(self.recon_x / self.pixel_ratio_x)))

    def to_recon_space(self, image: np.ndarray) -> np.ndarray:
        """``(n_ky, readout_x)`` at the encoded pixel size to ``(recon_y, recon_x)`` at the
        recon pixel size: each axis interpolated from its k-space samples (band-limited),
        centred, which crops phase oversampling."""
        n_y, n_x = image.shape
        if (n_y, n_x) == (self.recon_y, self.recon_x) and self.pixel_ratio_x == self.pixel_ratio_y == 1:
            return image
        rows = _interpolation_matrix(n_y, self.recon_y, self.pixel_ratio_y)
        columns = _interpolation_matrix(n_x, self.recon_x, self.pixel_ratio_x)
        return (rows @ image.astype(np.complex128) @ columns.T).astype(image.dtype)

    def image_index(self, key: SliceKey) -> int:
        """A 1-based image number from the counters alone (slice fastest, then
        :data:`IMAGE_COUNTERS` in turn), so that it does not depend on the order in which
        slices complete or on which worker reconstructs them."""
        index = 0
        for name, size in reversed(list(zip(IMAGE_COUNTERS, self.counter_sizes, strict=True))):
            index = index * size + getattr(key, name)
        return index + 1

    @classmethod
    def from_header(cls, header: xsd.ismrmrdHeader, limits: StreamLimits | None = None) -> EncodingGeometry:
        """Read the first encoding of an ISMRMRD header; 2D Cartesian only, and no side
        larger than ``limits.max_matrix``."""
        if not header.encoding:
            raise ValueError("the ISMRMRD header has no encoding")
        encoding = header.encoding[0]
        trajectory = getattr(encoding.trajectory, "value", encoding.trajectory)
        if trajectory not in ("cartesian", None):
            raise ValueError(f"only Cartesian data can be reconstructed, got trajectory {trajectory!r}")
        encoded, recon = encoding.encodedSpace.matrixSize, encoding.reconSpace.matrixSize
        if (encoded.z or 1) > 1:
            raise ValueError(f"3D encodings are not supported (encoded z = {encoded.z})")
        largest = max(encoded.x, encoded.y, recon.x, recon.y)
        max_matrix = (limits or StreamLimits()).max_matrix
        if largest > max_matrix:
            raise LimitExceeded(f"the matrix ({encoded.x} x {encoded.y} encoded, {recon.x} x {recon.y} recon) "
                                f"exceeds the limit of {max_matrix} samples a side")
        if min(encoded.x, encoded.y, recon.x, recon.y) < 1:
            raise ValueError(f"the matrix ({encoded.x} x {encoded.y} encoded, {recon.x} x {recon.y} recon) is empty")
        step_1 = encoding.encodingLimits.kspace_encoding_step_1 if encoding.encodingLimits else None
        if step_1 is None:
            raise ValueError("the ISMRMRD header has no encodingLimits for kspace_encoding_step_1, so its lines "
                             "cannot be placed")
        centre = step_1.center if step_1.center is not None else encoded.y // 2
        counter_sizes = tuple(_counter_size(encoding.encodingLimits, name) for name in IMAGE_COUNTERS)
        fov, encoded_fov = _fov_mm(encoding.reconSpace), _fov_mm(encoding.encodedSpace)
        return cls(encoded_x=int(encoded.x), n_ky=int(encoded.y), recon_x=int(recon.x), recon_y=int(recon.y),
                   ky_centre=int(centre), recon_fov=fov, counter_sizes=counter_sizes,
                   pixel_ratio_x=_pixel_ratio(encoded_fov[0], int(encoded.x), fov[0], int(recon.x)),
                   pixel_ratio_y=_pixel_ratio(encoded_fov[1], int(encoded.y), fov[1], int(recon.y)))

    def line(self, head: ismrmrd.AcquisitionHeader) -> int:
        """Row of the k-space buffer for an acquisition (the encoding centre at ``n_ky // 2``)."""
        return int(head.idx.kspace_encode_step_1) - self.ky_centre + self.n_ky // 2

    def readout(self, data: np.ndarray, centre_sample: int, *, reverse: bool = False) -> np.ndarray:
        """``(coils, samples)`` with k-space's centre at ``centre_sample`` to ``(coils,
        readout_x)``: asymmetric echoes are zero-padded about the centre sample, a line read
        with the readout gradient reversed (``reverse``) is mirrored about it
        (:func:`mirrored_about_the_centre`), and oversampling is cropped in image space."""
        n_coils, n_samples = data.shape
        line = np.zeros((n_coils, self.encoded_x), dtype=np.complex64)
        offset = self.encoded_x // 2 - centre_sample
        if offset < 0 or offset + n_samples > self.encoded_x:
            raise ValueError(f"{n_samples} samples about centre sample {centre_sample} do not fit the "
                             f"encoded readout of {self.encoded_x}")
        line[:, offset:offset + n_samples] = data
        if reverse:
            line = mirrored_about_the_centre(line)
        if self.encoded_x == self.readout_x:
            return line
        profile = ifftc(torch.from_numpy(line), dim=-1)
        start = self.encoded_x // 2 - self.readout_x // 2
        return fftc(profile[:, start:start + self.readout_x], dim=-1).numpy()


def mirrored_about_the_centre(lines: np.ndarray) -> np.ndarray:
    """``(..., n)`` lines centred at sample ``n // 2``, mirrored about it: sample
    ``n // 2 + d`` takes sample ``n // 2 - d``, periodically (the one sample without a
    partner, at ``-n // 2``, is the Nyquist sample and stays).

    This turns a line read with the readout gradient reversed (flagged ``ACQ_IS_REVERSE``:
    the even echoes of a bipolar multi-echo readout; siemens_to_ismrmrd sets the flag from
    the MDH's REFLECT bit), placed about its ``center_sample`` in the order it was read,
    into a line from low kx to high. Left as read, its image would be mirrored left to right.
    """
    return np.roll(lines[..., ::-1], 1, axis=-1)


def _without_discarded_samples(data: np.ndarray, head: ismrmrd.AcquisitionHeader) -> np.ndarray:
    """``(coils, samples)`` with the ``discard_pre`` first and ``discard_post`` last samples
    zeroed: the scanner marks them as not to be used."""
    pre, post = int(head.discard_pre), int(head.discard_post)
    if pre == post == 0:
        return data
    n_samples = data.shape[1]
    if pre + post >= n_samples:
        raise ValueError(f"discard_pre {pre} and discard_post {post} leave none of the line's {n_samples} samples")
    kept = np.zeros_like(data)
    kept[:, pre:n_samples - post] = data[:, pre:n_samples - post]
    return kept


@dataclass
class _Buffer:
    kspace: np.ndarray
    mask: np.ndarray
    calibration: np.ndarray
    calibration_mask: np.ndarray
    reference: ismrmrd.AcquisitionHeader | None = None
    lines: int = 0
    samples: int | None = None

    @classmethod
    def empty(cls, n_coils: int, geometry: EncodingGeometry) -> _Buffer:
        shape = (n_coils, geometry.n_ky, geometry.readout_x)
        return cls(np.zeros(shape, np.complex64), np.zeros(shape[1:], bool),
                   np.zeros(shape, np.complex64), np.zeros(shape[1:], bool))


@dataclass(frozen=True)
class _CalibrationLines:
    """A slice's calibration lines alone, kept for its later repetitions (a slice's whole
    buffer would hold its coils' full k-space twice for the rest of the stream)."""

    rows: np.ndarray
    kspace: np.ndarray  # (coils, rows, kx)

    @classmethod
    def of(cls, buffer: _Buffer) -> _CalibrationLines:
        rows = np.flatnonzero(buffer.calibration_mask.any(axis=1))
        return cls(rows, buffer.calibration[:, rows])


@dataclass
class SliceAssembler:
    """Collects acquisitions into :class:`SliceData`; :meth:`add` returns completed slices.

    An acquisition that does not fit its slice (a channel or sample count that changes, a
    line outside the matrix, NaN or infinite samples) fails that slice with ``ValueError``
    once; the slice's later acquisitions are dropped and the other slices go on.
    """

    header: xsd.ismrmrdHeader
    limits: StreamLimits = field(default_factory=StreamLimits)
    geometry: EncodingGeometry = field(init=False)
    skipped: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.geometry = EncodingGeometry.from_header(self.header, self.limits)
        self._noise: list[np.ndarray] | None = []  # None once the first line has fixed the prewhitening
        self._whitening: np.ndarray | None = None
        self._buffers: dict[SliceKey, _Buffer] = {}
        self._last_calibration: dict[int, _CalibrationLines] = {}
        self._failed: set[SliceKey] = set()

    def add(self, acquisition: ismrmrd.Acquisition) -> list[SliceData]:
        """Take one acquisition; return the slices it completes (usually none)."""
        head = acquisition.getHead()
        if acquisition.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            noise = np.array(acquisition.data, dtype=np.complex64)
            if self._noise is None:  # whitening the lines still to come would set them apart from those before
                self._skip("noise scans after the first line (the prewhitening was fixed then)")
            elif np.isfinite(noise).all():
                self._noise.append(noise)
            else:
                self._skip("noise scans with NaN or infinite samples")
            return []
        for flag, name in SKIPPED_FLAGS.items():
            if acquisition.is_flag_set(flag):
                self._skip(name)
                return []
        if acquisition.data.size == 0:  # no channel or no sample: nothing to place, nothing to check
            self._skip("acquisitions without samples")
            return []
        if head.encoding_space_ref != 0:
            self._skip(f"lines of encoding space {head.encoding_space_ref} (only the first is reconstructed)")
            return []
        key = SliceKey.of(head)
        if key in self._failed:
            self._skip("lines of failed slices")
            return []
        try:
            return self._place(acquisition, head, key)
        except ValueError:
            self._buffers.pop(key, None)
            self._failed.add(key)
            raise

    def _skip(self, what: str) -> None:
        self.skipped[what] = self.skipped.get(what, 0) + 1

    def _place(self, acquisition: ismrmrd.Acquisition, head: ismrmrd.AcquisitionHeader,
               key: SliceKey) -> list[SliceData]:
        if head.active_channels > self.limits.max_channels:
            raise LimitExceeded(f"{head.active_channels} channels exceed the limit of {self.limits.max_channels}")
        data = _without_discarded_samples(np.asarray(acquisition.data, dtype=np.complex64), head)
        if not np.isfinite(data).all():
            raise ValueError(f"{key}: NaN or infinite samples in line {head.idx.kspace_encode_step_1}")
        row = self.geometry.line(head)
        if not 0 <= row < self.geometry.n_ky:
            raise ValueError(f"{key}: kspace_encode_step_1 {head.idx.kspace_encode_step_1} lies outside the "
                             f"encoded matrix ({self.geometry.n_ky} lines, centre {self.geometry.ky_centre})")
        buffer = self._buffers.get(key)
        if buffer is None:
            buffer = self._buffers[key] = _Buffer.empty(data.shape[0], self.geometry)
        if data.shape[0] != buffer.kspace.shape[0]:
            raise ValueError(f"{key}: {data.shape[0]} channels after {buffer.kspace.shape[0]}")
        calibration = acquisition.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)
        embedded = acquisition.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)
        if embedded or not calibration:  # a separate reference scan may have its own readout length
            if buffer.samples is not None and data.shape[1] != buffer.samples:
                raise ValueError(f"{key}: {data.shape[1]} samples per line after {buffer.samples}")
            buffer.samples = data.shape[1]
        line = self.geometry.readout(self._whiten(data), int(head.center_sample),
                                     reverse=head.is_flag_set(ismrmrd.ACQ_IS_REVERSE))
        if calibration or embedded:
            buffer.calibration[:, row] = line
            buffer.calibration_mask[row] = True
        if calibration and not embedded:
            return []
        buffer.kspace[:, row] = line
        buffer.mask[row] = True
        buffer.lines += 1
        if buffer.reference is None or row == self.geometry.n_ky // 2:
            buffer.reference = head
        if acquisition.is_flag_set(ismrmrd.ACQ_LAST_IN_SLICE):
            return [self._complete(key)]
        return []

    def finish(self) -> list[SliceData]:
        """End of stream: every slice still open, in key order."""
        return [self._complete(key) for key in sorted(self._buffers) if self._buffers[key].lines]

    def _whiten(self, data: np.ndarray) -> np.ndarray:
        if self._noise is not None:  # the stream's first line: the noise scans so far decide, once
            if self._noise:
                self._whitening = self._whitening_from_noise(np.concatenate(self._noise, axis=1), data.shape[0])
            self._noise = None
        return data if self._whitening is None else self._whitening @ data

    @staticmethod
    def _whitening_from_noise(noise: np.ndarray, n_channels: int) -> np.ndarray | None:
        """The prewhitening matrix, or ``None`` (with a warning) when the noise cannot give one."""
        if noise.shape[0] != n_channels:
            logger.warning("noise scans have %d channels, data %d: no prewhitening", noise.shape[0], n_channels)
            return None
        try:
            whitening = prewhitening_matrix(noise)
        except np.linalg.LinAlgError:
            logger.warning("the noise covariance is singular: no prewhitening")
            return None
        logger.info("prewhitening from %d noise samples on %d channels", noise.shape[1], noise.shape[0])
        return whitening

    def _open_calibration(self, slice_index: int, n_coils: int) -> _CalibrationLines | None:
        """The calibration lines of an open buffer of ``slice_index``. A reference scan acquired
        once, under the counters of the first average, before short-term averages that
        interleave their lines: the last average completes first, and its own buffer holds
        no ACS line. Only a buffer of ``n_coils`` channels can lend its lines."""
        for key, buffer in self._buffers.items():
            if key.slice == slice_index and buffer.calibration_mask.any() and buffer.kspace.shape[0] == n_coils:
                return _CalibrationLines.of(buffer)
        return None

    def _complete(self, key: SliceKey) -> SliceData:
        buffer = self._buffers.pop(key)
        if buffer.calibration_mask.any():
            self._last_calibration[key.slice] = _CalibrationLines.of(buffer)
        # ESPIRiT sees every calibration line (this slice's, or else the last of its slice
        # index's, or else those of a buffer of its slice index still open) plus the imaging lines.
        calibration, calibration_mask = buffer.kspace.copy(), buffer.mask.copy()
        lines = self._last_calibration.get(key.slice)
        if lines is None:
            lines = self._open_calibration(key.slice, n_coils=calibration.shape[0])
        if lines is not None and lines.kspace.shape[0] != calibration.shape[0]:
            logger.warning("%s: %d channels, its slice's calibration lines %d: not used", key,
                           calibration.shape[0], lines.kspace.shape[0])
        elif lines is not None:
            calibration[:, lines.rows] = lines.kspace
            calibration_mask[lines.rows] = True
        logger.info("%s complete: %d lines", key, buffer.lines)
        return SliceData(key=key, kspace=buffer.kspace, mask=buffer.mask, calibration=calibration,
                         calibration_mask=calibration_mask, reference=buffer.reference)
