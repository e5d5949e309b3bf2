import ismrmrd
import numpy as np
import pytest
import torch
from unrollinr_gadget.assembly import EncodingGeometry, SliceAssembler, SliceData, SliceKey
from unrollinr_gadget.images import ImageFactory
from unrollinr_gadget.limits import LimitExceeded, StreamLimits
from unrollinr_gadget.rawdata import RawFile, make_header, simulate_raw

from unrollinr.fft import ifft2c
from unrollinr.masks import random_line_mask
from unrollinr.phantoms import phantom_kspace


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    kspace = phantom_kspace(32, 3, seed=2)
    mask = random_line_mask((32, 32), 2, acs_lines=10, seed=1)
    path = simulate_raw(kspace, mask, tmp_path_factory.mktemp("a") / "raw.h5", oversampling=2, noise_scans=0)
    return kspace, mask, RawFile(path)


def test_lines_are_placed_and_oversampling_removed_exactly(single):
    kspace, mask, raw = single
    assembler = SliceAssembler(raw.header())
    completed = [s for a in raw.acquisitions() for s in assembler.add(a)]
    assert len(completed) == 1 and assembler.finish() == []
    data = completed[0]
    assert data.kspace.shape == (3, 32, 32)
    np.testing.assert_array_equal(data.mask, mask)
    np.testing.assert_allclose(data.kspace, kspace * mask, atol=1e-4 * np.abs(kspace).max())
    assert data.calibration_mask[11:21].all()


def test_noise_scans_prewhiten_and_are_never_imaged(tmp_path):
    kspace = phantom_kspace(32, 3, seed=2)
    mask = random_line_mask((32, 32), 2, acs_lines=10, seed=1)
    raw = RawFile(simulate_raw(kspace, mask, tmp_path / "raw.h5", noise_scans=3, noise_std=0.5))
    assembler = SliceAssembler(raw.header())
    acquisitions = list(raw.acquisitions())
    assert sum(a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT) for a in acquisitions) == 3
    (data,) = [s for a in acquisitions for s in assembler.add(a)]
    noise = np.concatenate([a.data for a in acquisitions[:3]], axis=1)
    from unrollinr.coils import prewhitening_matrix

    whitened = np.einsum("dc,cyx->dyx", prewhitening_matrix(noise), kspace * mask)
    np.testing.assert_allclose(data.kspace, whitened, atol=1e-3 * np.abs(whitened).max())


def _acquisition(ky, n_samples=16, coils=2, flags=(), **idx):
    acquisition = ismrmrd.Acquisition.from_array(np.ones((coils, n_samples), np.complex64) * (ky + 1))
    head = acquisition.getHead()
    head.idx.kspace_encode_step_1 = ky
    head.center_sample = n_samples // 2
    for name, value in idx.items():
        setattr(head.idx, name, value)
    acquisition.setHead(head)
    for flag in flags:
        acquisition.set_flag(flag)
    return acquisition


@pytest.fixture
def header(tmp_path):
    path = simulate_raw(phantom_kspace(16, 2), random_line_mask((16, 16), 2, acs_lines=8), tmp_path / "h.h5",
                        oversampling=1, noise_scans=0)
    return RawFile(path).header()


def test_counters_are_kept_apart_and_slices_complete_on_their_last_line(header):
    assembler = SliceAssembler(header)
    assert assembler.add(_acquisition(8, slice=0)) == []
    assert assembler.add(_acquisition(8, slice=1)) == []
    assert assembler.add(_acquisition(8, repetition=1)) == []
    done = assembler.add(_acquisition(9, slice=1, flags=[ismrmrd.ACQ_LAST_IN_SLICE]))
    assert [d.key for d in done] == [SliceKey(slice=1)]
    assert done[0].mask[:, 0].sum() == 2
    rest = assembler.finish()
    assert [d.key for d in rest] == [SliceKey(), SliceKey(repetition=1)]


def test_navigators_and_phase_correction_are_skipped_and_separate_acs_is_not_imaged(header):
    assembler = SliceAssembler(header)
    assembler.add(_acquisition(3, flags=[ismrmrd.ACQ_IS_NAVIGATION_DATA]))
    assembler.add(_acquisition(4, flags=[ismrmrd.ACQ_IS_PHASECORR_DATA]))
    assembler.add(_acquisition(7, flags=[ismrmrd.ACQ_IS_PARALLEL_CALIBRATION]))
    assembler.add(_acquisition(8, flags=[ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING]))
    (data,) = assembler.finish()
    assert np.flatnonzero(data.mask[:, 0]).tolist() == [8]
    assert np.flatnonzero(data.calibration_mask[:, 0]).tolist() == [7, 8]
    assert assembler.skipped == {"navigator": 1, "phase correction": 1}


def test_an_acquisition_without_samples_is_skipped_and_costs_no_slice(header):
    assembler = SliceAssembler(header)
    empty = ismrmrd.Acquisition.from_array(np.zeros((2, 0), np.complex64))
    assert assembler.add(empty) == []
    for ky in (7, 8, 9):
        assembler.add(_acquisition(ky))
    (data,) = assembler.finish()
    assert np.flatnonzero(data.mask[:, 0]).tolist() == [7, 8, 9]
    assert assembler.skipped == {"acquisitions without samples": 1}


def test_lines_of_a_second_encoding_space_are_skipped(header):
    assembler = SliceAssembler(header)
    assembler.add(_acquisition(8))
    calibration = _acquisition(3, n_samples=32)  # a calibration scan on its own matrix
    head = calibration.getHead()
    head.encoding_space_ref = 1
    calibration.setHead(head)
    assert assembler.add(calibration) == []
    (data,) = assembler.finish()
    assert np.flatnonzero(data.mask[:, 0]).tolist() == [8]
    assert assembler.skipped == {"lines of encoding space 1 (only the first is reconstructed)": 1}


def test_later_repetitions_take_the_calibration_lines_of_their_slice(header):
    assembler = SliceAssembler(header)
    for ky in (7, 8):  # separate ACS lines in the first repetition only
        calibration = _acquisition(ky, flags=[ismrmrd.ACQ_IS_PARALLEL_CALIBRATION])
        calibration.data[:] *= 10
        assembler.add(calibration)
    (first,) = assembler.add(_acquisition(3, flags=[ismrmrd.ACQ_LAST_IN_SLICE]))
    (later,) = assembler.add(_acquisition(4, repetition=1, flags=[ismrmrd.ACQ_LAST_IN_SLICE]))
    (other,) = assembler.add(_acquisition(5, slice=1, repetition=1, flags=[ismrmrd.ACQ_LAST_IN_SLICE]))
    assert np.flatnonzero(first.calibration_mask[:, 0]).tolist() == [3, 7, 8]
    assert np.flatnonzero(later.calibration_mask[:, 0]).tolist() == [4, 7, 8]
    np.testing.assert_array_equal(later.calibration[:, [4, 7, 8], 0], [[5, 80, 90]] * 2)
    assert np.flatnonzero(later.mask[:, 0]).tolist() == [4]
    assert np.flatnonzero(other.calibration_mask[:, 0]).tolist() == [5]  # another slice's lines are not its own


def _assembler_with_two(header, counter: str) -> SliceAssembler:
    """An assembler for ``header`` whose ``counter`` takes the values 0 and 1."""
    setattr(header.encoding[0].encodingLimits, counter, ismrmrd.xsd.limitType(minimum=0, maximum=1, center=0))
    return SliceAssembler(header)


def _reference_lines(assembler: SliceAssembler, flag: int, **idx) -> list[SliceData]:
    """Add ACS lines 5-10 (``flag``: separate or embedded) under the counters ``idx``;
    the slices they complete."""
    return [data for ky in range(5, 11) for data in assembler.add(_acquisition(ky, flags=[flag], **idx))]


def test_an_average_that_completes_first_takes_the_reference_lines_of_an_average_still_open(header):
    # A reference scan under average 0, then two short-term averages interleaved line by
    # line: the last line, and so the first slice to complete, is average 1's.
    assembler = _assembler_with_two(header, "average")
    completed = _reference_lines(assembler, ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)
    rows = list(range(0, 16, 2))
    for ky in rows:
        for average in (0, 1):
            flags = [ismrmrd.ACQ_LAST_IN_SLICE] if (ky, average) == (rows[-1], 1) else []
            completed += assembler.add(_acquisition(ky, flags=flags, average=average))
    completed += assembler.finish()
    assert [data.key.average for data in completed] == [1, 0]
    for data in completed:
        assert data.calibration_mask[5:11].all(), data.key
        np.testing.assert_array_equal(data.calibration[0, 5:11, 0], np.arange(6, 12))


def test_reference_lines_under_counters_of_no_imaging_line_serve_the_images_of_their_slice(header):
    assembler = _assembler_with_two(header, "set")
    # a reference scan under set 1, which no imaging line has
    assert _reference_lines(assembler, ismrmrd.ACQ_IS_PARALLEL_CALIBRATION, set=1) == []
    completed = [s for ky in range(0, 16, 2) for s in assembler.add(
        _acquisition(ky, flags=[ismrmrd.ACQ_LAST_IN_SLICE] if ky == 14 else []))]
    assert assembler.finish() == []  # the reference lines alone are no image
    (data,) = completed
    assert data.key.set == 0 and data.calibration_mask[5:11].all()


def test_calibration_lines_of_another_channel_count_are_not_used_and_the_stream_ends_with_every_slice(header):
    assembler = _assembler_with_two(header, "repetition")
    completed = _reference_lines(assembler, ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)
    completed += assembler.add(_acquisition(12, flags=[ismrmrd.ACQ_LAST_IN_SLICE]))
    for ky in (0, 2, 4):  # repetition 1 on 3 channels, without ACS lines: finish() used to raise
        completed += assembler.add(_acquisition(ky, coils=3, repetition=1))
    completed += assembler.finish()
    assert [data.key.repetition for data in completed] == [0, 1]
    np.testing.assert_array_equal(completed[1].calibration_mask, completed[1].mask)


def test_asymmetric_echo_is_placed_by_its_centre_sample(header):
    assembler = SliceAssembler(header)
    acquisition = _acquisition(8, n_samples=12)
    head = acquisition.getHead()
    head.center_sample = 4  # 4 samples before the echo centre, 8 after
    acquisition.setHead(head)
    assembler.add(acquisition)
    (data,) = assembler.finish()
    row = np.abs(data.kspace[0, 8])
    assert np.flatnonzero(row).tolist() == list(range(4, 16))


# A full echo read in reverse covers kx -7..8 about its centre sample 8 (the same kx as
# -7..7 and the Nyquist sample); an asymmetric echo, 4 samples before the centre, read in
# reverse from the high end, has 7 samples before its centre in the order read.
@pytest.mark.parametrize(("n_samples", "centre", "reversed_centre"), [(16, 8, 8), (12, 4, 7)])
def test_a_line_read_with_the_readout_reversed_is_placed_from_low_kx_to_high(header, n_samples, centre,
                                                                           reversed_centre):
    samples = (np.arange(n_samples) + 1) * (1 + 2j)  # from low kx to high
    as_read = np.roll(samples[::-1], 1) if n_samples == 16 else samples[::-1]
    placed = []
    for reverse in (False, True):
        acquisition = _acquisition(8, n_samples=n_samples, coils=1)
        acquisition.data[:] = as_read if reverse else samples
        head = acquisition.getHead()
        head.center_sample = reversed_centre if reverse else centre
        acquisition.setHead(head)
        if reverse:
            acquisition.set_flag(ismrmrd.ACQ_IS_REVERSE)
        assembler = SliceAssembler(header)
        assembler.add(acquisition)
        (data,) = assembler.finish()
        placed.append(data.kspace[0, 8])
    np.testing.assert_array_equal(placed[1], placed[0])
    assert np.flatnonzero(placed[0]).tolist() == list(range(8 - centre, 8 - centre + n_samples))


def test_separate_calibration_lines_may_be_longer_than_asymmetric_imaging_lines(header):
    assembler = SliceAssembler(header)
    for ky in (7, 8, 9):  # full echoes, 8 samples before the centre
        assembler.add(_acquisition(ky, flags=[ismrmrd.ACQ_IS_PARALLEL_CALIBRATION]))
    for ky in (4, 8):  # asymmetric echoes: 4 samples before the centre, 8 after
        acquisition = _acquisition(ky, n_samples=12)
        head = acquisition.getHead()
        head.center_sample = 4
        acquisition.setHead(head)
        assembler.add(acquisition)
    (data,) = assembler.finish()
    assert np.flatnonzero(data.calibration[0, :, 0]).tolist() == [7, 8, 9]
    assert np.flatnonzero(data.kspace[0, 4]).tolist() == list(range(4, 16))


def test_discarded_samples_are_zeroed_and_never_checked(header):
    assembler = SliceAssembler(header)
    acquisition = _acquisition(8)
    head = acquisition.getHead()
    head.discard_pre, head.discard_post = 2, 3
    acquisition.setHead(head)
    acquisition.data[:, 0] = np.nan  # what a discarded sample may hold
    assembler.add(acquisition)
    (data,) = assembler.finish()
    assert np.flatnonzero(data.kspace[0, 8]).tolist() == list(range(2, 13))
    assert data.mask[8].all()


def test_lines_outside_the_encoding_are_an_error(header):
    with pytest.raises(ValueError, match="outside the encoded matrix"):
        SliceAssembler(header).add(_acquisition(40))
    with pytest.raises(ValueError, match="do not fit the encoded readout of 16"):  # a finer readout than encoded
        SliceAssembler(header).add(_acquisition(8, n_samples=20))


def test_geometry_reads_the_recon_space(header):
    geometry = EncodingGeometry.from_header(header)
    assert (geometry.encoded_x, geometry.n_ky, geometry.recon_x, geometry.ky_centre) == (16, 16, 16, 8)


def test_a_slice_whose_channels_samples_or_values_change_fails_once_and_the_others_go_on(header):
    assembler = SliceAssembler(header)
    assembler.add(_acquisition(7, slice=0))
    with pytest.raises(ValueError, match="3 channels after 2"):
        assembler.add(_acquisition(8, slice=0, coils=3))
    assert assembler.add(_acquisition(9, slice=0)) == []  # the failed slice's later lines are dropped
    assembler.add(_acquisition(7, slice=1))
    with pytest.raises(ValueError, match="12 samples per line after 16"):
        assembler.add(_acquisition(8, slice=1, n_samples=12))
    nan = _acquisition(8, slice=2)
    nan.data[0, 3] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        assembler.add(nan)
    assembler.add(_acquisition(8, slice=3))
    assert [d.key for d in assembler.finish()] == [SliceKey(slice=3)]
    assert assembler.skipped == {"lines of failed slices": 1}


def test_limits_bound_the_matrix_and_the_channels(header):
    with pytest.raises(LimitExceeded, match="exceeds the limit of 8 samples"):
        SliceAssembler(header, limits=StreamLimits(max_matrix=8))
    with pytest.raises(LimitExceeded, match="2 channels exceed the limit of 1"):
        SliceAssembler(header, limits=StreamLimits(max_channels=1)).add(_acquisition(8))


def test_a_header_without_encoding_limits_is_refused(header):
    header.encoding[0].encodingLimits.kspace_encoding_step_1 = None
    with pytest.raises(ValueError, match="no encodingLimits"):
        SliceAssembler(header)


def test_noise_scans_that_cannot_whiten_are_left_out_and_the_slice_goes_on(header):
    assembler = SliceAssembler(header)
    broken = _acquisition(0, flags=[ismrmrd.ACQ_IS_NOISE_MEASUREMENT])
    broken.data[0, 0] = np.inf
    assembler.add(broken)
    silent = _acquisition(0, flags=[ismrmrd.ACQ_IS_NOISE_MEASUREMENT])
    silent.data[:] = 0  # a singular noise covariance
    assembler.add(silent)
    assembler.add(_acquisition(8))
    (data,) = assembler.finish()
    np.testing.assert_array_equal(data.kspace[:, 8], 9)  # not whitened
    assert assembler.skipped == {"noise scans with NaN or infinite samples": 1}


def test_noise_scans_after_the_first_line_leave_the_prewhitening_as_the_first_line_found_it(header):
    rng = np.random.default_rng(0)
    noise = ismrmrd.Acquisition.from_array(  # coil 1 ten times as noisy: whitening would scale it down
        (rng.standard_normal((2, 256)) * [[1.0], [10.0]]).astype(np.complex64))
    noise.set_flag(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)
    assembler = SliceAssembler(header)
    assembler.add(_acquisition(7))
    assembler.add(noise)
    for ky in (8, 9):
        assembler.add(_acquisition(ky))
    (data,) = assembler.finish()
    np.testing.assert_array_equal(data.kspace[:, 7:10, 0], [[8, 9, 10], [8, 9, 10]])  # no line whitened
    assert assembler.skipped == {"noise scans after the first line (the prewhitening was fixed then)": 1}


def test_image_numbers_come_from_the_counters_alone(header):
    import dataclasses

    geometry = dataclasses.replace(EncodingGeometry.from_header(header), counter_sizes=(3, 2, 1, 1, 1, 4))
    assert geometry.image_index(SliceKey()) == 1
    assert geometry.image_index(SliceKey(slice=2)) == 3
    assert geometry.image_index(SliceKey(slice=2, contrast=1)) == 6
    assert geometry.image_index(SliceKey(slice=2, contrast=1, repetition=1)) == 12
    assert EncodingGeometry.from_header(header).counter_sizes == (1, 1, 1, 1, 1, 1)


def _made_for(key: SliceKey) -> SliceData:
    """Stand-in slice data for :meth:`ImageFactory.make`, which reads only its key and header."""
    empty = np.zeros((1, 32, 32), np.complex64)
    return SliceData(key, empty, np.ones((32, 32), bool), empty, np.ones((32, 32), bool), ismrmrd.AcquisitionHeader())


def _geometry_32(counter_sizes: tuple[int, ...]) -> EncodingGeometry:
    return EncodingGeometry(encoded_x=32, n_ky=32, recon_x=32, recon_y=32, ky_centre=16,
                            recon_fov=(200.0, 200.0, 5.0), counter_sizes=counter_sizes)


def test_no_image_number_is_given_twice_when_the_header_limits_do_not_hold_the_counters(caplog):
    keys = [SliceKey(slice=s, repetition=r) for r in range(2) for s in range(3)]
    within = ImageFactory(_geometry_32((3, 1, 1, 1, 1, 2)))  # limits that hold: the counters' numbers
    assert [within.make(np.ones((32, 32)), _made_for(key)).getHead().image_index for key in keys] == [1, 2, 3, 4, 5, 6]
    assert "would repeat" not in caplog.text
    # No limits (every size 1): slice 1 and repetition 1 of slice 0 both count to 2, and a
    # key that comes twice to its own number again.
    beyond = ImageFactory(_geometry_32((1, 1, 1, 1, 1, 1)))
    numbers = [beyond.make(np.ones((32, 32)), _made_for(key)).getHead().image_index for key in keys + keys[:1]]
    assert len(set(numbers)) == len(numbers) == 7
    assert numbers[:3] == [1, 2, 3]  # the first image of each number keeps it
    assert "repetition 1 would repeat image number 2" in caplog.text  # slice 0 of repetition 1
    assert caplog.text.count("would repeat") == 1  # once a stream: 4 images were renumbered
    # Limits whose product passes what image_index holds (a uint16): numbered after the rest.
    large = ImageFactory(_geometry_32((300, 1, 1, 1, 1, 300)))
    numbers = [large.make(np.ones((32, 32)), _made_for(key)).getHead().image_index
               for key in (SliceKey(slice=4), SliceKey(slice=299, repetition=299))]
    assert numbers == [5, 6]


# Gaussian blobs (centre y, centre x in mm, complex amplitude) whose k-space is known exactly.
BLOBS = ((-30.0, 20.0, 1.0), (25.0, -40.0, 0.6j), (10.0, 45.0, 0.8 - 0.3j))
BLOB_SIGMA_MM = 10.0


def _blobs(y_mm: np.ndarray, x_mm: np.ndarray) -> np.ndarray:
    """The object on a grid of positions."""
    return sum(a * np.exp(-((y_mm - cy) ** 2 + (x_mm - cx) ** 2) / (2 * BLOB_SIGMA_MM ** 2)) for cy, cx, a in BLOBS)


def _blobs_kspace(ky: np.ndarray, kx: np.ndarray) -> np.ndarray:
    """The object's Fourier transform at spatial frequencies in 1/mm."""
    envelope = 2 * np.pi * BLOB_SIGMA_MM ** 2 * np.exp(-2 * np.pi ** 2 * BLOB_SIGMA_MM ** 2 * (ky ** 2 + kx ** 2))
    return sum(a * envelope * np.exp(-2j * np.pi * (ky * cy + kx * cx)) for cy, cx, a in BLOBS)


def _scan(encoded: tuple[int, int], encoded_fov: tuple[float, float], recon: tuple[int, int],
          recon_fov: tuple[float, float]) -> tuple[SliceData, EncodingGeometry]:
    """Assemble a fully sampled one-coil scan of the blobs under a header with these
    ``(x, y)`` matrices and fields of view."""
    header = make_header(n_coils=1, n_ky=encoded[1], n_kx=recon[0], n_slices=1, oversampling=1,
                         fov_mm=(*recon_fov, 5.0), acceleration=1, calibration_mode="embedded")
    encoding = header.encoding[0]
    encoding.encodedSpace.matrixSize.x, encoding.encodedSpace.matrixSize.y = encoded
    encoding.encodedSpace.fieldOfView_mm.x, encoding.encodedSpace.fieldOfView_mm.y = encoded_fov
    encoding.reconSpace.matrixSize.x, encoding.reconSpace.matrixSize.y = recon
    assembler = SliceAssembler(header)
    kx = (np.arange(encoded[0]) - encoded[0] // 2) / encoded_fov[0]
    for line in range(encoded[1]):
        ky = (line - encoded[1] // 2) / encoded_fov[1]
        acquisition = ismrmrd.Acquisition.from_array(_blobs_kspace(ky, kx)[None].astype(np.complex64))
        head = acquisition.getHead()
        head.idx.kspace_encode_step_1 = line
        head.center_sample = encoded[0] // 2
        acquisition.setHead(head)
        assembler.add(acquisition)
    (data,) = assembler.finish()
    return data, assembler.geometry


@pytest.mark.parametrize(("encoded", "encoded_fov", "recon", "recon_fov"), [
    # phase resolution 75% with 25% phase oversampling, and 2x readout oversampling
    ((128, 60), (400.0, 250.0), (64, 64), (200.0, 200.0)),
    # interpolation: a recon matrix twice the acquired one in both directions
    ((128, 64), (400.0, 200.0), (128, 128), (200.0, 200.0)),
    # a rectangular recon field of view, cut from a wider phase-encode one
    ((192, 72), (300.0, 180.0), (96, 64), (150.0, 120.0)),
    # odd matrices, and pixel ratios whose resampled sizes are not whole numbers
    ((128, 63), (400.0, 252.0), (127, 81), (200.0, 202.5)),
    ((150, 45), (300.0, 270.0), (75, 51), (150.0, 229.5)),
])
def test_images_come_out_on_the_recon_spaces_matrix_and_field_of_view(encoded, encoded_fov, recon, recon_fov):
    data, geometry = _scan(encoded, encoded_fov, recon, recon_fov)
    assert data.kspace.shape[-1] == geometry.readout_x
    image = ifft2c(torch.from_numpy(data.kspace[0])).numpy()  # the slice at its encoded resolution
    made = ImageFactory(geometry, output="complex").make(image, data)
    pixels = made.data[0, 0]
    assert pixels.shape == (recon[1], recon[0])
    assert tuple(made.getHead().matrix_size[:2]) == recon
    np.testing.assert_allclose(made.getHead().field_of_view[:2], recon_fov)
    spacing_x, spacing_y = recon_fov[0] / recon[0], recon_fov[1] / recon[1]
    y_mm, x_mm = np.meshgrid((np.arange(recon[1]) - recon[1] // 2) * spacing_y,
                             (np.arange(recon[0]) - recon[0] // 2) * spacing_x, indexing="ij")
    expected = _blobs(y_mm, x_mm)
    scale = np.vdot(expected, pixels) / np.vdot(expected, expected)  # the transforms' constant
    np.testing.assert_allclose(pixels, scale * expected, atol=1e-3 * np.abs(scale * expected).max())


def test_a_coarser_recon_space_keeps_only_the_frequencies_its_pixels_can_hold():
    # 64 samples to 32 pixels twice as wide: a tone at 24/64 cycles per sample lies beyond
    # the recon pixels' Nyquist frequency (16/64) and must not alias into the image.
    geometry = EncodingGeometry(encoded_x=64, n_ky=64, recon_x=32, recon_y=32, ky_centre=32,
                                recon_fov=(200.0, 200.0, 5.0), pixel_ratio_x=0.5, pixel_ratio_y=0.5)
    positions = np.arange(64) - 32
    fast, slow = (np.tile(np.exp(2j * np.pi * cycles / 64 * positions), (64, 1)) for cycles in (24, 4))
    recon = geometry.to_recon_space((fast + slow).astype(np.complex64))
    np.testing.assert_allclose(recon, slow[16:48, 0::2], atol=1e-5)  # every other sample of the slow tone


def test_an_image_far_brighter_than_the_first_is_scaled_down_and_never_clipped(caplog):
    # A first slice beyond the anatomy holds only noise: the next, with the object, is 50
    # times as bright and would saturate at the first image's uint16 scale.
    geometry = _geometry_32((1,) * 6)
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((32, 32)) + 1j * rng.standard_normal((32, 32))
    obj = np.zeros((32, 32), complex)
    obj[8:24, 8:24] = np.linspace(10.0, 200.0, 16)
    factory = ImageFactory(geometry)
    slices = [noise, obj + noise, 0.5 * obj + noise]
    images = [factory.make(image, _made_for(SliceKey(slice=index))) for index, image in enumerate(slices)]
    scales = [float(image.meta["ImageScaleFactor"]) for image in images]
    assert scales[1] == scales[2] < scales[0] / 10
    assert "slice 1 would clip" in caplog.text
    for image, expected, scale in zip(images, slices, scales, strict=True):
        pixels = image.data[0, 0].astype(float)
        assert pixels.max() < np.iinfo(np.uint16).max
        np.testing.assert_allclose(pixels / scale, np.abs(expected), atol=0.5 / scale, rtol=1e-5)  # meta: 6 digits


def test_a_fixed_uint16_scale_is_the_same_for_streams_whose_first_images_differ(caplog):
    # Gadgetron's distributed mode makes each slice a stream of its own: without a fixed
    # scale each would be scaled to its own peak, and a series would change brightness
    # from slice to slice.
    geometry = _geometry_32((1,) * 6)
    obj = np.zeros((32, 32), complex)
    obj[8:24, 8:24] = np.linspace(10.0, 200.0, 16)
    slices = [obj, 0.5 * obj]
    own = [ImageFactory(geometry).make(image, _made_for(SliceKey(slice=i))) for i, image in enumerate(slices)]
    assert float(own[0].meta["ImageScaleFactor"]) != float(own[1].meta["ImageScaleFactor"])
    fixed = [ImageFactory(geometry, uint16_scale=100.0).make(image, _made_for(SliceKey(slice=i)))
             for i, image in enumerate(slices)]
    for image, expected in zip(fixed, slices, strict=True):
        assert float(image.meta["ImageScaleFactor"]) == 100.0
        np.testing.assert_allclose(image.data[0, 0].astype(float), 100.0 * np.abs(expected), atol=0.5)
    # a fixed scale still never clips: the image takes the scale of its own peak, and says so
    brighter = ImageFactory(geometry, uint16_scale=1000.0).make(obj, _made_for(SliceKey(slice=0)))
    assert brighter.data.max() < np.iinfo(np.uint16).max
    assert float(brighter.meta["ImageScaleFactor"]) < 1000.0 and "would clip" in caplog.text


@pytest.mark.parametrize("fov", [0.0, float("inf"), float("nan")])
def test_a_field_of_view_that_is_missing_or_not_finite_leaves_the_pixel_size_alone(header, fov):
    header.encoding[0].encodedSpace.fieldOfView_mm.x = fov
    geometry = EncodingGeometry.from_header(header)
    assert (geometry.pixel_ratio_x, geometry.readout_x) == (1.0, geometry.recon_x)
