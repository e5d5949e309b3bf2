"""``unrollinr serve`` as a process: killed, stopped and starved of disk mid-session, it
keeps every exam's raw data or says why not."""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import ismrmrd
from conftest import FAST_PROPERTIES
from ismrmrd.serialization import ConfigFile
from peers import Replies, connect_with_retry, read_replies
from test_hostile import _stream
from unrollinr_gadget.cli import main
from unrollinr_gadget.outputs import read_images
from unrollinr_gadget.rawdata import RawFile
from unrollinr_gadget.rawsave import open_raw, recover

FAST_SETTINGS = [argument for name, value in FAST_PROPERTIES.items() for argument in ("--set", f"{name}={value}")]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _no_big_files() -> None:
    """In the child: writes past 32 kB fail with EFBIG, as on a full disk."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (32_000, 32_000))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


@contextmanager
def serve_process(raw_folder: Path, starve_disk: bool = False) -> Iterator[tuple[subprocess.Popen, int]]:
    """``serve`` on a free port, its log in ``raw_folder.parent / "serve.log"``."""
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    with open(raw_folder.parent / "serve.log", "wb") as log, subprocess.Popen(
            [sys.executable, "-m", "unrollinr_gadget.cli", "serve", "--port", str(port), "--save-raw", str(raw_folder),
             *FAST_SETTINGS], stderr=log, env=env, preexec_fn=_no_big_files if starve_disk else None) as process:
        try:
            connect_with_retry(port, timeout=120).close()
            yield process, port
        finally:
            process.kill()


def _imaging(raw: RawFile) -> list[ismrmrd.Acquisition]:
    return [a for a in raw.acquisitions() if not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]


def _slice0_and_part_of_slice1(raw: RawFile) -> list[ismrmrd.Acquisition]:
    acquisitions = _imaging(raw)
    slice1 = [a for a in acquisitions if a.idx.slice == 1]
    return [a for a in acquisitions if a.idx.slice == 0] + slice1[:len(slice1) // 2]


@contextmanager
def open_session(port: int, data: bytes) -> Iterator[tuple[socket.socket, Replies, threading.Thread]]:
    """Send ``data`` and read the replies in the background."""
    replies = Replies()

    def read() -> None:
        try:
            replies.__dict__.update(read_replies(sock).__dict__)
        except (EOFError, OSError):
            pass  # a killed server answers nothing: ``replies.closed`` stays False

    with connect_with_retry(port) as sock:
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        sock.sendall(data)
        yield sock, replies, reader


def _wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_sigkill_mid_session_leaves_raw_data_that_replays(tmp_path, raw_phantom):
    raw = RawFile(raw_phantom)
    sent = _slice0_and_part_of_slice1(raw)
    with serve_process(tmp_path / "raw") as (process, port):
        with open_session(port, _stream(ConfigFile("unrollinr"), raw.header(), sent, close=False)):
            def journal_complete() -> bool:
                journals = list((tmp_path / "raw").glob("*.mrd"))
                return bool(journals) and len(open_raw(journals[0])) == len(sent)

            _wait_for(journal_complete)
            process.send_signal(signal.SIGKILL)
            process.wait(60)
    (journal,) = (tmp_path / "raw").glob("*.mrd")
    assert main(["replay", str(journal), "-o", str(tmp_path / "from-journal.h5"), *FAST_SETTINGS]) in (0, 1)
    assert 0 in [image.getHead().slice for image in read_images(tmp_path / "from-journal.h5")]

    (saved,) = recover(tmp_path / "raw")  # what `serve` does when it starts again
    assert saved.suffix == ".h5" and not journal.exists()
    assert len(RawFile(saved)) == len(sent)


def test_sigterm_finishes_the_slice_in_progress_and_closes_the_session(tmp_path, raw_phantom):
    raw = RawFile(raw_phantom)
    sent = _slice0_and_part_of_slice1(raw)
    with serve_process(tmp_path / "raw") as (process, port):
        with open_session(port, _stream(ConfigFile("unrollinr"), raw.header(), sent, close=False)) as (_, replies,
                                                                                                      reader):
            time.sleep(1.0)  # slice 0 is complete and being reconstructed
            process.send_signal(signal.SIGTERM)
            reader.join(120)
        assert process.wait(120) == 0, (tmp_path / "serve.log").read_text()
    assert replies.closed and [image.getHead().slice for image in replies.images] == [0]
    assert replies.texts == ["unrollinr: the server is shutting down"]
    (saved,) = (tmp_path / "raw").glob("*.h5")
    assert len(RawFile(saved)) == len(sent) and list((tmp_path / "raw").glob("*.mrd")) == []


def test_a_full_disk_is_reported_and_the_images_still_come(tmp_path, raw_phantom):
    raw = RawFile(raw_phantom)
    with serve_process(tmp_path / "raw", starve_disk=True) as (_, port):
        with open_session(port, _stream(ConfigFile("unrollinr"), raw.header(), raw.acquisitions())) as (_, replies,
                                                                                                       reader):
            reader.join(300)
    assert replies.closed and len(replies.images) == 2
    (problem,) = replies.texts
    assert "the raw data could not be saved" in problem and "File too large" in problem


def test_a_raw_folder_that_cannot_be_written_stops_serve_at_start(tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["serve", "--port", "0", "--save-raw", str(blocker / "raw")]) == 2
    assert "Not a directory" in caplog.text


def test_recovery_reports_a_journal_without_a_header_and_converts_the_others(tmp_path, raw_phantom, caplog):
    from unrollinr_gadget.protocol import MessageWriter

    raw = RawFile(raw_phantom)
    with open(tmp_path / "killed.mrd", "wb") as journal:  # as a killed server leaves it: no CLOSE
        writer = MessageWriter(journal)
        writer.header(raw.header())
        for acquisition in list(raw.acquisitions())[:5]:
            writer.acquisition(acquisition)
    (tmp_path / "empty.mrd").write_bytes(b"\x03\x00")  # killed while writing its header
    (saved,) = recover(tmp_path)
    assert saved.name == "killed.h5" and len(RawFile(saved)) == 5
    assert "empty.mrd ends before its ISMRMRD header is complete" in caplog.text
