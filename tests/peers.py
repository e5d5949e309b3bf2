"""An independent MRD peer for protocol tests, built on ismrmrd's own ProtocolSerializer
and ProtocolDeserializer (plus a hand-read ERROR message, which they do not cover)."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import BinaryIO

import ismrmrd
from ismrmrd.serialization import ConfigFile, ConfigText, ProtocolDeserializer, ProtocolSerializer

ERROR_ID = 8
CLOSE_ID = 4


@dataclass
class Replies:
    images: list[ismrmrd.Image] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    closed: bool = False
    order: list[str] = field(default_factory=list)  # "image", "text" or "error", as they came


def properties_xml(properties: dict[str, str]) -> str:
    """A Gadgetron ``<configuration>`` element, as Gadgetron sends it to an external gadget."""
    items = "".join(f'<property name="{k}" value="{v}"/>' for k, v in properties.items())
    return f"<configuration>{items}</configuration>"


def send_stream(sock: socket.socket, config: str | ConfigText | ConfigFile, header, items: Iterable,
                text: str | None = None, extra: Callable[[BinaryIO], None] | None = None) -> None:
    """Config, header, optional TEXT, the items, ``extra(stream)`` for messages ismrmrd
    cannot write (Gadgetron buffers), then CLOSE."""
    stream = sock.makefile("wb")
    with ProtocolSerializer(stream) as serializer:
        serializer.serialize(config)
        serializer.serialize(header)
        if text is not None:
            serializer.serialize(text)
        for item in items:
            serializer.serialize(item)
        if extra is not None:
            extra(stream)
    stream.flush()


def read_replies(sock: socket.socket, on_error: Callable[[], None] | None = None) -> Replies:
    """Read images, TEXT and ERROR messages until CLOSE; ``on_error()`` runs at each ERROR."""
    stream = sock.makefile("rb")
    replies = Replies()
    while True:
        deserializer = ProtocolDeserializer(stream)
        message_id = deserializer.peek()
        if message_id == ERROR_ID:
            (length,) = struct.unpack("<Q", stream.read(8))
            replies.errors.append(stream.read(length).decode())
            replies.order.append("error")
            if on_error is not None:
                on_error()
            continue
        if message_id == CLOSE_ID:
            replies.closed = True
            return replies
        item = next(deserializer.deserialize())
        if isinstance(item, ismrmrd.Image):
            replies.images.append(item)
            replies.order.append("image")
        else:
            replies.texts.append(str(item))
            replies.order.append("text")


def connect_with_retry(port: int, host: str = "localhost", timeout: float = 60.0) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
            sock.settimeout(timeout * 5)
            return sock
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def exchange_like_external_channel(sock: socket.socket, config, header, items: Iterable,
                                   pause_after: Callable[[object], bool], pause_s: float) -> Replies:
    """Talk to a gadget as Gadgetron 4.7's ``ExternalChannel`` does: send from one thread
    and read from another, and close the outbound side (CLOSE, then nothing more) on the
    gadget's first ERROR. Items are paced: ``pause_s`` after each item for which
    ``pause_after(item)`` holds, as a scanner streams slice by slice."""
    closed = threading.Event()

    def send() -> None:
        stream = sock.makefile("wb")
        with ProtocolSerializer(stream) as serializer:  # CLOSE on exit
            serializer.serialize(config)
            serializer.serialize(header)
            for item in items:
                if closed.is_set():
                    break
                serializer.serialize(item)
                stream.flush()
                if pause_after(item):
                    closed.wait(pause_s)
        stream.flush()

    sender = threading.Thread(target=send)
    sender.start()
    replies = read_replies(sock, on_error=closed.set)
    sender.join()
    return replies
