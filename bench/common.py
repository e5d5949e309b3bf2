"""Shared helpers for the benchmarks: data location, logging, and printing tables."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import torch

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "brain_8ch_256.npz"
# "within 0.3 dB" in the speed issue's targets: how close to a best PSNR counts as reached
QUALITY_TOLERANCE_DB = 0.3


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="fully sampled k-space .npz")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "2")),
                        help="torch CPU threads")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--set", action="append", metavar="NAME=VALUE", default=[],
                        help="override one ReconConfig field (repeatable)")
    return parser


def setup(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    if not args.data.exists():
        raise SystemExit(f"no data at {args.data}: pass --data")


def overrides(args: argparse.Namespace) -> dict[str, str]:
    values = {}
    for item in args.set:
        name, _, value = item.partition("=")
        values[name] = value
    return values


def device_name(device: str | None) -> str:
    if (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"CPU, {torch.get_num_threads()} torch threads"


def synchronize(device: str | torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that wall-clock timings cover it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def free_port() -> int:
    """A free TCP port on loopback."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
