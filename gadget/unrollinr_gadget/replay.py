"""Offline replay of raw files (``unrollinr replay``): which files, where their images go,
and the in-process reconstruction of each (see :mod:`ray_replay` for a Ray cluster)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import ismrmrd

from unrollinr_gadget.outputs import write_images, write_pngs
from unrollinr_gadget.pipeline import Delivery, ReconPipeline
from unrollinr_gadget.rawsave import JOURNAL_SUFFIX, open_raw
from unrollinr_gadget.settings import GadgetSettings

logger = logging.getLogger(__name__)

RAW_SUFFIXES = (".h5", JOURNAL_SUFFIX)


@dataclass
class ReplayJob:
    """One raw file and where its images go (an ISMRMRD file, and optionally PNGs)."""

    raw: Path
    out: Path
    png: Path | None = None


@dataclass
class FileSummary:
    """What replaying one file gave."""

    job: ReplayJob
    images: int = 0
    failures: list[str] = field(default_factory=list)


def replay_jobs(inputs: Sequence[Path], out: Path, png: Path | None = None) -> list[ReplayJob]:
    """Raw files (folders give their ``.h5`` and ``.mrd`` files) and their outputs: with one
    file and an ``out`` ending in ``.h5``, that file; otherwise ``out/<name>.h5``."""
    files: list[Path] = []
    for path in inputs:
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix in RAW_SUFFIXES)
        elif path.exists():
            files.append(path)
        else:
            raise FileNotFoundError(f"no such raw file or folder: {path}")
    if not files:
        raise FileNotFoundError(f"no raw files ({', '.join(RAW_SUFFIXES)}) in {', '.join(map(str, inputs))}")
    if len(files) == 1 and out.suffix == ".h5":
        return [ReplayJob(files[0], out, png)]
    names = [f.stem for f in files]
    if len(set(names)) < len(names):
        raise ValueError(f"two raw files share a name, so their images would share an output: {sorted(names)}")
    return [ReplayJob(f, out / f"{f.stem}.h5", None if png is None else png / f.stem) for f in files]


class ImageSink(Delivery):
    """Writes one job's images as they come (its output file is replaced on the first), and
    keeps its failures."""

    def __init__(self, job: ReplayJob) -> None:
        super().__init__(self._write, lambda failure: logger.error("%s: %s", job.raw.name, failure))
        self.job = job
        job.out.unlink(missing_ok=True)

    def _write(self, image: ismrmrd.Image) -> None:
        write_images([image], self.job.out)
        if self.job.png is not None:
            write_pngs([image], self.job.png)

    @property
    def summary(self) -> FileSummary:
        return FileSummary(self.job, self.images, [str(failure) for failure in self.failures])


def replay_in_process(jobs: Sequence[ReplayJob], settings: GadgetSettings) -> list[FileSummary]:
    """Reconstruct each file here, its slices batched, and write its images as they come."""
    from tqdm.auto import tqdm

    summaries = []
    for job in jobs:
        raw = open_raw(job.raw)
        pipeline = ReconPipeline.from_settings(raw.header(), settings)
        sink = ImageSink(job)
        acquisitions: Iterator = tqdm(raw.acquisitions(), total=len(raw), desc=job.raw.name, unit="acq",
                                      disable=not sys.stderr.isatty())
        sink(pipeline.process(acquisitions))
        summaries.append(sink.summary)
    return summaries
