"""Framing of the MRD streaming protocol (little-endian, a u16 message id first).

Used by our server and by ``unrollinr send``. Message bodies are (de)serialised by
``ismrmrd`` itself; this module only frames them.
"""

from __future__ import annotations

import ctypes
import io
import logging
import struct
import warnings
from dataclasses import dataclass
from typing import Protocol

import ismrmrd
import ismrmrd.xsd as xsd
from ismrmrd.image import get_dtype_from_data_type

from unrollinr_gadget.limits import StreamLimits

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

logger = logging.getLogger(__name__)

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class ByteSource(Protocol):
    """Where messages are read from: a binary file, or the gadget's socket."""

    def read(self, size: int, /) -> bytes | None: ...


class ByteSink(Protocol):
    """Where messages are written to: a binary file, or the gadget's socket."""

    def write(self, data: bytes, /) -> object: ...


class ProtocolError(ValueError):
    """The peer sent something the protocol does not allow here."""


def parse_header(document: bytes | str) -> xsd.ismrmrdHeader:
    """An ISMRMRD XML header, or :class:`ProtocolError` naming what is wrong with it."""
    if isinstance(document, str):
        document = document.encode("utf-8")
    with warnings.catch_warnings(record=True) as doubts:  # xsdata warns of values it cannot convert
        warnings.simplefilter("always")
        try:
            header = xsd.CreateFromDocument(document)
        except (ValueError, TypeError) as error:  # xsdata: ParserError for bad XML, TypeError for missing parts
            raise ProtocolError(f"the header is not a valid ISMRMRD XML header: {error}") from None
    for doubt in doubts:
        logger.warning("ISMRMRD header: %s", doubt.message)
    return header


@dataclass(frozen=True)
class Message:
    """One framed message: its id and decoded payload (``None`` for CLOSE)."""

    id: int
    payload: object = None


class MessageReader:
    """Reads framed messages from a binary stream; every length the peer claims is checked
    against ``limits.max_message_bytes`` before it is read."""

    def __init__(self, stream: ByteSource, limits: StreamLimits | None = None) -> None:
        self._stream = stream
        self._limits = limits or StreamLimits()

    def _exactly(self, size: int) -> bytes:
        self._limits.check_message_size(size)
        data = self._stream.read(size)
        if data is None or len(data) < size:
            raise EOFError(f"the stream ended inside a message ({0 if data is None else len(data)} of {size} bytes)")
        return data

    def _text(self, length_format: struct.Struct = _U32) -> str:
        (length,) = length_format.unpack(self._exactly(length_format.size))
        return self._exactly(length).decode("utf-8", errors="replace").rstrip("\x00")

    def read(self) -> Message:
        """The next message; ``EOFError`` if the stream ends, :class:`ProtocolError` or
        :class:`~unrollinr_gadget.limits.LimitExceeded` if it is malformed or too large."""
        head = self._stream.read(_U16.size)
        if not head:
            raise EOFError("the stream ended without CLOSE")
        if len(head) < _U16.size:
            raise EOFError("the stream ended inside a message id")
        (message_id,) = _U16.unpack(head)
        return Message(message_id, self.read_body(message_id))

    def read_body(self, message_id: int) -> object:
        """The decoded body of a message whose id was already read."""
        decode = self._decoders.get(message_id)
        if decode is None:
            raise ProtocolError(f"unsupported message id {message_id}")
        try:
            return decode(self)
        except (TypeError, KeyError, IndexError, struct.error) as error:  # malformed bodies, from ismrmrd
            raise ProtocolError(f"malformed message (id {message_id}): {error}") from None

    def _config_name(self) -> str:
        name = self._exactly(CONFIG_FILE_SIZE).split(b"\x00", 1)[0]
        return name.decode("utf-8", errors="replace")

    def _acquisition(self) -> ismrmrd.Acquisition:
        head_bytes = self._exactly(ctypes.sizeof(ismrmrd.AcquisitionHeader))
        head = ismrmrd.AcquisitionHeader.from_buffer_copy(head_bytes)
        samples, channels, dimensions = head.number_of_samples, head.active_channels, head.trajectory_dimensions
        body = self._exactly(samples * (dimensions * 4 + channels * 8))
        return ismrmrd.Acquisition.deserialize_from(io.BytesIO(head_bytes + body).read)

    def _image(self) -> ismrmrd.Image:
        head_bytes = self._exactly(ctypes.sizeof(ismrmrd.ImageHeader))
        head = ismrmrd.ImageHeader.from_buffer_copy(head_bytes)
        item_size = get_dtype_from_data_type(head.data_type).itemsize
        attributes_length = self._exactly(_U64.size)
        attributes = self._exactly(_U64.unpack(attributes_length)[0])
        x, y, z = head.matrix_size
        data = self._exactly(head.channels * x * y * z * item_size)
        rest = io.BytesIO(attributes_length + attributes + data)
        return ismrmrd.Image.deserialize_from_with_header(head_bytes, rest.read)

    def _waveform(self) -> ismrmrd.Waveform:
        head_bytes = self._exactly(ctypes.sizeof(ismrmrd.WaveformHeader))
        head = ismrmrd.WaveformHeader.from_buffer_copy(head_bytes)
        body = self._exactly(head.channels * head.number_of_samples * 4)
        return ismrmrd.Waveform.deserialize_from(io.BytesIO(head_bytes + body).read)

    # Each body is read whole, its size checked first, before ismrmrd allocates for it.
    _decoders = {
        CONFIG_FILE: _config_name,
        CONFIG_TEXT: lambda reader: reader._text(),
        TEXT: lambda reader: reader._text(),
        HEADER: lambda reader: parse_header(reader._text()),
        ERROR: lambda reader: reader._text(_U64),
        CLOSE: lambda reader: None,
        ACQUISITION: _acquisition,
        IMAGE: _image,
        WAVEFORM: _waveform,
    }


class MessageWriter:
    """Writes framed messages to a binary stream."""

    def __init__(self, stream: ByteSink) -> None:
        self._stream = stream

    def _frame(self, message_id: int, *parts: bytes) -> None:
        self._stream.write(_U16.pack(message_id) + b"".join(parts))
        flush = getattr(self._stream, "flush", None)  # Gadgetron's socket wrapper has none
        if flush is not None:
            flush()

    def header(self, header: xsd.ismrmrdHeader) -> None:
        """Message 3: a u32 length and the ISMRMRD XML header."""
        data = xsd.ToXML(header).encode("utf-8")
        self._frame(HEADER, _U32.pack(len(data)), data)

    def acquisition(self, acquisition: ismrmrd.Acquisition) -> None:
        """Message 1008."""
        self._frame(ACQUISITION, acquisition.to_bytes())

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
