"""Blocking clients for Gloom, for scripts and ordinary programs.

The API of the 2009 reference client is kept (``Master.submit``,
``receive``, ``do_many``, ``disconnect``; ``Slave.join``, ``job``,
``respond``), so old code ports by changing an import.  New: context
managers, `Master.run`, `Master.map`, `Slave.serve`, ``cancel``, ``stats``,
detached and delayed jobs (``submit(..., detach=True)``, `Master.status`,
the dead list), progress (``job.progress`` in a worker, ``on_progress`` in
a master), unique jobs (``unique=``), the admin actions (`Master.pause`,
`Master.resume`, `Master.clear`, `Master.drain`), TLS, and several daemons
at once::

    from gloom.client import Master, Slave

    with Master() as master:
        print(master.run("upper", "hello"))          # -> "HELLO"

    with Slave() as slave:
        slave.serve(lambda job: job.body.upper(), type="upper")

This module only moves bytes: matching replies, routing jobs over daemons
and failing over are `gloom.core`'s.
"""

from __future__ import annotations

import logging
import selectors
import socket
import ssl
import threading
import time
from collections import deque
from contextlib import contextmanager
from typing import Any, Callable, Deque, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from gloom import core
from gloom.core import (
    Cancelled,
    EncodeError,
    GloomError,
    Job,
    ProtocolError,
    ServerError,
    Timeout,
    TransportError,
    loads,
)

# Re-exported from gloom.core for the code that imports them from here.
_REEXPORTED = (Cancelled, EncodeError, GloomError, Job, ProtocolError, ServerError, Timeout, TransportError,
               loads)

Address = Union[Tuple[str, int], str]
"""A daemon's address: ``(host, port)`` or ``"host:port"``."""

Addresses = Union[None, Address, Sequence[Address]]
"""One address, several (a list, or ``"a:9998,b:9998"``), or None for the
environment's (``GLOOM_MASTERS`` / ``GLOOM_SLAVES``) or the default."""

TLS = Union[None, bool, ssl.SSLContext]
"""None or False for plain TCP, True for the system's CAs, or a context."""

_log = logging.getLogger(__name__)

RETRY_INITIAL = 0.5
"""Seconds before the first attempt to connect again to a daemon whose
connection was lost (or never made), while another is up."""

RETRY_MAX = 30.0
"""The longest wait between such attempts (each failure doubles it)."""

STOP_WAIT = 5.0
"""The longest a stopping `Slave` waits for its daemons to confirm that
they count no job on it any more."""

RETRY_CONNECT_TIMEOUT = 2.0
"""The longest one such attempt may take."""

RETRY_ATTEMPT_MIN = 0.5
"""The least time an attempt is given, even past the end of the call that
makes it (a TLS handshake takes a few round trips): one cut short by that
end is not counted as refused."""

_READ_SIZE = 256 * 1024
_WRITE_SIZE = 256 * 1024
_ACK = object()  # Request.waiter of a submit whose ack submit() waits for
_RUN = object()  # Request.waiter of a job whose answer run() waits for


def client_context(cafile: Optional[str] = None, certfile: Optional[str] = None,
                   keyfile: Optional[str] = None) -> ssl.SSLContext:
    """A TLS context that checks the server's certificate and name against
    ``cafile`` (or the system's CAs) and presents a client certificate if given.

    :param cafile: a PEM file of the CA certificates to trust; by default,
        the system's.
    :param certfile: a PEM file with the client certificate to present
        (and any intermediates); by default, none.
    :param keyfile: the PEM file with the client certificate's private key,
        if it is not in ``certfile``.
    """
    context = ssl.create_default_context(cafile=cafile)
    if certfile is not None:
        context.load_cert_chain(certfile, keyfile)
    return context


def _address_text(address: Any) -> Any:
    """``"host:port"`` for a ``(host, port)`` pair; anything else as it is."""
    if isinstance(address, tuple) and len(address) == 2 and isinstance(address[1], int):
        host, port = address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return address


def _addresses(addr: Addresses, env: Sequence[str], default: str) -> List[str]:
    """The daemons' addresses as text, one per daemon (see `Addresses`)."""
    if isinstance(addr, tuple) and len(addr) == 2 and isinstance(addr[1], int):
        addr = [addr]
    if isinstance(addr, (list, tuple)):
        addr = [_address_text(address) for address in addr]
    return core.addresses(addr, env, default)


def _tls_failure(name: str, error: BaseException) -> str:
    """One line saying that TLS with ``name`` failed, and why."""
    if isinstance(error, ssl.SSLCertVerificationError):
        why = f"certificate verify failed: {error.verify_message}"
    elif isinstance(error, ssl.SSLError) and error.reason:
        why = error.reason.lower().replace("_", " ")
    else:
        why = getattr(error, "strerror", None) or str(error) or error.__class__.__name__
    return f"TLS with {name} failed: {why}"


class _Connection:
    """One daemon's socket: blocking while it connects, then non-blocking,
    with the bytes not yet sent and the frames not yet handled."""

    def __init__(self, address: str, tls: TLS, server_hostname: Optional[str],
                 connect_timeout: Optional[float]):
        self.name = core.display_name(address)
        host, port = core.host_port(address)
        try:
            sock = socket.create_connection((host, port), timeout=connect_timeout)
        except OSError as e:
            raise TransportError(f"cannot connect to {self.name}: {e.strerror or e}", self.name) from None
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls:
            context = tls if isinstance(tls, ssl.SSLContext) else client_context()
            try:
                sock = context.wrap_socket(sock, server_hostname=server_hostname or host)
            except (ssl.SSLError, ssl.CertificateError, OSError) as e:
                sock.close()
                raise TransportError(_tls_failure(self.name, e), self.name) from None
        sock.setblocking(False)
        self.sock = sock
        self.tls = bool(tls)
        self.frames: Deque[bytes] = deque()
        self.dead: Optional[str] = None
        """Why the connection is over, once it is."""
        self.events = selectors.EVENT_READ
        self.handle: Any = None
        """The core's object for this connection (a `core.Link` for slaves)."""
        self._splitter = core.FrameBuffer()
        self._out = bytearray()
        self._offset = 0
        self._retry = 0

    def send(self, data: bytes) -> None:
        """Queue a frame; `flush` writes it (frames queued together go
        out in one write)."""
        if self.dead is None:
            self._out += data

    @property
    def writing(self) -> bool:
        """Whether bytes wait to be written."""
        return self._offset < len(self._out) and self.dead is None

    def flush(self) -> None:
        """Write queued bytes until the socket would block."""
        out = self._out
        try:
            while self._offset < len(out):
                # TLS must retry a write with the same bytes: keep its size.
                start = self._offset
                size = self._retry or min(len(out) - start, _WRITE_SIZE)
                try:
                    sent = self.sock.send(out[start:start + size])
                except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                    self._retry = size
                    return
                self._retry = 0
                self._offset += sent
        except OSError as e:
            self._lost(e)
        finally:
            if self._offset == len(out):
                out.clear()
                self._offset = 0
            elif self._offset > _WRITE_SIZE and self._offset * 2 > len(out):
                del out[:self._offset]
                self._offset = 0

    def read(self) -> None:
        """Read what the socket has and split it into frames."""
        while self.dead is None:
            try:
                data = self.sock.recv(_READ_SIZE)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            except OSError as e:
                self._lost(e)
                return
            if not data:
                self.dead = f"{self.name} closed the connection"
                return
            try:
                self.frames.extend(self._splitter.feed(data))
            except ProtocolError as e:
                self.dead = f"{self.name}: {e}"
                return
            if not (self.tls and self.sock.pending()):
                return

    def _lost(self, error: OSError) -> None:
        if isinstance(error, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
            self.dead = f"{self.name} closed the connection"
        elif isinstance(error, ssl.SSLError):
            self.dead = _tls_failure(self.name, error)
        else:
            self.dead = f"connection to {self.name} lost: {error.strerror or error}"

    def close(self) -> None:
        self.sock.close()


class _Client:
    """The connections of a client, one per daemon, read together with
    ``selectors``; `disconnect` may be called from any thread.

    :param addresses: the daemons' addresses; those that cannot be
        connected are left out, unless none can.
    :raises TransportError: if no daemon can be connected.
    """

    def __init__(self, addresses: List[str], tls: TLS, server_hostname: Optional[str],
                 connect_timeout: Optional[float]):
        for address in addresses:
            core.host_port(address)  # a ValueError before any socket is opened
        self.names = [core.display_name(address) for address in addresses]
        """Every daemon's name, connected or not, in the order given."""
        self._connections: Dict[str, _Connection] = {}
        self._settings = (tls, server_hostname, connect_timeout)
        self._addresses = dict(zip(self.names, addresses))
        self._retry: Dict[str, Tuple[float, float]] = {}
        """For each daemon not connected: when to try it next, and the wait after that."""
        failures = []
        for address in addresses:
            try:
                connection = _Connection(address, tls, server_hostname, connect_timeout)
            except TransportError as e:
                failures.append(e)
                self._retry[core.display_name(address)] = (time.monotonic() + RETRY_INITIAL, RETRY_INITIAL)
                continue
            self._connections[connection.name] = connection
        if not self._connections:
            if len(failures) == 1:
                raise failures[0]
            raise TransportError("; ".join(str(e) for e in failures))
        self._why = "no daemon is connected"
        self._lock = threading.Lock()
        self._state = threading.RLock()
        """Held while a thread uses the core or the connections' buffers."""
        self._selecting = 0  # threads waiting in the selector
        self._busy = 0
        self._closed = False
        self._selector = selectors.DefaultSelector()
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self._wake_write.setblocking(False)
        self._selector.register(self._wake_read, selectors.EVENT_READ, None)
        for connection in self._connections.values():
            self._selector.register(connection.sock, selectors.EVENT_READ, connection)

    @property
    def connected(self) -> List[str]:
        """The daemons connected now."""
        return list(self._connections)

    def disconnect(self) -> None:
        """Close every connection.  From another thread, this wakes a call
        blocked reading (it raises `TransportError`, `Slave.serve`
        returns); the sockets are closed once that call is done with them."""
        with self._lock:
            self._closed = True
            if self._busy:
                try:
                    self._wake_write.send(b"\0")
                except OSError:
                    pass
            else:
                self._close_all()

    close = disconnect

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.disconnect()

    # --- inside ------------------------------------------------------------------------------

    def _close_all(self) -> None:
        """Close the sockets (with the lock held, no call using them)."""
        if self._selector is None:
            return
        for connection in self._connections.values():
            connection.close()
        self._selector.close()
        self._selector = None
        self._wake_read.close()
        self._wake_write.close()

    def _disconnected(self) -> TransportError:
        return TransportError(f"disconnected from {', '.join(self.names)}: disconnect() was called")

    @contextmanager
    def _io(self) -> Iterator[None]:
        """Mark a use of the sockets, which `disconnect` leaves open until
        it ends."""
        with self._lock:
            if self._closed:
                raise self._disconnected()
            self._busy += 1
        try:
            yield
        finally:
            with self._lock:
                self._busy -= 1
                if self._closed and not self._busy:
                    self._close_all()

    def _flush(self) -> None:
        """Write what the connections have queued, as far as they take it
        now, for a request nobody waits for (call inside `_io`)."""
        for connection in self._connections.values():
            if connection.writing:
                connection.flush()

    def _send(self, name: str, data: bytes) -> None:
        connection = self._connections.get(name)
        if connection is not None:
            connection.send(data)

    def _wait(self, done: Callable[[], bool], timeout: Optional[float] = None,
              tick: Optional[Callable[[float], Optional[float]]] = None, deliver: bool = True) -> None:
        """Read and handle frames until ``done()`` (call inside `_io`).
        The state lock is held all along but while the selector waits, so
        another thread may send a job's progress meanwhile (`_poll`).

        :param tick: called with the time (``time.monotonic``) before each
            wait; returns the latest time to wake up at, or None.
        :param deliver: call the callbacks due (`_deliver`) as frames are
            handled; else they wait for the next call that does.
        :raises Timeout: if ``timeout`` seconds pass first.
        :raises TransportError: if every connection is gone or
            `disconnect` was called first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        polled = False
        state = self._state
        while True:
            with state:
                self._handle_frames()
            if deliver:
                self._deliver()
            if done():
                with state:
                    self._flush()
                return
            if self._closed:
                raise self._disconnected()
            if self._retry and self._connections:
                self._reconnect(deadline)  # outside the state lock: progress() need not wait for it
            with state:
                if not self._connections:
                    self._all_lost()
                    if done():
                        return
                    raise TransportError(self._why)
                wait = None
                now = time.monotonic()
                if deadline is not None:
                    wait = deadline - now
                    if wait <= 0:
                        if polled:
                            raise Timeout(f"nothing arrived within {timeout} s")
                        wait = 0
                wakes = [tick(now)] if tick is not None else []
                if self._retry:
                    wakes.append(min(due for due, _ in self._retry.values()))
                for wake in wakes:
                    if wake is not None:
                        until = max(0.0, wake - now)
                        wait = until if wait is None else min(wait, until)
                polled = True
                selector = self._selector
                for connection in self._connections.values():
                    if connection.writing:
                        connection.flush()
                    events = selectors.EVENT_READ | (selectors.EVENT_WRITE if connection.writing else 0)
                    if events != connection.events:
                        selector.modify(connection.sock, events, connection)
                        connection.events = events
                self._selecting += 1
            try:
                ready = selector.select(wait)
            finally:
                with state:
                    self._selecting -= 1
            with state:
                for key, mask in ready:
                    connection = key.data
                    if connection is None:
                        try:
                            self._wake_read.recv(64)
                        except OSError:
                            pass
                        continue
                    if connection.dead is not None:
                        continue  # another thread found it over meanwhile
                    if mask & selectors.EVENT_WRITE:
                        connection.flush()
                    if mask & selectors.EVENT_READ:
                        connection.read()

    def _poll(self) -> None:
        """From a thread that sent something while another may be waiting
        in `_wait` (call inside `_io`, with the state lock): write it, take
        what has arrived without waiting, and wake the waiting thread so
        it sees both."""
        for connection in self._connections.values():
            if connection.writing:
                connection.flush()
            connection.read()
        self._handle_frames()
        if self._selecting:
            try:
                self._wake_write.send(b"\0")
            except OSError:
                pass

    def _deliver(self) -> None:
        """Call what waits to be called outside the state lock (the
        progress callbacks of a `Master`)."""

    def _handle_frames(self) -> None:
        """Hand each frame read to the core, then drop the connections
        that are over.  A frame that cannot be read raises
        `ProtocolError`; the frames after it stay for the next call."""
        for connection in list(self._connections.values()):
            frames = connection.frames
            while frames:
                self._received(connection, core.decode(frames.popleft(), connection.name))
            if connection.dead is not None:
                self._selector.unregister(connection.sock)
                connection.close()
                del self._connections[connection.name]
                self._why = connection.dead
                self._retry[connection.name] = (time.monotonic() + RETRY_INITIAL, RETRY_INITIAL)
                self._lost(connection, connection.dead)

    def _reconnect(self, deadline: Optional[float]) -> None:
        """While a daemon is up, try each lost one again when its turn has
        come (a refused attempt doubles its wait, up to `RETRY_MAX`); a
        connection made is handed to `_connected`.  Called by the thread
        that waits for the daemons, without the state lock (an attempt
        may take up to `RETRY_CONNECT_TIMEOUT`, and not past ``deadline``,
        the end of the call that waits, by more than `RETRY_ATTEMPT_MIN`)."""
        tls, server_hostname, connect_timeout = self._settings
        for name, (due, delay) in list(self._retry.items()):
            now = time.monotonic()
            if due > now:
                continue
            full = RETRY_CONNECT_TIMEOUT if connect_timeout is None else \
                min(connect_timeout, RETRY_CONNECT_TIMEOUT)
            timeout = full if deadline is None else min(full, max(deadline - now, RETRY_ATTEMPT_MIN))
            try:
                connection = _Connection(self._addresses[name], tls, server_hostname, timeout)
            except TransportError as e:
                if timeout < full and time.monotonic() - now >= timeout * 0.9:
                    # Cut short by the call's end: tried again soon, not counted as refused.
                    self._retry[name] = (time.monotonic() + RETRY_INITIAL, delay)
                    return
                delay = min(delay * 2, RETRY_MAX)
                self._retry[name] = (time.monotonic() + delay, delay)
                _log.debug("%s", e)
                continue
            with self._lock:
                closed = self._closed
            if closed:
                connection.close()
                return
            with self._state:
                del self._retry[name]
                self._connections[name] = connection
                self._selector.register(connection.sock, selectors.EVENT_READ, connection)
                _log.info("connected to %s again", name)
                self._connected(connection)

    def _received(self, connection: _Connection, message: dict) -> None:
        raise NotImplementedError

    def _connected(self, connection: _Connection) -> None:
        """A daemon lost earlier is connected again."""
        raise NotImplementedError

    def _lost(self, connection: _Connection, why: str) -> None:
        raise NotImplementedError

    def _all_lost(self) -> None:
        """Every connection is gone (and none comes back)."""


class Master(_Client):
    """Submits jobs and collects their answers, over one connection per
    daemon; `gloom.core.MasterCore` routes each job to a daemon and
    matches every reply.

    :param addr: the daemons' master ports: ``(host, port)``,
        ``"host:port"``, ``"a:9998,b:9998"`` or a list of those; by
        default ``GLOOM_MASTERS`` (or ``GLOOM_MASTER``), else
        127.0.0.1:9998.
    :keyword tls: None for plain TCP, True for TLS checked against the
        system's CAs, or an ``ssl.SSLContext`` (see `client_context`).
    :keyword server_hostname: the name the server's certificate must carry;
        by default, the host of each address.
    :keyword connect_timeout: seconds to wait for each connection, 10 by
        default (None waits as long as the system does).
    :keyword resubmit: when a daemon's connection drops, submit its
        unanswered jobs to the other daemons instead of failing them.
    :raises TransportError: if no daemon can be connected (a daemon that
        cannot be is left out while others can).
    """

    def __init__(self, addr: Addresses = None, *, tls: TLS = None, server_hostname: Optional[str] = None,
                 connect_timeout: Optional[float] = 10.0, resubmit: bool = False):
        addresses = _addresses(addr, core.MASTERS_ENV, core.DEFAULT_MASTER)
        super().__init__(addresses, tls, server_hostname, connect_timeout)
        self._core = core.MasterCore(self.names, self._send, self._ended, resubmit=resubmit,
                                     progressed=self._progressed)
        self._answers: Deque[core.Request] = deque()
        self._watchers: Dict[core.Request, Callable[[dict], Any]] = {}
        """The ``on_progress`` of each submit in flight that has one."""
        self._progress: Deque[Tuple[Callable[[dict], Any], dict]] = deque()
        """Progress callbacks due, in the order the frames came."""
        for name in self._connections:
            self._core.connected(name)
        for name in self.names:
            if name not in self._connections:
                self._core.attempt_failed(name)  # tried: unique submits need not wait for it

    # --- what the core and the connections say ------------------------------------------------

    def _received(self, connection: _Connection, message: dict) -> None:
        self._core.received(connection.name, message)

    def _lost(self, connection: _Connection, why: str) -> None:
        self._core.lost(connection.name, why)

    def _connected(self, connection: _Connection) -> None:
        self._core.connected(connection.name)

    def _all_lost(self) -> None:
        self._core.unreachable(self._why)

    def _ended(self, request: core.Request) -> None:
        """Keep each job's outcome that nobody waits for, for `receive`
        (a detached job has none: its submit ends at the ack)."""
        if self._watchers:
            self._watchers.pop(request, None)
        if request.kind == "submit" and request.waiter is None and not request.detached \
                and not isinstance(request.error, Cancelled):
            self._answers.append(request)

    def _progressed(self, request: core.Request, progress: dict) -> None:
        watcher = self._watchers.get(request)
        if watcher is not None:
            self._progress.append((watcher, progress))

    def _deliver(self) -> None:
        """Call the ``on_progress`` callbacks due, in order (an exception
        one raises comes out of the call that was reading; the rest stay
        due)."""
        due = self._progress
        while due:
            watcher, progress = due.popleft()
            watcher(progress)

    # --- the 2009 API -------------------------------------------------------------------------

    def _submit(self, id: Optional[str], type: Optional[str], body: Any, priority: Optional[int],
                timeout: Optional[float], waiter: Any, options: Optional[Dict[str, Any]] = None,
                on_progress: Optional[Callable[[dict], Any]] = None) -> core.Request:
        """Submit a job and wait for its ack; then the job's outcome goes
        to ``waiter`` (None: to `receive`).  ``options``: `gloom.core.job_options`'s
        and ``unique``; ``on_progress``: called with each progress."""
        if id and id in self._core.jobs:
            raise ServerError("id_exists", f"job {id!r} is already in flight", id)
        if on_progress is not None and not callable(on_progress):
            raise TypeError(f"on_progress must be callable, not {on_progress!r}")
        options = options or {}
        with self._io():
            request = self._core.submit(type, body, priority, id or None, timeout, **options)
            request.waiter = _ACK
            if on_progress is not None:
                self._watchers[request] = on_progress
            # No callback while the ack is awaited: one that raised would
            # lose the job's id, and the answer's waiter.
            self._wait(lambda: request.acked or request.done, deliver=False)
        if not request.acked and request.error is not None:
            raise request.error
        request.waiter = waiter
        if request.done:
            self._ended(request)
        return request

    def submit(self, id: Optional[str] = None, type: Optional[str] = None, body: Any = None,
               priority: Optional[int] = None, timeout: Optional[float] = None, *, detach: bool = False,
               delay: Any = None, at: Any = None, retries: Optional[int] = None,
               backoff: bool = False, unique: Optional[str] = None,
               on_progress: Optional[Callable[[dict], Any]] = None) -> str:
        """Submit a job and wait for its ack.  Its answer comes to
        `receive`, unless it is detached: a detached job belongs to the
        daemon, outlives this connection, and gets no answer here (`status`
        says how it went).

        :param id: the job's id, unique among this master's unfinished
            jobs (a detached job's, among the daemon's detached jobs); by
            default a fresh uuid4 hex.
        :param type: the job's type (required).
        :param body: the job's body: any value ``json.dumps`` takes.
        :param priority: higher runs first; the daemon's default is 0.
        :param timeout: the job's own time limit on a slave, in seconds.
        :param detach: hand the job to the daemon (see above).
        :param delay: seconds to wait before the job is queued (a number
            or a ``timedelta``, up to 365 days).
        :param at: when to queue it: seconds since the epoch or a
            ``datetime``; a past time means now.  Not with ``delay``.
        :param retries: how many times a lost attempt is queued again (0 to
            1000); by default, the daemon's ``--retries``.
        :param backoff: retry lost attempts after a growing delay instead
            of at once (detached jobs always do).
        :param unique: a key (a non-empty string, at most 1024 bytes of
            UTF-8): while a job of this type with this key is queued,
            delayed or running on the daemon, this submit joins it instead
            of queueing another, and gets its progress and answer under
            this id (the first submit's priority, timeout, delay and
            retries hold).  Not with ``detach``.
        :param on_progress: called with each progress of the job (a dict
            of ``done``, ``total`` and ``data``, those the worker sent),
            before its answer, in the thread of the call that reads it
            (`receive`, or any call of this master that waits).  An
            exception it raises comes out of that call.
        :returns: the job's id.
        :raises ServerError: if the daemon refuses the job (``id_exists``,
            ``journal_error``...).
        :raises EncodeError: at once, if the body is not JSON.
        :raises ValueError: at once, for an option out of range, both
            ``delay`` and ``at``, or ``unique`` with ``detach``.
        :raises TransportError: if the daemon's connection dropped first
            (a detached job may then have been taken or not: ask `status`).
        """
        options = dict(detach=detach, delay=delay, at=at, retries=retries, backoff=backoff, unique=unique)
        return self._submit(id, type, body, priority, timeout, None, options, on_progress).id

    def receive(self, timeout: Optional[float] = None) -> Job:
        """The next answer to any of this master's jobs, as a `Job`; a failed
        job comes back with ``error`` and ``reason``.

        :param timeout: seconds to wait; by default, for ever.
        :raises Timeout: if no answer came in time.
        :raises TransportError: for a job its daemon's connection dropped
            (``.daemon`` and ``.id`` name them), or once no daemon is left.
        """
        if not self._answers:
            with self._io():
                self._wait(lambda: bool(self._answers), timeout)
        self._deliver()  # what came before the answer, first
        request = self._answers.popleft()
        error = request.error
        if error is None:
            return Job(id=request.id, body=request.value)
        if isinstance(error, ServerError):
            return Job(id=request.id, error=error.error, reason=error.reason)
        raise error

    def do_many(self, jobs: Iterable, timeout: Optional[float] = None) -> Iterator[Job]:
        """Submit every job, then yield their answers (as `Job`) as they
        arrive.

        :param jobs: dicts with ``type``, ``body`` and optionally ``id``,
            ``priority``, ``timeout``, ``delay``, ``at``, ``retries``,
            ``backoff``, ``unique`` and ``on_progress`` (as `submit` takes
            them), or ``(type, body)`` pairs.
        :param timeout: seconds each wait for an answer may take.
        :raises ValueError: for a job with ``detach``: it would get no
            answer to yield.
        """
        count = 0
        for job in jobs:
            if not isinstance(job, dict):
                job_type, body = job
                job = {"type": job_type, "body": body}
            if job.get("detach"):
                raise ValueError("do_many waits for answers, and a detached job gets none: use submit")
            self.submit(job.get("id"), job["type"], job.get("body"), job.get("priority"),
                        job.get("timeout"), delay=job.get("delay"), at=job.get("at"),
                        retries=job.get("retries"), backoff=job.get("backoff", False),
                        unique=job.get("unique"), on_progress=job.get("on_progress"))
            count += 1
        for _ in range(count):
            yield self.receive(timeout)

    # --- new ----------------------------------------------------------------------------------

    def run(self, type: str, body: Any = None, priority: Optional[int] = None,
            timeout: Optional[float] = None, wait: Optional[float] = None, *, detach: bool = False,
            delay: Any = None, at: Any = None, retries: Optional[int] = None,
            backoff: bool = False, unique: Optional[str] = None,
            on_progress: Optional[Callable[[dict], Any]] = None) -> Any:
        """Submit one job and wait for its answer body.  Answers to other
        jobs that arrive meanwhile stay for `receive`.

        :param type: the job's type.
        :param body: the job's body.
        :param priority: as `submit` takes it.
        :param timeout: the job's own time limit on a slave, in seconds.
        :param wait: seconds to wait for the answer; by default, for ever
            (on `Timeout` the answer, when it comes, goes to `receive`).
            A delayed job's wait includes its delay.
        :param detach: refused: a detached job gets no answer to wait for
            (use `submit`, then `status`).
        :param delay: as `submit` takes it; so are ``at``, ``retries``,
            ``backoff`` and ``unique``.
        :param on_progress: called with each progress of the job (a dict
            of ``done``, ``total`` and ``data``), in this thread, before
            `run` returns.  An exception it raises comes out of `run`; the
            job stays in flight, and its answer goes to `receive`.
        :raises ServerError: if the job was refused or failed.
        :raises TransportError: if its daemon's connection dropped.
        :raises Timeout: if the answer did not come within ``wait``.
        :raises ValueError: with ``detach``, or an option out of range.
        """
        if detach:
            raise ValueError("run waits for the answer, and a detached job gets none: use submit(detach=True)")
        options = dict(delay=delay, at=at, retries=retries, backoff=backoff, unique=unique)
        request = self._submit(None, type, body, priority, timeout, _RUN, options, on_progress)
        try:
            with self._io():
                self._wait(lambda: request.done, wait)
        except BaseException:
            request.waiter = None
            self._watchers.pop(request, None)
            if request.done:
                self._ended(request)
            raise
        return request.result()

    def map(self, type: str, bodies: Iterable, window: int = 64, priority: Optional[int] = None,
            timeout: Optional[float] = None, wait: Optional[float] = None) -> Iterator[Any]:
        """Run one job per body with up to ``window`` in flight; yield the
        answer bodies in the order of ``bodies``.  A failed job raises
        `ServerError` when its turn comes.  The jobs still in flight when
        it stops early (an error, or the iterator closed) are cancelled.

        :param type: the type of every job.
        :param bodies: the jobs' bodies; read only as jobs are submitted.
        :param window: the most jobs submitted and not yet answered.
        :param priority: as `submit` takes it, for every job.
        :param timeout: each job's own time limit on a slave, in seconds.
        :param wait: seconds each wait for an answer may take.
        """
        flight = core.InOrder(window)
        mine = object()
        bodies = iter(bodies)
        more = True
        try:
            while True:
                with self._io():
                    while more and flight.room:
                        try:
                            body = next(bodies)
                        except StopIteration:
                            more = False
                            break
                        request = self._core.submit(type, body, priority, None, timeout)
                        request.waiter = mine
                        flight.add(request)
                    head = flight.head()
                    if head is None:
                        return
                    self._wait(lambda: head.done, wait)
                for request in flight.ready():
                    yield request.result()
        finally:
            self._cancel_all(mine)

    def _cancel_all(self, waiter: Any) -> None:
        """Cancel the unfinished jobs of one `map`, without waiting."""
        left = [request for request in self._core.jobs.values() if request.waiter is waiter]
        if not left:
            return
        try:
            with self._io():
                for request in left:
                    self._core.cancel(request.id)
                self._flush()
        except GloomError:
            pass

    def cancel(self, id: str) -> None:
        """Withdraw one of this master's unfinished jobs: nothing more comes
        for it.  If its answer came first, that answer goes to `receive`
        and the cancel fails.  Or withdraw a detached job (queued, delayed
        or running; anyone may): it ends ``failed``, reason "cancelled by a
        master".  With several daemons, an id that is not this master's
        is asked of each daemon in turn (`gloom.core.MasterCore.cancel`).

        :param id: the job's id.
        :raises ServerError: ``unknown_job`` if no daemon has an unfinished
            job by that id that this master may cancel.
        """
        with self._io():
            request = self._core.cancel(id)
            self._wait(lambda: request.done)
        request.result()

    def status(self, id: str) -> dict:
        """Where a job is: the daemon's reply as a dict, with ``id``,
        ``state`` (``queued``, ``delayed``, ``running``, ``completed``,
        ``failed``, ``dead`` or ``unknown``) and, where they apply,
        ``detached``, ``type``, ``priority``, ``attempts``, ``run_at``,
        ``result``, ``reason`` and ``ended_at``.  A daemon knows this
        master's own unfinished jobs and every detached job (another
        master's attached job is ``unknown``).  With several daemons they
        are asked in the id's rendezvous order until one knows the job,
        and the dict names it as ``daemon``.

        :param id: the job's id.
        :raises ValueError: if the id is not a non-empty string.
        """
        return self._request(lambda: self._core.status(id))

    def dead_list(self, offset: int = 0, limit: int = 100) -> core.DeadList:
        """A page of the dead list (detached jobs whose retries ran out),
        oldest first: a `gloom.core.DeadList` of dicts with ``id``,
        ``type``, ``priority``, ``attempts``, ``reason`` and ``ended_at``,
        whose ``total`` is the length of the whole list.  With several
        daemons the page is taken from all their lists merged oldest first,
        each entry naming its ``daemon`` (see
        `gloom.core.MasterCore.dead_list`).

        :param offset: how many of the oldest to skip.
        :param limit: the most entries to return (1 to 1000).
        :raises ValueError: if either is out of range.
        """
        return self._request(lambda: self._core.dead_list(offset, limit))

    def dead_retry(self, id: str) -> None:
        """Queue a dead job again, with fresh retries.

        :param id: the dead job's id.
        :raises ServerError: ``unknown_job`` if no daemon has a dead job by
            that id.
        """
        self._request(lambda: self._core.dead_retry(id))

    def dead_discard(self, id: str) -> None:
        """Forget a dead job.

        :param id: the dead job's id.
        :raises ServerError: ``unknown_job`` if no daemon has a dead job by
            that id.
        """
        self._request(lambda: self._core.dead_discard(id))

    def _request(self, make: Callable[[], core.Request]) -> Any:
        """Make a request of the core, wait for it to end; its outcome."""
        with self._io():
            request = make()
            self._wait(lambda: request.done)
        return request.result()

    def stats(self) -> dict:
        """The daemon's figures (see the README's stats action); with
        several daemons, those of the connected ones added up
        (`gloom.core.sum_stats`, each daemon's own under ``daemons``)."""
        with self._io():
            if len(self.names) == 1:
                request = self._core.stats()
                self._wait(lambda: request.done)
                return request.result()
            requests = {name: self._core.stats(name) for name in self._core.up()}
            self._wait(lambda: all(request.done for request in requests.values()))
        by_daemon = {name: request.value for name, request in requests.items() if request.error is None}
        if not by_daemon:
            raise next((r.error for r in requests.values()), None) or TransportError(self._why)
        return core.sum_stats(by_daemon)

    # --- admin --------------------------------------------------------------------------------

    def pause(self, type: str) -> None:
        """Have every daemon hand out no job of ``type`` until `resume`
        (submits are still taken, and queue).  The daemons must run with
        ``--admin``.

        :param type: the job type.
        :raises ServerError: ``forbidden`` if a daemon runs without
            ``--admin``.
        :raises TransportError: if a daemon given is not connected (the
            others were asked).
        """
        self._admin("pause", type)

    def resume(self, type: str) -> None:
        """Hand out jobs of ``type`` again (see `pause`).

        :param type: the job type.
        """
        self._admin("resume", type)

    def clear(self, type: str) -> int:
        """End every queued and delayed job of ``type`` on every daemon:
        each master waiting for one gets ``ServerError`` ``cleared``, and
        a detached one goes to the dead list.  Running jobs go on.

        :param type: the job type.
        :returns: how many jobs were cleared, over every daemon.
        """
        return sum(reply.get("cleared", 0) for reply in self._admin("clear", type).values())

    def drain(self) -> None:
        """Have every daemon refuse new submits (``shutdown``), finish
        its queued and running jobs, then exit."""
        self._admin("drain")

    def _admin(self, action: str, type: Optional[str] = None) -> Dict[str, dict]:
        """Ask every daemon connected; each one's reply, by name."""
        core.admin_message(action, type)  # a ValueError before anything is sent
        with self._io():
            requests = {name: self._core.admin(action, type, name) for name in self._core.up()}
            self._wait(lambda: all(request.done for request in requests.values()))
        return core.admin_outcome(action, self.names, {
            name: request.error if request.error is not None else request.value
            for name, request in requests.items()})


class Slave(_Client):
    """Takes jobs of one type, one at a time, and answers them; with
    several daemons, from whichever has one (`gloom.core.WorkerCore`
    with concurrency 1 keeps it to one job in hand, and `job` wakes every
    ``ROTATE_INTERVAL`` to move an ask that brought nothing).

    The job `job` returns reports progress with ``job.progress(done,
    total, data)`` and ``job.touch()``, which may be called from any
    thread, even while another is in a call of this slave: each sends its
    frame at once, handles the replies that have come by then without
    waiting for any, and returns whether it was sent (False once the job
    is answered, or its connection lost, or `disconnect` called).  So
    ``job.cancelled`` turns True at the first call after the daemon's
    ``cancelled`` reply has arrived.

    :param addr: the daemons' slave ports, as `Master` takes them; by
        default ``GLOOM_SLAVES`` (or ``GLOOM_SLAVE``), else 127.0.0.1:9999.
        The keywords (``tls``, ``server_hostname``, ``connect_timeout``)
        are those of `Master`.
    :raises TransportError: if no daemon can be connected.
    """

    def __init__(self, addr: Addresses = None, *, tls: TLS = None, server_hostname: Optional[str] = None,
                 connect_timeout: Optional[float] = 10.0):
        addresses = _addresses(addr, core.SLAVES_ENV, core.DEFAULT_SLAVE)
        super().__init__(addresses, tls, server_hostname, connect_timeout)
        self._core = core.WorkerCore(None, 1, self.names, self._send_link, self._run, self._report,
                                     self._replied)
        self._jobs: Deque[Tuple[core.Link, Job]] = deque()
        self._replies: List[Tuple[core.Link, str, Optional[ServerError]]] = []
        self._link: Optional[core.Link] = None
        self._stop_asked = False
        self._joining = False
        self._next_rotate = time.monotonic() + core.WorkerCore.ROTATE_INTERVAL
        self.current: Optional[Job] = None
        """The job taken by `job` and not yet answered."""
        for link in self._core.links:
            connection = self._connections.get(link.daemon)
            if connection is not None:
                link.handle = connection
                connection.handle = link
                self._core.link_up(link)

    # --- what the core and the connections say ------------------------------------------------

    def _send_link(self, link: core.Link, data: bytes) -> None:
        link.handle.send(data)

    def _run(self, link: core.Link, job: Job) -> None:
        job.bind(lambda done=None, total=None, data=None: self._report_progress(link, job, (done, total, data)),
                 lambda: self._report_progress(link, job, None))
        self._jobs.append((link, job))

    def _replied(self, link: core.Link, kind: str, error: Optional[ServerError]) -> None:
        if kind not in ("progress", "touch"):  # nobody waits for those: job.cancelled says
            self._replies.append((link, kind, error))

    def _report_progress(self, link: core.Link, job: Job, fields: Optional[Tuple[Any, Any, Any]]) -> bool:
        """Send a job's progress (``fields``: done, total, data) or touch
        (None), from any thread, and handle the replies that have come
        meanwhile, without waiting for any.  False if it was not sent:
        the job is no longer held, or `disconnect` was called."""
        if fields is not None:
            core.progress_fields(*fields)  # a mistake raises in the caller, sent or not
        try:
            with self._io(), self._state:
                if fields is None:
                    sent = self._core.touch(link, job)
                else:
                    sent = self._core.progress(link, job, *fields)
                if sent:
                    self._poll()
                return sent
        except TransportError:
            return False

    def _report(self, text: str, fatal: bool) -> None:
        # A join refused while join() waits is raised to its caller: not
        # also a warning (which Python prints when logging is not set up).
        _log.log(logging.WARNING if fatal and not self._joining else logging.INFO, "%s", text)

    def _received(self, connection: _Connection, message: dict) -> None:
        self._core.received(connection.handle, message)

    def _connected(self, connection: _Connection) -> None:
        link = next(link for link in self._core.links if link.daemon == connection.name)
        link.handle = connection
        connection.handle = link
        self._core.link_up(link)  # it asks there again, if the worker has room

    def _lost(self, connection: _Connection, why: str) -> None:
        link = connection.handle
        self._core.link_down(link)
        for _, job in [entry for entry in self._jobs if entry[0] is link]:
            self._core.abandon(job)  # never given out by job(): its place comes free
        self._jobs = deque(entry for entry in self._jobs if entry[0] is not link)

    # --- the 2009 API -------------------------------------------------------------------------

    def join(self, type: str) -> None:
        """Serve jobs of this type (switching type if already joined).

        :param type: the job type to take.
        :raises ServerError: if a daemon refuses it.
        """
        links = self._core.links
        with self._io():
            with self._state:
                self._replies = []
                self._core.join(type)
            self._joining = True
            try:
                self._wait(lambda: not any("join" in link.replies for link in links if link.up))
            finally:
                self._joining = False
        for _, kind, error in self._replies:
            if kind == "join" and error is not None:
                raise error
        if not any(link.up for link in links):
            raise TransportError(self._why)

    def job(self, timeout: Optional[float] = None) -> Job:
        """Wait for the next job; it becomes the current job, which
        `respond` or `fail` answers.

        :param timeout: seconds to wait; by default, for ever.
        :raises Timeout: if no job came in time.
        :raises TransportError: if every connection is gone, or
            `disconnect` was called (from another thread).
        """
        if not self._jobs:
            tick = self._rotate if len(self.names) > 1 else None
            with self._io():
                self._wait(lambda: bool(self._jobs) or self._stop_asked, timeout, tick)
                if not self._jobs:  # stop() was called
                    with self._state:
                        self._core.stop()  # every ask is taken back; a job that crosses one is released
                    try:
                        self._wait(lambda: not any(link.replies for link in self._core.links if link.up),
                                   STOP_WAIT)
                    except Timeout:
                        pass
                    raise TransportError("the slave was stopped: it takes no more jobs")
        with self._state:
            self._link, self.current = self._jobs.popleft()
        return self.current

    def stop(self) -> None:
        """Take no more jobs, from any thread: the job in hand (if any) is
        still answered; then `job` raises `TransportError` and `serve`
        returns, once every ask for work is taken back (``leave``) and a
        job that crossed one is handed back unrun (``release``, no attempt
        counted).  Queued jobs stay queued for other workers."""
        self._stop_asked = True
        with self._lock:
            if not self._closed:
                try:
                    self._wake_write.send(b"\0")
                except OSError:
                    pass

    def _rotate(self, now: float) -> float:
        """Call the core's ``rotate`` once each
        `gloom.core.WorkerCore.ROTATE_INTERVAL`; return when it is due next."""
        if now >= self._next_rotate:
            self._next_rotate = now + self._core.ROTATE_INTERVAL
            self._replies = []  # nobody waits for the replies to what job() sends
            self._core.rotate()
        return self._next_rotate

    def respond(self, body: Any = None) -> None:
        """Answer the current job.

        :param body: the answer: any value ``json.dumps`` takes.
        :raises EncodeError: if it is not (the job stays current).
        :raises ServerError: ``timed_out`` if the job had run past its
            timeout and the answer was discarded.
        """
        self._held()
        core.encode(body)
        self._finish(body, None)

    def fail(self, reason: str) -> None:
        """Report that the current job failed (the master is told; no retry).

        :param reason: why, for the master; made a string.
        """
        self._held()
        self._finish(None, str(reason))

    def _held(self) -> None:
        if self.current is None:
            raise ServerError("not_processing", "this slave holds no job")

    def _finish(self, outcome: Any, failure: Optional[str]) -> None:
        """Answer the current job and wait for the daemon's reply."""
        job, link = self.current, self._link
        self.current = self._link = None
        with self._io():
            if self._stop_asked:
                with self._state:
                    self._core.stop()  # the answer goes after a leave: no job follows it
            if not link.up:
                with self._state:
                    self._core.finished(link, job, outcome, failure)  # frees its place only
                raise TransportError(f"the connection to {link.daemon} was lost; "
                                     f"job {job.id!r} went back to its queue there", link.daemon, job.id)
            with self._state:
                self._replies = []
                self._core.finished(link, job, outcome, failure)
            self._wait(lambda: "respond" not in link.replies)
        for replied, kind, error in self._replies:
            if replied is link and kind == "respond":
                if error is not None:
                    raise error
                return
        raise TransportError(f"{self._why}; the answer to job {job.id!r} may not have arrived",
                             link.daemon, job.id)

    def serve(self, handler: Callable[[Job], Any], type: Optional[str] = None) -> None:
        """Join ``type`` (if given) and answer jobs until every daemon has
        closed its connection or `disconnect` is called.

        :param handler: called with each `Job`; what it returns is the
            answer, and an exception it raises fails the job with the
            exception's text.  It may report with ``job.progress(...)``
            and ``job.touch()`` (from any thread), and stop early once
            ``job.cancelled`` (or ``job.timed_out``) is True.
        :param type: the job type to join first; by default, the one
            already joined.
        """
        if type is not None:
            try:
                self.join(type)
            except TransportError:
                if self._closed:
                    return
                raise
        while True:
            try:
                job = self.job()
            except TransportError:
                return
            try:
                outcome, failure = handler(job), None
            except Exception as e:
                outcome, failure = None, str(e) or e.__class__.__name__
            try:
                self._finish(outcome, failure)
            except ServerError as e:
                if e.error != "timed_out":
                    raise
            except TransportError:
                pass  # that daemon is gone; job() says whether any is left
