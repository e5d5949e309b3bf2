"""The Gadgetron external Python gadget.

In a chain (see ``chains/``)::

    <external>
      <execute name="unrollinr_gadget.gadget" target="handle" type="python"/>
      <configuration><property name="iterations" value="300"/></configuration>
    </external>

Gadgetron runs ``python3 -m gadgetron <port> unrollinr_gadget.gadget handle``; in connect
mode (``<connect port="18000"/>``) run ``unrollinr listen --port 18000`` instead.

Slices that complete together (the end of an interleaved multi-slice exam: their last
lines are already waiting in the socket) are reconstructed in one batched run, each slice
as it would be alone. A slice that fails (or a malformed acquisition) never costs the
others: Gadgetron's
``ExternalChannel`` answers an ERROR (id 8) by closing its channel to the gadget, so the
failures are collected and sent as one ERROR after the last image, just before CLOSE;
Gadgetron then reports them. The gadget also works around the upstream client package's
gaps: a TEXT message no longer ends the stream; a peer that disconnects ends the gadget
instead of spinning forever; nothing is printed to stdout.
"""

from __future__ import annotations

import logging
import select
import socket
import time

import ismrmrd
from gadgetron.external import constants
from gadgetron.external.readers import read_byte_string
from gadgetron.types.recon_data import ReconData

from unrollinr_gadget.pipeline import Outcome, ReconPipeline, SliceFailure
from unrollinr_gadget.protocol import MessageWriter
from unrollinr_gadget.settings import GadgetSettings, chain_properties

logger = logging.getLogger(__name__)


class _EndSafeSocket:
    """Replaces gadgetron-python's socket wrapper, whose read loops forever once the peer
    has closed (``recv`` returning nothing): this one raises ``EOFError`` instead."""

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock

    def read(self, size: int) -> bytes:
        data = bytearray()
        while len(data) < size:
            chunk = self.socket.recv(size - len(data))
            if not chunk:
                raise EOFError(f"Gadgetron closed the connection ({len(data)} of {size} bytes read)")
            data += chunk
        return bytes(data)

    def more_waiting(self) -> bool:
        """Whether Gadgetron has already sent more than was read."""
        readable, _, _ = select.select([self.socket], [], [], 0)
        return bool(readable)

    def write(self, data: bytes) -> None:
        self.socket.sendall(data)

    def close(self) -> None:
        try:
            MessageWriter(self).close()
        except OSError:
            pass  # the peer is gone: nothing to tell it
        self.socket.close()


class _Text(str):
    """A TEXT message read from Gadgetron (ignored, but must not end the stream)."""


def _read_text(source) -> _Text:
    return _Text(read_byte_string(source).decode("utf-8", errors="replace"))


def send_error(connection, message: str) -> None:
    """Send ERROR (id 8) to Gadgetron, which closes its channel to the gadget and raises
    the message as a RemoteError at CLOSE: send it last."""
    MessageWriter(connection.socket).error(message)


def _send(connection, outcomes: list[Outcome], failures: list[str]) -> None:
    """Send the images now; keep the failures for the end of the stream."""
    for outcome in outcomes:
        if isinstance(outcome, SliceFailure):
            failures.append(str(outcome))
        else:
            connection.send(outcome)


def failure_report(failures: list[str]) -> str:
    """One message for every failure of the stream, one per line."""
    return "\n".join(failures)


def handle(connection) -> None:
    """Reconstruct every slice of the stream and send its image as soon as it is done."""
    start = time.perf_counter()
    connection.socket = _EndSafeSocket(connection.socket.socket)
    connection.add_reader(constants.GADGET_MESSAGE_TEXT, _read_text)
    try:
        settings = GadgetSettings.from_properties(chain_properties(connection.config))
        pipeline = ReconPipeline(connection.header, settings.recon, output=settings.output,
                                 device=settings.device, series_index=settings.series_index)
    except (ValueError, AttributeError) as error:
        logger.error("invalid configuration: %s", error)
        send_error(connection, f"unrollinr: invalid configuration: {error}")
        return
    failures: list[str] = []
    images = 0
    try:
        for item in connection:
            if isinstance(item, ismrmrd.Acquisition):
                outcomes = pipeline.add(item, defer=True)
            elif isinstance(item, ReconData):
                outcomes = pipeline.add_buffers(item, defer=True)
            elif isinstance(item, (ismrmrd.Waveform, _Text)):
                continue
            else:  # images and other items pass through untouched
                connection.send(item)
                continue
            if not connection.socket.more_waiting():  # slices that complete together run as one batch
                outcomes += pipeline.flush()
            images += sum(not isinstance(o, SliceFailure) for o in outcomes)
            _send(connection, outcomes, failures)
        outcomes = pipeline.finish()
        images += sum(not isinstance(o, SliceFailure) for o in outcomes)
        _send(connection, outcomes, failures)
        if failures:
            send_error(connection, failure_report(failures))
    except (EOFError, OSError) as error:
        logger.error("connection lost: %s", error)
        return
    except Exception as error:  # noqa: BLE001 - report anything to Gadgetron rather than vanish
        logger.exception("gadget failed")
        send_error(connection, failure_report([*failures, f"unrollinr: {type(error).__name__}: {error}"]))
        return
    logger.info("sent %d images, %d failures, in %.1f s", images, len(failures), time.perf_counter() - start)
