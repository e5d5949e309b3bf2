"""The ``unrollinr`` command: retrospective evaluation, the built-in example, the
scanner-facing server, offline replay and streaming of raw ISMRMRD files."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from unrollinr.config import ReconConfig

logger = logging.getLogger("unrollinr")


def config_from_args(args: argparse.Namespace) -> ReconConfig:
    """The reconstruction config from ``--preset`` and repeated ``--set name=value``."""
    values: dict[str, str] = {}
    for item in args.set or []:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects name=value, got {item!r}")
        values[name.strip()] = value.strip()
    return ReconConfig.from_strings(values, base=ReconConfig.preset(args.preset))


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="retrospective", choices=["retrospective", "prospective"],
                        help="initial lambda/lambda_s preset (default: %(default)s)")
    parser.add_argument("--set", action="append", metavar="NAME=VALUE",
                        help="override one ReconConfig field, e.g. --set iterations=100 (repeatable)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Compare UnrollINR with the classic methods on fully sampled data."""
    from unrollinr.data import load_kspace
    from unrollinr.evaluate import evaluate, reference_image, write_figure, write_tables

    kspace = load_kspace(args.data)
    config = config_from_args(args)
    results = evaluate(kspace, args.R, config=config, mask_kind=args.mask, seed=args.seed,
                       use_bart=False if args.no_bart else None, device=args.device)
    md_path, csv_path = write_tables(results, args.out)
    figure = write_figure(results, reference_image(kspace), args.out / "figure.png")
    print(md_path.read_text(), end="")
    print(f"wrote {md_path}, {csv_path} and {figure}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="unrollinr", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    commands = parser.add_subparsers(dest="command", required=True)

    evaluate = commands.add_parser("evaluate", help=cmd_evaluate.__doc__,
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    evaluate.add_argument("data", type=Path, help=".npz with fully sampled 'kspace' (coils, ky, kx)")
    evaluate.add_argument("--R", type=float, nargs="+", default=[6, 8, 10], help="accelerations")
    evaluate.add_argument("--out", type=Path, default=Path("evaluation"), help="output folder")
    evaluate.add_argument("--mask", default="random", choices=["random", "uniform", "radial", "spiral"])
    evaluate.add_argument("--seed", type=int, default=0, help="mask seed")
    evaluate.add_argument("--no-bart", action="store_true", help="skip BART even if it is installed")
    _add_config_options(evaluate)
    evaluate.set_defaults(run=cmd_evaluate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``unrollinr`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, OSError) as error:
        logger.error("%s", error)
        return 2


if __name__ == "__main__":
    sys.exit(main())
