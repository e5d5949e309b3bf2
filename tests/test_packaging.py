"""The package as a site installs it: a lean core, extras named when missing, chains shipped
inside the package, and ``unrollinr doctor``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from unrollinr_gadget.cli import main

REPOSITORY = Path(__file__).resolve().parents[1]
BLOCK = "import sys\nfor name in {names!r}:\n    sys.modules[name] = None  # as if not installed\n"


def _python(program: str, *, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=600,
                            env=env, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def test_the_core_reconstructs_without_the_gadget_eval_and_scale_extras():
    program = BLOCK.format(names=["ismrmrd", "gadgetron", "h5py", "matplotlib", "ray", "optuna"]) + (
        "import numpy as np\n"
        "from unrollinr import ReconConfig, reconstruct\n"
        "from unrollinr.phantoms import phantom_kspace\n"
        "from unrollinr.masks import random_line_mask\n"
        "from unrollinr.metrics import psnr, ssim, nrmse\n"
        "k = phantom_kspace(32, 4, seed=0); m = random_line_mask((32, 32), 2, acs_lines=10, seed=0)\n"
        "image = reconstruct(k * m, m, config=ReconConfig(iterations=5))\n"
        "assert image.shape == (32, 32) and np.isfinite(image).all()\n"
        "assert not {'ismrmrd', 'gadgetron', 'matplotlib', 'ray'} & {n for n, m in sys.modules.items() if m}\n")
    _python(program)


def test_a_command_names_the_extra_it_needs():
    program = BLOCK.format(names=["ismrmrd", "gadgetron", "ray"]) + (
        "from unrollinr_gadget.cli import main\n"
        "assert main(['serve', '--port', '0', '--no-save-raw']) == 2\n"
        "assert main(['replay', 'nothing.h5', '-o', 'x.h5', '--ray']) == 2\n")
    printed = _python(program, cwd=REPOSITORY)
    assert "unrollinr serve needs ismrmrd, from the [gadget] extra: pip install 'unrollinr[gadget]'" in printed
    assert "unrollinr replay needs" in printed


def test_an_installed_copy_resolves_every_config_name_outside_the_checkout(tmp_path):
    source = tmp_path / "source"
    files = subprocess.run(["git", "ls-files"], cwd=REPOSITORY, capture_output=True, text=True, check=True)
    for name in files.stdout.split():
        if (REPOSITORY / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPOSITORY / name, source / name)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True, capture_output=True, timeout=600)
    shutil.rmtree(source)
    program = ("import unrollinr_gadget\n"
               f"assert unrollinr_gadget.__file__.startswith({str(target)!r}), unrollinr_gadget.__file__\n"
               "from unrollinr_gadget.server import ConfigResolver\n"
               "resolver = ConfigResolver()\n"
               "names = resolver.names()\n"
               "for name in names + ['unrollinr_distributed']:\n"
               "    resolver.by_name(name)\n"
               "print(names)\n")
    printed = _python(program, env=dict(os.environ, PYTHONPATH=str(target)), cwd=tmp_path)
    for name in ("unrollinr", "unrollinr_prospective", "unrollinr.xml", "unrollinr_buffered.xml",
                 "unrollinr_distributed.xml", "unrollinr_prospective_connect.xml"):
        assert repr(name) in printed


def test_the_version_is_written_once():
    import importlib.metadata

    import unrollinr

    assert importlib.metadata.version("unrollinr") == unrollinr.__version__
    assert "version =" not in (REPOSITORY / "pyproject.toml").read_text().split("[project.optional")[0]


def test_no_benchmark_figures_in_the_library_source():
    """dB figures go stale: they belong in bench/RESULTS.md, not in docstrings or comments."""
    import re

    stale = [f"{path.relative_to(REPOSITORY)}:{number}: {line.strip()}"
             for folder in ("unrollinr", "gadget") for path in sorted((REPOSITORY / folder).rglob("*.py"))
             for number, line in enumerate(path.read_text().splitlines(), start=1)
             if re.search(r"\d dB\b", line)]
    assert not stale, stale


def test_benchmark_results_hold_todays_figures_and_history_holds_the_rest():
    """A reader must find today's figures: session-by-session records go to HISTORY.md."""
    results = (REPOSITORY / "bench" / "RESULTS.md").read_text()
    assert len(results.splitlines()) <= 300, "move the older sections of bench/RESULTS.md to bench/HISTORY.md"
    assert (REPOSITORY / "bench" / "HISTORY.md").exists()


def test_doctor_on_the_cpu(capsys):
    assert main(["doctor", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "backend    torch" in printed and "device     cpu" in printed and "precision  " in printed
    assert "PSNR" in printed and "torch      2." in printed


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer where no CUDA device is present")
def test_doctor_fails_when_the_requested_device_is_not_usable(capsys):
    assert main(["doctor", "--device", "cuda"]) == 1
    assert main(["doctor", "--device", "cpu", "--set", "encoding_backend=tcnn"]) == 1
