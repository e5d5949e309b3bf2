"""Offline replay, `send`, the CLI, and the same images three ways."""

import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import ismrmrd
import numpy as np
import pytest
from conftest import FAST_PROPERTIES
from ismrmrd.serialization import ConfigText
from peers import properties_xml
from test_gadget import run_execute_mode
from unrollinr_gadget.cli import main
from unrollinr_gadget.outputs import read_images
from unrollinr_gadget.rawdata import RawFile
from unrollinr_gadget.server import ConfigResolver, UnrollINRServer
from unrollinr_gadget.settings import GadgetSettings

SETS = [arg for name, value in FAST_PROPERTIES.items() for arg in ("--set", f"{name}={value}")]


@pytest.fixture(scope="module")
def shepp_logan(tmp_path_factory) -> Path:
    """Debian's generator: noise scan, 2x oversampling, 2 repetitions of R=2 with 16 ACS lines."""
    generator = shutil.which("ismrmrd_generate_cartesian_shepp_logan")
    if generator is None:
        pytest.skip("ismrmrd-tools is not installed (.ci/run installs it)")
    path = tmp_path_factory.mktemp("sl") / "shepp_logan.h5"
    subprocess.run([generator, "-m", "64", "-c", "8", "-a", "2", "-w", "16", "-C", "-r", "2", "-o", str(path)],
                   check=True, capture_output=True)
    return path


def test_replay_of_the_debian_generator_file(shepp_logan, tmp_path):
    out = tmp_path / "images.h5"
    assert main(["replay", str(shepp_logan), "-o", str(out), "--png", str(tmp_path / "png"), *SETS]) == 0
    images = read_images(out)
    raw = RawFile(shepp_logan)
    repetitions = {a.getHead().idx.repetition for a in raw.acquisitions()
                   if not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)}
    assert len(images) == len(repetitions) >= 2
    assert [im.getHead().repetition for im in images] == sorted(repetitions)
    for image in images:
        assert tuple(image.getHead().matrix_size) == (64, 64, 1)  # oversampling removed
        pixels = image.data[0, 0].astype(float)
        # the Shepp-Logan head fills the middle, the corners are empty
        assert pixels[24:40, 24:40].mean() > 2 * pixels[:6, :6].mean()
    assert len(list((tmp_path / "png").glob("*.png"))) == len(images)


def test_same_images_from_replay_serve_and_gadget(raw_phantom, tmp_path):
    replay_out = tmp_path / "replay.h5"
    assert main(["replay", str(raw_phantom), "-o", str(replay_out), *SETS]) == 0
    replayed = read_images(replay_out)

    resolver = ConfigResolver(base=GadgetSettings.from_properties(FAST_PROPERTIES))
    with UnrollINRServer(("127.0.0.1", 0), resolver) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        sent_out = tmp_path / "sent.h5"
        assert main(["send", str(raw_phantom), "--port", str(server.port), "--config", "unrollinr",
                     "-o", str(sent_out)]) == 0
        server.shutdown()
    sent = read_images(sent_out)

    raw = RawFile(raw_phantom)
    replies, _, _ = run_execute_mode(FAST_PROPERTIES, raw.header(), raw.acquisitions())
    gadget = replies.images

    assert len(replayed) == len(sent) == len(gadget) == 2
    for a, b, c in zip(replayed, sent, gadget, strict=True):
        reference = a.data.astype(np.float64)
        assert a.data.max() > 1000
        np.testing.assert_allclose(b.data.astype(np.float64), reference, atol=1)
        np.testing.assert_allclose(c.data.astype(np.float64), reference, atol=1)
        assert a.getHead().image_index == b.getHead().image_index == c.getHead().image_index


def test_send_reports_a_server_error(tmp_path, raw_phantom):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with UnrollINRServer(("127.0.0.1", port), ConfigResolver()) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        code = main(["send", str(raw_phantom), "--port", str(port), "--config", "nope", "-o", str(tmp_path / "x.h5")])
        server.shutdown()
    assert code == 1


def test_send_gives_up_on_a_server_that_never_answers_after_its_timeout(tmp_path, raw_phantom, capsys):
    with socket.socket() as silent:  # takes the whole stream, answers nothing, never closes
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        drained = threading.Event()

        def drain():
            connection, _ = silent.accept()
            with connection:
                while connection.recv(1 << 16):
                    drained.set()

        threading.Thread(target=drain, daemon=True).start()
        started = time.monotonic()
        code = main(["send", str(raw_phantom), "--port", str(silent.getsockname()[1]), "--timeout", "2",
                     "-o", str(tmp_path / "x.h5")])
    assert code == 1 and drained.is_set()
    assert time.monotonic() - started < 60
    assert "the server did not close the connection" in capsys.readouterr().err


def test_evaluate_cli_end_to_end(tmp_path, phantom_48):
    data = tmp_path / "data.npz"
    np.savez(data, kspace=phantom_48)
    out = tmp_path / "eval"
    assert main(["evaluate", str(data), "--R", "3", "--out", str(out), "--no-bart",
                 "--set", "iterations=25", "--set", "cg_iterations=5"]) == 0
    table = (out / "results.csv").read_text().splitlines()
    assert table[0].startswith("R,method,psnr_db,ssim,nrmse,seconds")
    methods = [row.split(",")[1] for row in table[1:]]
    assert methods == ["zero-filled", "CG-SENSE", "L1-ESPIRiT", "UnrollINR"]
    psnr = {row.split(",")[1]: float(row.split(",")[2]) for row in table[1:]}
    assert psnr["UnrollINR"] > psnr["zero-filled"]
    assert (out / "figure.png").stat().st_size > 10_000
    assert "| 3 | UnrollINR |" in (out / "results.md").read_text()


def test_simulate_raw_cli(tmp_path, phantom_48):
    data = tmp_path / "data.npz"
    np.savez(data, kspace=phantom_48)
    assert main(["simulate-raw", str(data), "--R", "4", "-o", str(tmp_path / "raw.h5")]) == 0
    raw = RawFile(tmp_path / "raw.h5")
    header = raw.header()
    assert header.encoding[0].encodedSpace.matrixSize.x == 96
    assert len(raw) == 1 + 12  # noise scan + 48 / 4 lines


def test_simulate_raw_writes_a_scanners_header_and_interleaved_slices_that_replay(tmp_path, phantom_48):
    data = tmp_path / "data.npz"
    np.savez(data, kspace=phantom_48)
    raw_path = tmp_path / "raw.h5"
    assert main(["simulate-raw", str(data), "--R", "3", "--slices", "3", "--order", "interleaved",
                 "--noise-scans", "2", "-o", str(raw_path)]) == 0
    raw = RawFile(raw_path)
    header = raw.header()
    assert header.measurementInformation.measurementID and header.measurementInformation.protocolName
    assert header.measurementInformation.patientPosition.value == "HFS"
    assert header.acquisitionSystemInformation.receiverChannels == 8
    assert header.sequenceParameters.TR and header.studyInformation.studyDate
    noise = [a for a in raw.acquisitions() if a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    lines = [a for a in raw.acquisitions() if not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    assert len(noise) == 2
    assert [a.idx.slice for a in lines[:6]] == [0, 1, 2, 0, 1, 2]
    out = tmp_path / "images.h5"
    assert main(["replay", str(raw_path), "-o", str(out), *SETS]) == 0
    assert sorted(image.getHead().slice for image in read_images(out)) == [0, 1, 2]


def test_cli_errors_are_clean(tmp_path):
    assert main(["replay", str(tmp_path / "missing.h5"), "-o", str(tmp_path / "o.h5")]) == 2
    assert main(["evaluate", str(tmp_path / "missing.npz")]) == 2


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "unrollinr_gadget.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "replay" in result.stdout and "serve" in result.stdout
    assert ConfigText(properties_xml({"a": "b"})).startswith("<configuration>")
