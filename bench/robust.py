"""Robustness benchmark: UnrollINR against the classic methods on every fully sampled set
and on realistic variants of each, where a scan differs from one clean slice.

Variants of each set (``--data``, default: every ``.npz`` in ``../shared/data``):

- ``as-is`` at R = 4, 8 and 12 (random lines);
- ``cut-readout``: the central half of x, an object cut at both readout edges (what
  readout-oversampling removal gives when the head is wider than the field of view), R 8;
- ``small-fov``: the central half of x and y, cut at every edge, R 6;
- ``pe-wrap``: every other phase-encode line, half the PE field of view, so that the
  object wraps, R 4;
- ``low-snr``: complex Gaussian noise added to the k-space, to an object SNR of about 15
  (the reference is the noisy, fully sampled data), R 8;
- ``vd-2d``: a 2D variable-density random mask with a 24 x 24 centre, R 8;
- ``4-coils``: SVD coil compression of the fully sampled data to 4 coils, R 8;
- ``uniform``: equispaced lines (every R-th, through the centre) and the ACS block, R 3
  and 4: the GRAPPA-style pattern of most clinical scans, whose aliasing is coherent;
- ``partial-fourier``: random lines at R 3 over the last 6/8 of the phase-encode lines,
  none in the first 2/8 (R about 4 in all);
- ``low-res``: the central 80% of ky and of kx, a scan at a lower matrix (77 x 77 of 96 x
  96: odd sizes), R 4;
- ``pe-turned``: readout and phase encoding swapped, the lines along the other axis of the
  object (a scan prescribed with the phase encoding turned), R 8.

Accelerations are capped at 12 x (phase-encode lines / 256) (4 at 96 lines), and every
line mask keeps at least 10 ACS lines (Table I's ACS, scaled); the ``R`` column gives
the nominal rate (its line mask's, before partial Fourier). Each case compares
zero-filled, CG-SENSE (10 iterations, our maps) and, when ``bart`` is installed, BART
L1-ESPIRiT with 1 and with 2 sets of maps, oracle-tuned over lambda and the ESPIRiT
crop, with UnrollINR's default configuration. A case's margin is UnrollINR's PSNR minus
that of the best classic method. Wall times: UnrollINR's reconstruction (maps included),
and BART's ``ecalib`` + ``pics`` at its best setting, run once more.

The reference, the root-sum-of-squares of the fully sampled coils, has the noise floor in
its background. The object margin scores the object alone (:func:`unrollinr.metrics.object_support`):
UnrollINR's PSNR there minus the best classic method's there (BART tuned on it too). The
line before the last gives its worst and median. The last line is machine-readable:

    worst_margin_db=<x> median_margin_db=<y> cases=<n> below_zero_filled=<k> below_cg_sense=<m>
"""

from __future__ import annotations

import dataclasses
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DEFAULT_DATA, base_parser, device_name, overrides, setup  # noqa: E402

from unrollinr import baselines  # noqa: E402
from unrollinr.coils import apply_coil_matrix, coil_compression_matrix  # noqa: E402
from unrollinr.config import ReconConfig  # noqa: E402
from unrollinr.data import load_kspace  # noqa: E402
from unrollinr.masks import (  # noqa: E402
    paper_acs_lines,
    random_line_mask,
    uniform_line_mask,
    variable_density_mask,
)
from unrollinr.metrics import object_support, psnr, ssim  # noqa: E402
from unrollinr.recon import prepare_maps, reconstruct_with_details  # noqa: E402
from unrollinr.variants import (  # noqa: E402
    cut_readout,
    lower_resolution,
    pe_wrap,
    phase_encoding_turned,
    small_fov,
)

MIN_ACS = 10
PARTIAL_FOURIER = 6 / 8
OBJECT_SNR = 15.0
BART_LAMBDAS = (0.001, 0.003, 0.01)
BART_CROPS = (0.8, 0.5)


@dataclass
class Case:
    """One variant of one data set: the fully sampled k-space and its mask."""

    data: str
    name: str
    acceleration: float
    kspace: np.ndarray
    mask: np.ndarray


def low_snr(kspace: np.ndarray, seed: int = 0) -> np.ndarray:
    """Complex Gaussian noise so that the object's mean RSS magnitude is ``OBJECT_SNR`` times
    the noise level of the RSS image."""
    reference = baselines.kspace_rss(kspace)
    level = reference[reference > 0.1 * reference.max()].mean() / OBJECT_SNR / np.sqrt(kspace.shape[0])
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(kspace.shape) + 1j * rng.standard_normal(kspace.shape)
    return (kspace + level / np.sqrt(2) * noise).astype(np.complex64)


def four_coils(kspace: np.ndarray) -> np.ndarray:
    """SVD coil compression to 4 virtual coils (unchanged with 4 or fewer)."""
    if kspace.shape[0] <= 4:
        return kspace
    return apply_coil_matrix(coil_compression_matrix(kspace, 4), kspace)


def max_acceleration(n_y: int) -> float:
    """The largest R a set of ``n_y`` phase-encode lines is run at."""
    return float(max(3, int(12 * n_y / 256)))


def _acs_lines(acceleration: float, n_y: int) -> int:
    return max(MIN_ACS, paper_acs_lines(acceleration, n_y))


def line_mask(shape: tuple[int, int], acceleration: float, seed: int) -> np.ndarray:
    return random_line_mask(shape, acceleration, acs_lines=_acs_lines(acceleration, shape[0]), seed=seed)


def partial_fourier_mask(shape: tuple[int, int], acceleration: float, seed: int) -> np.ndarray:
    """:func:`line_mask` without its lines in the first ``1 - PARTIAL_FOURIER`` of ky."""
    mask = line_mask(shape, acceleration, seed)
    mask[:shape[0] - round(PARTIAL_FOURIER * shape[0])] = False
    return mask


def make_case_mask(kind: str, shape: tuple[int, int], acceleration: float, seed: int) -> np.ndarray:
    """The ``(ky, kx)`` mask of a variant's ``kind``: ``lines``, ``uniform``,
    ``partial-fourier`` or ``2d``."""
    if kind == "lines":
        return line_mask(shape, acceleration, seed)
    if kind == "uniform":
        return uniform_line_mask(shape, int(acceleration), acs_lines=_acs_lines(acceleration, shape[0]))
    if kind == "partial-fourier":
        return partial_fourier_mask(shape, acceleration, seed)
    return variable_density_mask(shape, acceleration, acs=min(24, shape[0] // 4), seed=seed)


VARIANTS: list[tuple[str, Callable[[np.ndarray], np.ndarray], float, str]] = [
    ("as-is", lambda k: k, 4, "lines"),
    ("as-is", lambda k: k, 8, "lines"),
    ("as-is", lambda k: k, 12, "lines"),
    ("cut-readout", cut_readout, 8, "lines"),
    ("small-fov", small_fov, 6, "lines"),
    ("pe-wrap", pe_wrap, 4, "lines"),
    ("low-snr", low_snr, 8, "lines"),
    ("vd-2d", lambda k: k, 8, "2d"),
    ("4-coils", four_coils, 8, "lines"),
    ("uniform", lambda k: k, 3, "uniform"),
    ("uniform", lambda k: k, 4, "uniform"),
    ("partial-fourier", lambda k: k, 3, "partial-fourier"),
    ("low-res", lower_resolution, 4, "lines"),
    ("pe-turned", phase_encoding_turned, 8, "lines"),
]


def cases(path: Path, names: set[str] | None, seed: int) -> list[Case]:
    full = load_kspace(path)
    found: dict[tuple[str, float], Case] = {}
    for name, make, acceleration, kind in VARIANTS:
        if names and name not in names:
            continue
        kspace = make(full)
        rate = min(acceleration, max_acceleration(kspace.shape[1]))
        if (name, rate) in found:  # a capped R repeats a case
            continue
        found[name, rate] = Case(path.stem, name, rate, kspace, make_case_mask(kind, kspace.shape[1:], rate, seed))
    return list(found.values())


def _timed(run: Callable[[], np.ndarray]) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    image = run()
    return image, time.perf_counter() - start


def _bart_maps(measured: np.ndarray, crop: float, kernel: int, sets: int) -> np.ndarray | None:
    """BART's ESPIRiT maps, or ``None`` where ``ecalib`` fails (a crash is run again on one
    thread first: :func:`unrollinr.baselines.run_bart`)."""
    try:
        return baselines.bart_maps(measured, crop=crop, kernel_width=kernel, sets=sets)
    except subprocess.CalledProcessError as error:
        print(f"BART ecalib -m{sets} -c {crop} failed: {error}", file=sys.stderr)
        return None


@dataclass
class Score:
    """A method's PSNR and SSIM on the whole image (SSIM 0: not computed) and its PSNR on
    the object alone."""

    psnr: float
    ssim: float
    object_psnr: float


def score(reference: np.ndarray, support: np.ndarray, image: np.ndarray, with_ssim: bool = False) -> Score:
    """``image``'s score against ``reference``, on the whole and on the object ``support``."""
    return Score(psnr(reference, image), ssim(reference, image) if with_ssim else 0.0,
                 psnr(reference, image, region=support))


def bart_best(measured: np.ndarray, reference: np.ndarray, support: np.ndarray, kernel: int,
              sets: int) -> tuple[Score, str, float]:
    """Oracle-tuned BART L1-ESPIRiT: the best PSNR over lambda and crop with its SSIM, the
    best PSNR on the object ``support`` (over the same settings, tuned on it), the setting
    of the best PSNR, and the wall time of ``ecalib`` + ``pics`` there, run once more
    (with a crashed ``ecalib``'s rerun on one thread, if there is one; NaN if it fails)."""
    best, best_object, setting, crop, lam = Score(-np.inf, 0.0, -np.inf), -np.inf, "", 0.0, 0.0
    for crop_tried in BART_CROPS:
        maps = _bart_maps(measured, crop_tried, kernel, sets)
        if maps is None:
            continue
        for lam_tried in BART_LAMBDAS:
            image = baselines.bart_pics(measured, maps, lam_tried)
            candidate = score(reference, support, image)
            best_object = max(best_object, candidate.object_psnr)
            if candidate.psnr > best.psnr:
                best = dataclasses.replace(candidate, ssim=ssim(reference, image))
                setting, crop, lam = f"crop {crop_tried} lambda {lam_tried}", crop_tried, lam_tried
    best.object_psnr = best_object
    if not setting:
        return best, setting, 0.0
    start = time.perf_counter()
    maps = _bart_maps(measured, crop, kernel, sets)
    if maps is None:
        return best, setting, float("nan")
    baselines.bart_pics(measured, maps, lam)
    return best, setting, time.perf_counter() - start


def run_case(case: Case, config: ReconConfig, device: str | None, use_bart: bool) -> dict:
    from unrollinr.coils import find_calibration_region, fitting_kernel_width

    reference = baselines.kspace_rss(case.kspace)
    support = object_support(reference)
    measured = (case.kspace * case.mask).astype(np.complex64)
    scores: dict[str, Score] = {}
    scores["zero-filled"] = score(reference, support, baselines.zero_filled(measured))
    one_set = ReconConfig.from_strings({"espirit_sets": "1"}, base=config)
    data, maps = prepare_maps(measured, case.mask, None, one_set)
    scores["CG-SENSE"] = score(reference, support, baselines.cg_sense(data, case.mask, maps, iterations=10))
    settings, bart_seconds = {}, {}
    if use_bart:
        kernel = fitting_kernel_width(find_calibration_region(case.mask), config.espirit_kernel_width)
        for sets in (1, 2):
            best, setting, seconds = bart_best(measured, reference, support, kernel, sets)
            scores[f"BART {sets} map{'s' if sets > 1 else ''}"] = best
            settings[sets], bart_seconds[sets] = setting, seconds
    (image, result), seconds = _timed(lambda: reconstruct_with_details(measured, case.mask, config=config,
                                                                       device=device, progress=False))
    scores["UnrollINR"] = ours = score(reference, support, image, with_ssim=True)
    classic = [m for m in scores if m != "UnrollINR"]
    best_name = max(classic, key=lambda m: scores[m].psnr)
    return {"scores": scores, "best": best_name, "margin": ours.psnr - scores[best_name].psnr,
            "object_margin": ours.object_psnr - max(scores[m].object_psnr for m in classic),
            "seconds": seconds, "returned": f"{result.returned} ({result.verdicts[0].held_out_loss:.2f})",
            "bart": settings, "bart_seconds": bart_seconds}


def main() -> None:
    parser = base_parser(__doc__)
    parser.set_defaults(data=None)
    parser.add_argument("--variants", nargs="+", default=None, help="only these variant names")
    parser.add_argument("--seed", type=int, default=0, help="mask seed")
    parser.add_argument("--no-bart", action="store_true", help="skip BART even when installed")
    args = parser.parse_args()
    paths = [args.data] if args.data else sorted(DEFAULT_DATA.parent.glob("*.npz"))
    args.data = paths[0]
    setup(args)
    config = ReconConfig.from_strings(overrides(args))
    use_bart = baselines.bart_available() and not args.no_bart
    print(f"device {device_name(args.device)}, BART {'yes' if use_bart else 'no'}")
    print(f"config {config}")
    methods = ["zero-filled", "CG-SENSE"] + (["BART 1 map", "BART 2 maps"] if use_bart else []) + ["UnrollINR"]
    print("\n| data | variant | R | " + " | ".join(methods) +
          " | margin dB | best classic | object margin dB | s | BART s (1 / 2 maps) | returned |")
    print("|" + "---|" * (len(methods) + 9))
    margins, object_margins, below_zero, below_cg, rows = [], [], 0, 0, []
    for path in paths:
        for case in cases(path, set(args.variants) if args.variants else None, args.seed):
            outcome = run_case(case, config, args.device, use_bart)
            scores = outcome["scores"]
            ours = scores["UnrollINR"].psnr
            margins.append(outcome["margin"])
            object_margins.append(outcome["object_margin"])
            below_zero += ours < scores["zero-filled"].psnr
            below_cg += ours < scores["CG-SENSE"].psnr
            cells = [f"{scores[m].psnr:.2f}" + (f" / {scores[m].ssim:.3f}" if scores[m].ssim else "") for m in methods]
            row = (f"| {case.data} | {case.name} | {case.acceleration:g} | " + " | ".join(cells) +
                   f" | {outcome['margin']:+.2f} | {outcome['best']} | {outcome['object_margin']:+.2f} | "
                   f"{outcome['seconds']:.1f} | "
                   + " / ".join(f"{t:.1f}" for t in outcome["bart_seconds"].values()) +
                   f" | {outcome['returned']} |")
            rows.append((outcome["margin"], f"{case.data} {case.name} R={case.acceleration:g}"))
            print(row, flush=True)
    worst = min(rows)
    print(f"\nworst case: {worst[1]} ({worst[0]:+.2f} dB)")
    print(f"object: worst_margin_db={min(object_margins):.2f} median_margin_db={statistics.median(object_margins):.2f}")
    print(f"worst_margin_db={min(margins):.2f} median_margin_db={statistics.median(margins):.2f} "
          f"cases={len(margins)} below_zero_filled={below_zero} below_cg_sense={below_cg}")


if __name__ == "__main__":
    main()
