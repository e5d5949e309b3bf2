"""Multiresolution grid encodings (Instant-NGP) following tiny-cuda-nn's rules exactly.

One config dict, in tiny-cuda-nn's own format, drives both implementations::

    {"otype": "HashGrid", "n_levels": 16, "n_features_per_level": 2,
     "log2_hashmap_size": 14, "base_resolution": 16, "per_level_scale": 1.2}

The rules (tiny-cuda-nn ``encodings/grid.h``):

- level ``l`` has ``scale = base_resolution * per_level_scale**l - 1`` and
  ``resolution = ceil(scale) + 1``;
- a coordinate ``u`` in [0, 1] maps to ``p = u * scale + 0.5``; the cell is ``floor(p)``
  and the bilinear weights use ``p - floor(p)``;
- a level holds ``min(next_multiple(resolution**2, 8), 2**log2_hashmap_size)`` entries
  (``DenseGrid`` never caps); it is indexed densely, ``x + y * resolution``, when
  ``resolution**2`` fits, otherwise by ``(x * 1) ^ (y * 2654435761)`` in uint32; either
  index is taken modulo the level's size;
- tables start uniform in [-1e-4, 1e-4].

The pure-PyTorch :class:`GridEncoding` is the default (and the only choice on the CPU).
For a fixed set of coordinates, as in image reconstruction, it precomputes the sparse
interpolation matrix once, so each forward and backward pass is one sparse product. The
matrices depend only on the grid's geometry and the coordinates, so encodings that share
both (the slices of a batch, a slice's retries, the slices of an exam) share them: the
last :data:`PLAN_CACHE_SIZE` are kept (about 70 MB each at 256 x 256 pixels, 16 levels).
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from unrollinr.config import ENCODING_BACKENDS

logger = logging.getLogger(__name__)

_HASH_PRIME_Y = 2654435761
_UINT32 = 1 << 32
_INIT_RANGE = 1e-4
GRID_TYPES = ("HashGrid", "DenseGrid")
PLAN_CACHE_SIZE = 2
_plans: OrderedDict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
_plans_lock = threading.Lock()


@dataclass(frozen=True)
class GridLevel:
    """Geometry of one level: its ``scale``, ``resolution`` and table ``size`` (entries)."""

    scale: float
    resolution: int
    size: int

    @property
    def dense(self) -> bool:
        """Whether the level is indexed densely rather than hashed."""
        return self.resolution**2 <= self.size


def _next_multiple(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def grid_levels(config: dict[str, Any]) -> list[GridLevel]:
    """The levels that a tiny-cuda-nn grid config describes (2D inputs)."""
    otype = config.get("otype", "HashGrid")
    if otype not in GRID_TYPES:
        raise ValueError(f"unsupported encoding otype {otype!r}; expected one of {GRID_TYPES}")
    log2_scale = math.log2(float(config.get("per_level_scale", 2.0)))
    base = int(config.get("base_resolution", 16))
    max_size = 1 << int(config.get("log2_hashmap_size", 19))
    levels = []
    for level in range(int(config.get("n_levels", 16))):
        # the power in float64, rounded to float32 for the rest (tiny-cuda-nn takes log2f and
        # exp2f in float32: an ulp apart, which can move a level's ceil; see bench/HISTORY.md)
        scale = float(torch.tensor(2.0 ** (level * log2_scale), dtype=torch.float32) * base - 1.0)
        resolution = math.ceil(scale) + 1
        size = _next_multiple(resolution**2, 8)
        if otype == "HashGrid":
            size = min(size, max_size)
        levels.append(GridLevel(scale=scale, resolution=resolution, size=size))
    return levels


def grid_index(level: GridLevel, cell: torch.Tensor) -> torch.Tensor:
    """Table index of integer grid points ``cell`` ``(..., 2)`` (x, y) within one level."""
    cell = cell.to(torch.int64) % _UINT32
    x, y = cell[..., 0], cell[..., 1]
    if level.dense:
        index = x + y * level.resolution
    else:
        index = (x ^ ((y * _HASH_PRIME_Y) % _UINT32))
    return index % level.size


def interpolation_corners(level: GridLevel, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The four corners of each coordinate's cell, as table indices and bilinear weights.

    Parameters
    ----------
    coords
        ``(points, 2)`` float coordinates ``(x, y)`` in [0, 1].

    Returns
    -------
    ``indices`` int64 ``(points, 4)`` and ``weights`` ``(points, 4)``, corners ordered
    ``(0,0), (1,0), (0,1), (1,1)`` in ``(x, y)``.
    """
    position = coords.to(torch.float32) * level.scale + 0.5
    cell = torch.floor(position)
    fraction = position - cell
    cell = cell.to(torch.int64)
    indices, weights = [], []
    for corner in range(4):
        offset = torch.tensor([corner & 1, (corner >> 1) & 1], dtype=torch.int64, device=coords.device)
        corner_weight = torch.where(offset.bool(), fraction, 1 - fraction).prod(dim=-1)
        indices.append(grid_index(level, cell + offset))
        weights.append(corner_weight)
    return torch.stack(indices, dim=-1), torch.stack(weights, dim=-1)


def _index_dtype(*sizes: int) -> torch.dtype:
    """32-bit sparse indices where they fit: the sparse products are bound by reading the
    indices, and halving them halves that (measured x1.8 forward and backward at
    256 x 256 pixels, 16 levels)."""
    return torch.int32 if max(sizes) < 2**31 else torch.int64


def _sparse_csr(crow: torch.Tensor, columns: torch.Tensor, values: torch.Tensor,
                shape: tuple[int, int]) -> torch.Tensor:
    dtype = _index_dtype(*shape, values.numel())
    with warnings.catch_warnings():  # "CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow.to(dtype), columns.to(dtype), values, shape)


class _SparseProduct(torch.autograd.Function):
    """``matrix @ table`` with a precomputed transpose for the backward pass."""

    @staticmethod
    def forward(ctx, table, matrix, matrix_t):  # type: ignore[override]
        ctx.matrix_t = matrix_t
        return matrix @ table

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        return ctx.matrix_t @ grad_out.contiguous(), None, None


class GridEncoding(nn.Module):
    """Pure-PyTorch multiresolution hash (or dense) grid encoding for 2D coordinates.

    ``forward(coords)`` maps ``(points, 2)`` coordinates in [0, 1] to features
    ``(points, n_levels * n_features_per_level)``, level-major as in tiny-cuda-nn.
    """

    def __init__(self, config: dict[str, Any], *, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.config = dict(config)
        self.levels = grid_levels(config)
        self.n_features_per_level = int(config.get("n_features_per_level", 2))
        offsets = [0]
        for level in self.levels:
            offsets.append(offsets[-1] + level.size)
        self.offsets = offsets
        table = torch.empty(offsets[-1], self.n_features_per_level)
        table.uniform_(-_INIT_RANGE, _INIT_RANGE, generator=generator)
        self.table = nn.Parameter(table)
        self._plan_key: tuple[Any, ...] | None = None
        self._plan: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def n_output_dims(self) -> int:
        """Number of output features."""
        return len(self.levels) * self.n_features_per_level

    def interpolation_matrices(self, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The sparse ``(points * n_levels, table_entries)`` CSR matrix whose rows hold the
        bilinear weights of one point at one level (corners that share a table entry are
        summed), and its transpose, also in CSR, built on the table's device."""
        n_points, n_levels = coords.shape[0], len(self.levels)
        device = self.table.device
        coords = coords.detach().to(device)
        columns, weights = [], []
        for level_number, level in enumerate(self.levels):
            indices, corner_weights = interpolation_corners(level, coords)
            columns.append(indices + self.offsets[level_number])
            weights.append(corner_weights)
        # (points, levels, 4) flattened: row point * n_levels + level, its four corners in a row
        columns_by_row, order = torch.stack(columns, dim=1).reshape(-1, 4).sort(dim=1)
        weights_by_row = torch.stack(weights, dim=1).reshape(-1, 4).gather(1, order)
        # Merge corners that hash to the same entry: keep the first of each run, add the rest to it.
        first = torch.ones_like(columns_by_row, dtype=torch.bool)
        first[:, 1:] = columns_by_row[:, 1:] != columns_by_row[:, :-1]
        group = first.reshape(-1).cumsum(0) - 1
        values = weights_by_row.new_zeros(int(group[-1]) + 1)
        values.index_add_(0, group, weights_by_row.reshape(-1))
        entries = columns_by_row.reshape(-1)[first.reshape(-1)]
        entries_per_row = first.sum(dim=1)
        row_ends = entries_per_row.cumsum(0)
        n_rows, n_entries = n_points * n_levels, self.offsets[-1]
        crow = torch.cat([row_ends.new_zeros(1), row_ends])
        matrix = _sparse_csr(crow, entries, values, (n_rows, n_entries))
        # The transpose: entries by column; the sort is stable, so rows stay ascending (on
        # 32-bit keys where the columns fit: the same order, 40% sooner for 4M entries).
        by_column = torch.sort(entries.to(_index_dtype(n_entries)), stable=True).indices
        rows = torch.repeat_interleave(torch.arange(n_rows, device=device), entries_per_row)
        column_ends = torch.bincount(entries, minlength=n_entries).cumsum(0)
        crow_t = torch.cat([column_ends.new_zeros(1), column_ends])
        matrix_t = _sparse_csr(crow_t, rows[by_column], values[by_column], (n_entries, n_rows))
        return matrix, matrix_t

    def _interpolation_plan(self, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (coords.data_ptr(), tuple(coords.shape), coords.device, coords._version)
        if self._plan is None or key != self._plan_key:
            self._plan = self._shared_plan(coords)
            self._plan_key = key
        return self._plan

    def _shared_plan(self, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`interpolation_matrices` of ``coords``, from the cache of recent plans when
        an encoding of the same geometry has built them for the same coordinates."""
        content = hashlib.blake2b(coords.detach().cpu().numpy().tobytes(), digest_size=16).hexdigest()
        key = (tuple(self.levels), tuple(coords.shape), str(self.table.device), content)
        with _plans_lock:
            plan = _plans.get(key)
            if plan is not None:
                _plans.move_to_end(key)
                return plan
        plan = self.interpolation_matrices(coords)
        with _plans_lock:
            _plans[key] = plan
            while len(_plans) > PLAN_CACHE_SIZE:
                _plans.popitem(last=False)
        return plan

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        """Encode ``(points, 2)`` coordinates in [0, 1] to ``(points, n_output_dims)``."""
        matrix, matrix_t = self._interpolation_plan(coords)
        features = _SparseProduct.apply(self.table, matrix, matrix_t)
        return features.reshape(coords.shape[0], self.n_output_dims)


class TcnnGridEncoding(nn.Module):
    """tiny-cuda-nn's fused CUDA grid encoding behind the same interface (fp16 output cast to float)."""

    def __init__(self, config: dict[str, Any], *, seed: int = 0) -> None:
        super().__init__()
        import tinycudann as tcnn

        self.config = dict(config)
        self.encoding = tcnn.Encoding(n_input_dims=2, encoding_config=self.config, seed=seed)

    @property
    def n_output_dims(self) -> int:
        """Number of output features."""
        return int(self.encoding.n_output_dims)

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        """Encode ``(points, 2)`` coordinates in [0, 1] to ``(points, n_output_dims)``."""
        return self.encoding(coords).float()


def tcnn_available() -> bool:
    """Whether the optional ``tinycudann`` extension imports."""
    try:
        import tinycudann  # noqa: F401
    except ImportError:
        return False
    return True


def grid_backend(backend: str, device: torch.device) -> str:
    """The grid implementation a reconstruction will use: ``"torch"`` or ``"tcnn"``.

    ``"auto"`` takes tiny-cuda-nn on CUDA where it imports, else PyTorch; ``"tcnn"``
    without CUDA or without the extension is a ``ValueError``.
    """
    if backend not in ENCODING_BACKENDS:
        raise ValueError(f"backend must be one of {ENCODING_BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "tcnn" if device.type == "cuda" and tcnn_available() else "torch"
    if backend == "tcnn":
        if device.type != "cuda":
            raise ValueError("the tcnn encoding backend needs a CUDA device")
        if not tcnn_available():
            raise ValueError("the tcnn encoding backend needs tinycudann, which does not import here")
    return backend


def make_grid_encoding(config: dict[str, Any], device: torch.device, *, seed: int = 0,
                       backend: str = "auto") -> GridEncoding | TcnnGridEncoding:
    """The grid encoding for ``config`` on the backend :func:`grid_backend` picks."""
    chosen = grid_backend(backend, device)
    if backend == "auto":
        logger.info("grid encoding backend: %s (auto)", chosen)
    if chosen == "tcnn":
        return TcnnGridEncoding(config, seed=seed).to(device)
    generator = torch.Generator().manual_seed(seed)
    return GridEncoding(config, generator=generator).to(device)
