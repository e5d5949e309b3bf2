"""``unrollinr doctor``: what this installation will do, and proof that it reconstructs.

It lists the versions that matter, says which grid backend, device and MLP precision a
reconstruction will use, and reconstructs a built-in phantom (a few seconds), reporting
seconds per iteration and PSNR. It fails when the requested device or backend cannot be used.
"""

from __future__ import annotations

import importlib.metadata
import time
from dataclasses import dataclass

import numpy as np
import torch

from unrollinr.config import ReconConfig
from unrollinr.evaluate import reference_image
from unrollinr.hashgrid import grid_backend
from unrollinr.masks import random_line_mask
from unrollinr.metrics import psnr
from unrollinr.model import mlp_dtype
from unrollinr.phantoms import phantom_kspace
from unrollinr.recon import default_device, reconstruct_with_details

PACKAGES = ("unrollinr", "torch", "tinycudann", "sigpy", "ismrmrd", "gadgetron", "ray")
PHANTOM_SIZE, PHANTOM_COILS, PHANTOM_R = 96, 8, 4


class NotUsable(RuntimeError):
    """The requested device or backend cannot run here."""


@dataclass(frozen=True)
class Plan:
    """What a reconstruction with a given config will run on."""

    device: torch.device
    backend: str
    precision: str


def package_versions() -> dict[str, str]:
    """Installed versions (``"not installed"`` where absent), and CUDA's."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    cuda = torch.version.cuda or "none (CPU build)"
    if torch.cuda.is_available():
        cuda += f", {torch.cuda.device_count()} device(s): {torch.cuda.get_device_name(0)}"
    else:
        cuda += ", no device available"
    versions["CUDA"] = cuda
    return versions


def plan(config: ReconConfig, device: str | None) -> Plan:
    """The device, grid backend and MLP precision for ``config``; :class:`NotUsable` if not possible."""
    chosen = default_device() if device is None else torch.device(device)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise NotUsable(f"device {device!r} was asked for, but torch sees no CUDA device")
    try:
        backend = grid_backend(config.encoding_backend, chosen)
    except ValueError as error:
        raise NotUsable(str(error)) from None
    return Plan(chosen, backend, str(mlp_dtype(config, chosen)).removeprefix("torch."))


def phantom_check(config: ReconConfig, device: torch.device, *, iterations: int = 80) -> dict[str, float]:
    """Reconstruct the built-in phantom (:data:`PHANTOM_SIZE`, ...): seconds per iteration,
    and the PSNR of UnrollINR and of the zero-filled image against the fully sampled reference."""
    kspace = phantom_kspace(PHANTOM_SIZE, PHANTOM_COILS, noise=0.002, seed=0)
    mask = random_line_mask((PHANTOM_SIZE, PHANTOM_SIZE), PHANTOM_R, seed=0)
    run = ReconConfig.from_strings({"iterations": iterations}, base=config)
    start = time.perf_counter()
    image, result = reconstruct_with_details(kspace * mask, mask, config=run, device=device, progress=False)
    seconds = time.perf_counter() - start
    reference = reference_image(kspace)
    zero_filled = reference_image(kspace * mask)
    return {"seconds": seconds, "seconds_per_iteration": seconds / max(result.iterations, 1),
            "iterations": float(result.iterations), "psnr": psnr(reference, image),
            "psnr_zero_filled": psnr(reference, zero_filled)}


def report(config: ReconConfig, device: str | None) -> list[str]:
    """The doctor's lines; raises :class:`NotUsable` after the versions if the plan fails."""
    lines = [f"{name:10s} {version}" for name, version in package_versions().items()]
    chosen = plan(config, device)
    lines += [f"device     {chosen.device}", f"backend    {chosen.backend}", f"precision  {chosen.precision}"]
    check = phantom_check(config, chosen.device)
    lines.append(f"phantom    {PHANTOM_SIZE}x{PHANTOM_SIZE}, {PHANTOM_COILS} coils, R {PHANTOM_R}: "
                 f"{check['iterations']:.0f} iterations in {check['seconds']:.1f} s "
                 f"({check['seconds_per_iteration'] * 1000:.0f} ms/iteration), PSNR {check['psnr']:.2f} dB "
                 f"(zero-filled {check['psnr_zero_filled']:.2f} dB)")
    if not np.isfinite(check["psnr"]) or check["psnr"] <= check["psnr_zero_filled"]:
        raise NotUsable("the phantom reconstruction is no better than zero-filling: something is broken")
    return lines
