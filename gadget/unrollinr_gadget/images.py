"""Building ISMRMRD images from reconstructions, with headers taken from the acquisitions."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import ismrmrd
import numpy as np

from unrollinr_gadget.assembly import EncodingGeometry, SliceData, SliceKey
from unrollinr_gadget.settings import OUTPUT_TYPES

logger = logging.getLogger(__name__)

_UINT16_TARGET = 4095.0
_UINT16_MAX = float(np.iinfo(np.uint16).max)
_MAX_IMAGE_NUMBER = 65535  # image_index is a uint16, which wraps a larger number onto a smaller one


@dataclass
class ImageFactory:
    """Numbers images by their counters (see :meth:`EncodingGeometry.image_index`) and
    fixes the uint16 scale on the first image (its peak at 4095), so that the slices of a
    stream share one intensity scale; ``ImageScaleFactor`` in the meta gives it back.
    ``uint16_scale`` fixes it beforehand instead, the same in every stream: in Gadgetron's
    distributed mode each slice is a stream of its own, and would otherwise be scaled to
    its own peak.

    An image that would clip at that scale (more than 16 times as bright as the first, as
    after a first slice beyond the anatomy that holds only noise) gets the scale of its own
    peak instead, and so do the images after it: a change of scale is logged and shown in
    ``ImageScaleFactor``, while clipping would lose the image's bright parts unseen.

    Where the header's ``encodingLimits`` are missing or too small for the counters that
    come, or a sequence repeats its counters, two images would share a number, and a
    scanner's database keeps one image per number; a number from the counters can also
    pass the 65535 that ``image_index`` holds. Such an image is numbered after every
    number given so far (and logged): no number is given twice in a stream."""

    geometry: EncodingGeometry
    output: str = "uint16"
    series_index: int = 1
    comment: str = "UnrollINR"
    uint16_scale: float | None = None
    _uint16_scale: float | None = field(default=None, init=False)
    _numbers_given: set[int] = field(default_factory=set, init=False)
    _highest_number_given: int = field(default=0, init=False)
    _renumbered: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.output not in OUTPUT_TYPES:
            raise ValueError(f"output must be one of {OUTPUT_TYPES}, got {self.output!r}")
        self._uint16_scale = self.uint16_scale

    def _pixels(self, image: np.ndarray, key: SliceKey) -> tuple[np.ndarray, int, float]:
        magnitude = np.abs(image)
        if self.output == "complex":
            return image.astype(np.complex64), ismrmrd.IMTYPE_COMPLEX, 1.0
        if self.output == "float":
            return magnitude.astype(np.float32), ismrmrd.IMTYPE_MAGNITUDE, 1.0
        peak = float(magnitude.max())
        if self._uint16_scale is None or peak * self._uint16_scale > _UINT16_MAX:
            scale = _UINT16_TARGET / peak if peak > 0 else 1.0
            if self._uint16_scale is not None:
                logger.warning("%s would clip at the stream's uint16 scale %.4g: it and the images after it "
                               "are scaled by %.4g (ImageScaleFactor)", key, self._uint16_scale, scale)
            self._uint16_scale = scale
        scaled = np.clip(np.round(magnitude * self._uint16_scale), 0, _UINT16_MAX)
        return scaled.astype(np.uint16), ismrmrd.IMTYPE_MAGNITUDE, self._uint16_scale

    def _image_index(self, key: SliceKey) -> int:
        number = self.geometry.image_index(key)
        if number in self._numbers_given or number > _MAX_IMAGE_NUMBER:
            clash, number = number, self._highest_number_given + 1
            self._renumbered += 1
            log = logger.warning if self._renumbered == 1 else logger.debug  # once a stream, not once an image
            log("%s would repeat image number %d (its counters come twice, or the header's encodingLimits do not "
                "hold them), or it passes %d: numbered %d, and so on for the images like it", key, clash,
                _MAX_IMAGE_NUMBER, number)
        self._numbers_given.add(number)
        self._highest_number_given = max(self._highest_number_given, number)
        return number

    def make(self, image: np.ndarray, data: SliceData, *, details: dict[str, str] | None = None) -> ismrmrd.Image:
        """An ``ismrmrd.Image`` for a reconstructed ``(n_ky, readout_x)`` complex slice, on
        the recon space's matrix and field of view."""
        pixels, image_type, scale = self._pixels(self.geometry.to_recon_space(image), data.key)
        result = ismrmrd.Image.from_array(pixels, acquisition=data.reference)
        head = result.getHead()
        head.image_type = image_type
        head.field_of_view[:] = self.geometry.recon_fov
        head.image_index = self._image_index(data.key)
        head.image_series_index = self.series_index
        result.setHead(head)

        magnitude = np.abs(pixels).astype(np.float64)
        low, high = np.percentile(magnitude, [1, 99.5])
        meta = ismrmrd.Meta()
        meta["DataRole"] = "Image"
        meta["ImageComment"] = self.comment
        meta["ImageProcessingHistory"] = ["UNROLLINR"]
        meta["WindowCenter"] = str(int(round((low + high) / 2)))
        meta["WindowWidth"] = str(max(1, int(round(high - low))))
        meta["ImageScaleFactor"] = f"{scale:.6g}"
        for name, value in (details or {}).items():
            meta[name] = value
        result.meta = meta
        return result
