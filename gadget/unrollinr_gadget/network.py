"""The TCP front of ``unrollinr serve`` and ``unrollinr listen``: who may connect, how many
at once, how long a peer may stall, and a stop that lets sessions end cleanly."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import socketserver
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from unrollinr_gadget.limits import StreamLimits

logger = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(ranges: Sequence[str]) -> list[Network]:
    """Address ranges such as ``10.0.0.0/8`` or ``192.168.2.7``; ``ValueError`` names a bad one."""
    networks = []
    for text in ranges:
        try:
            networks.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError:
            raise ValueError(f"not an address range: {text!r} (expected e.g. 10.0.0.0/8 or 192.168.2.7)") from None
    return networks


def is_allowed(host: str, allow: Sequence[Network] | None) -> bool:
    """Whether ``host`` lies in one of the ``allow`` ranges (``None`` allows every host)."""
    if allow is None:
        return True
    address = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in allow)


class GuardedServer(socketserver.ThreadingTCPServer):
    """A threaded TCP server for peers we do not trust.

    Connections from outside ``allow`` are closed unanswered and logged. At most
    ``max_connections`` sessions run at once; handlers ask :meth:`session` for a place
    (``serve_once`` stops the server after the first session).
    Every session's socket gets ``limits.idle_timeout_s``. :meth:`stop` (what SIGTERM
    calls) ends the read side of every session, so each finishes the work in hand,
    answers its peer and closes; ``server_close`` then waits for them.
    """

    daemon_threads = False
    block_on_close = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type[socketserver.BaseRequestHandler], *,
                 limits: StreamLimits | None = None, allow: Sequence[Network] | None = None,
                 max_connections: int = 8, serve_once: bool = False) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {max_connections}")
        self.limits = limits or StreamLimits()
        self.allow = None if allow is None else list(allow)
        self.max_connections = max_connections
        self.serve_once = serve_once
        self.stopping = threading.Event()
        self.device_lock = threading.Lock()
        self._sessions: set[socket.socket] = set()
        self._sessions_lock = threading.Lock()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)
        host = self.server_address[0]
        if self.allow is None and not ipaddress.ip_address(str(host)).is_loopback:
            logger.warning("listening on %s with no --allow: any host that reaches this port may connect", host)

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        return self.server_address[1]

    def verify_request(self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any) -> bool:
        if is_allowed(str(client_address[0]), self.allow):
            return True
        logger.warning("refused a connection from %s: not in the allowed ranges %s", client_address[0],
                       [str(n) for n in self.allow or []])
        return False

    @contextlib.contextmanager
    def session(self, connection: socket.socket) -> Iterator[bool]:
        """Yield whether ``connection`` may run now (False: the server is full or stopping);
        while it runs, :meth:`stop` can reach it."""
        with self._sessions_lock:
            admitted = len(self._sessions) < self.max_connections and not self.stopping.is_set()
            if admitted:
                self._sessions.add(connection)
        if admitted:
            connection.settimeout(self.limits.idle_timeout_s)
        try:
            yield admitted
        finally:
            with self._sessions_lock:
                self._sessions.discard(connection)
            if admitted and self.serve_once:
                threading.Thread(target=self.stop, name="stop").start()

    def turn_away(self, peer: str) -> str:
        """Log that ``peer`` was not admitted, and return what to tell it."""
        reason = "shutting down" if self.stopping.is_set() else "busy"
        logger.warning("%s: turned away, the server is %s", peer, reason)
        return f"unrollinr: the server is {reason} ({self.max_connections} sessions at most): try again later"

    def stop(self) -> None:
        """Stop accepting, and end every session's input: each one finishes the slice in
        progress, answers and closes. Call from any thread but the one serving."""
        logger.info("stopping: %d session(s) to close", len(self._sessions))
        self.stopping.set()
        with self._sessions_lock:
            for connection in self._sessions:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RD)
        self.shutdown()
