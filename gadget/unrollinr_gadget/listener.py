"""``unrollinr listen``: the gadget in Gadgetron's connect mode (``<connect port=.../>``).

In place of gadgetron-python's ``listen`` (which binds every interface and serves one
connection), this serves any number of Gadgetron connections at once on the address it is
given, 127.0.0.1 unless told otherwise, through :class:`~unrollinr_gadget.network.GuardedServer`:
the same allow list, connection limit, idle timeout and clean stop as ``unrollinr serve``.
Each connection's config and header are read within the stream limits; whatever goes
wrong is answered with ERROR (id 8) and CLOSE, as Gadgetron expects.
"""

from __future__ import annotations

import logging
import socketserver
from collections.abc import Sequence

from gadgetron.external.connection import Connection

from unrollinr_gadget.gadget import GadgetSocket, handle, send_error
from unrollinr_gadget.limits import StreamLimits
from unrollinr_gadget.network import GuardedServer, Network
from unrollinr_gadget.settings import GadgetSettings

logger = logging.getLogger(__name__)


class _GadgetHandler(socketserver.BaseRequestHandler):
    server: GadgetListener

    def handle(self) -> None:
        peer = f"{self.client_address[0]}:{self.client_address[1]}"
        gadget_socket = GadgetSocket(self.request, self.server.limits)
        with self.server.session(self.request) as admitted:
            try:
                if admitted:
                    self._run(peer, gadget_socket)
                else:
                    self._error(gadget_socket, self.server.turn_away(peer))
            finally:
                gadget_socket.close()

    def _run(self, peer: str, gadget_socket: GadgetSocket) -> None:
        logger.info("%s: Gadgetron connected", peer)
        try:
            connection = Connection(gadget_socket)  # reads the config and the header
        except TimeoutError:
            self._error(gadget_socket, f"unrollinr: {self.server.limits.silence()}")
            return
        except EOFError as error:
            logger.error("%s: %s", peer, error)
            return
        except (AssertionError, ValueError, TypeError) as error:  # gadgetron-python asserts the message ids
            problem = str(error) or type(error).__name__
            self._error(gadget_socket, f"unrollinr: not a config and an ISMRMRD header: {problem}")
            return
        if connection.config is None:  # Gadgetron's distributed mode sends an empty one
            logger.info("%s: no gadget configuration from Gadgetron: listen's own settings apply", peer)
        handle(connection, device_lock=self.server.device_lock, base=self.server.settings)
        if self.server.stopping.is_set():
            self._error(gadget_socket, "unrollinr: the gadget is shutting down")
        logger.info("%s: done", peer)

    @staticmethod
    def _error(gadget_socket: GadgetSocket, message: str) -> None:
        logger.error("%s", message)
        try:
            send_error(gadget_socket, message)
        except OSError:
            pass  # Gadgetron is gone


class GadgetListener(GuardedServer):
    """Serves Gadgetron connections to the gadget; ``serve_forever()`` runs it, ``stop()`` ends it.

    ``settings`` are the base that each connection's chain properties override; in
    Gadgetron's distributed mode, which drops them, they are all the workers get.
    """

    def __init__(self, address: tuple[str, int], *, settings: GadgetSettings | None = None,
                 limits: StreamLimits | None = None, allow: Sequence[Network] | None = None,
                 max_connections: int = 8, serve_once: bool = False) -> None:
        self.settings = settings or GadgetSettings()
        super().__init__(address, _GadgetHandler, limits=limits, allow=allow, max_connections=max_connections,
                         serve_once=serve_once)
