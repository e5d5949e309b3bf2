"""``unrollinr serve``: the scanner-facing MRD stream server for prospective exams.

It speaks the client-side stream of ``gadgetron_ismrmrd_client``, python-ismrmrd-server's
client and Siemens FIRE: a config by name (id 1) or as text (id 2), the ISMRMRD header,
optionally a TEXT (id 5) with JSON parameters, acquisitions (waveforms are ignored) and
CLOSE. Images go back as each slice completes, failures as TEXT, then CLOSE. Each
connection has its own thread; reconstructions share one device through a lock.
"""

from __future__ import annotations

import json
import logging
import socketserver
import threading
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from pathlib import Path

from unrollinr_gadget.pipeline import ReconPipeline, SliceFailure
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
from unrollinr_gadget.settings import GadgetSettings, chain_properties, gadget_configuration

logger = logging.getLogger(__name__)

NAMED_CONFIGS = {
    "unrollinr": {},
    "unrollinr_prospective": {"preset": "prospective"},
}
DEFAULT_CHAINS = Path(__file__).resolve().parents[2] / "chains"


class ConfigResolver:
    """Maps a client's config name or config text to :class:`GadgetSettings`.

    Names: ``unrollinr``, ``unrollinr_prospective``, or the file name of a chain in
    ``chains_dir`` (e.g. ``unrollinr.xml``), whose properties are used.
    """

    def __init__(self, chains_dir: Path | None = DEFAULT_CHAINS, base: GadgetSettings | None = None) -> None:
        self.chains_dir = chains_dir
        self.base = base or GadgetSettings()

    def names(self) -> list[str]:
        """Every config name this server accepts."""
        if self.chains_dir is None or not self.chains_dir.is_dir():
            return sorted(NAMED_CONFIGS)
        chains = sorted(p.name for p in self.chains_dir.glob("*.xml"))
        return sorted(NAMED_CONFIGS) + chains

    def by_name(self, name: str) -> GadgetSettings:
        name = name.strip()
        if name in NAMED_CONFIGS:
            return GadgetSettings.from_properties(NAMED_CONFIGS[name], base=self.base)
        if self.chains_dir is not None and Path(name).name == name:
            chain = self.chains_dir / name
            if not chain.suffix:
                chain = chain.with_suffix(".xml")
            if chain.is_file():
                return self.by_text(chain.read_text())
        raise ValueError(f"unknown config {name!r}; this server accepts {self.names()}")

    def by_text(self, text: str) -> GadgetSettings:
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
    """One client connection."""

    def __init__(self, reader: MessageReader, writer: MessageWriter, resolver: ConfigResolver,
                 device_lock: threading.Lock, peer: str) -> None:
        self.reader, self.writer, self.resolver = reader, writer, resolver
        self.device_lock = device_lock
        self.peer = peer
        self.images = 0
        self.failures = 0

    def _send(self, outcomes) -> None:
        for outcome in outcomes:
            if isinstance(outcome, SliceFailure):
                self.failures += 1
                self.writer.text(str(outcome))
            else:
                self.writer.image(outcome)
                self.images += 1

    def run(self) -> None:
        message = self.reader.read()
        if message.id == CONFIG_FILE:
            settings = self.resolver.by_name(str(message.payload))
            config_name = str(message.payload)
        elif message.id == CONFIG_TEXT:
            settings = self.resolver.by_text(str(message.payload))
            config_name = "<config text>"
        else:
            raise ProtocolError(f"expected a config (id 1 or 2) first, got id {message.id}")
        message = self.reader.read()
        if message.id != HEADER:
            raise ProtocolError(f"expected the ISMRMRD header (id 3), got id {message.id}")
        header = message.payload
        logger.info("%s: config %s", self.peer, config_name)
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
                if pipeline is None:
                    pipeline = ReconPipeline(header, settings.recon, output=settings.output, device=settings.device,
                                             device_lock=self.device_lock, series_index=settings.series_index)
                self._send(pipeline.add(message.payload))
            elif message.id == WAVEFORM:
                ignored_waveforms += 1
            elif message.id == IMAGE:
                self.writer.image(message.payload)
            else:
                raise ProtocolError(f"unexpected message id {message.id} in the data stream")
        if pipeline is not None:
            self._send(pipeline.finish())
        if ignored_waveforms:
            logger.info("%s: ignored %d waveforms", self.peer, ignored_waveforms)


class _Handler(socketserver.StreamRequestHandler):
    server: UnrollINRServer

    def handle(self) -> None:
        peer = f"{self.client_address[0]}:{self.client_address[1]}"
        start = time.perf_counter()
        logger.info("%s: connected", peer)
        writer = MessageWriter(self.wfile)
        session = _Session(MessageReader(self.rfile), writer, self.server.resolver, self.server.device_lock, peer)
        try:
            session.run()
        except (ValueError, EOFError) as error:
            logger.error("%s: %s", peer, error)
            self._try(writer.text, f"unrollinr: {error}")
        except OSError as error:
            logger.error("%s: connection lost: %s", peer, error)
            return
        except Exception as error:  # noqa: BLE001 - the server must outlive any one client
            logger.exception("%s: failed", peer)
            self._try(writer.text, f"unrollinr: {type(error).__name__}: {error}")
        self._try(writer.close)
        logger.info("%s: done, %d images, %d failures, %.1f s", peer, session.images, session.failures,
                    time.perf_counter() - start)

    @staticmethod
    def _try(action: Callable[..., None], *args: object) -> None:
        """Best effort: the client may already be gone."""
        try:
            action(*args)
        except OSError:
            pass


class UnrollINRServer(socketserver.ThreadingTCPServer):
    """Threaded MRD stream server; ``serve_forever()`` runs it, ``shutdown()`` stops it."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], resolver: ConfigResolver | None = None) -> None:
        super().__init__(address, _Handler)
        self.resolver = resolver or ConfigResolver()
        self.device_lock = threading.Lock()

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        return self.server_address[1]
