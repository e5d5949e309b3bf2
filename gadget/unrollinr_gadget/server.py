"""``unrollinr serve``: the scanner-facing MRD stream server for prospective exams.

It speaks the client-side stream of ``gadgetron_ismrmrd_client``, python-ismrmrd-server's
client and Siemens FIRE: a config by name (id 1) or as text (id 2), the ISMRMRD header,
optionally a TEXT (id 5) with JSON parameters, acquisitions (waveforms are ignored) and
CLOSE. Images go back as each slice completes, failures as TEXT, then CLOSE. Each
connection has its own thread; reconstructions share one device through a lock.

Whatever a client sends, it gets an answer: a malformed, oversized or unexpected message, a
stall past the idle timeout, or a bad header ends its session with a TEXT naming the
problem and CLOSE, and the next client is served as usual (see :mod:`network` and
:mod:`limits`). With a raw folder, the session's data is saved as it arrives.
"""

from __future__ import annotations

import importlib.resources
import json
import logging
import socketserver
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Sequence
from pathlib import Path

import ismrmrd
import ismrmrd.xsd as xsd

from unrollinr_gadget.assembly import EncodingGeometry
from unrollinr_gadget.limits import StreamLimits
from unrollinr_gadget.network import GuardedServer, Network
from unrollinr_gadget.pipeline import Delivery, ReconPipeline
from unrollinr_gadget.protocol import (
    ACQUISITION,
    CLOSE,
    CONFIG_FILE,
    CONFIG_TEXT,
    HEADER,
    IMAGE,
    TEXT,
    WAVEFORM,
    MessageReader,
    MessageWriter,
    ProtocolError,
)
from unrollinr_gadget.rawsave import RawRecorder, check_writable
from unrollinr_gadget.settings import GadgetSettings, chain_properties, gadget_configuration

logger = logging.getLogger(__name__)

NAMED_CONFIGS = {
    "unrollinr": {},
    "unrollinr_prospective": {"preset": "prospective"},
}


def shipped_chains() -> Path:
    """The chains shipped with the package: ``unrollinr_gadget/chains`` when installed, the
    checkout's ``chains/`` in a source tree (an editable install)."""
    packaged = importlib.resources.files("unrollinr_gadget") / "chains"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "chains"


DEFAULT_CHAINS = shipped_chains()


class ConfigResolver:
    """Maps a client's config name or config text to :class:`GadgetSettings`.

    Names form a fixed registry, read once: ``unrollinr``, ``unrollinr_prospective``, and
    each chain in ``chains_dir`` by file name, with or without ``.xml`` (its properties are
    used). A name from the network is only ever a key into it: never a path, never a module.
    """

    def __init__(self, chains_dir: Path | None = DEFAULT_CHAINS, base: GadgetSettings | None = None) -> None:
        self.chains_dir = chains_dir
        self.base = base or GadgetSettings()
        self._chains: dict[str, str] = {}
        if chains_dir is not None and chains_dir.is_dir():
            for chain in sorted(chains_dir.glob("*.xml")):
                self._chains[chain.name] = self._chains[chain.stem] = chain.read_text()

    def names(self) -> list[str]:
        """Every config name this server accepts."""
        return sorted(NAMED_CONFIGS) + sorted(name for name in self._chains if name.endswith(".xml"))

    def by_name(self, name: str) -> GadgetSettings:
        """The settings registered under ``name``; ``ValueError`` if there are none."""
        name = name.strip()
        if name in NAMED_CONFIGS:
            return GadgetSettings.from_properties(NAMED_CONFIGS[name], base=self.base)
        if name in self._chains:
            return self.by_text(self._chains[name])
        raise ValueError(f"unknown config {name!r}; this server accepts {self.names()}")

    def by_text(self, text: str) -> GadgetSettings:
        """The settings of a chain's XML (its ``<external>`` node's properties)."""
        try:
            root = ElementTree.fromstring(text)
        except ElementTree.ParseError as error:
            raise ValueError(f"the config text is not XML: {error}") from None
        return GadgetSettings.from_properties(chain_properties(gadget_configuration(root)), base=self.base)


def json_parameters(text: str) -> dict[str, object]:
    """Our settings from a client's JSON TEXT message; other clients' keys are ignored.

    Accepts a flat object or python-ismrmrd-server's ``{"parameters": {...}}``.
    """
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"TEXT parameters are not JSON: {error}") from None
    if not isinstance(document, dict):
        raise ValueError("TEXT parameters must be a JSON object")
    parameters = document.get("parameters", document)
    if not isinstance(parameters, dict):
        raise ValueError("TEXT 'parameters' must be a JSON object")
    known = GadgetSettings.known_names()
    ignored = sorted(set(parameters) - known)
    if ignored:
        logger.info("ignoring TEXT parameters %s", ignored)
    return {name: value for name, value in parameters.items() if name in known}


class _Session:
    """One client connection: config, header, optional TEXT parameters, data, CLOSE."""

    def __init__(self, reader: MessageReader, writer: MessageWriter, server: UnrollINRServer, peer: str) -> None:
        self.reader, self.writer, self.server = reader, writer, server
        self.peer = peer
        self.deliver = Delivery(writer.image, lambda failure: writer.text(str(failure)))
        self.recorder: RawRecorder | None = None

    def _settings(self) -> tuple[GadgetSettings, str]:
        message = self.reader.read()
        if message.id == CONFIG_FILE:
            return self.server.resolver.by_name(str(message.payload)), str(message.payload)
        if message.id == CONFIG_TEXT:
            return self.server.resolver.by_text(str(message.payload)), "<config text>"
        raise ProtocolError(f"expected a config (id 1 or 2) first, got id {message.id}")

    def _start_recording(self, header: xsd.ismrmrdHeader) -> None:
        if self.server.raw_folder is not None:
            self.recorder = RawRecorder(self.server.raw_folder, header)
            self._report_recording_error()

    def _record(self, acquisition: ismrmrd.Acquisition) -> None:
        if self.recorder is not None and self.recorder.error is None:
            self.recorder.acquisition(acquisition)
            self._report_recording_error()

    def _report_recording_error(self) -> None:
        """Tell the client once, when the recording has just failed."""
        if self.recorder is not None and self.recorder.error is not None:
            self.writer.text(f"unrollinr: {self.recorder.error}; the reconstruction goes on")

    def run(self) -> None:
        """Serve the whole session; errors propagate to the handler, which answers them."""
        settings, config_name = self._settings()
        message = self.reader.read()
        if message.id != HEADER:
            raise ProtocolError(f"expected the ISMRMRD header (id 3), got id {message.id}")
        header = message.payload
        EncodingGeometry.from_header(header, self.server.limits)  # refuse what cannot be reconstructed now
        logger.info("%s: config %s", self.peer, config_name)
        self._start_recording(header)
        pipeline: ReconPipeline | None = None
        ignored_waveforms = 0
        while True:
            message = self.reader.read()
            if message.id == CLOSE:
                break
            if message.id == TEXT:
                if pipeline is not None:
                    logger.info("%s: TEXT after the first acquisition ignored", self.peer)
                    continue
                settings = GadgetSettings.from_properties(json_parameters(str(message.payload)), base=settings)
            elif message.id == ACQUISITION:
                self._record(message.payload)
                if pipeline is None:
                    pipeline = ReconPipeline.from_settings(header, settings, device_lock=self.server.device_lock,
                                                           limits=self.server.limits)
                self.deliver(pipeline.add(message.payload))
            elif message.id == WAVEFORM:
                ignored_waveforms += 1
            elif message.id == IMAGE:
                self.writer.image(message.payload)
            else:
                raise ProtocolError(f"unexpected message id {message.id} in the data stream")
        if pipeline is not None:
            self.deliver(pipeline.finish())
        if ignored_waveforms:
            logger.info("%s: ignored %d waveforms", self.peer, ignored_waveforms)

    def save_raw(self) -> Path | None:
        """End the raw recording (whatever ended the session); the saved file, if any."""
        return self.recorder.finish() if self.recorder is not None else None


class _Handler(socketserver.StreamRequestHandler):
    server: UnrollINRServer

    def handle(self) -> None:
        peer = f"{self.client_address[0]}:{self.client_address[1]}"
        writer = MessageWriter(self.wfile)
        with self.server.session(self.connection) as admitted:
            if not admitted:
                self._try(writer.text, self.server.turn_away(peer))
                self._try(writer.close)
                return
            self._serve(peer, writer)

    def _serve(self, peer: str, writer: MessageWriter) -> None:
        start = time.perf_counter()
        logger.info("%s: connected", peer)
        session = _Session(MessageReader(self.rfile, self.server.limits), writer, self.server, peer)
        try:
            session.run()
        except TimeoutError:
            logger.error("%s: %s: session closed", peer, self.server.limits.silence())
            self._try(writer.text, f"unrollinr: {self.server.limits.silence()}: the session is closed")
        except EOFError as error:
            message = "the server is shutting down" if self.server.stopping.is_set() else str(error)
            logger.error("%s: %s", peer, message)
            self._try(writer.text, f"unrollinr: {message}")
        except ValueError as error:
            logger.error("%s: %s", peer, error)
            self._try(writer.text, f"unrollinr: {error}")
        except OSError as error:
            logger.error("%s: connection lost: %s", peer, error)
        except Exception as error:  # noqa: BLE001 - the server must outlive any one client
            logger.exception("%s: failed", peer)
            self._try(writer.text, f"unrollinr: {type(error).__name__}: {error}")
        saved = session.save_raw()
        self._try(writer.close)
        logger.info("%s: done, %d images, %d failures, %.1f s%s", peer, session.deliver.images,
                    len(session.deliver.failures),
                    time.perf_counter() - start, f"; raw data in {saved}" if saved else "")

    @staticmethod
    def _try(action: Callable[..., None], *args: object) -> None:
        """Best effort: the client may already be gone."""
        try:
            action(*args)
        except OSError:
            pass


class UnrollINRServer(GuardedServer):
    """Threaded MRD stream server; ``serve_forever()`` runs it, ``stop()`` ends it cleanly.

    ``raw_folder`` (``None``: off) receives every session's raw data as it arrives; see
    :mod:`unrollinr_gadget.rawsave`. Reconstructions share one device through a lock, so
    sessions queue their slices rather than hold them on the device at once.
    """

    def __init__(self, address: tuple[str, int], resolver: ConfigResolver | None = None, *,
                 raw_folder: Path | None = None, limits: StreamLimits | None = None,
                 allow: Sequence[Network] | None = None, max_connections: int = 8) -> None:
        self.resolver = resolver or ConfigResolver()
        self.raw_folder = None if raw_folder is None else check_writable(raw_folder)
        super().__init__(address, _Handler, limits=limits, allow=allow, max_connections=max_connections)
