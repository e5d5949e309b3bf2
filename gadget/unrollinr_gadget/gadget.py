"""The Gadgetron external Python gadget.

In a chain (see ``chains/``)::

    <external>
      <execute name="unrollinr_gadget.gadget" target="handle" type="python"/>
      <configuration><property name="iterations" value="300"/></configuration>
    </external>

Gadgetron runs ``python3 -m gadgetron <port> unrollinr_gadget.gadget handle``; in connect
mode (``<connect port="18000"/>``) run ``unrollinr listen --port 18000`` instead.

Slices that complete together (the end of an interleaved multi-slice exam: their last
lines are already waiting in the socket) are reconstructed in one batched run (one per
image shape and number of sets of coil maps in use), each slice as it would be alone. A
slice that fails (or a malformed acquisition) never costs the others: Gadgetron's
``ExternalChannel`` answers an ERROR (id 8) by closing its channel to the gadget, so the
failures are collected and sent as one ERROR after the last image, just before CLOSE;
Gadgetron then reports them. The gadget also works around the upstream client package's
gaps: a TEXT message no longer ends the stream; a peer that disconnects ends the gadget
instead of spinning forever; an unknown message id is an error rather than a silent end;
no length a message claims is read past :class:`~unrollinr_gadget.limits.StreamLimits`;
nothing is printed to stdout.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time

import ismrmrd
from gadgetron.types.recon_data import ReconData

from unrollinr_gadget.limits import StreamLimits
from unrollinr_gadget.pipeline import Delivery, ReconPipeline, SliceFailure
from unrollinr_gadget.protocol import ACQUISITION, IMAGE, TEXT, WAVEFORM, MessageReader, MessageWriter, ProtocolError
from unrollinr_gadget.settings import GadgetSettings, chain_properties

logger = logging.getLogger(__name__)

# Gadgetron's own <execute> stream: its pauses follow the scanner, so no idle timeout.
EXECUTE_LIMITS = StreamLimits(idle_timeout_s=None)


class GadgetSocket:
    """The gadget's side of its Gadgetron socket, in place of gadgetron-python's wrapper.

    That wrapper reads for ever once the peer has closed (``recv`` returning nothing) and
    reads whatever length a message claims. This one raises ``EOFError`` at the end of the
    stream, checks every length against ``limits.max_message_bytes`` before reading it,
    and keeps ``limits.idle_timeout_s`` (``TimeoutError`` when a peer stalls). It also
    offers the socket calls gadgetron-python's ``Connection`` makes, so that a connection
    can be built on it and read its config and header within the same limits.
    """

    def __init__(self, sock: socket.socket, limits: StreamLimits) -> None:
        self.socket = sock
        self.limits = limits
        self._closed = False
        sock.settimeout(limits.idle_timeout_s)

    def read(self, size: int) -> bytes:
        """Exactly ``size`` bytes."""
        self.limits.check_message_size(size)
        data = bytearray()
        while len(data) < size:
            chunk = self.socket.recv(size - len(data))
            if not chunk:
                raise EOFError(f"Gadgetron closed the connection ({len(data)} of {size} bytes read)")
            data += chunk
        return bytes(data)

    def recv(self, size: int, flags: int = 0) -> bytes:
        """What ``Connection`` calls (with ``MSG_WAITALL``): exactly ``size`` bytes."""
        return self.read(size)

    def settimeout(self, _timeout: float | None) -> None:
        """``Connection`` clears the timeout; the idle timeout stays."""

    def more_waiting(self) -> bool:
        """Whether Gadgetron has already sent more than was read."""
        readable, _, _ = select.select([self.socket], [], [], 0)
        return bool(readable)

    def write(self, data: bytes) -> None:
        self.socket.sendall(data)

    sendall = send = write

    def close(self) -> None:
        """Send CLOSE (once, if the peer is still there) and close the socket."""
        if self._closed:
            return
        self._closed = True
        try:
            MessageWriter(self).close()
        except OSError:
            pass  # the peer is gone: nothing to tell it
        self.socket.close()


class _KnownMessages(dict):
    """gadgetron-python's table of readers, except that a message id it lacks is an error
    (the package logs it and ends the stream as if CLOSE had come)."""

    def get(self, message_id: int, default: object = None) -> object:
        if message_id in self:
            return self[message_id]
        raise ProtocolError(f"unsupported message id {message_id}")


def guard(connection, limits: StreamLimits = EXECUTE_LIMITS) -> GadgetSocket:
    """Put ``connection`` on a :class:`GadgetSocket` and bounded readers for the messages
    ismrmrd decodes; unknown message ids become errors. Returns the socket."""
    raw = connection.socket.socket
    gadget_socket = raw if isinstance(raw, GadgetSocket) else GadgetSocket(raw, limits)
    connection.socket = gadget_socket
    connection.readers = _KnownMessages(connection.readers)
    reader = MessageReader(gadget_socket, gadget_socket.limits)
    for message_id in (ACQUISITION, WAVEFORM, IMAGE, TEXT):
        connection.add_reader(message_id, lambda _source, message_id=message_id: reader.read_body(message_id))
    return gadget_socket


def send_error(gadget_socket: GadgetSocket, message: str) -> None:
    """Send ERROR (id 8) to Gadgetron, which closes its channel to the gadget and raises
    the message as a RemoteError at CLOSE: send it last."""
    MessageWriter(gadget_socket).error(message)


def failure_report(failures: list[SliceFailure], *more: str) -> str:
    """One message for every failure of the stream, one per line."""
    return "\n".join([*map(str, failures), *more])


def handle(connection, device_lock: threading.Lock | None = None, base: GadgetSettings | None = None) -> None:
    """Reconstruct every slice of the stream and send its image as soon as it is done.

    ``device_lock`` queues the device among connections that share it, and ``base`` holds
    the settings that the chain's properties override (both from ``unrollinr listen``).
    """
    start = time.perf_counter()
    gadget_socket = guard(connection)
    try:
        settings = GadgetSettings.from_properties(chain_properties(connection.config), base=base)
        pipeline = ReconPipeline.from_settings(connection.header, settings, device_lock=device_lock,
                                               limits=gadget_socket.limits)
    except (ValueError, AttributeError) as error:
        logger.error("cannot reconstruct this stream: %s", error)
        send_error(gadget_socket, f"unrollinr: cannot reconstruct this stream: {error}")
        return
    deliver = Delivery(connection.send, lambda failure: None)  # failures go last, as one ERROR
    try:
        for item in connection:
            if isinstance(item, ismrmrd.Acquisition):
                outcomes = pipeline.add(item, defer=True)
            elif isinstance(item, ReconData):
                outcomes = pipeline.add_buffers(item, defer=True)
            elif isinstance(item, (ismrmrd.Waveform, str)):  # waveforms and TEXT are not ours to use
                continue
            else:  # images and other items pass through untouched
                connection.send(item)
                continue
            if not gadget_socket.more_waiting():  # slices that complete together run as one batch
                outcomes += pipeline.flush()
            deliver(outcomes)
        deliver(pipeline.finish())
        if deliver.failures:
            send_error(gadget_socket, failure_report(deliver.failures))
    except (TimeoutError, ValueError) as error:  # a stalled or malformed stream: keep the slices complete so far
        problem = (f"{gadget_socket.limits.silence()}: the gadget stops" if isinstance(error, TimeoutError)
                   else str(error))
        logger.error("%s", problem)
        deliver(pipeline.flush())
        send_error(gadget_socket, failure_report(deliver.failures, f"unrollinr: {problem}"))
        return
    except (EOFError, OSError) as error:
        logger.error("connection lost: %s", error)
        return
    except Exception as error:  # noqa: BLE001 - report anything to Gadgetron rather than vanish
        logger.exception("gadget failed")
        send_error(gadget_socket, failure_report(deliver.failures, f"unrollinr: {type(error).__name__}: {error}"))
        return
    logger.info("sent %d images, %d failures, in %.1f s", deliver.images, len(deliver.failures),
                time.perf_counter() - start)
