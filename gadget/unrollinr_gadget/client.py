"""``unrollinr send``: stream a raw file to an MRD server (ours or Gadgetron) and collect
the images. Sending uses ismrmrd's own ``ProtocolSerializer``; replies are read
concurrently, so a server that answers while data still flows never blocks."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import ismrmrd
from ismrmrd.serialization import ConfigFile, ConfigText, ProtocolSerializer

from unrollinr_gadget.protocol import CLOSE, ERROR, IMAGE, TEXT, MessageReader
from unrollinr_gadget.rawdata import RawFile

logger = logging.getLogger(__name__)


@dataclass
class Replies:
    """What the server sent back."""

    images: list[ismrmrd.Image] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    closed: bool = False


def _collect(stream, replies: Replies) -> None:
    reader = MessageReader(stream)
    try:
        while True:
            message = reader.read()
            if message.id == IMAGE:
                replies.images.append(message.payload)
            elif message.id == TEXT:
                logger.warning("server: %s", message.payload)
                replies.texts.append(str(message.payload))
            elif message.id == ERROR:
                logger.error("server error: %s", message.payload)
                replies.errors.append(str(message.payload))
            elif message.id == CLOSE:
                replies.closed = True
                return
    except (EOFError, OSError, ValueError) as error:
        replies.errors.append(f"connection ended: {error}")


def stream_to_server(raw: RawFile, host: str, port: int, config: str, *, config_text: str | None = None,
                     parameters: str | None = None, progress: Callable[[Iterable], Iterable] | None = None,
                     timeout: float | None = None) -> Replies:
    """Send ``raw`` with config name ``config`` (or ``config_text``, a chain XML) and an
    optional JSON ``parameters`` TEXT; return the replies after the server's CLOSE."""
    replies = Replies()
    with socket.create_connection((host, port), timeout=timeout) as connection:
        connection.settimeout(None)
        incoming = connection.makefile("rb")
        reader = threading.Thread(target=_collect, args=(incoming, replies), daemon=True)
        reader.start()
        outgoing = connection.makefile("wb")
        try:
            with ProtocolSerializer(outgoing) as serializer:
                serializer.serialize(ConfigText(config_text) if config_text is not None else ConfigFile(config))
                serializer.serialize(raw.header())
                if parameters is not None:
                    serializer.serialize(parameters)
                acquisitions = raw.acquisitions()
                for acquisition in progress(acquisitions) if progress else acquisitions:
                    serializer.serialize(acquisition)
            outgoing.close()
        except OSError as error:  # the server gave up on us: its reason is in the replies
            logger.error("sending stopped: %s", error)
        reader.join(timeout)
    if not replies.closed and not replies.errors:
        replies.errors.append("the server did not close the connection")
    return replies
