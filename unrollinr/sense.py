"""The multi-coil SENSE encoding operator ``E = M F C`` on native complex tensors.

Dimension order, used throughout the package:

- image ``x``: ``(slices, sets, y, x)``, one image per set of coil maps
- coil maps ``C``: ``(slices, sets, coils, y, x)``
- k-space ``y``: ``(slices, coils, ky, kx)``
- sampling mask ``M``: ``(slices, ky, kx)`` boolean

With one set of maps this is SENSE. With two (ESPIRiT's second eigenvectors, "soft
SENSE"), a pixel whose coil signals fit no single sensitivity vector, where the object
wraps or is cut at the edge of the field of view, is the sum of two images:
``E x = M F sum_s C_s x_s``.
"""

from __future__ import annotations

import torch
from torch import nn

from unrollinr.coil_products import CoilProducts
from unrollinr.fft import centred_dft_matrix, centring_phase, fft2c, fftc, ifft2c

_IMAGE_DIMS = (-2, -1)


def is_line_mask(mask: torch.Tensor) -> bool:
    """True when every phase-encode row ``ky`` is either fully sampled or empty,
    i.e. the mask ``(..., ky, kx)`` is constant along ``kx``."""
    return bool((mask == mask[..., :1]).all())


def combine_sets(images: torch.Tensor) -> torch.Tensor:
    """One image per slice from ``(slices, sets, y, x)``: the root-sum-of-squares of the
    sets' magnitudes (as BART combines them) with the first set's phase, ``(slices, y, x)``."""
    first = images[:, 0]
    if images.shape[1] == 1:
        return first
    magnitude = torch.linalg.vector_norm(images, dim=1)
    phase = torch.sgn(first)
    return torch.where(phase == 0, magnitude.to(images.dtype), phase * magnitude)


def sets_in_use(maps: torch.Tensor) -> int:
    """How many sets of ``maps`` ``(slices, sets, coils, y, x)`` there are before the last
    sets that are zero in every slice (ESPIRiT's second set where one sensitivity vector
    explains every pixel); all of them where every set is zero."""
    has_maps = maps.flatten(start_dim=2).ne(0).any(dim=2).any(dim=0)  # (sets,)
    return int(has_maps.nonzero().max()) + 1 if bool(has_maps.any()) else maps.shape[1]


def _padded_positions(positions: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each slice's ascending indices as rows ``(slices, K)``, zero-padded to the longest
    (``K`` at least 1), and which entries are indices, not padding ``(slices, K)``."""
    k_max = max(1, max(len(p) for p in positions))
    device = positions[0].device
    indices = torch.zeros(len(positions), k_max, dtype=torch.int64, device=device)
    valid = torch.zeros(len(positions), k_max, dtype=torch.bool, device=device)
    for s, p in enumerate(positions):
        indices[s, : len(p)] = p
        valid[s, : len(p)] = True
    return indices, valid


class SenseOp(nn.Module):
    """``E = M F C`` with forward, adjoint and normal (``E^H E``) applications.

    Parameters
    ----------
    maps
        Coil sensitivities ``(slices, sets, coils, y, x)``, complex.
    mask
        Sampling mask ``(slices, ky, kx)`` or ``(ky, kx)``, boolean.

    For whole-line masks (1D undersampling along ``ky``) the normal operator needs no
    FFT at all: ``F^H M F`` acts along ``y`` only, as ``P^H P`` where ``P`` holds the
    sampled rows of the centred DFT matrix. That path is exact, much cheaper than two 2D
    FFTs per coil, and used automatically; the coil images are then laid out
    ``(slices, y, coils, x)`` (maps ``(slices, sets, y, coils, x)``) so that each product
    is a single matrix multiply.

    Other masks take 2D FFTs, with no shifts: the normal operator is
    ``C^H ifft2(M' fft2(C x))`` with the mask ``M'`` stored in FFT order, since the shifts
    of the centred transforms around it cancel (each multiplies the spectrum by a phase of
    modulus one, which commutes with the mask). Their samples (:meth:`measure`,
    :meth:`samples`) are gathered from the k-space in FFT order, so that the loss reduces
    only the measured samples, not every k-space location; :meth:`measure` multiplies its
    samples by the phase that centring adds there (:func:`~unrollinr.fft.centring_phase`).
    """

    maps: torch.Tensor
    mask: torch.Tensor
    mask_fft_order: torch.Tensor
    rows: torch.Tensor
    rows_h: torch.Tensor
    sample_indices: torch.Tensor
    sample_valid: torch.Tensor
    sample_phase: torch.Tensor

    def __init__(self, maps: torch.Tensor, mask: torch.Tensor) -> None:
        super().__init__()
        if maps.ndim != 5 or not maps.is_complex():
            raise ValueError(f"maps must be complex (slices, sets, coils, y, x), got {tuple(maps.shape)} {maps.dtype}")
        if mask.ndim == 2:
            mask = mask.expand(maps.shape[0], *mask.shape)
        if mask.shape != (maps.shape[0], *maps.shape[-2:]):
            raise ValueError(f"mask {tuple(mask.shape)} does not match maps {tuple(maps.shape)}")
        self.register_buffer("maps", maps)
        self.register_buffer("mask", mask.to(torch.bool))
        self.line_mask = is_line_mask(self.mask)
        self.coil_products: CoilProducts  # coil images (slices, coils, y, x), or (slices, y, coils, x)
        if not self.line_mask:
            self.coil_products = CoilProducts(maps, coil_axis=1, y_axis=2, x_axis=3)
            self.register_buffer("mask_fft_order", torch.fft.ifftshift(self.mask, dim=_IMAGE_DIMS).unsqueeze(1))
            # the samples: each slice's sampled locations in FFT order, as flat ky * kx indices
            positions = [torch.nonzero(m.flatten()).flatten() for m in self.mask_fft_order[:, 0]]
        else:
            self.coil_products = CoilProducts(maps.permute(0, 1, 3, 2, 4), coil_axis=2, y_axis=1, x_axis=3)
            # the samples: each slice's sampled rows ky
            positions = [torch.nonzero(m[:, 0]).flatten() for m in self.mask]
        indices, valid = _padded_positions(positions)
        self.register_buffer("sample_indices", indices)
        self.register_buffer("sample_valid", valid)
        if not self.line_mask:
            # (slices, 1, K): the centring's phase at each sample, zero at padding
            phase = centring_phase((maps.shape[-2], maps.shape[-1]), dtype=maps.dtype, device=maps.device).flatten()
            self.register_buffer("sample_phase", (phase[indices] * valid).unsqueeze(1))
        else:
            # P (slices, K, y): the sampled rows of the centred DFT; padding rows are zero
            dft = centred_dft_matrix(maps.shape[-2], dtype=maps.dtype, device=maps.device)
            rows = dft[indices] * valid.unsqueeze(-1)
            self.register_buffer("rows", rows)
            self.register_buffer("rows_h", rows.mH.resolve_conj().contiguous())

    def _gather_samples(self, kspace: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The samples of k-space ``(slices, coils, ky, kx)`` in FFT order times their
        ``weights`` ``(slices, 1, K)`` (zero at padding): ``(slices, coils, K)``; 2D masks."""
        indices = self.sample_indices.unsqueeze(1).expand(-1, kspace.shape[1], -1)
        return kspace.flatten(start_dim=2).gather(2, indices) * weights

    @property
    def image_shape(self) -> tuple[int, int, int, int]:
        """``(slices, sets, y, x)``."""
        s, sets, _, y, x = self.maps.shape
        return (s, sets, y, x)

    @property
    def sample_coil_dim(self) -> int:
        """The coil axis in the layout of :meth:`measure` and :meth:`samples`."""
        return 2 if self.line_mask else 1

    def coil_kspace(self, image: torch.Tensor) -> torch.Tensor:
        """``F C x`` before masking: image ``(slices, sets, y, x)`` to ``(slices, coils, ky, kx)``."""
        return fft2c((self.maps * image.unsqueeze(2)).sum(dim=1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``E x``: image ``(slices, sets, y, x)`` to masked k-space ``(slices, coils, ky, kx)``."""
        return self.coil_kspace(image) * self.mask.unsqueeze(1)

    def adjoint(self, kspace: torch.Tensor) -> torch.Tensor:
        """``E^H y``: k-space ``(slices, coils, ky, kx)`` to image ``(slices, sets, y, x)``."""
        coil_images = ifft2c(kspace * self.mask.unsqueeze(1))
        return (self.maps.conj() * coil_images.unsqueeze(1)).sum(dim=2)

    def normal(self, image: torch.Tensor) -> torch.Tensor:
        """``E^H E x`` for an image ``(slices, sets, y, x)``."""
        if not self.line_mask:
            kspace = self._uncentred_coil_kspace(image)
            kspace *= self.mask_fft_order  # in place: a fresh array, which the FFT's backward does not need
            return self.coil_products.contract(torch.fft.ifft2(kspace, norm="ortho"))
        n_slices, _, n_y, _ = image.shape
        projected = self.rows_h @ (self.rows @ self._coil_rows(image))
        return self.coil_products.contract(projected.reshape(n_slices, n_y, -1, image.shape[-1]))

    def _coil_rows(self, image: torch.Tensor) -> torch.Tensor:
        """Coil images ``C x`` laid out ``(slices, y, coils * x)`` for the row products."""
        n_slices, _, n_y, _ = image.shape
        return self.coil_products.expand(image).reshape(n_slices, n_y, -1)

    def _uncentred_coil_kspace(self, image: torch.Tensor) -> torch.Tensor:
        """``fft2(C x)``, without the centring's shifts: ``(slices, coils, ky, kx)`` in FFT
        order (DC at index 0), each sample off the centred ``F C x`` by the centring's
        phase; 2D masks."""
        return torch.fft.fft2(self.coil_products.expand(image), norm="ortho")

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """The part of ``E x`` that :meth:`measure` takes before the mask: for line masks the
        coil images ``C x`` ``(slices, y, coils * x)``, for other masks their uncentred
        spectra ``fft2(C x)`` ``(slices, coils, ky, kx)``. Operators with the same maps and
        the same kind of mask (:attr:`line_mask`) share it, e.g. a slice's training and
        held-out samples."""
        return self._coil_rows(image) if self.line_mask else self._uncentred_coil_kspace(image)

    def measure(self, image: torch.Tensor, encoded: torch.Tensor | None = None) -> torch.Tensor:
        """The measured samples of ``E x``, in the layout of :meth:`samples`.

        Line masks give the sampled rows ``(slices, K, coils, kx)`` (computed from the
        rows alone, without 2D FFTs); other masks the samples ``(slices, coils, K)``.
        ``encoded`` is :meth:`encode` of ``image`` where the caller has it (from this
        operator or one that shares it); otherwise it is computed.
        """
        if encoded is None:
            encoded = self.encode(image)
        elif encoded.ndim != (3 if self.line_mask else 4):
            raise ValueError(f"encoded {tuple(encoded.shape)} is not of a {'line' if self.line_mask else '2D'} mask")
        if not self.line_mask:
            return self._gather_samples(encoded, self.sample_phase)
        n_slices, _, _, n_x = image.shape
        rows = (self.rows @ encoded).reshape(n_slices, -1, self.maps.shape[2], n_x)
        return fftc(rows, dim=-1)

    def samples(self, kspace: torch.Tensor) -> torch.Tensor:
        """The measured samples of k-space ``(slices, coils, ky, kx)``, as :meth:`measure`
        lays them out (padding rows are zero)."""
        if not self.line_mask:
            return self._gather_samples(torch.fft.ifftshift(kspace, dim=_IMAGE_DIMS), self.sample_valid.unsqueeze(1))
        rows = self.sample_indices[:, None, :, None].expand(-1, kspace.shape[1], -1, kspace.shape[3])
        return kspace.gather(2, rows).permute(0, 2, 1, 3) * self.sample_valid[:, :, None, None]
