"""Sampling masks on the Cartesian grid for retrospective undersampling.

Every mask is a boolean ``(ky, kx)`` array with a fully sampled centre (the ACS region),
so that ESPIRiT can estimate coil maps from the data themselves.
"""

from __future__ import annotations

import numpy as np

# Table I of the paper: ACS lines at 368 phase-encode lines, per acceleration.
PAPER_ACS_LINES_AT_368 = {6: 18, 8: 16, 10: 12}
# ESPIRiT needs a calibration window wider than its kernel: never scale below this.
MIN_ACS_LINES = 8
MASK_KINDS = ("random", "uniform", "radial", "spiral", "variable-density")


def paper_acs_lines(acceleration: float, n_ky: int) -> int:
    """ACS lines for ``acceleration`` following Table I, scaled from 368 to ``n_ky`` lines.

    Accelerations between the table's entries are interpolated linearly; small matrices
    get at least :data:`MIN_ACS_LINES` lines.
    """
    table = sorted(PAPER_ACS_LINES_AT_368.items())
    rates = [r for r, _ in table]
    lines_368 = float(np.interp(acceleration, rates, [a for _, a in table]))
    return max(MIN_ACS_LINES, round(lines_368 * n_ky / 368))


def centre_range(n: int, width: int) -> slice:
    """``width`` of ``n`` samples about the centre sample ``n // 2`` (the centred FFT's DC)."""
    start = n // 2 - width // 2
    return slice(start, start + width)


def random_line_mask(shape: tuple[int, int], acceleration: float, acs_lines: int | None = None,
                     *, seed: int = 0) -> np.ndarray:
    """Whole ``ky`` lines: a centred ACS block plus uniformly random lines, ``round(ky / R)`` in all."""
    n_y, n_x = shape
    acs_lines = paper_acs_lines(acceleration, n_y) if acs_lines is None else acs_lines
    total = max(round(n_y / acceleration), acs_lines)
    rows = np.zeros(n_y, dtype=bool)
    rows[centre_range(n_y, acs_lines)] = True
    outside = np.flatnonzero(~rows)
    rng = np.random.default_rng(seed)
    rows[rng.choice(outside, size=total - acs_lines, replace=False)] = True
    return np.repeat(rows[:, None], n_x, axis=1)


def uniform_line_mask(shape: tuple[int, int], acceleration: int, acs_lines: int | None = None) -> np.ndarray:
    """Equispaced ``ky`` lines (every ``R``-th, through the centre) plus a centred ACS block."""
    n_y, n_x = shape
    acs_lines = paper_acs_lines(acceleration, n_y) if acs_lines is None else acs_lines
    rows = np.zeros(n_y, dtype=bool)
    rows[n_y // 2 % acceleration::acceleration] = True
    rows[centre_range(n_y, acs_lines)] = True
    return np.repeat(rows[:, None], n_x, axis=1)


def _with_acs_square(mask: np.ndarray, acs: int) -> np.ndarray:
    mask[centre_range(mask.shape[0], acs), centre_range(mask.shape[1], acs)] = True
    return mask


def _rasterise(points_y: np.ndarray, points_x: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    iy = np.round(points_y + shape[0] // 2).astype(int)
    ix = np.round(points_x + shape[1] // 2).astype(int)
    keep = (iy >= 0) & (iy < shape[0]) & (ix >= 0) & (ix < shape[1])
    mask[iy[keep], ix[keep]] = True
    return mask


def _radial(shape: tuple[int, int], n_spokes: int) -> np.ndarray:
    radius = np.arange(-max(shape), max(shape), 0.5) / 2
    angles = np.arange(n_spokes) * np.pi / n_spokes
    ys = np.outer(np.sin(angles), radius).ravel()
    xs = np.outer(np.cos(angles), radius).ravel()
    return _rasterise(ys, xs, shape)


def _spiral(shape: tuple[int, int], total_turns: int, interleaves: int = 8) -> np.ndarray:
    """``interleaves`` Archimedean arms sharing ``total_turns`` turns between them."""
    max_radius = max(shape) / 2 * np.sqrt(2)
    turns = total_turns / interleaves
    theta = np.linspace(0, 2 * np.pi * turns, int(8 * max_radius * max(turns, 1) * 2 * np.pi))
    radius = max_radius * theta / theta[-1]
    ys, xs = [], []
    for arm in range(interleaves):
        phase = theta + 2 * np.pi * arm / interleaves
        ys.append(radius * np.sin(phase))
        xs.append(radius * np.cos(phase))
    return _rasterise(np.concatenate(ys), np.concatenate(xs), shape)


def _closest_count(build, target_fraction: float, upper: int) -> np.ndarray:
    """Build masks with 1..upper spokes/arms; return the one closest to the sampling fraction."""
    lo, hi = 1, upper
    while lo < hi:
        mid = (lo + hi) // 2
        if build(mid).mean() < target_fraction:
            lo = mid + 1
        else:
            hi = mid
    candidates = [build(n) for n in {max(lo - 1, 1), lo}]
    return min(candidates, key=lambda m: abs(m.mean() - target_fraction))


def radial_mask(shape: tuple[int, int], acceleration: float, acs: int = 16) -> np.ndarray:
    """Radial spokes through the centre, rasterised to the grid, with a centred ACS square."""
    target = 1 / acceleration
    return _closest_count(lambda n: _with_acs_square(_radial(shape, n), acs), target, 4 * max(shape))


def spiral_mask(shape: tuple[int, int], acceleration: float = 10, acs: int = 16) -> np.ndarray:
    """Eight Archimedean spiral interleaves rasterised to the grid, with a centred ACS square."""
    target = 1 / acceleration
    return _closest_count(lambda n: _with_acs_square(_spiral(shape, n), acs), target, max(shape))


def variable_density_mask(shape: tuple[int, int], acceleration: float, acs: int = 24, *, seed: int = 0,
                          power: float = 2.0) -> np.ndarray:
    """2D variable-density random samples: a centred ``acs x acs`` square, and each other
    point drawn with probability falling as ``(1 - r)^power`` with its distance ``r``
    from the centre (1 at the corners), scaled so that ``1 / acceleration`` of the points
    are sampled."""
    n_y, n_x = shape
    mask = _with_acs_square(np.zeros(shape, dtype=bool), acs)
    y, x = np.meshgrid(np.linspace(-1, 1, n_y), np.linspace(-1, 1, n_x), indexing="ij")
    density = (1 - np.sqrt((y**2 + x**2) / 2)) ** power
    wanted = max(round(mask.size / acceleration) - int(mask.sum()), 0)
    free = ~mask
    rng = np.random.default_rng(seed)
    chosen = rng.choice(np.flatnonzero(free), size=min(wanted, int(free.sum())), replace=False,
                        p=density[free] / density[free].sum())
    mask.flat[chosen] = True
    return mask


def make_mask(kind: str, shape: tuple[int, int], acceleration: float, *, seed: int = 0) -> np.ndarray:
    """A mask by name: ``random``, ``uniform``, ``radial``, ``spiral`` or ``variable-density``."""
    if kind == "random":
        return random_line_mask(shape, acceleration, seed=seed)
    if kind == "uniform":
        return uniform_line_mask(shape, int(round(acceleration)))
    if kind == "radial":
        return radial_mask(shape, acceleration)
    if kind == "spiral":
        return spiral_mask(shape, acceleration)
    if kind == "variable-density":
        return variable_density_mask(shape, acceleration, seed=seed)
    raise ValueError(f"unknown mask kind {kind!r}; expected one of {MASK_KINDS}")


def acceleration_of(mask: np.ndarray) -> float:
    """The achieved acceleration ``1 / sampled fraction``."""
    return float(mask.size / max(int(np.count_nonzero(mask)), 1))
