"""Framing of the MRD streaming protocol (little-endian, a u16 message id first).

Used by our server and by ``unrollinr send``. Message bodies are (de)serialised by
``ismrmrd`` itself; this module only frames them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO

import ismrmrd
import ismrmrd.xsd as xsd

CONFIG_FILE = 1
CONFIG_TEXT = 2
HEADER = 3
CLOSE = 4
TEXT = 5
ERROR = 8
ACQUISITION = 1008
IMAGE = 1022
WAVEFORM = 1026
CONFIG_FILE_SIZE = 1024

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class ProtocolError(ValueError):
    """The peer sent something the protocol does not allow here."""


@dataclass(frozen=True)
class Message:
    """One framed message: its id and decoded payload (``None`` for CLOSE)."""

    id: int
    payload: object = None


class MessageReader:
    """Reads framed messages from a binary stream."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream

    def _exactly(self, size: int) -> bytes:
        data = self._stream.read(size)
        if data is None or len(data) < size:
            raise EOFError(f"the stream ended inside a message ({0 if data is None else len(data)} of {size} bytes)")
        return data

    def _text(self, length_format: struct.Struct = _U32) -> str:
        (length,) = length_format.unpack(self._exactly(length_format.size))
        return self._exactly(length).decode("utf-8", errors="replace").rstrip("\x00")

    def read(self) -> Message:
        """The next message; ``EOFError`` if the stream ends before one starts."""
        head = self._stream.read(_U16.size)
        if not head:
            raise EOFError("the stream ended without CLOSE")
        if len(head) < _U16.size:
            raise EOFError("the stream ended inside a message id")
        (message_id,) = _U16.unpack(head)
        if message_id == CONFIG_FILE:
            return Message(message_id, self._exactly(CONFIG_FILE_SIZE).split(b"\x00", 1)[0].decode("utf-8"))
        if message_id in (CONFIG_TEXT, TEXT):
            return Message(message_id, self._text())
        if message_id == HEADER:
            return Message(message_id, xsd.CreateFromDocument(self._text().encode("utf-8")))
        if message_id == ERROR:
            return Message(message_id, self._text(_U64))
        if message_id == CLOSE:
            return Message(message_id)
        if message_id == ACQUISITION:
            return Message(message_id, ismrmrd.Acquisition.deserialize_from(self._exactly))
        if message_id == IMAGE:
            return Message(message_id, ismrmrd.Image.deserialize_from(self._exactly))
        if message_id == WAVEFORM:
            return Message(message_id, ismrmrd.Waveform.deserialize_from(self._exactly))
        raise ProtocolError(f"unsupported message id {message_id}")


class MessageWriter:
    """Writes framed messages to a binary stream."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream

    def _frame(self, message_id: int, *parts: bytes) -> None:
        self._stream.write(_U16.pack(message_id) + b"".join(parts))
        flush = getattr(self._stream, "flush", None)  # Gadgetron's socket wrapper has none
        if flush is not None:
            flush()

    def image(self, image: ismrmrd.Image) -> None:
        """Message 1022."""
        self._frame(IMAGE, image.to_bytes())

    def text(self, text: str) -> None:
        """Message 5: a u32 length and UTF-8 text."""
        data = text.encode("utf-8")
        self._frame(TEXT, _U32.pack(len(data)), data)

    def error(self, text: str) -> None:
        """Message 8, as Gadgetron expects it: a u64 length and UTF-8 text."""
        data = text.encode("utf-8")
        self._frame(ERROR, _U64.pack(len(data)), data)

    def close(self) -> None:
        """Message 4."""
        self._frame(CLOSE)
