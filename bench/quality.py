"""Quality benchmark: UnrollINR against zero-filled, CG-SENSE, best-tuned L1-ESPIRiT
(sigpy, and BART when installed) and best-tuned BART TV-SENSE at R = 6, 8, 10 with random
line masks, plus the ablations at R = 8. The last line is machine-readable:

    R=8 unrollinr_psnr=<x> l1espirit_psnr=<y> margin_db=<x-y>

where ``y`` is the best L1-ESPIRiT PSNR over the lambda grid (BART's or sigpy's).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import base_parser, device_name, overrides, setup  # noqa: E402

from unrollinr.config import ReconConfig  # noqa: E402
from unrollinr.data import load_kspace  # noqa: E402
from unrollinr.evaluate import evaluate, evaluate_ablations, write_tables  # noqa: E402


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--R", type=float, nargs="+", default=[6, 8, 10])
    parser.add_argument("--no-ablations", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="also write results.md/csv here")
    args = parser.parse_args()
    setup(args)
    config = ReconConfig.from_strings(overrides(args))
    kspace = load_kspace(args.data)
    print(f"data {args.data.name} {kspace.shape}, device {device_name(args.device)}")
    print(f"config {config}")
    results = evaluate(kspace, args.R, config=config, device=args.device)
    if not args.no_ablations and 8 in args.R:
        results += evaluate_ablations(kspace, 8, config=config, device=args.device)

    print("\n| R | method | PSNR dB | SSIM | NRMSE | seconds | tuning |\n|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r.acceleration:g} | {r.method} | {r.psnr:.2f} | {r.ssim:.4f} | {r.nrmse:.4f} | "
              f"{r.seconds:.1f} | {r.setting} |")
    if args.out is not None:
        write_tables(results, args.out)

    for acceleration in args.R:
        at_r = {r.method: r for r in results if r.acceleration == acceleration}
        ours = at_r["UnrollINR"]
        best_l1 = max((at_r[m] for m in ("L1-ESPIRiT", "BART L1-ESPIRiT") if m in at_r), key=lambda r: r.psnr)
        rivals = [at_r["CG-SENSE"], best_l1] + [at_r[m] for m in ("BART TV-SENSE",) if m in at_r]
        beaten = [r.method for r in rivals if ours.psnr > r.psnr and ours.ssim > r.ssim]
        unbeaten = [r.method for r in rivals if r.method not in beaten]
        verdicts = ([f"beats {', '.join(beaten)}"] if beaten else []) + \
                   ([f"does NOT beat {', '.join(unbeaten)}"] if unbeaten else [])
        print(f"R={acceleration:g}: UnrollINR {ours.psnr:.2f} dB / {ours.ssim:.4f} vs best L1-ESPIRiT "
              f"({best_l1.method}) {best_l1.psnr:.2f} / {best_l1.ssim:.4f}: {'; '.join(verdicts)} "
              "(higher PSNR and SSIM)")
    at_8 = {r.method: r for r in results if r.acceleration == 8}
    if "UnrollINR" in at_8:
        best = max(at_8[m].psnr for m in ("L1-ESPIRiT", "BART L1-ESPIRiT") if m in at_8)
        print(f"R=8 unrollinr_psnr={at_8['UnrollINR'].psnr:.2f} l1espirit_psnr={best:.2f} "
              f"margin_db={at_8['UnrollINR'].psnr - best:.2f}")


if __name__ == "__main__":
    main()
