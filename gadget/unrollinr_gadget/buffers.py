"""Gadgetron's buffered recon data (message 1023, after ``BucketToBuffer``) as slices."""

from __future__ import annotations

import itertools
import logging

import ismrmrd
import numpy as np

from unrollinr.recon import mask_from_kspace
from unrollinr_gadget.assembly import EncodingGeometry, SliceData, SliceKey, mirrored_about_the_centre

logger = logging.getLogger(__name__)


def _centred_rows(data: np.ndarray, centre: int, n_ky: int) -> np.ndarray:
    """Roll ``(coils, E1, RO)`` so that the encoding centre sits at row ``n_ky // 2``."""
    if data.shape[1] != n_ky:
        raise ValueError(f"buffer has {data.shape[1]} phase-encode lines, the header encodes {n_ky}")
    return np.roll(data, n_ky // 2 - centre, axis=1)


def _readouts(data: np.ndarray, geometry: EncodingGeometry) -> np.ndarray:
    """Remove readout oversampling from every line of ``(coils, E1, RO)``, whose lines
    BucketToBuffer has centred (and from which it has dropped the discarded samples)."""
    if data.shape[2] == geometry.readout_x:
        return data
    n_coils, n_lines, n_samples = data.shape
    lines = geometry.readout(data.reshape(n_coils * n_lines, n_samples), n_samples // 2)
    return lines.reshape(n_coils, n_lines, geometry.readout_x)


def _unreversed(data: np.ndarray, headers: np.ndarray) -> np.ndarray:
    """``(coils, E1, RO)`` with each line flagged ``ACQ_IS_REVERSE`` mirrored about its
    centre sample ``RO // 2``, where BucketToBuffer has put it as it was read
    (:func:`unrollinr_gadget.assembly.mirrored_about_the_centre`)."""
    reversed_lines = [e1 for e1, head in enumerate(headers) if head.is_flag_set(ismrmrd.ACQ_IS_REVERSE)]
    if not reversed_lines:
        return data
    data = data.copy()
    data[:, reversed_lines] = mirrored_about_the_centre(data[:, reversed_lines])
    return data


def _buffer_kspace(buffer, geometry: EncodingGeometry, n: int, s: int, loc: int) -> tuple[np.ndarray, object]:
    headers = buffer.headers[:, 0, n, s, loc]
    data = _unreversed(np.asarray(buffer.data)[:, :, 0, :, n, s, loc].transpose(2, 1, 0), headers)  # (CHA, E1, RO)
    sampled = np.flatnonzero(np.abs(data).sum(axis=(0, 2)) > 0)
    if len(sampled) == 0:
        raise ValueError("the buffer holds no samples")
    centre = int(buffer.sampling.sampling_limits[1].center)
    reference = headers[sampled[np.argmin(np.abs(sampled - centre))]]
    kspace = _centred_rows(_readouts(data.astype(np.complex64), geometry), centre, geometry.n_ky)
    return kspace, reference


def _encoding_space(buffer) -> int:
    """The encoding space of a buffer's lines (its unsampled lines' headers are zeroed)."""
    return max(int(head.encoding_space_ref) for head in np.asarray(buffer.headers).flat)


def slices_from_recon_data(recon_data, geometry: EncodingGeometry) -> list[SliceData]:
    """Every ``(N, S, LOC)`` image of every bit of a ``gadgetron.types.ReconData``.

    The buffer's array is ``(RO, E1, E2, CHA, N, S, LOC)``; the optional reference buffer
    holds the ACS lines.
    """
    slices = []
    for bit in recon_data.bits:
        space = _encoding_space(bit.data)
        if space != 0:
            logger.warning("skipped a buffer of encoding space %d: only the first is reconstructed", space)
            continue
        _, _, _, _, n_n, n_s, n_loc = np.asarray(bit.data.data).shape
        for loc, s, n in itertools.product(range(n_loc), range(n_s), range(n_n)):
            kspace, reference = _buffer_kspace(bit.data, geometry, n, s, loc)
            mask = mask_from_kspace(kspace)
            if bit.ref is not None:
                calibration, _ = _buffer_kspace(bit.ref, geometry, min(n, bit.ref.data.shape[4] - 1),
                                                min(s, bit.ref.data.shape[5] - 1), min(loc, bit.ref.data.shape[6] - 1))
                calibration_mask = mask_from_kspace(calibration)
                calibration = np.where(calibration_mask[None], calibration, kspace)
                calibration_mask = calibration_mask | mask
            else:
                calibration, calibration_mask = kspace, mask
            slices.append(SliceData(key=SliceKey.of(reference), kspace=kspace, mask=mask,
                                    calibration=calibration, calibration_mask=calibration_mask,
                                    reference=reference))
    return slices
