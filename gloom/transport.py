"""Writing to a connection: the one module that relies on Twisted internals.

Twisted's TCP transport never sends in ``write``: it buffers the data,
registers the socket for writability and sends on the next reactor turn,
then unregisters it.  For Gloom's traffic (many small frames, each a round
trip someone waits on) that is two ``epoll_ctl`` calls per burst, as many
system calls as the sends themselves, and a turn of latency.  A
`DirectTCPWriter` sends on the socket at once when the transport has
nothing buffered, and leaves the rest to the transport, so nothing written
later overtakes it.  That needs two names Twisted does not promise,
``tcp.Connection.dataBuffer`` and ``_tempDataBuffer``, and its
``getHandle()`` to be the socket the transport writes to.
`direct_sends_available` checks them once, on a real connection, and
`writer_for` falls back to the public `TransportWriter` if they are not
there or do not behave as expected.  Without direct sends Gloom works the
same, with more system calls per job (see Performance in the README).
"""

from __future__ import annotations

import socket
from typing import List, Optional

from twisted.internet import tcp
from twisted.internet.interfaces import ITransport
from twisted.internet.protocol import Protocol


class TransportWriter:
    """Writes through the transport's public interface (``ITransport``)."""

    direct = False
    """Whether `send` may reach the socket before the reactor's next turn."""

    def __init__(self, transport: ITransport):
        """
        :param transport: the connection's transport.
        """
        self.transport = transport

    def send(self, data: bytes) -> None:
        """Write ``data``, after anything written before."""
        self.transport.write(data)

    def send_all(self, pieces: List[bytes]) -> None:
        """Write ``pieces`` in order, after anything written before."""
        self.transport.writeSequence(pieces)


class DirectTCPWriter(TransportWriter):
    """Writes to a Twisted TCP connection, sending on its socket at once
    when nothing is waiting in the transport's buffer."""

    direct = True

    def __init__(self, transport: ITransport):
        super().__init__(transport)
        try:
            self._socket = transport.getHandle()
        except AttributeError:  # closed already: nothing is sent directly
            self._socket = None

    def send(self, data: bytes) -> None:
        """Send ``data`` on the socket if the transport holds nothing; what
        the socket does not take (all of it, on an error, which the
        transport then meets when it writes) goes to the transport."""
        transport = self.transport
        if (transport.connected and not transport.dataBuffer and not transport._tempDataBuffer
                and self._socket is not None):
            try:
                sent = self._socket.send(data)
            except OSError:
                sent = 0
            if sent == len(data):
                return
            if sent:
                data = data[sent:]
        transport.write(data)

    def send_all(self, pieces: List[bytes]) -> None:
        self.send(b"".join(pieces))


_available: Optional[bool] = None
_unavailable_because = ""


def direct_sends_available() -> bool:
    """Whether this Twisted's TCP connections have the internals
    `DirectTCPWriter` uses, tried once on a real socket pair."""
    global _available, _unavailable_because
    if _available is None:
        try:
            _available = _try_direct_send()
        except Exception as e:
            _available = False
            _unavailable_because = f"{type(e).__name__}: {e}"
        else:
            if not _available:
                _unavailable_because = "Twisted's TCP transport is not as expected"
    return _available


def why_direct_sends_unavailable() -> str:
    """What `direct_sends_available` found, when it found them unavailable."""
    return _unavailable_because


def _try_direct_send() -> bool:
    """Build a Twisted TCP connection on one end of a socket pair (never
    registered with a reactor), check it has the buffers `DirectTCPWriter`
    reads, and that its handle is the socket, and send a byte on it."""
    ours, theirs = socket.socketpair()
    try:
        ours.setblocking(False)
        connection = tcp.Connection(ours, Protocol())
        if not (connection.dataBuffer == b"" and connection._tempDataBuffer == []):
            return False
        theirs.settimeout(1)
        if connection.getHandle() is not ours:
            return False
        return connection.getHandle().send(b"g") == 1 and theirs.recv(1) == b"g"
    finally:
        ours.close()
        theirs.close()


def writer_for(transport: ITransport) -> TransportWriter:
    """The writer for a new connection's transport: direct for Twisted's
    own TCP connections when `direct_sends_available`, public otherwise
    (TLS, other transports, test transports)."""
    if isinstance(transport, tcp.Connection) and direct_sends_available():
        return DirectTCPWriter(transport)
    return TransportWriter(transport)
