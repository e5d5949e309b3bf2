"""ISMRMRD raw files: reading them, and simulating a prospective acquisition from fully
sampled k-space (``unrollinr simulate-raw``)."""

from __future__ import annotations

import datetime
import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import ismrmrd
import ismrmrd.xsd as xsd
import numpy as np
import torch
from xsdata.models.datatype import XmlDate

from unrollinr.coils import CalibrationError, find_calibration_region
from unrollinr.fft import fftc, ifftc
from unrollinr_gadget.hdf5 import open_dataset
from unrollinr_gadget.protocol import parse_header

logger = logging.getLogger(__name__)
DATASET = "dataset"
_CHUNK = 256  # acquisitions read at a time, the file open


@dataclass
class RawFile:
    """An ISMRMRD raw dataset: its XML header and acquisitions, read lazily."""

    path: Path
    dataset: str = DATASET

    def __post_init__(self) -> None:
        if not Path(self.path).exists():
            raise FileNotFoundError(f"no such raw file: {self.path}")

    def header(self) -> xsd.ismrmrdHeader:
        """The parsed ISMRMRD XML header."""
        with open_dataset(self.path, self.dataset) as dataset:
            text = dataset.read_xml_header()
        return parse_header(text)

    def __len__(self) -> int:
        with open_dataset(self.path, self.dataset) as dataset:
            return dataset.number_of_acquisitions()

    def acquisitions(self) -> Iterator[ismrmrd.Acquisition]:
        """Every acquisition in file order (the file is open, and
        :data:`~unrollinr_gadget.hdf5.HDF5_LOCK` held, only while a chunk is read)."""
        index = 0
        while True:
            with open_dataset(self.path, self.dataset) as dataset:
                chunk = [dataset.read_acquisition(i)
                         for i in range(index, min(index + _CHUNK, dataset.number_of_acquisitions()))]
            if not chunk:
                return
            yield from chunk
            index += len(chunk)


def _matrix(x: int, y: int, z: int = 1) -> xsd.matrixSizeType:
    return xsd.matrixSizeType(x=x, y=y, z=z)


def _fov(x: float, y: float, z: float) -> xsd.fieldOfViewMm:
    return xsd.fieldOfViewMm(x=x, y=y, z=z)


MEASUREMENT_ID = "unrollinr_00000_0000000_000000_00001"


def xsd_date(day: datetime.date) -> XmlDate:
    """An ISMRMRD header date."""
    return XmlDate(day.year, day.month, day.day)


def make_header(*, n_coils: int, n_ky: int, n_kx: int, n_slices: int, oversampling: int,
                fov_mm: tuple[float, float, float], acceleration: float, calibration_mode: str) -> xsd.ismrmrdHeader:
    """A Cartesian 2D multi-slice ISMRMRD header with readout oversampling, and the study,
    measurement, system and sequence information a scanner writes (Gadgetron's
    NoiseAdjustGadget, for one, needs ``measurementInformation``)."""
    limits = xsd.encodingLimitsType(
        kspace_encoding_step_1=xsd.limitType(minimum=0, maximum=n_ky - 1, center=n_ky // 2),
        slice=xsd.limitType(minimum=0, maximum=n_slices - 1, center=0))
    encoding = xsd.encodingType(
        trajectory=xsd.trajectoryType("cartesian"),
        encodedSpace=xsd.encodingSpaceType(matrixSize=_matrix(n_kx * oversampling, n_ky),
                                           fieldOfView_mm=_fov(fov_mm[0] * oversampling, fov_mm[1], fov_mm[2])),
        reconSpace=xsd.encodingSpaceType(matrixSize=_matrix(n_kx, n_ky), fieldOfView_mm=_fov(*fov_mm)),
        encodingLimits=limits,
        parallelImaging=xsd.parallelImagingType(
            accelerationFactor=xsd.accelerationFactorType(kspace_encoding_step_1=max(1, round(acceleration)),
                                                          kspace_encoding_step_2=1),
            calibrationMode=xsd.calibrationModeType(calibration_mode)),
    )
    today = datetime.date.today()
    header = xsd.ismrmrdHeader(
        studyInformation=xsd.studyInformationType(studyDate=xsd_date(today), studyID="unrollinr-simulated",
                                                  studyDescription="simulated undersampled scan"),
        measurementInformation=xsd.measurementInformationType(
            measurementID=MEASUREMENT_ID, seriesDate=xsd_date(today), patientPosition=xsd.patientPositionType.HFS,
            protocolName="unrollinr simulate-raw", sequenceName="fse2d", seriesDescription="simulated 2D FSE"),
        acquisitionSystemInformation=xsd.acquisitionSystemInformationType(
            systemVendor="unrollinr simulate-raw", systemModel="retrospective undersampling",
            systemFieldStrength_T=3.0, receiverChannels=n_coils, relativeReceiverNoiseBandwidth=0.793,
            institutionName="unrollinr"),
        experimentalConditions=xsd.experimentalConditionsType(H1resonanceFrequency_Hz=123_200_000),
        encoding=[encoding],
        sequenceParameters=xsd.sequenceParametersType(TR=[3000.0], TE=[90.0], flipAngle_deg=[90.0],
                                                      sequence_type="TurboSpinEcho", echo_spacing=[10.0]),
    )
    return header


def _oversample_readout(kspace: np.ndarray, factor: int) -> np.ndarray:
    """Embed ``(..., ky, kx)`` k-space in a ``factor``-times wider readout FOV (zero image
    outside): only the readout direction is transformed."""
    if factor == 1:
        return kspace
    profiles = ifftc(torch.from_numpy(kspace), dim=-1).numpy()
    n_x = profiles.shape[-1]
    padded = np.zeros(profiles.shape[:-1] + (n_x * factor,), dtype=profiles.dtype)
    start = (n_x * factor) // 2 - n_x // 2
    padded[..., start:start + n_x] = profiles
    return fftc(torch.from_numpy(padded), dim=-1).numpy()


ORDERS = ("sequential", "interleaved")


def simulate_raw(kspace: np.ndarray, mask: np.ndarray, path: str | Path, *, oversampling: int = 2,
                 noise_scans: int = 1, noise_std: float | None = None,
                 fov_mm: tuple[float, float, float] = (220.0, 220.0, 5.0),
                 order: str = "sequential", seed: int = 0) -> Path:
    """Write an undersampled ISMRMRD raw file from fully sampled k-space.

    Parameters
    ----------
    kspace
        Fully sampled, centred k-space ``(coils, ky, kx)`` or ``(slices, coils, ky, kx)``.
    mask
        ``(ky, kx)`` line mask (whole ``ky`` lines), or one per slice ``(slices, ky, kx)``;
        its centred fully sampled block, if any, is flagged as embedded ACS
        (``ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING``).
    oversampling
        Readout oversampling factor of the file (the encoded space is this much wider).
    noise_scans
        Number of noise-only acquisitions written first (``ACQ_IS_NOISE_MEASUREMENT``).
    noise_std
        Standard deviation of the complex noise in those scans; by default estimated from
        the k-space corners.
    order
        ``"sequential"``: one slice after another; ``"interleaved"``: line by line, each
        line of every slice in turn, as a 2D multi-slice FSE acquires them.
    """
    kspace = np.asarray(kspace, dtype=np.complex64)
    if kspace.ndim == 3:
        kspace = kspace[None]
    if kspace.ndim != 4:
        raise ValueError(f"kspace must be (coils, ky, kx) or (slices, coils, ky, kx), got {kspace.shape}")
    n_slices, n_coils, n_ky, n_kx = kspace.shape
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    masks = np.asarray(mask, dtype=bool)
    masks = np.broadcast_to(masks, (n_slices, *masks.shape[-2:])) if masks.ndim == 2 else masks
    if masks.shape != (n_slices, n_ky, n_kx) or not (masks == masks[..., :1]).all():
        raise ValueError("simulate_raw needs a (ky, kx) or (slices, ky, kx) mask of whole ky lines")
    oversampled = _oversample_readout(kspace, oversampling)
    rng = np.random.default_rng(seed)
    if noise_std is None:
        corner = kspace[..., : max(1, n_ky // 16), : max(1, n_kx // 16)]
        noise_std = float(np.std(corner)) or 1e-6

    path = Path(path)
    if path.exists():
        path.unlink()
    header = make_header(n_coils=n_coils, n_ky=n_ky, n_kx=n_kx, n_slices=n_slices, oversampling=oversampling,
                         fov_mm=fov_mm, acceleration=n_ky / masks[0, :, 0].sum(), calibration_mode="embedded")
    acquisitions = [_slice_lines(oversampled[s], masks[s], s, n_slices, fov_mm) for s in range(n_slices)]
    if order == "interleaved":
        lines = [line for lines in itertools.zip_longest(*acquisitions) for line in lines if line is not None]
    else:
        lines = [line for lines in acquisitions for line in lines]
    lines[-1].set_flag(ismrmrd.ACQ_LAST_IN_MEASUREMENT)
    for _ in range(noise_scans):
        noise = noise_std * (rng.standard_normal((n_coils, n_kx * oversampling))
                             + 1j * rng.standard_normal((n_coils, n_kx * oversampling))) / np.sqrt(2)
        lines.insert(0, _acquisition(noise.astype(np.complex64), ismrmrd.ACQ_IS_NOISE_MEASUREMENT))
    with open_dataset(path, DATASET, create=True) as dataset:
        dataset.write_xml_header(header.toXML("utf-8"))
        for stamp, acquisition in enumerate(lines):
            acquisition.acquisition_time_stamp = stamp
            dataset.append_acquisition(acquisition)
    logger.info("wrote %s: %d %s slices, %d lines, %d coils, readout oversampling %d", path, n_slices, order,
                len(lines) - noise_scans, n_coils, oversampling)
    return path


def _slice_lines(kspace: np.ndarray, mask: np.ndarray, s: int, n_slices: int,
                 fov_mm: tuple[float, float, float]) -> list[ismrmrd.Acquisition]:
    """The acquisitions of slice ``s``'s sampled lines of ``(coils, ky, kx)`` k-space, in ky order."""
    rows = np.flatnonzero(mask[:, 0])
    try:
        acs = find_calibration_region(mask).ky
    except CalibrationError:
        acs = (0, 0)  # no ACS block: a file that must fail to reconstruct, for tests
    lines = []
    for number, ky in enumerate(rows):
        flags = [ismrmrd.ACQ_FIRST_IN_SLICE] if number == 0 else []
        if number == len(rows) - 1:
            flags.append(ismrmrd.ACQ_LAST_IN_SLICE)
        if acs[0] <= ky < acs[1]:
            flags.append(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)
        acquisition = _acquisition(kspace[:, ky, :], *flags)
        acquisition.idx.kspace_encode_step_1 = int(ky)
        acquisition.idx.slice = s
        acquisition.position[:] = [0.0, 0.0, (s - (n_slices - 1) / 2) * fov_mm[2]]
        lines.append(acquisition)
    return lines


def _acquisition(data: np.ndarray, *flags: int) -> ismrmrd.Acquisition:
    acquisition = ismrmrd.Acquisition.from_array(np.ascontiguousarray(data, dtype=np.complex64))
    head = acquisition.getHead()
    head.center_sample = data.shape[1] // 2
    head.sample_time_us = 5.0
    head.read_dir[:] = [1.0, 0.0, 0.0]
    head.phase_dir[:] = [0.0, 1.0, 0.0]
    head.slice_dir[:] = [0.0, 0.0, 1.0]
    head.patient_table_position[:] = [0.0, 0.0, 0.0]
    acquisition.setHead(head)
    for flag in flags:
        acquisition.set_flag(flag)
    return acquisition
