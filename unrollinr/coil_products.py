"""Coil images from set images and back, each set of maps only where it is non-zero.

ESPIRiT's second set of maps (soft SENSE) is non-zero only where one sensitivity vector
does not explain the data: nowhere for most objects well inside the field of view, a few
percent of the image for others. Multiplying every pixel of every set would spend half
of the work of ``C x`` and ``C^H c`` on zeros. Here each set's maps are applied on the
bounding box of their support in each slice, and a set with no support is skipped.
Outside the boxes the maps are zero, so the results are those of the full products.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

Box = tuple[slice, slice]  # (y range, x range)


class CoilProducts(nn.Module):
    """``C x`` and ``C^H c`` for maps laid out ``(slices, sets, *coil_layout)``.

    Parameters
    ----------
    maps
        ``(slices, sets, ...)``: each set's maps in the layout of the coil images, e.g.
        ``(slices, sets, y, coils, x)`` for coil images ``(slices, y, coils, x)``.
    coil_axis, y_axis, x_axis
        Where the coils, ``y`` and ``x`` are in the coil images' layout (``maps[:, s]``).

    The boxes are each slice's own, and each slice is computed on its own, so that a slice
    gets the same numbers in a batch as alone (vectorised loops round the last elements of
    a row differently when the row's length changes). Both products are autograd functions
    whose backward pass is the other one (its adjoint).
    """

    maps: torch.Tensor
    maps_conj: torch.Tensor

    def __init__(self, maps: torch.Tensor, *, coil_axis: int, y_axis: int, x_axis: int) -> None:
        super().__init__()
        self.register_buffer("maps", maps.contiguous())
        self.register_buffer("maps_conj", maps.conj().resolve_conj().contiguous())
        # axes within one slice's coil images
        self.coil_axis, self.y_axis, self.x_axis = coil_axis - 1, y_axis - 1, x_axis - 1
        self.boxes = [_support_boxes(slice_maps, self.y_axis, self.x_axis) for slice_maps in maps]
        self.whole: Box = (slice(0, maps.shape[y_axis + 1]), slice(0, maps.shape[x_axis + 1]))
        # every set of every slice spans the whole image: C^H c writes every pixel
        self.covered = all(len(boxes) == maps.shape[1] and all(box == self.whole for _, box in boxes)
                           for boxes in self.boxes)

    def _box_index(self, box: Box) -> tuple[slice, ...]:
        """The index of ``box`` in one slice's coil images."""
        index = [slice(None)] * (self.maps.ndim - 2)
        index[self.y_axis], index[self.x_axis] = box
        return tuple(index)

    def expand(self, images: torch.Tensor) -> torch.Tensor:
        """``C x``: set images ``(slices, sets, y, x)`` to coil images in the maps' layout."""
        return _Product.apply(images, self, False)

    def contract(self, coil_images: torch.Tensor) -> torch.Tensor:
        """``C^H c``: coil images in the maps' layout to set images ``(slices, sets, y, x)``."""
        return _Product.apply(coil_images, self, True)

    def _expand(self, images: torch.Tensor) -> torch.Tensor:
        coil_images = self.maps.new_empty(self.maps[:, 0].shape, dtype=torch.promote_types(self.maps.dtype,
                                                                                              images.dtype))
        for slice_index, boxes in enumerate(self.boxes):
            target = coil_images[slice_index]
            if not boxes:
                target.zero_()
            elif boxes[0][1] != self.whole:
                self._zero_outside(target, boxes[0][1])
            for number, (set_index, box) in enumerate(boxes):
                index = self._box_index(box)
                maps = self.maps[slice_index, set_index][index]
                image = images[slice_index, set_index][box].unsqueeze(self.coil_axis)
                if number == 0:  # written, not added: one pass over the coil images fewer
                    torch.mul(maps, image, out=target[index])
                else:
                    target[index].addcmul_(maps, image)
        return coil_images

    def _zero_outside(self, coil_images: torch.Tensor, box: Box) -> None:
        """Zero one slice's ``coil_images`` outside ``box``: the frame round the box (rows
        above and below it, then the columns beside it), not the box that is written next."""
        rows, columns = box
        n_y, n_x = self.whole[0].stop, self.whole[1].stop
        for frame in ((slice(0, rows.start), slice(0, n_x)), (slice(rows.stop, n_y), slice(0, n_x)),
                      (rows, slice(0, columns.start)), (rows, slice(columns.stop, n_x))):
            coil_images[self._box_index(frame)].zero_()

    def _contract(self, coil_images: torch.Tensor) -> torch.Tensor:
        n_slices, n_sets = self.maps.shape[:2]
        n_y, n_x = self.maps.shape[self.y_axis + 2], self.maps.shape[self.x_axis + 2]
        shape = (n_slices, n_sets, n_y, n_x)
        images = coil_images.new_empty(shape) if self.covered else coil_images.new_zeros(shape)
        for slice_index, boxes in enumerate(self.boxes):
            for set_index, box in boxes:
                index = self._box_index(box)
                _sum_of_products(self.maps_conj[slice_index, set_index][index], coil_images[slice_index][index],
                                 self.coil_axis, out=images[slice_index, set_index][box])
        return images


def _sum_of_products(first: torch.Tensor, second: torch.Tensor, axis: int, *, out: torch.Tensor) -> None:
    """``out = (first * second).sum(axis)``. Where ``axis`` leads, each of its planes is
    contiguous, and the products are added into ``out`` one plane at a time, without
    storing them all (for 4 coils at 256 x 256 pixels, 0.12 against 0.20 ms); elsewhere as
    one product and one sum, fewer and larger operations."""
    if axis != 0:
        torch.sum(first * second, dim=axis, out=out)
        return
    torch.mul(first[0], second[0], out=out)
    for plane in range(1, first.shape[0]):
        out.addcmul_(first[plane], second[plane])


def _support_boxes(maps: torch.Tensor, y_axis: int, x_axis: int) -> list[tuple[int, Box]]:
    """``(set, (y range, x range))`` for each set of one slice's maps ``(sets, ...)`` that is
    non-zero somewhere: the bounding box of where it is."""
    boxes = []
    for set_index, set_maps in enumerate(maps):
        nonzero = set_maps != 0
        rows = torch.nonzero(nonzero.any(dim=tuple(d for d in range(nonzero.ndim) if d != y_axis))).flatten()
        if rows.numel() == 0:
            continue
        columns = torch.nonzero(nonzero.any(dim=tuple(d for d in range(nonzero.ndim) if d != x_axis))).flatten()
        boxes.append((set_index, (slice(int(rows[0]), int(rows[-1]) + 1),
                                  slice(int(columns[0]), int(columns[-1]) + 1))))
    return boxes


class _Product(torch.autograd.Function):
    """``C x`` (``adjoint`` False) or ``C^H c``; the backward pass is the other product."""

    @staticmethod
    def forward(ctx: Any, values: torch.Tensor, products: CoilProducts,  # type: ignore[override]
                adjoint: bool) -> torch.Tensor:
        ctx.products, ctx.adjoint = products, adjoint
        return products._contract(values) if adjoint else products._expand(values)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        products = ctx.products
        return (products._expand(grad) if ctx.adjoint else products._contract(grad)), None, None
