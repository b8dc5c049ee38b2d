"""What the master and slave protocols share: framing, error frames, and
the factory that tracks connections so the daemon can close them on stop."""

from __future__ import annotations

import socket
from struct import Struct, unpack_from
from typing import List, Optional, Set

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IHandshakeListener, IReactorTime, ISSLTransport
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver
from zope.interface import implementer

from gloom import transport, wire
from gloom.quoting import shortened
from gloom.scheduler import Scheduler

# How long a peer that sent an oversized frame gets to read its error frame.
ABORT_AFTER_ERROR = 10.0

DEFAULT_FRAME_TIMEOUT = 30.0
"""Seconds a connection may sit in the middle of a frame (or of its TLS
handshake) without sending more, before it is closed."""

# The replies to one read's requests are written together when the read
# is handled; but a reply over REPLY_WRITTEN_AT_ONCE bytes (a stats reply,
# a slave's next job), or more than REPLIES_HELD replies, are written at
# once, so that a transport whose buffer is then full pauses the connection:
# backpressure holds within a read, not only between reads.  (Counting only
# these, not every reply's bytes, keeps the cost per reply to a comparison.)
REPLY_WRITTEN_AT_ONCE = 1024
REPLIES_HELD = 1024

# Frames held for the end of a reactor turn (see GloomProtocol._send) are
# written at once when they come to more than this many bytes, so that a
# connection whose transport is then full is paused within the turn too.
HELD_BYTES_WRITTEN_AT_ONCE = 64 * 1024

# Bad input is logged at most this many times per connection per window;
# the rest is counted and the count logged when the window ends.
BAD_INPUT_LOG_BURST = 5
BAD_INPUT_LOG_WINDOW = 60.0

# TCP keepalive: probe a silent peer after a minute, then every 10 s; after 6
# unanswered probes (about two minutes in all) the connection is dropped, so
# a slave whose host vanished has its job retried.
KEEPALIVE_IDLE = 60
KEEPALIVE_INTERVAL = 10
KEEPALIVE_PROBES = 6


def tune_connection(transport) -> None:
    """Set TCP_NODELAY (the protocol is many small frames; without it a
    round trip waits on delayed ACKs) and keepalive on ``transport``, if it
    is TCP."""
    for setting in ("setTcpNoDelay", "setTcpKeepAlive"):
        setter = getattr(transport, setting, None)
        if setter is not None:
            try:
                setter(True)
            except OSError:
                return
    try:
        sock = transport.getHandle()
        for option, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE),
                              ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
                              ("TCP_KEEPCNT", KEEPALIVE_PROBES)):
            if hasattr(socket, option):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
    except (AttributeError, OSError):
        pass


_HEADER = Struct("!I")
_MISSING = wire.MISSING


def handshake_failure(reason) -> str:
    """Why a TLS handshake failed, in OpenSSL's words where it gave some
    (``peer did not return a certificate``, ``certificate verify failed``).

    :param reason: the ``Failure`` the connection was lost with.
    """
    error = getattr(reason, "value", reason)
    if isinstance(error, (ConnectionDone, ConnectionLost)):
        return "the connection closed before the handshake completed"
    details = error.args[0] if error.args and isinstance(error.args[0], list) else None
    if details is not None:  # OpenSSL's errors: (library, function, reason) each
        texts = [str(item[-1]) for item in details if isinstance(item, tuple) and item]
        if texts:
            return shortened("; ".join(texts))
    return shortened(str(error) or type(error).__name__)


def address_name(address) -> str:
    """``host:port`` for an IP ``address``, the address itself otherwise."""
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if host is not None and port is not None:
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    name = getattr(address, "name", False)
    if name is not False:  # a Unix socket's; a client's is usually unnamed
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        return f"unix:{name}" if name else "unix socket"
    return str(address)


LARGE_FRAME = 1024 * 1024
"""Frames of at least this many bytes are gathered in pieces of this size
and joined once, rather than appended to one buffer that is re-allocated as
it grows (which leaves several times the frame behind as garbage on PyPy)."""


class FrameReceiver(Int32StringReceiver):
    """Int32StringReceiver with a ``bytearray`` buffer: Twisted's own copies
    everything received so far on every read, which makes one large frame
    cost quadratic time.  Parsing stops while the protocol is paused."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._parts: Optional[List[bytes]] = None  # a large frame's pieces so far
        self._piece = bytearray()  # the reads since the last piece
        self._missing = 0  # bytes of that frame still to come
        self._parsing = False
        self._refusing = False

    def dataReceived(self, data: bytes) -> None:
        if self._refusing:
            return
        if self._parts is not None:
            if len(data) < self._missing:
                if data:
                    piece = self._piece
                    piece += data
                    if len(piece) >= LARGE_FRAME:
                        self._parts.append(bytes(piece))
                        del piece[:]
                    self._missing -= len(data)
                if not self.paused:
                    self.inside_frame()
                return
            data = self._large_frame_received(data)
        buffer = self._buffer
        if not buffer and not self._parsing and type(data) is bytes:
            # Most reads: nothing left over from the last one.  The whole
            # frames are cut straight out of the read, one copy each.
            offset = self._whole_frames(data)
            if offset == len(data) and not buffer:
                return
            if offset < len(data) and not self._refusing:
                buffer[:0] = data[offset:] if offset else data
        else:
            buffer += data
            if self._parsing:
                return
        self._parse_buffer()

    def _whole_frames(self, data: bytes) -> int:
        """Handle the whole frames at the start of ``data`` (until the
        protocol is paused), and return how many bytes they took."""
        self._parsing = True
        offset = 0
        size = len(data)
        try:
            while not self.paused and size - offset >= 4:
                (length,) = unpack_from("!I", data, offset)
                end = offset + 4 + length
                if end > size or length > self.MAX_LENGTH:
                    break  # a frame not all here yet, or too long: the buffer's loop decides
                frame = data[offset + 4 : end]
                offset = end
                self.stringReceived(frame)
        except BaseException:
            if offset < size:  # the rest of the read stays, ahead of what came meanwhile
                self._buffer[:0] = data[offset:]
            raise
        finally:
            self._parsing = False
        return offset

    def _parse_buffer(self) -> None:
        """Handle the whole frames in the buffer, until the protocol is paused."""
        if self._refusing:
            return
        buffer = self._buffer
        self._parsing = True
        offset = 0
        try:
            while not self.paused and len(buffer) - offset >= 4:
                (length,) = unpack_from("!I", buffer, offset)
                if length > self.MAX_LENGTH:
                    self._refusing = True
                    del buffer[:]
                    offset = 0
                    self.lengthLimitExceeded(length)
                    return
                end = offset + 4 + length
                if len(buffer) < end:
                    if length >= LARGE_FRAME:
                        with memoryview(buffer) as view:
                            self._parts = [bytes(view[offset + 4 :])]
                        self._missing = end - len(buffer)
                        offset = len(buffer)
                    break
                if length < 65536:
                    frame = bytes(buffer[offset + 4 : end])
                else:  # one copy rather than two
                    with memoryview(buffer) as view:
                        frame = bytes(view[offset + 4 : end])
                offset = end
                self.stringReceived(frame)
        finally:
            if offset:
                del buffer[:offset]
            self._parsing = False
            if (buffer or self._parts is not None) and not self.paused and not self._refusing:
                self.inside_frame()

    def _large_frame_received(self, data: bytes) -> bytes:
        """``data`` completes the large frame being gathered: handle the
        frame, and return the rest of ``data``."""
        parts, self._parts = self._parts, None
        missing = self._missing
        parts.append(bytes(self._piece))
        del self._piece[:]
        parts.append(data[:missing])
        frame = b"".join(parts)
        del parts[:]
        self._parsing = True
        try:
            self.stringReceived(frame)
        finally:
            self._parsing = False
        return data[missing:]

    def inside_a_frame(self) -> bool:
        """Whether part of a frame has been received, and not all of it."""
        return bool(self._buffer) or self._parts is not None

    def inside_frame(self) -> None:
        """Called after a read that ends in the middle of a frame."""


@implementer(IHandshakeListener)
class GloomProtocol(FrameReceiver):
    """A connection speaking Gloom frames; subclasses handle the actions.

    The protocol is its transport's streaming producer: while the peer does
    not read what Gloom writes and the transport's buffer is full, Gloom
    stops reading (and acting on) what the peer sends.
    """

    log = Logger()
    role = "peer"
    other_role = "peer"
    actions: frozenset = frozenset()
    other_actions: frozenset = frozenset()

    def __init__(self) -> None:
        super().__init__()
        self._abort_call = None
        self._stall_call = None
        self._handshake_call = None
        self._last_progress = 0.0
        self._writer: Optional[transport.TransportWriter] = None
        self._outgoing: Optional[List[bytes]] = None
        self._log_window_start = None
        self._logged = 0
        self._unlogged = 0
        self._held_frames: Optional[List[bytes]] = None
        self._held_bytes = 0
        self._turn = -1
        self._handshaking = False  # TLS, and the handshake is not over yet
        self._ended_unseen = False  # closed for a stalled handshake: nothing more to log
        self.closed: Deferred = Deferred()

    def dataReceived(self, data: bytes) -> None:
        """Frames this connection's own requests produce while its data is
        handled (acks for a run of submits; a slave's ok and its next job)
        go out in one write at the end, instead of one write each."""
        if self._outgoing is not None:
            return FrameReceiver.dataReceived(self, data)
        self._outgoing = []
        try:
            FrameReceiver.dataReceived(self, data)
        finally:
            self._write_outgoing()
            self._outgoing = None

    def _write_outgoing(self) -> None:
        outgoing = self._outgoing
        if outgoing:
            if self._writer.direct:
                self._send(b"".join(outgoing))
            else:
                self._writer.send_all(outgoing)
            outgoing.clear()

    def _write_outgoing_now(self) -> None:
        """Write this read's replies so far at once, behind anything held:
        a transport whose buffer is full then pauses the connection, and no
        more of its frames are handled until the peer reads."""
        outgoing = self._outgoing
        if self._writer.direct:
            self.write_held()
        self._writer.send_all(outgoing)
        outgoing.clear()

    def _send(self, data: bytes) -> None:
        """Send ``data`` now if this connection has not sent yet in this
        reactor turn; otherwise hold it, with whatever else comes for this
        connection, until the turn ends.  A lone frame (a round trip's)
        goes out at once, and the answers several slaves return in one
        turn to one master go out in one system call (in several, of
        64 KiB or so each, when they come to more)."""
        held = self._held_frames
        if held is not None:
            held.append(data)
            self._held_bytes += len(data)
            if self._held_bytes > HELD_BYTES_WRITTEN_AT_ONCE:
                self.write_held()  # the transport pauses this connection if it is full
            return
        outbox = self.factory.outbox
        if self._turn == outbox.turn:
            self._held_frames = [data]
            self._held_bytes = len(data)
            outbox.hold(self)
            return
        self._turn = outbox.turn
        outbox.end_turn_soon()
        self._writer.send(data)

    def write_held(self) -> None:
        """Send what was held for the end of the turn."""
        held, self._held_frames = self._held_frames, None
        if held:
            self._writer.send_all(held)

    def reply(self, frame: bytes, ref) -> None:
        """Send the frame that answers a request, with the request's ``ref``
        added if it carried one.

        :param frame: the reply (an ok or an error frame).
        :param ref: the request's ``ref`` (checked), or ``MISSING``.
        """
        self.sendString(frame if ref is _MISSING else wire.with_ref(frame, ref))

    def sendString(self, frame: bytes) -> None:
        outgoing = self._outgoing
        if outgoing is not None:
            size = len(frame)
            outgoing.append(_HEADER.pack(size))
            outgoing.append(frame)
            if size > REPLY_WRITTEN_AT_ONCE or len(outgoing) > 2 * REPLIES_HELD:
                self._write_outgoing_now()
        elif self._writer.direct:
            self._send(_HEADER.pack(len(frame)) + frame)
        else:
            self._writer.send(_HEADER.pack(len(frame)) + frame)

    # --- connection -------------------------------------------------------

    def connectionMade(self) -> None:
        self.MAX_LENGTH = self.factory.max_frame
        tune_connection(self.transport)
        self._writer = self.factory.writer_for(self.transport)
        self.transport.registerProducer(self, True)
        self.peer = address_name(self.transport.getPeer())
        self.factory.connections.add(self)
        if ISSLTransport.providedBy(self.transport):
            # Said once the handshake is over: "connected", or why it failed.
            self._handshaking = True
            self._handshake_call = self.factory.clock.callLater(
                self.factory.frame_timeout, self._stalled, "its TLS handshake")
        else:
            self.log.info("{role} connected from {peer}", role=self.role, peer=self.peer)

    def inside_frame(self) -> None:
        """The peer is part way through a frame: it has `frame_timeout`
        seconds from now to send more."""
        clock = self.factory.clock
        self._last_progress = clock.seconds()
        if self._stall_call is None:
            self._stall_call = clock.callLater(self.factory.frame_timeout, self._check_progress)

    def _check_progress(self) -> None:
        self._stall_call = None
        if not self.inside_a_frame() or self._refusing:
            return
        clock, timeout = self.factory.clock, self.factory.frame_timeout
        if self.paused:  # waiting for the peer to read, not for it to send
            self._last_progress = clock.seconds()
        waited = clock.seconds() - self._last_progress
        if waited < timeout:
            self._stall_call = clock.callLater(timeout - waited, self._check_progress)
        else:
            self._stalled("a frame")

    def _stalled(self, what: str) -> None:
        """Close a connection that stopped part way through ``what``."""
        self._handshake_call = None
        if self._handshaking:
            self._handshaking = False  # this is all that is said of it
            self._ended_unseen = True
        self.log.warn("{role} {peer}: no progress in {what} for {timeout:g} s; closing",
                      role=self.role, peer=self.peer, what=what,
                      timeout=self.factory.frame_timeout)
        self.closing()
        self.abort()

    def handshakeCompleted(self) -> None:
        """TLS is up (only then does any frame reach the protocol): the
        connection is logged now, with the certificate the client presented."""
        if self._handshake_call is not None:
            if self._handshake_call.active():
                self._handshake_call.cancel()
            self._handshake_call = None
        self._handshaking = False
        certificate = self.transport.getPeerCertificate()
        who = "no client certificate"
        if certificate is not None:
            subject = certificate.to_cryptography().subject.rfc4514_string()
            who = f"client certificate {subject!r}"
        self.log.info("{role} connected from {peer} (TLS established, {who})", role=self.role,
                      peer=self.peer, who=who)

    def connectionLost(self, reason) -> None:
        self.factory.connections.discard(self)
        self._held_frames = None  # nowhere to send them now
        for call in (self._abort_call, self._stall_call, self._handshake_call):
            if call is not None and call.active():
                call.cancel()
        if self._unlogged:
            self._log_unlogged()
        if self._handshaking:
            self.log.info("{role} {peer}: TLS handshake failed: {why}", role=self.role,
                          peer=self.peer, why=handshake_failure(reason))
        elif not self._ended_unseen:
            self.log.info("{role} {peer} disconnected", role=self.role, peer=self.peer)
        self.closed.callback(None)

    # --- framing ----------------------------------------------------------

    def lengthLimitExceeded(self, length: int) -> None:
        """Say why, then close: the rest of the stream cannot be framed."""
        reason = f"frame of {length} bytes is over the limit of {self.MAX_LENGTH} bytes"
        if self._may_log():
                    self.log.warn("{role} {peer}: {code}: {reason}", role=self.role, peer=self.peer,
                              code=wire.SIZE_ERROR, reason=reason)
        self.sendString(wire.error(wire.SIZE_ERROR, reason))
        self.close()
        self._abort_call = self.factory.clock.callLater(
            ABORT_AFTER_ERROR, self.abort
        )

    def close(self) -> None:
        """Close once pending frames are written.  The protocol stops being
        the transport's producer first: a TLS transport would otherwise wait
        for it before closing."""
        self.closing()
        if self._stall_call is not None and self._stall_call.active():
            self._stall_call.cancel()
        self._write_outgoing()
        self.write_held()
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def abort(self) -> None:
        """Drop the connection now, and anything not yet sent.  From here on
        the connection writes only through the transport's interface, which
        an aborted transport ignores, never on its socket directly."""
        self._writer = transport.TransportWriter(self.transport)
        self.transport.abortConnection()

    def closing(self) -> None:
        """The daemon is closing this connection: take on no new work."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._handlers = {action: getattr(cls, "do_" + action) for action in cls.actions}

    def stringReceived(self, frame: bytes) -> None:
        """Handle one request.  Its ``ref``, if it carries a valid one, is
        checked first and echoed in whichever frame answers it (the handler
        adds it to its own replies; the refusals below add it here)."""
        ref = None
        try:
            message = wire.decode(frame)
            if message.ref is not _MISSING:
                message.ref = ref = wire.checked_ref(message)
            action = message.action
            handler = self._handlers.get(action) if type(action) is str else None
            if handler is None:
                action = wire.action_of(message)
                if action in self.other_actions:
                    raise wire.MessageError(
                        wire.WRONG_PORT,
                        f"action {action!r} belongs on the {self.other_role} port, "
                        f"not the {self.role} port",
                    )
                raise wire.MessageError(wire.UNKNOWN_ACTION, f"unknown action {wire.quoted(action)}")
            handler(self, message)
        except wire.MessageError as e:
            reason = shortened(e.reason)
            if self._may_log():
                self.log.info("{role} {peer}: {code}: {reason}", role=self.role, peer=self.peer,
                              code=e.code, reason=reason)
            self.sendString(wire.error(e.code, reason, e.job_id, ref))
        except Exception:
            if self._may_log():
                self.log.failure("{role} {peer}: error handling a request", role=self.role,
                                 peer=self.peer)
            self.sendString(wire.error(
                wire.INTERNAL_ERROR, "the daemon failed to handle this request; "
                "the failure was logged", None, ref))

    def _may_log(self) -> bool:
        """Whether one more line about this connection's bad input may be
        logged: at most `BAD_INPUT_LOG_BURST` per `BAD_INPUT_LOG_WINDOW`."""
        now = self.factory.clock.seconds()
        start = self._log_window_start
        if start is None or now - start >= BAD_INPUT_LOG_WINDOW:
            if self._unlogged:
                self._log_unlogged()
            self._log_window_start = now
            self._logged = 0
        if self._logged < BAD_INPUT_LOG_BURST:
            self._logged += 1
            return True
        self._unlogged += 1
        return False

    def _log_unlogged(self) -> None:
        self.log.info("{role} {peer}: {count} more bad requests not logged",
                      role=self.role, peer=self.peer, count=self._unlogged)
        self._unlogged = 0


class Outbox:
    """Marks the reactor turns for the connections that send on their
    sockets themselves (through a `transport.DirectTCPWriter`), and writes
    what they held back when a turn ends.  One per daemon: the master and
    slave factories share it."""

    def __init__(self, clock: IReactorTime):
        """
        :param clock: where the end of a turn is scheduled (``callLater(0)``).
        """
        self.clock = clock
        self.turn = 0
        self._holding: List[GloomProtocol] = []
        self._call = None

    def end_turn_soon(self) -> None:
        """Make sure this turn's end is marked (by a ``callLater(0)``)."""
        if self._call is None:
            self._call = self.clock.callLater(0, self._end_turn)

    def hold(self, connection: GloomProtocol) -> None:
        """Call ``connection.write_held()`` when this turn ends."""
        self._holding.append(connection)
        self.end_turn_soon()

    def _end_turn(self) -> None:
        self._call = None
        self.turn += 1
        holding, self._holding = self._holding, []
        for connection in holding:
            connection.write_held()


class GloomFactory(Factory):
    """Builds one kind of Gloom protocol around the shared scheduler (and
    the `Outbox` the daemon's factories share), and tracks its connections
    so the daemon can close them when it stops."""

    noisy = False

    writer_for = staticmethod(transport.writer_for)
    """Chooses how a new connection writes: a `transport.TransportWriter`
    for its transport."""

    def __init__(self, scheduler: Scheduler, clock: IReactorTime,
                 max_frame: int = wire.DEFAULT_MAX_FRAME, outbox: Optional[Outbox] = None,
                 frame_timeout: float = DEFAULT_FRAME_TIMEOUT):
        """
        :param scheduler: the daemon's scheduler.
        :param clock: for timeouts and the end of a reactor turn.
        :param max_frame: the largest frame a peer may send, in bytes.
        :param outbox: the daemon's `Outbox`; a new one if None.
        :param frame_timeout: seconds a peer may stay part way through a
            frame (or a TLS handshake) without sending more.
        """
        self.scheduler = scheduler
        self.clock = clock
        self.max_frame = max_frame
        self.frame_timeout = frame_timeout
        self.outbox = outbox if outbox is not None else Outbox(clock)
        self.connections: Set[GloomProtocol] = set()

    def close_all(self, timeout: float) -> Deferred:
        """Close every connection after its pending frames are written;
        abort those still open after ``timeout`` seconds.

        :returns: a Deferred that fires once every connection is closed.
        """
        connections = list(self.connections)
        for connection in connections:
            connection.close()
        done = DeferredList([c.closed for c in connections])
        if connections:
            abort = self.clock.callLater(timeout, self._abort, connections)
            done.addBoth(_cancel_if_active, abort)
        return done

    @staticmethod
    def _abort(connections) -> None:
        for connection in connections:
            if not connection.closed.called:
                connection.abort()


def _cancel_if_active(result, call):
    if call.active():
        call.cancel()
    return result
