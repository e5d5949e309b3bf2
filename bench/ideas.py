"""The speed ideas of the speed issue, each measured against its alternative in one run.

Micro-benchmarks (median ms): hash-grid encoding as a precomputed sparse matrix vs.
gather + scatter-add; the line-mask normal operator vs. 2D FFTs, and the 2D-mask normal
operator in FFT order vs. centred FFTs; the exact column solve of the DC system vs. 20
CG iterations; CG eager vs. ``torch.compile``; the k-space loss with its l2 norms over
the real view vs. complex ``vector_norm``; the MLP in float32 vs. bfloat16; ESPIRiT's
pixel operators from a small grid vs. at full size. Whole reconstructions (seconds, PSNR at
R = 8): exact vs. CG data consistency, CG iterations with and without warm starts, fewer
CG iterations in the first training steps, and coil compression; and, on neighbouring
slices of the 3D Shepp-Logan phantom (the data hold one slice), slice n+1's training
started from slice n's trained weights vs. from the seeded initialisation.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import QUALITY_TOLERANCE_DB, base_parser, device_name, overrides, setup  # noqa: E402

from unrollinr.cg import conjugate_gradient  # noqa: E402
from unrollinr.column_solve import ColumnSolver  # noqa: E402
from unrollinr.config import ReconConfig  # noqa: E402
from unrollinr.data import load_kspace  # noqa: E402
from unrollinr.espirit import _image_space_kernels, _pixel_operators  # noqa: E402
from unrollinr.evaluate import reference_image  # noqa: E402
from unrollinr.fft import fft2c, ifft2c  # noqa: E402
from unrollinr.hashgrid import GridEncoding, interpolation_corners  # noqa: E402
from unrollinr.loss import normalized_l1_l2  # noqa: E402
from unrollinr.masks import radial_mask, random_line_mask  # noqa: E402
from unrollinr.metrics import psnr  # noqa: E402
from unrollinr.model import pixel_coordinates  # noqa: E402
from unrollinr.phantoms import multicoil_kspace, phantom_volume  # noqa: E402
from unrollinr.recon import prepare_maps, reconstruct_prepared, reconstruct_with_details  # noqa: E402
from unrollinr.sense import SenseOp  # noqa: E402


def median_ms(run, repeats: int = 15) -> float:
    for _ in range(3):
        run()
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        timings.append(time.perf_counter() - start)
    return statistics.median(timings) * 1e3


def gather_encoding(encoding: GridEncoding, coords: torch.Tensor):
    """The same encoding by gathering table rows and letting autograd scatter-add back."""
    corners = []
    for number, level in enumerate(encoding.levels):
        indices, weights = interpolation_corners(level, coords)
        corners.append((indices + encoding.offsets[number], weights))

    def run() -> torch.Tensor:
        features = [(encoding.table[i] * w.unsqueeze(-1)).sum(dim=1) for i, w in corners]
        return torch.cat(features, dim=1)

    return run


def encoding_rows(config: ReconConfig, shape: tuple[int, int]) -> list[str]:
    encoding = GridEncoding(config.grid_config(max(shape)))
    coords = pixel_coordinates(shape)
    gathered = gather_encoding(encoding, coords)
    sparse = median_ms(lambda: encoding(coords).sum().backward())
    dense = median_ms(lambda: gathered().sum().backward())
    return [f"| hash grid forward+backward | precomputed sparse matrix {sparse:.1f} ms | "
            f"gather + scatter-add {dense:.1f} ms | x{dense / sparse:.1f} |"]


def _centred_normal(op: SenseOp, x: torch.Tensor) -> torch.Tensor:
    """``E^H E x`` with centred 2D FFTs of every coil array (no shortcuts)."""
    return (op.maps.conj() * ifft2c(fft2c(op.maps * x.unsqueeze(1)) * op.mask.unsqueeze(1))).sum(dim=1)


def normal_rows(maps: np.ndarray, mask: np.ndarray, radial: np.ndarray) -> list[str]:
    op = SenseOp(torch.from_numpy(maps)[None], torch.from_numpy(mask)[None])
    x = torch.randn(op.image_shape, dtype=torch.complex64)
    fast, slow = median_ms(lambda: op.normal(x)), median_ms(lambda: _centred_normal(op, x))
    radial_op = SenseOp(torch.from_numpy(maps)[None], torch.from_numpy(radial)[None])
    fft_order, centred = median_ms(lambda: radial_op.normal(x)), median_ms(lambda: _centred_normal(radial_op, x))
    return [f"| SENSE normal operator (line mask) | sampled-row matrix products {fast:.2f} ms | "
            f"2D FFTs {slow:.2f} ms | x{slow / fast:.1f} |",
            f"| SENSE normal operator (radial mask) | 2D FFTs in FFT order, maps and mask stored shifted "
            f"{fft_order:.2f} ms | centred 2D FFTs of every coil array {centred:.2f} ms | x{centred / fft_order:.1f} |"]


def _cg_solve(op: SenseOp, rhs: torch.Tensor, config: ReconConfig) -> torch.Tensor:
    """``config.cg_iterations`` CG iterations on ``(E^H E + lam I) x = rhs`` ``(slices, y, x)``."""
    return conjugate_gradient(lambda x: op.normal(x) + config.lam * x, rhs, max_iterations=config.cg_iterations)


def dc_solve_rows(maps: np.ndarray, mask: np.ndarray, config: ReconConfig) -> list[str]:
    op = SenseOp(torch.from_numpy(maps)[None], torch.from_numpy(mask)[None])
    rhs = torch.randn(op.image_shape, dtype=torch.complex64)
    lam = torch.tensor([config.lam])
    start = time.perf_counter()
    solver = ColumnSolver(op)
    setup_ms = (time.perf_counter() - start) * 1e3
    exact = median_ms(lambda: solver.solve(rhs, lam))
    cg = median_ms(lambda: _cg_solve(op, rhs, config))
    return [f"| DC solve (line mask) | exact column solve {exact:.2f} ms (once per scan: {setup_ms:.0f} ms) | "
            f"{config.cg_iterations} CG iterations {cg:.2f} ms | x{cg / exact:.1f} |"]


def compile_rows(maps: np.ndarray, masks: dict[str, np.ndarray], config: ReconConfig) -> list[str]:
    """One CG solve of the DC system per mask, eager against ``torch.compile`` (the whole
    solve, operator included, traced for one shape; the compile time is reported apart)."""
    return [_compile_row(name, SenseOp(torch.from_numpy(maps)[None], torch.from_numpy(mask)[None]), config)
            for name, mask in masks.items()]


def _compile_row(name: str, op: SenseOp, config: ReconConfig) -> str:
    rhs = torch.randn(op.image_shape, dtype=torch.complex64)

    compiled = torch.compile(_cg_solve, dynamic=False)
    start = time.perf_counter()
    compiled(op, rhs, config)
    compile_seconds = time.perf_counter() - start
    eager, fused = median_ms(lambda: _cg_solve(op, rhs, config)), median_ms(lambda: compiled(op, rhs, config))
    return (f"| {config.cg_iterations} CG iterations ({name} mask) | eager {eager:.1f} ms | `torch.compile` "
            f"{fused:.1f} ms (compiling: {compile_seconds:.0f} s per shape) | x{eager / fused:.2f} |")


def _loss_with_complex_norms(predicted: torch.Tensor, measured: torch.Tensor) -> torch.Tensor:
    """:func:`normalized_l1_l2` with ``vector_norm`` taken on the complex values."""
    error, reference = (predicted - measured).flatten(start_dim=1), measured.flatten(start_dim=1)
    return (torch.linalg.vector_norm(error, dim=1) / torch.linalg.vector_norm(reference, dim=1)
            + error.abs().sum(dim=1) / reference.abs().sum(dim=1))


def loss_rows(kspace: np.ndarray, maps: np.ndarray, radial: np.ndarray) -> list[str]:
    op = SenseOp(torch.from_numpy(maps)[None], torch.from_numpy(radial)[None])
    samples = op.samples(torch.from_numpy((kspace * radial).astype(np.complex64))[None])
    x = torch.randn(op.image_shape, dtype=torch.complex64, requires_grad=True)
    kept = median_ms(lambda: normalized_l1_l2(op.measure(x), samples).sum().backward())
    complex_norms = median_ms(lambda: _loss_with_complex_norms(op.measure(x), samples).sum().backward())
    return [f"| k-space loss forward+backward (radial mask) | l2 norms over the real view {kept:.2f} ms | "
            f"complex `vector_norm` {complex_norms:.2f} ms | x{complex_norms / kept:.1f} |"]


def espirit_rows(shape: tuple[int, int], coils: int = 8, kernels: int = 55, width: int = 6) -> list[str]:
    generator = torch.Generator().manual_seed(0)
    kernel = torch.randn(kernels, coils, width, width, dtype=torch.complex64, generator=generator)

    def full() -> torch.Tensor:
        image_kernels = _image_space_kernels(kernel, shape)
        return torch.einsum("kcyx,kdyx->yxcd", image_kernels, image_kernels.conj())

    small, direct = median_ms(lambda: _pixel_operators(kernel, shape), 3), median_ms(full, 3)
    return [f"| ESPIRiT pixel operators ({kernels} kernels, {coils} coils) | from a {2 * width}^2 grid, "
            f"interpolated exactly {small:.0f} ms | at full size {direct:.0f} ms | x{direct / small:.1f} |"]


def mlp_rows(shape: tuple[int, int]) -> list[str]:
    mlp = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                              torch.nn.Linear(64, 2))
    features = torch.randn(shape[0] * shape[1], 32, requires_grad=True)

    def run(dtype: torch.dtype) -> None:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            out = mlp(features)
        out.float().sum().backward()

    fp32, bf16 = median_ms(lambda: run(torch.float32)), median_ms(lambda: run(torch.bfloat16))
    return [f"| MLP forward+backward | bfloat16 {bf16:.1f} ms | float32 {fp32:.1f} ms | x{fp32 / bf16:.1f} |"]


def reconstruction_rows(kspace: np.ndarray, mask: np.ndarray, config: ReconConfig) -> list[str]:
    reference = reference_image(kspace)
    measured = (kspace * mask).astype(np.complex64)
    variants = {
        "default (exact DC solves)": {},
        "CG DC: 5 CG in training (warm start), 20 at inference": {"dc_solver": "cg"},
        "CG DC: 20 CG in training, warm start": {"dc_solver": "cg", "cg_training_iterations": 20},
        "CG DC: 20 CG in training, cold start": {"dc_solver": "cg", "cg_training_iterations": 20,
                                                 "cg_warm_start": False},
        "CG DC: 10 CG in training, warm start": {"dc_solver": "cg", "cg_training_iterations": 10},
        "coil compression 8 -> 5": {"coil_compression": 5},
    }
    rows = []
    for name, change in variants.items():
        variant = dataclasses.replace(config, **change)
        start = time.perf_counter()
        image, result = reconstruct_with_details(measured, mask, config=variant, progress=False)
        seconds = time.perf_counter() - start
        rows.append(f"| {name} | {seconds:.1f} s, {seconds / max(result.iterations, 1) * 1e3:.0f} ms/it | "
                    f"PSNR {psnr(reference, image):.2f} dB | |")
    return rows


def _trained(data: np.ndarray, mask: np.ndarray, maps: np.ndarray, config: ReconConfig, truth: np.ndarray,
             initial: dict[str, torch.Tensor] | None) -> tuple[float, list[float], dict[str, torch.Tensor]]:
    """(final PSNR, PSNR after each iteration, trained weights) of one slice's training on
    ``(coils, ky, kx)`` data and maps with its ``(ky, kx)`` mask, against ``truth``."""
    trace: list[float] = []
    image, result = reconstruct_prepared(data[None], mask[None], maps[None], config, progress=False,
                                         callback=lambda _, x: trace.append(psnr(truth, x[0])),
                                         initial_parameters=initial)
    return psnr(truth, image[0]), trace, result.parameters


def warm_start_rows(config: ReconConfig, acceleration: float, slices: int = 5, size: int = 256,
                    coils: int = 8) -> list[str]:
    """Slice n+1 trained from slice n's weights (all of them, or the MLP and the loss
    weights without the hash tables) against a cold start, on neighbouring phantom slices:
    mean final PSNR, and the iterations each needs to come within 0.3 dB of the cold
    start's final PSNR."""
    images = phantom_volume(slices, size)
    kspace = multicoil_kspace(images, coils, seed=0)
    starts = {"cold": lambda _: None, "warm, all weights": lambda weights: weights,
              "warm, MLP and lambdas": lambda weights: {name: value for name, value in weights.items()
                                                       if ".encoding." not in name}}
    finals: dict[str, list[float]] = {name: [] for name in starts}
    reached: dict[str, list[str]] = {name: [] for name in starts}
    previous = None
    for s in range(slices):
        mask = random_line_mask((size, size), acceleration, seed=s)
        data, maps = prepare_maps((kspace[s] * mask).astype(np.complex64), mask, None, config)
        truth = np.abs(images[s])
        cold = _trained(data, mask, maps, config, truth, None)
        if previous is not None:
            target = cold[0] - QUALITY_TOLERANCE_DB
            for name, start in starts.items():
                final, trace, _ = cold if name == "cold" else _trained(data, mask, maps, config, truth,
                                                                       start(previous))
                finals[name].append(final)
                reached[name].append(next((str(i + 1) for i, value in enumerate(trace) if value >= target), "never"))
        previous = cold[2]
    return [f"| slice n+1 from slice n ({slices - 1} phantom slices {size}^2, {coils} coils): {name} | | "
            f"mean PSNR {statistics.mean(finals[name]):.2f} dB | iterations to within {QUALITY_TOLERANCE_DB} dB "
            f"of the cold start's final PSNR: {', '.join(reached[name])} |" for name in starts]


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--R", type=float, default=8)
    parser.add_argument("--no-reconstructions", action="store_true")
    args = parser.parse_args()
    setup(args)
    config = ReconConfig.from_strings(overrides(args))
    kspace = load_kspace(args.data)
    mask = random_line_mask(kspace.shape[1:], args.R, seed=0)
    _, maps = prepare_maps((kspace * mask).astype(np.complex64), mask, None, config)
    print(f"data {args.data.name} {kspace.shape}, R={args.R:g}, device {device_name(args.device)}")
    print("| idea | kept | alternative | effect |\n|---|---|---|---|")
    radial = radial_mask(mask.shape, args.R)
    rows = (encoding_rows(config, kspace.shape[1:]) + normal_rows(maps, mask, radial)
            + dc_solve_rows(maps, mask, config) + compile_rows(maps, {"line": mask, "radial": radial}, config)
            + loss_rows(kspace, maps, radial) + mlp_rows(kspace.shape[1:])
            + espirit_rows(kspace.shape[1:]))
    if not args.no_reconstructions:
        rows += reconstruction_rows(kspace, mask, config) + warm_start_rows(config, args.R)
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
