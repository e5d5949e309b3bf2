"""``unrollinr replay --ray``: one Ray task per slice, for many raw files on a cluster.

The driver reads each file and assembles its slices; each slice is a task that asks for
one GPU where the cluster has any, else ``cpus_per_slice`` CPUs. A task that fails is
retried once, then reported; the other slices and files go on. Images come back into each
file's output in slice order as they complete, with one progress bar over every slice.
Ray is imported only here, so replay without ``--ray`` never needs it.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch

from unrollinr.config import ReconConfig
from unrollinr.recon import reconstruct_together
from unrollinr.training import FitResult
from unrollinr_gadget.assembly import SliceData
from unrollinr_gadget.images import ImageFactory
from unrollinr_gadget.pipeline import ReconPipeline, slice_outcome
from unrollinr_gadget.rawsave import open_raw
from unrollinr_gadget.replay import FileSummary, ImageSink, ReplayJob
from unrollinr_gadget.settings import GadgetSettings

logger = logging.getLogger(__name__)

SliceTask = Callable[..., tuple[np.ndarray, FitResult]]


def reconstruct_slice(kspace: np.ndarray, mask: np.ndarray, calibration: np.ndarray, calibration_mask: np.ndarray,
                      config: ReconConfig, device: str | None, threads: int) -> tuple[np.ndarray, FitResult]:
    """One slice, as the pipeline reconstructs it: its ``(ky, kx)`` image and result (on the CPU)."""
    torch.set_num_threads(threads)  # this worker process's own share of the node
    (result,) = reconstruct_together([kspace], [mask], [(calibration, calibration_mask)], config=config, device=device)
    if isinstance(result, Exception):
        raise result
    image, fit = result
    return image, dataclasses.replace(fit, image=fit.image.cpu(), prior=fit.prior.cpu(),
                                      held_out=None if fit.held_out is None else fit.held_out.cpu())


@dataclass
class _FileInOrder:
    """One file's slices, written in slice order as their results arrive."""

    sink: ImageSink
    factory: ImageFactory
    slices: list[SliceData]
    results: dict[int, tuple[np.ndarray, FitResult] | Exception]
    written: int = 0

    def settle(self) -> None:
        """Write every result that is next in slice order."""
        while self.written < len(self.slices) and self.written in self.results:
            data, result = self.slices[self.written], self.results.pop(self.written)
            self.sink([slice_outcome(self.factory, data, result)])
            self.written += 1


def _assemble(job: ReplayJob, settings: GadgetSettings) -> _FileInOrder:
    """Read a file and assemble its slices, in slice order (failures go straight to its sink)."""
    raw = open_raw(job.raw)
    pipeline = ReconPipeline.from_settings(raw.header(), settings)
    sink = ImageSink(job)
    for acquisition in raw.acquisitions():
        sink(pipeline.add(acquisition, defer=True))
    slices = sorted(pipeline.drain(), key=lambda data: data.key)
    return _FileInOrder(sink, pipeline.factory, slices, {})


def _resources(cpus_per_slice: int) -> dict[str, float]:
    """What one slice's task asks for: a GPU where the cluster has them, else CPUs."""
    if ray.cluster_resources().get("GPU", 0) > 0:
        return {"num_gpus": 1, "num_cpus": 1}
    return {"num_cpus": cpus_per_slice}


def replay_on_ray(jobs: Sequence[ReplayJob], settings: GadgetSettings, *, address: str | None = None,
                  cpus_per_slice: int = 1, task: SliceTask = reconstruct_slice) -> list[FileSummary]:
    """Reconstruct every slice of every job as a Ray task; ``address`` ``None`` starts a
    local Ray, ``"auto"`` or ``host:port`` joins a cluster. ``task`` is what runs per slice."""
    from tqdm.auto import tqdm

    if not ray.is_initialized():
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    files = [_assemble(job, settings) for job in jobs]
    resources = _resources(cpus_per_slice)
    remote: Any = ray.remote(task).options(max_retries=1, retry_exceptions=True, **resources)
    config = ray.put(settings.recon)
    threads = int(resources.get("num_cpus", 1))
    pending = {}
    for file_index, file in enumerate(files):
        for slice_index, data in enumerate(file.slices):
            reference = remote.remote(data.kspace, data.mask, data.calibration, data.calibration_mask, config,
                                      settings.device, threads)
            pending[reference] = (file_index, slice_index)
    logger.info("%d slices of %d files as Ray tasks, each with %s", len(pending), len(files), resources)
    with tqdm(total=len(pending), desc="replay", unit="slice", disable=not sys.stderr.isatty()) as bar:
        while pending:
            (done,), _ = ray.wait(list(pending), num_returns=1)
            file_index, slice_index = pending.pop(done)
            try:
                result = ray.get(done)
            except ray.exceptions.RayTaskError as error:  # failed twice: reported with its slice
                result = error.cause if isinstance(error.cause, Exception) else error
            except ray.exceptions.RayError as error:  # a lost worker or node, twice
                result = error
            files[file_index].results[slice_index] = result
            files[file_index].settle()
            bar.update()
    return [file.sink.summary for file in files]
