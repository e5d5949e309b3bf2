"""Saving every session's raw data as it arrives, so that no exam is lost to a failed
reconstruction, a crash or a kill (``unrollinr serve --save-raw DIR``).

Each session appends its header and acquisitions to a journal, ``<name>.mrd``, in the
ISMRMRD streaming format, flushed to the operating system after every message: a killed
server leaves every message it had received, and at worst a truncated last one that readers
drop. When the session ends, for whatever reason, the journal becomes ``<name>.h5``, an
ISMRMRD dataset written under a temporary name and renamed into place, so an ``.h5`` is
always complete. :func:`recover` converts the journals a killed server left behind; until
then ``unrollinr replay`` reads a journal directly.
"""

from __future__ import annotations

import datetime
import itertools
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import ismrmrd
import ismrmrd.xsd as xsd

from unrollinr_gadget.hdf5 import open_dataset
from unrollinr_gadget.protocol import ACQUISITION, CLOSE, HEADER, MessageReader, MessageWriter
from unrollinr_gadget.rawdata import DATASET, RawFile

logger = logging.getLogger(__name__)

JOURNAL_SUFFIX = ".mrd"
_sequence = itertools.count(1)


def session_name(header: xsd.ismrmrdHeader, now: datetime.datetime | None = None) -> str:
    """A file name for a session: time, measurement ID (reduced to safe characters), process
    and sequence number, so that no two sessions share one."""
    info = header.measurementInformation
    measurement = (info.measurementID if info is not None else None) or "session"
    measurement = re.sub(r"[^A-Za-z0-9_-]", "_", measurement)[:64]
    stamp = (now or datetime.datetime.now()).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}_{measurement}_{os.getpid()}-{next(_sequence)}"


def check_writable(folder: Path) -> Path:
    """Create ``folder`` if needed and prove a file can be written there; ``OSError`` if not."""
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".unrollinr-write-test-{os.getpid()}"
    probe.write_bytes(b"")
    probe.unlink()
    return folder


class RawRecorder:
    """One session's raw data: :meth:`acquisition` as each arrives, :meth:`finish` at the end.

    A write error (a full disk, a lost permission) stops the recording; it is logged, kept
    in :attr:`error` for the session to report, and never stops the reconstruction.
    """

    def __init__(self, folder: Path, header: xsd.ismrmrdHeader) -> None:
        self.journal = folder / (session_name(header) + JOURNAL_SUFFIX)
        self.error: str | None = None
        self.acquisitions = 0
        self._file = None
        try:
            self._file = open(self.journal, "xb")  # noqa: SIM115 - held open for the whole session
            self._writer = MessageWriter(self._file)
            self._writer.header(header)
        except OSError as error:
            self._fail(error)

    def acquisition(self, acquisition: ismrmrd.Acquisition) -> None:
        """Append one acquisition (flushed at once)."""
        if self._file is None:
            return
        try:
            self._writer.acquisition(acquisition)
            self.acquisitions += 1
        except OSError as error:
            self._fail(error)

    def finish(self) -> Path | None:
        """End the journal and turn it into ``<name>.h5``; return that path (``None`` if
        nothing could be saved)."""
        if self._file is None:
            return None
        try:
            self._writer.close()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            return journal_to_dataset(self.journal)
        except OSError as error:
            self._fail(error)
            return None

    def _fail(self, error: OSError) -> None:
        self.error = f"the raw data could not be saved to {self.journal}: {error}"
        logger.error("%s", self.error)
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None


def read_journal(journal: Path) -> tuple[xsd.ismrmrdHeader, list[ismrmrd.Acquisition]]:
    """The header and every complete acquisition of a journal (a truncated last message,
    from a killed writer, is dropped)."""
    with open(journal, "rb") as stream:
        reader = MessageReader(stream)
        try:
            message = reader.read()
        except EOFError:
            raise ValueError(f"{journal} ends before its ISMRMRD header is complete") from None
        if message.id != HEADER:
            raise ValueError(f"{journal} does not start with an ISMRMRD header")
        header, acquisitions = message.payload, list[ismrmrd.Acquisition]()
        while True:
            try:
                message = reader.read()
            except EOFError:
                logger.info("%s ends without CLOSE: %d complete acquisitions kept", journal, len(acquisitions))
                break
            if message.id == CLOSE:
                break
            if message.id == ACQUISITION:
                acquisitions.append(message.payload)
    return header, acquisitions


def journal_to_dataset(journal: Path) -> Path:
    """Write a journal's data to ``<name>.h5`` atomically, then remove the journal."""
    header, acquisitions = read_journal(journal)
    target = journal.with_suffix(".h5")
    partial = journal.with_suffix(".h5.partial")
    partial.unlink(missing_ok=True)
    with open_dataset(partial, DATASET, create=True) as dataset:
        dataset.write_xml_header(ismrmrd.xsd.ToXML(header))
        for acquisition in acquisitions:
            dataset.append_acquisition(acquisition)
    os.replace(partial, target)
    journal.unlink()
    logger.info("saved the raw data: %s (%d acquisitions)", target, len(acquisitions))
    return target


def recover(folder: Path) -> list[Path]:
    """Turn the journals left in ``folder`` (by a server that was killed) into ``.h5`` files."""
    recovered = []
    for journal in sorted(folder.glob("*" + JOURNAL_SUFFIX)):
        try:
            recovered.append(journal_to_dataset(journal))
        except (OSError, ValueError) as error:
            logger.error("could not recover %s: %s", journal, error)
    return recovered


class JournalFile:
    """A journal read as a raw file (the :class:`~unrollinr_gadget.rawdata.RawFile` interface)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._header, self._acquisitions = read_journal(path)

    def header(self) -> xsd.ismrmrdHeader:
        """The ISMRMRD header."""
        return self._header

    def __len__(self) -> int:
        return len(self._acquisitions)

    def acquisitions(self) -> Iterator[ismrmrd.Acquisition]:
        """Every complete acquisition, in the order received."""
        yield from self._acquisitions


def open_raw(path: Path) -> RawFile | JournalFile:
    """A raw ISMRMRD file: an HDF5 dataset, or a journal that a killed server left."""
    with open(path, "rb") as stream:
        signature = stream.read(8)
    return RawFile(path) if signature == b"\x89HDF\r\n\x1a\n" else JournalFile(path)
