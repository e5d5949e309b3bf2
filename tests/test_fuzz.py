"""Random and mutated byte streams, to the message reader and to a live server on loopback:
nothing may raise anything but a clean protocol error, crash the server or hang it."""

from __future__ import annotations

import io
import socket
import struct
import threading

import pytest
from conftest import FAST_PROPERTIES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ismrmrd.serialization import ConfigFile
from peers import connect_with_retry, read_replies
from test_gadget import check_images
from test_hostile import _slice0, _stream
from unrollinr_gadget.limits import MIB, StreamLimits
from unrollinr_gadget.protocol import CLOSE, MessageReader
from unrollinr_gadget.rawdata import RawFile
from unrollinr_gadget.server import ConfigResolver, UnrollINRServer
from unrollinr_gadget.settings import GadgetSettings

READER_CASES = 3000
SERVER_CASES = 1000
LIMITS = StreamLimits(max_message_bytes=4 * MIB, max_matrix=128, max_channels=16, idle_timeout_s=5.0)
# Reproducible in CI: a fixed sequence of cases, no example database, no time limit per case.
FUZZING = {"deadline": None, "derandomize": True, "database": None, "suppress_health_check": list(HealthCheck)}


@st.composite
def mutated(draw, valid: bytes) -> bytes:
    """``valid`` with bytes overwritten, inserted or cut, or plain random bytes. Half the
    mutations fall in the acquisitions (past the 1 kB config name and the header)."""
    if draw(st.booleans()) and draw(st.booleans()):
        return draw(st.binary(max_size=4096))
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 8))):
        start = draw(st.sampled_from([0, len(data) // 2]))
        position = draw(st.integers(min(start, len(data) - 1), len(data) - 1))
        action = draw(st.sampled_from(["overwrite", "insert", "cut"]))
        if action == "overwrite":
            data[position] = draw(st.integers(0, 255))
        elif action == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[position:position + draw(st.integers(1, 64))]
        if not data:
            break
    return bytes(data)


@pytest.fixture(scope="module")
def valid_session(raw_phantom) -> bytes:
    raw = RawFile(raw_phantom)
    return _stream(ConfigFile("unrollinr"), raw.header(), _slice0(raw)[:4])


def test_the_reader_only_ever_raises_protocol_errors(valid_session):
    cases = 0

    @settings(max_examples=READER_CASES, **FUZZING)
    @given(st.data())
    def read_everything(data) -> None:
        nonlocal cases
        cases += 1
        reader = MessageReader(io.BytesIO(data.draw(mutated(valid_session))), LIMITS)
        try:
            while reader.read().id != CLOSE:
                pass
        except (EOFError, ValueError):  # the end of the stream, ProtocolError and LimitExceeded
            pass

    read_everything()
    assert cases >= READER_CASES


def test_a_live_server_survives_mutated_sessions_and_then_serves_a_good_one(valid_session, raw_phantom):
    resolver = ConfigResolver(base=GadgetSettings.from_properties(FAST_PROPERTIES))
    server = UnrollINRServer(("127.0.0.1", 0), resolver, limits=LIMITS)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    cases = 0

    @settings(max_examples=SERVER_CASES, **FUZZING)
    @given(st.data())
    def session(data) -> None:
        nonlocal cases
        cases += 1
        with connect_with_retry(server.port, timeout=30) as sock:
            try:
                sock.sendall(data.draw(mutated(valid_session)))
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the server answered and closed first
            try:
                replies = read_replies(sock)
            except (EOFError, ValueError, struct.error):
                return  # the server closed after a reply our peer could not parse: it did not hang
            assert replies.closed

    try:
        session()
        assert cases >= SERVER_CASES and serving.is_alive()
        raw = RawFile(raw_phantom)
        with connect_with_retry(server.port) as sock:
            sock.sendall(_stream(ConfigFile("unrollinr"), raw.header(), raw.acquisitions()))
            replies = read_replies(sock)
        check_images(replies.images, raw)
    finally:
        server.stop()
        server.server_close()
