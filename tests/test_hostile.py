"""Bad input over real loopback sockets, to ``unrollinr serve`` and to the gadget in connect
mode (``unrollinr listen``): each case ends its session with a message that names the
problem and CLOSE, and a well-formed session on the same server still gets its images."""

from __future__ import annotations

import copy
import io
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import ismrmrd
import numpy as np
import pytest
from conftest import FAST_PROPERTIES
from ismrmrd.serialization import ConfigFile, ConfigText, ProtocolSerializer
from peers import Replies, connect_with_retry, properties_xml, read_replies
from test_gadget import check_images
from unrollinr_gadget.limits import MIB, StreamLimits
from unrollinr_gadget.listener import GadgetListener
from unrollinr_gadget.network import GuardedServer, parse_networks
from unrollinr_gadget.rawdata import RawFile
from unrollinr_gadget.rawsave import open_raw
from unrollinr_gadget.server import ConfigResolver, UnrollINRServer
from unrollinr_gadget.settings import GadgetSettings

IDLE_TIMEOUT_S = 3.0
LIMITS = StreamLimits(max_message_bytes=16 * MIB, max_matrix=128, max_channels=16, idle_timeout_s=IDLE_TIMEOUT_S)


def _running(server: GuardedServer) -> Iterator[GuardedServer]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.stop()
    server.server_close()


@pytest.fixture(scope="module")
def serve(tmp_path_factory) -> Iterator[UnrollINRServer]:
    resolver = ConfigResolver(base=GadgetSettings.from_properties(FAST_PROPERTIES))
    server = UnrollINRServer(("127.0.0.1", 0), resolver, raw_folder=tmp_path_factory.mktemp("raw"), limits=LIMITS)
    yield from _running(server)


@pytest.fixture(scope="module")
def listen() -> Iterator[GadgetListener]:
    yield from _running(GadgetListener(("127.0.0.1", 0), limits=LIMITS))


@dataclass(frozen=True)
class Front:
    """How a peer talks to one front end: its config message and how it reports errors."""

    name: str
    config: object

    def problems(self, replies: Replies) -> list[str]:
        return replies.texts if self.name == "serve" else replies.errors


FRONTS = {"serve": Front("serve", ConfigFile("unrollinr")),
          "listen": Front("listen", ConfigText(properties_xml(FAST_PROPERTIES)))}


def _stream(config: object, header: object, items=(), tail: bytes = b"", close: bool = True) -> bytes:
    """The bytes of a session, written by ismrmrd's own serializer, plus ``tail`` raw bytes."""
    buffer = io.BytesIO()
    serializer = ProtocolSerializer(buffer)
    serializer.serialize(config)
    if header is not None:
        serializer.serialize(header)
    for item in items:
        serializer.serialize(item)
    data = buffer.getvalue() + tail
    return data + struct.pack("<H", 4) if close else data


def _exchange(port: int, data: bytes) -> Replies:
    with connect_with_retry(port) as sock:
        try:
            sock.sendall(data)
        except OSError:
            pass  # the server may answer and close before it has read everything
        return read_replies(sock)


def _slice0(raw: RawFile) -> list[ismrmrd.Acquisition]:
    return [a for a in raw.acquisitions() if a.idx.slice == 0 and not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]


def _reshaped(original: ismrmrd.Acquisition, data: np.ndarray, centre_shift: int = 0) -> ismrmrd.Acquisition:
    """``original`` with other ``(channels, samples)`` data, its header made to match."""
    head = ismrmrd.AcquisitionHeader.from_buffer_copy(original.getHead())
    head.active_channels, head.available_channels = data.shape[0], data.shape[0]
    head.number_of_samples = data.shape[1]
    head.center_sample -= centre_shift
    changed = ismrmrd.Acquisition(head)
    changed.data[:] = data
    return changed


def _huge_acquisition_bytes() -> bytes:
    head = ismrmrd.AcquisitionHeader()
    head.number_of_samples, head.active_channels, head.available_channels = 65535, 65535, 65535
    return struct.pack("<H", 1008) + bytes(head)


def _nan(raw: RawFile) -> list[ismrmrd.Acquisition]:
    acquisitions = _slice0(raw)
    acquisitions[5].data[1, 7] = np.nan
    return acquisitions


def _changed(raw: RawFile, what: str) -> list[ismrmrd.Acquisition]:
    acquisitions = _slice0(raw)
    data = acquisitions[6].data
    acquisitions[6] = (_reshaped(acquisitions[6], data[:-1]) if what == "channels"
                       else _reshaped(acquisitions[6], data[:, 8:], centre_shift=8))
    return acquisitions


def _no_acs(raw: RawFile) -> list[ismrmrd.Acquisition]:
    return [a for a in _slice0(raw) if not 16 <= a.idx.kspace_encode_step_1 < 32]


def _header_without(raw: RawFile, what: str):
    """The raw file's header with one thing the gadget cannot take: no ``limits``, a wide
    ``matrix``, a ``3d`` encoding or a ``radial`` trajectory."""
    header = copy.deepcopy(raw.header())
    encoding = header.encoding[0]
    if what == "limits":
        encoding.encodingLimits.kspace_encoding_step_1 = None
    elif what == "3d":
        encoding.encodedSpace.matrixSize.z = 32
    elif what == "radial":
        encoding.trajectory = ismrmrd.xsd.trajectoryType("radial")
    else:
        encoding.encodedSpace.matrixSize.x = 4096
    return header


def _xml(header) -> str:
    return ismrmrd.xsd.ToXML(header)


# case -> (the session's bytes from a front and the raw file, the words the reply must hold)
CASES: dict[str, tuple[Callable[[Front, RawFile], bytes], str]] = {
    "unknown message id": (lambda f, raw: _stream(f.config, raw.header(), _slice0(raw)[:3],
                                                  tail=struct.pack("<H", 999), close=False),
                           "unsupported message id 999"),
    "a config length of 4 GB": (lambda f, raw: struct.pack("<HI", 2, 4_000_000_000), "claims 4000000000 bytes"),
    "an acquisition of 34 GB": (lambda f, raw: _stream(f.config, raw.header(), tail=_huge_acquisition_bytes(),
                                                       close=False), "claims"),
    "a header that is not XML": (lambda f, raw: _stream(f.config, None, tail=struct.pack("<HI", 3, 5) + b"hello"),
                                 "header"),
    "a header without encoding limits": (lambda f, raw: _stream(f.config, _header_without(raw, "limits")),
                                         "no encodingLimits"),
    "a 3D encoding": (lambda f, raw: _stream(f.config, _header_without(raw, "3d"), _slice0(raw)[:2]),
                      "3D encodings are not supported"),
    "a radial trajectory": (lambda f, raw: _stream(f.config, _header_without(raw, "radial"), _slice0(raw)[:2]),
                            "only Cartesian data"),
    "a matrix over the limit": (lambda f, raw: _stream(f.config, _header_without(raw, "matrix"), _slice0(raw)[:2]),
                                "exceeds the limit of 128"),
    "channels that change mid-slice": (lambda f, raw: _stream(f.config, raw.header(), _changed(raw, "channels")),
                                       "3 channels after 4"),
    "samples that change mid-slice": (lambda f, raw: _stream(f.config, raw.header(), _changed(raw, "samples")),
                                      "88 samples per line after 96"),
    "NaN samples": (lambda f, raw: _stream(f.config, raw.header(), _nan(raw)), "NaN or infinite"),
    "no ACS lines": (lambda f, raw: _stream(f.config, raw.header(), _no_acs(raw)), "centre is not sampled"),
}


@pytest.mark.parametrize("front_name", ["serve", "listen"])
def test_every_bad_input_gets_a_clear_error_and_close_and_the_next_session_is_served(
        front_name, request, raw_phantom):
    front, server = FRONTS[front_name], request.getfixturevalue(front_name)
    raw = RawFile(raw_phantom)
    for case, (make, expected) in CASES.items():
        replies = _exchange(server.port, make(front, raw))
        problems = front.problems(replies)
        assert replies.closed, case
        assert replies.images == [], case
        assert any(expected in problem for problem in problems), f"{case}: {problems}"

    # a client that vanishes mid-stream, and one that stalls while a good session runs
    with connect_with_retry(server.port) as sock:
        sock.sendall(_stream(front.config, raw.header(), _slice0(raw)[:5], close=False)[:-100])
    stalled: list[Replies] = []
    with connect_with_retry(server.port) as staller:
        staller.sendall(_stream(front.config, raw.header(), _slice0(raw)[:5], close=False))
        reader = threading.Thread(target=lambda: stalled.append(read_replies(staller)))
        reader.start()
        good = _exchange(server.port, _stream(front.config, raw.header(), raw.acquisitions()))
        reader.join(60)
    assert good.closed and front.problems(good) == []
    check_images(good.images, raw)
    assert stalled[0].closed and f"nothing received for {IDLE_TIMEOUT_S} s" in front.problems(stalled[0])[-1]


def test_serve_saves_every_sessions_raw_data_even_when_it_fails(serve, raw_phantom):
    raw = RawFile(raw_phantom)
    before = set(serve.raw_folder.glob("*.h5"))
    acquisitions = _nan(raw)
    _exchange(serve.port, _stream(FRONTS["serve"].config, raw.header(), acquisitions))
    (saved,) = set(serve.raw_folder.glob("*.h5")) - before
    copy_ = open_raw(saved)
    assert len(copy_) == len(acquisitions)
    assert np.isnan(list(copy_.acquisitions())[5].data).any()  # what was received, as received
    assert list(serve.raw_folder.glob("*.mrd")) == []


def test_config_names_come_from_a_fixed_registry(serve, raw_phantom):
    raw = RawFile(raw_phantom)
    for name in ("../../etc/passwd", "/etc/passwd", "os", "unrollinr_gadget.gadget", "__import__('os')"):
        replies = _exchange(serve.port, _stream(ConfigFile(name), raw.header()))
        assert replies.closed and f"unknown config {name!r}" in replies.texts[0]
    assert "unrollinr.xml" in serve.resolver.names()


@pytest.mark.parametrize("front_name", ["serve", "listen"])
def test_a_connection_from_outside_the_allowed_ranges_is_refused(front_name, raw_phantom):
    make = (lambda: UnrollINRServer(("127.0.0.1", 0), allow=parse_networks(["10.0.0.0/8"]))) \
        if front_name == "serve" else (lambda: GadgetListener(("127.0.0.1", 0), allow=parse_networks(["10.0.0.0/8"])))
    for server in _running(make()):
        with connect_with_retry(server.port) as sock:
            sock.sendall(_stream(FRONTS[front_name].config, RawFile(raw_phantom).header()))
            assert sock.recv(1) == b""  # closed unanswered


def test_connections_past_the_limit_are_turned_away(raw_phantom):
    raw = RawFile(raw_phantom)
    for server in _running(UnrollINRServer(("127.0.0.1", 0), max_connections=1, limits=LIMITS)):
        with connect_with_retry(server.port) as first:
            first.sendall(_stream(FRONTS["serve"].config, raw.header(), close=False))
            time.sleep(0.5)
            replies = _exchange(server.port, _stream(FRONTS["serve"].config, raw.header()))
        assert replies.closed and "busy (1 sessions at most)" in replies.texts[0]


def test_allowed_ranges_are_checked():
    from unrollinr_gadget.network import is_allowed

    allow = parse_networks(["10.0.0.0/8", "192.168.2.7", "fd00::/8"])
    assert is_allowed("10.1.2.3", allow) and is_allowed("192.168.2.7", allow) and is_allowed("fd00::1", allow)
    assert is_allowed("::ffff:10.0.0.1", allow)
    assert not is_allowed("192.168.2.8", allow) and not is_allowed("127.0.0.1", allow)
    assert is_allowed("8.8.8.8", None)
    with pytest.raises(ValueError, match="not an address range"):
        parse_networks(["10.0.0.0/33"])


def test_a_batch_that_runs_out_of_memory_runs_again_in_smaller_batches(monkeypatch, raw_phantom):
    import torch
    from unrollinr_gadget import pipeline as pipeline_module
    from unrollinr_gadget.pipeline import ReconPipeline, SliceFailure

    real = pipeline_module.reconstruct_together
    batch_sizes: list[int] = []

    def memory_for_one_slice_only(kspaces, *args, **kwargs):
        batch_sizes.append(len(kspaces))
        if len(kspaces) > 1:  # as reconstruct_together reports a batch that ran out of memory
            return [torch.OutOfMemoryError("CUDA out of memory")] * len(kspaces)
        return real(kspaces, *args, **kwargs)

    monkeypatch.setattr(pipeline_module, "reconstruct_together", memory_for_one_slice_only)
    raw = RawFile(raw_phantom)
    settings = GadgetSettings.from_properties(FAST_PROPERTIES)
    outcomes = list(ReconPipeline(raw.header(), settings.recon).process(raw.acquisitions()))
    assert batch_sizes == [2, 1, 1]
    assert not any(isinstance(o, SliceFailure) for o in outcomes)
    assert [image.getHead().slice for image in outcomes] == [0, 1]
