"""``replay --ray`` and ``tune`` on a local Ray with 2 CPUs, on small images."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST_PROPERTIES
from unrollinr_gadget.outputs import read_images
from unrollinr_gadget.rawdata import simulate_raw
from unrollinr_gadget.replay import replay_in_process, replay_jobs
from unrollinr_gadget.settings import GadgetSettings

from unrollinr.masks import random_line_mask
from unrollinr.phantoms import phantom_kspace

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def two_exams(tmp_path_factory) -> Path:
    """Two raw files of 3 slices each (sequential and interleaved)."""
    folder = tmp_path_factory.mktemp("exams")
    for number, order in enumerate(("sequential", "interleaved")):
        kspace = np.stack([phantom_kspace(32, 4, seed=10 * number + s) for s in range(3)])
        masks = np.stack([random_line_mask((32, 32), 2.5, acs_lines=10, seed=s) for s in range(3)])
        simulate_raw(kspace, masks, folder / f"exam{number}.h5", order=order, noise_scans=0)
    return folder


def _scaled(path: Path) -> dict[int, np.ndarray]:
    """Each slice's image in the reconstruction's units (the uint16 scale taken back out)."""
    return {image.getHead().slice: image.data / float(image.meta["ImageScaleFactor"]) for image in read_images(path)}


def test_replay_on_ray_gives_the_images_of_in_process_replay(local_ray, two_exams, tmp_path):
    from unrollinr_gadget.ray_replay import replay_on_ray

    settings = GadgetSettings.from_properties(FAST_PROPERTIES)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each task runs: the thread count changes the order of float sums
    try:
        here = replay_in_process(replay_jobs([two_exams], tmp_path / "here"), settings)
    finally:
        torch.set_num_threads(threads)
    there = replay_on_ray(replay_jobs([two_exams], tmp_path / "ray"), settings)
    assert [(s.images, s.failures) for s in there] == [(s.images, s.failures) for s in here] == [(3, [])] * 2
    for name in ("exam0.h5", "exam1.h5"):
        ours, theirs = _scaled(tmp_path / "ray" / name), _scaled(tmp_path / "here" / name)
        assert [image.getHead().slice for image in read_images(tmp_path / "ray" / name)] == [0, 1, 2]
        for index, image in theirs.items():  # one slice per task, each as in the batched run
            np.testing.assert_array_equal(ours[index], image)


def test_a_task_that_fails_once_is_retried(local_ray, two_exams, tmp_path):
    from unrollinr_gadget.ray_replay import reconstruct_slice, replay_on_ray

    marker = tmp_path / "failed-once"

    def fails_the_first_time(*args):
        if not marker.exists():
            marker.write_text("")
            raise RuntimeError("a worker's transient fault")
        return reconstruct_slice(*args)

    settings = GadgetSettings.from_properties(FAST_PROPERTIES)
    (summary,) = replay_on_ray(replay_jobs([two_exams / "exam0.h5"], tmp_path / "out.h5"), settings,
                               task=fails_the_first_time)
    assert marker.exists() and summary.images == 3 and summary.failures == []


def test_a_task_that_always_fails_is_reported_and_the_other_files_finish(local_ray, two_exams, tmp_path):
    from unrollinr_gadget.ray_replay import reconstruct_slice, replay_on_ray

    def slice_one_breaks(kspace, *args):
        if kspace.sum() == broken_sum:
            raise RuntimeError("this slice always fails")
        return reconstruct_slice(kspace, *args)

    from unrollinr_gadget.assembly import SliceAssembler
    from unrollinr_gadget.rawdata import RawFile

    raw = RawFile(two_exams / "exam1.h5")
    assembler = SliceAssembler(raw.header())
    slices = sorted([s for a in raw.acquisitions() for s in assembler.add(a)] + assembler.finish(),
                    key=lambda data: data.key)
    broken_sum = slices[1].kspace.sum()
    settings = GadgetSettings.from_properties(FAST_PROPERTIES)
    summaries = replay_on_ray(replay_jobs([two_exams], tmp_path / "out"), settings, task=slice_one_breaks)
    assert [s.images for s in summaries] == [3, 2]
    (failure,) = summaries[1].failures
    assert "slice 1" in failure and "this slice always fails" in failure
    assert [image.getHead().slice for image in read_images(tmp_path / "out" / "exam1.h5")] == [0, 2]


def test_replay_without_ray_never_imports_it(two_exams, tmp_path):
    program = ("import sys\nfrom unrollinr_gadget.cli import main\n"
               f"code = main(['replay', {str(two_exams / 'exam0.h5')!r}, '-o', {str(tmp_path / 'x.h5')!r}, "
               + ", ".join(f"'--set', '{k}={v}'" for k, v in FAST_PROPERTIES.items())
               + "])\nassert code == 0 and 'ray' not in sys.modules, sorted(m for m in sys.modules if 'ray' in m)\n")
    subprocess.run([sys.executable, "-c", program], check=True, capture_output=True, timeout=300)
    assert len(read_images(tmp_path / "x.h5")) == 3


def test_tune_writes_a_settings_file_that_loads(tmp_path, phantom_48):
    from unrollinr.config import ReconConfig

    data = tmp_path / "phantom.npz"
    np.savez(data, kspace=phantom_48)
    out = tmp_path / "tuned.json"
    result = subprocess.run([sys.executable, "-m", "unrollinr_gadget.cli", "tune", str(data), "--R", "3",
                             "--trials", "4", "--cpus-per-trial", "1", "--set", "iterations=20",
                             "--set", "cg_iterations=5", "-o", str(out)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    values = json.loads(out.read_text())
    assert set(values) == {"lam", "lam_s"}
    assert 0.01 <= values["lam"] <= 0.1 and 0.1 <= values["lam_s"] <= 1.0
    config = ReconConfig.load(out)
    assert (config.lam, config.lam_s) == (values["lam"], values["lam_s"])
    assert "4 trials on psnr" in result.stdout, result.stdout
