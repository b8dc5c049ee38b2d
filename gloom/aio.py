"""An asyncio client for Gloom: `Master` submits jobs and awaits their
answers (or, for a detached job, its id; ``status`` and the dead list say
how such jobs went), follows their progress (``on_progress``), and
pauses, resumes, clears and drains the daemons' queues; `Worker` (or
`work`) answers jobs with a plain or async function, which may report
its progress (``job.progress``) or ask for more time (``job.touch``).

Both are thin shells over `gloom.core`: they open one connection per
daemon (per job slot, for a worker), reconnect with backoff, and move
frames between those connections and `gloom.core.MasterCore` or
`gloom.core.WorkerCore`.  Only the standard library is used::

    import asyncio
    from gloom.aio import Master, work

    async def main():
        worker = await work("upper", lambda job: job.body.upper(), concurrency=4)
        async with Master() as master:
            print(await master.run("upper", "hello"))          # HELLO
            async for answer in master.map("upper", ["a", "b"]):
                print(answer)                                  # A, then B
        await worker.stop()

    asyncio.run(main())
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import random
import ssl as _ssl
import weakref
from typing import Any, AsyncIterable, AsyncIterator, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, \
    Set, Tuple, Union

from gloom import core
from gloom.core import EncodeError, Job, ProtocolError, TransportError, WorkerError

__all__ = ["Master", "Worker", "Answers", "work"]

ProgressCallback = Callable[[dict], Any]
"""What ``on_progress`` is: called with each progress dict of a job."""

Addresses = Union[None, str, Sequence[str]]
TLS = Union[None, bool, _ssl.SSLContext]

_log = logging.getLogger("gloom.aio")

_TRANSIENT_TLS = (_ssl.SSLEOFError, _ssl.SSLZeroReturnError)

PROVEN_AFTER = 5.0
"""The seconds a connection must stay up, if the daemon sends no frame on
it, before it counts as a working one that resets the backoff.  (A port
that closes every new connection, such as a TLS port reached without
``ssl=``, must back off as a refusing one does, not be retried at once.)"""


# --- connections -----------------------------------------------------------------------------


def _tls_failure(error: BaseException, daemon: str) -> Optional[str]:
    """One line saying a TLS handshake or session with ``daemon`` failed,
    and why; None if ``error`` is not such a failure."""
    if isinstance(error, _ssl.SSLCertVerificationError):
        message = str(error.verify_message or error.reason or error).rstrip(".")
        if "mismatch" in message.lower():
            return f"TLS with {daemon} failed: wrong host name ({message})"
        return f"TLS with {daemon} failed: certificate verify failed ({message})"
    if not isinstance(error, _ssl.SSLError) or isinstance(error, _TRANSIENT_TLS):
        return None
    reason = str(error.reason or "").upper()
    if "CERTIFICATE_REQUIRED" in reason or "PEER_DID_NOT_RETURN" in reason:
        why = "the daemon requires a client certificate"
    elif any(word in reason for word in ("UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN",
                                         "UNSUPPORTED_CERTIFICATE", "CERTIFICATE_EXPIRED")):
        why = f"the daemon refused the client certificate ({reason.lower().replace('_', ' ')})"
    elif "HANDSHAKE_FAILURE" in reason:
        why = "the daemon refused the handshake (a client certificate may be required)"
    elif any(word in reason for word in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH")):
        why = "the daemon does not speak TLS on that port"
    else:
        why = (reason.lower().replace("_", " ") or str(error)).strip()
    return f"TLS with {daemon} failed: {why}"


def _connect_failure(error: BaseException, daemon: str, timeout: float) -> Tuple[str, bool]:
    """Why a connection attempt to ``daemon`` failed, in one line, and
    whether retrying cannot help (a TLS or configuration error)."""
    tls = _tls_failure(error, daemon)
    if tls is not None:
        return tls, True
    if isinstance(error, (asyncio.TimeoutError, TimeoutError)):
        return f"cannot connect to {daemon}: no connection within {timeout:g} s", False
    if isinstance(error, OSError):
        return f"cannot connect to {daemon}: {error.strerror or error}", False
    return f"cannot connect to {daemon}: {error}", True


def _loss(error: Optional[BaseException], daemon: str, why: Optional[str],
          silent: bool = False) -> Tuple[str, bool]:
    """Why a connection to ``daemon`` ended, in one line, and whether it
    was a TLS failure that retrying cannot help.

    :param silent: whether it was a plain (not TLS) connection on which the
        daemon sent nothing: a TLS port closes such a connection at its
        first bytes, so a close then gets a hint (as the Twisted client's
        does).
    """
    if why is not None:
        return why, False
    if error is None:
        if silent:
            return (f"the connection to {daemon} was closed before the daemon said anything (if that port "
                    "expects TLS, give ssl=)"), False
        return f"the connection to {daemon} was closed", False
    tls = _tls_failure(error, daemon)
    if tls is not None:
        return tls, True
    text = getattr(error, "strerror", None) or str(error) or error.__class__.__name__
    return f"the connection to {daemon} was lost: {text}", False


class _Connection(asyncio.Protocol):
    """One connection to a daemon: splits the bytes into frames and hands
    each decoded frame to ``received``; ``closed`` resolves with the
    exception the connection ended with (None for a clean close), and
    ``heard`` says whether a frame came."""

    def __init__(self, name: str, received: Callable[[dict], None]):
        self.name = name
        self.received = received
        self.buffer = core.FrameBuffer()
        self.transport: Optional[asyncio.Transport] = None
        self._loop = asyncio.get_running_loop()
        self.closed: asyncio.Future = self._loop.create_future()
        self.why: Optional[str] = None
        self.heard = False
        self._unsent: Optional[List[bytes]] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.why is not None:
            return
        try:
            for payload in self.buffer.feed(data):
                self.heard = True
                self.received(core.decode(payload, self.name))
                if self.why is not None:
                    return
        except ProtocolError as e:
            self.abort(f"the connection to {self.name} was dropped: {e}")

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        if not self.closed.done():
            self.closed.set_result(exc)

    def write(self, data: bytes) -> None:
        """Send ``data``: the frames written in one turn of the event loop
        go out together, in one system call rather than one each."""
        if self._unsent is None:
            self._unsent = [data]
            self._loop.call_soon(self.flush)
        else:
            self._unsent.append(data)

    def flush(self) -> None:
        """Hand what was written to the transport now."""
        unsent, self._unsent = self._unsent, None
        if unsent and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(unsent))

    def close(self) -> None:
        """Close the connection once what was written is sent."""
        self.flush()
        if self.transport is not None:
            self.transport.close()

    def abort(self, why: str) -> None:
        """Drop the connection at once, for ``why``."""
        if self.why is None:
            self.why = why
        if self.transport is not None:
            self.transport.abort()


class _Shell:
    """What `Master` and `Worker` share: addresses, TLS, and connecting with
    backoff."""

    def __init__(self, addresses: List[str], ssl: TLS, server_hostname: Optional[str],
                 connect_timeout: float, retry_initial: float, retry_max: float):
        if retry_initial <= 0 or retry_max < retry_initial:
            raise ValueError("retry delays must be positive, and retry_max at least retry_initial")
        self.addresses = addresses
        self._hosts = {core.display_name(address): core.host_port(address) for address in addresses}
        self.names = list(self._hosts)
        if ssl is True:
            ssl = _ssl.create_default_context()
        elif ssl is False:
            ssl = None
        self._ssl: Optional[_ssl.SSLContext] = ssl
        self._server_hostname = server_hostname
        self.connect_timeout = connect_timeout
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._tasks: Dict[Any, asyncio.Task] = {}
        self._connections: Dict[Any, _Connection] = {}
        self._firsts: List[asyncio.Future] = []
        self._closing = False

    async def _open(self, name: str, received: Callable[[dict], None]) -> _Connection:
        """Connect to daemon ``name``; the seam tests replace."""
        host, port = self._hosts[name]
        loop = asyncio.get_running_loop()
        connection = _Connection(name, received)
        options: Dict[str, Any] = {}
        if self._ssl is not None:
            options = {"ssl": self._ssl, "server_hostname": self._server_hostname or host}
        await asyncio.wait_for(loop.create_connection(lambda: connection, host, port, **options),
                               self.connect_timeout)
        return connection

    def _delay(self, delay: float) -> float:
        """``delay`` with jitter, so that many clients do not retry in step."""
        return min(delay, self.retry_max) * random.uniform(0.5, 1.0)

    async def _start(self, keys: Iterable[Tuple[Any, str]]) -> None:
        """Start a `_keep` task for each (key, daemon name), and wait until
        each has made its first attempt (at most ``connect_timeout``)."""
        if self._loop is not None:
            raise RuntimeError("already started")
        self._launch(keys)
        await self._tried()

    def _launch(self, keys: Iterable[Tuple[Any, str]]) -> None:
        """Start a `_keep` task for each (key, daemon name), in the running
        loop."""
        self._loop = asyncio.get_running_loop()
        for key, name in keys:
            first = self._loop.create_future()
            self._firsts.append(first)
            self._tasks[key] = self._loop.create_task(self._keep(key, name, first))

    async def _tried(self) -> None:
        """Wait until each connection has made its first attempt (at most
        ``connect_timeout``)."""
        if self._firsts:
            await asyncio.wait(self._firsts, timeout=self.connect_timeout)

    async def _keep(self, key: Any, name: str, first: asyncio.Future) -> None:
        """Keep connection ``key`` to daemon ``name`` up until closing:
        connect, serve, and after each failure or loss try again, waiting
        twice as long each time (``retry_initial`` to ``retry_max``).

        The wait counts the attempts that failed since the last connection
        was made, and the connections closed before they proved themselves
        (the daemon sent no frame, and they were up less than
        `PROVEN_AFTER` seconds) since the last one that did: so a port
        that closes every new connection at once (a TLS port reached
        without ``ssl=``) is retried ever more slowly, while a daemon that
        comes back after a long outage is retried from ``retry_initial``."""
        failures = 0  # attempts refused in a row since a connection was made
        waits = 0  # waits since a connection was made: those failures, and the loss before them
        unproven = 0
        try:
            while not self._closing:
                try:
                    connection = await self._open(name, self._receiver(key))
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    failures += 1
                    why, permanent = _connect_failure(e, name, self.connect_timeout)
                    self._attempt_failed(key, failures, why, permanent)
                    if not first.done():
                        first.set_result(None)
                    waits += 1
                    await asyncio.sleep(self._delay(self._wait_for(waits + max(0, unproven - 1))))
                    continue
                if self._closing:
                    connection.close()
                    break
                failures = waits = 0
                self._connections[key] = connection
                connected_at = self._loop.time()  # type: ignore[union-attr]
                self._up(key, connection)
                if not first.done():
                    first.set_result(None)
                error = await connection.closed
                del self._connections[key]
                proven = connection.heard or self._loop.time() - connected_at >= PROVEN_AFTER  # type: ignore[union-attr]
                unproven = 0 if proven else unproven + 1
                why, permanent = _loss(error, name, connection.why, silent=self._ssl is None and not proven)
                if self._closing:
                    why, permanent = f"the connection to {name} was closed by this client", False
                self._down(key, why, permanent)
                if not self._closing:
                    waits = 1
                    await asyncio.sleep(self._delay(self._wait_for(waits + max(0, unproven - 1))))
        finally:
            if not first.done():
                first.set_result(None)

    def _wait_for(self, attempt: int) -> float:
        """The wait before retry number ``attempt`` (1 for the first):
        ``retry_initial``, twice as long each time, at most ``retry_max``."""
        return min(self.retry_initial * 2 ** min(attempt - 1, 32), self.retry_max)

    async def _close_connections(self) -> None:
        """Stop reconnecting; close each connection once what was written
        to it is sent, and wait for every connection task to end."""
        self._closing = True
        connected = dict(self._connections)
        for key, task in self._tasks.items():
            if key not in connected:
                task.cancel()
        for connection in connected.values():
            connection.close()
        closing = [connection.closed for connection in connected.values()]
        if closing:
            await asyncio.wait(closing, timeout=self.connect_timeout)
        for connection in connected.values():
            if not connection.closed.done() and connection.transport is not None:
                connection.transport.abort()
        tasks = list(self._tasks.values())
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # --- what the subclasses do with their connections ---------------------------------------

    def _receiver(self, key: Any) -> Callable[[dict], None]:
        """The function that takes each frame connection ``key`` receives."""
        raise NotImplementedError

    def _attempt_failed(self, key: Any, failures: int, why: str, permanent: bool) -> None:
        """Connecting failed (``failures`` times in a row)."""
        raise NotImplementedError

    def _up(self, key: Any, connection: _Connection) -> None:
        """Connection ``key`` is up."""
        raise NotImplementedError

    def _down(self, key: Any, why: str, permanent: bool) -> None:
        """Connection ``key`` is gone (``why``, for people)."""
        raise NotImplementedError


# --- masters ---------------------------------------------------------------------------------


class Master(_Shell):
    """Submits jobs to one or more daemons and awaits their answers.

    Each daemon gets one connection, kept up in a task of its own; jobs
    are spread over the daemons up by `gloom.core.MasterCore`.  While no
    daemon is up, requests wait for one.  Use ``async with Master() as
    master:``, or ``await start()`` and ``await close()`` (or ``stop()``,
    the same, as the Twisted client names it).  A request made before
    `start` starts the master in the running loop, and waits for a daemon
    as the Twisted client's do.

    :param masters: the daemons' master addresses: ``host:port`` strings,
        a list or one comma-separated string; None for ``GLOOM_MASTERS``,
        then ``GLOOM_MASTER``, else ``127.0.0.1:9998``.
    :param ssl: None for plain TCP, an ``ssl.SSLContext`` for TLS, or True
        for TLS checked against the system's certificate authorities.
    :param server_hostname: the name the daemons' certificates must carry;
        by default the host of each address.
    :param connect_timeout: the seconds a connection attempt may take.
    :param fail_after: once every daemon has refused this many attempts in
        a row, requests waiting for a connection fail with
        `gloom.core.TransportError` (and so do new ones, until a daemon is
        up); None to wait for ever.  A TLS failure counts as all of them:
        retrying does not fix a certificate.
    :param resubmit: when a daemon's connection drops, send its unanswered
        jobs to the others instead of failing them.
    :param retry_initial: the seconds before the first retry; each failed
        attempt doubles it, up to ``retry_max`` (both with jitter).
    :param retry_max: the longest wait between attempts.
    """

    def __init__(self, masters: Addresses = None, *, ssl: TLS = None, server_hostname: Optional[str] = None,
                 connect_timeout: float = 10.0, fail_after: Optional[int] = None, resubmit: bool = False,
                 retry_initial: float = 0.5, retry_max: float = 30.0):
        super().__init__(core.addresses(masters, core.MASTERS_ENV, core.DEFAULT_MASTER), ssl, server_hostname,
                         connect_timeout, retry_initial, retry_max)
        if fail_after is not None and fail_after < 1:
            raise ValueError("fail_after must be at least 1")
        self.fail_after = fail_after
        self._core = core.MasterCore(self.names, self._send, self._ended, resubmit=resubmit,
                                     progressed=self._progressed)
        self._watchers: Dict[core.Request, ProgressCallback] = {}
        """The ``on_progress`` of each submit in flight that has one."""
        self._failures: Dict[str, float] = {}
        self._why: Dict[str, str] = {}
        self._unreachable: Optional[str] = None
        self._closed = False
        self._auto_started = False
        """Whether a request started the master (`start` then only waits)."""

    # --- life ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start connecting to every daemon, and return once each has been
        tried once (connected or not).  If a request started the master
        already, only wait for those first attempts."""
        if self._loop is None:
            self._begin()
        elif not self._auto_started:
            raise RuntimeError("already started")
        self._auto_started = False
        await self._tried()

    async def close(self) -> None:
        """Stop: close every connection once what was written is sent.
        Requests not yet answered fail with `gloom.core.TransportError`
        (the daemons drop the jobs of a master that leaves)."""
        if self._closed:
            return
        self._closed = True
        await self._close_connections()
        self._core.unreachable("the master was closed")

    async def stop(self) -> None:
        """`close`, by the name the Twisted client's ``stop`` has."""
        await self.close()

    async def __aenter__(self) -> "Master":
        if self._loop is None or self._auto_started:
            await self.start()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        """Whether any daemon is connected."""
        return bool(self._core.up())

    @property
    def up(self) -> List[str]:
        """The names of the daemons connected now."""
        return self._core.up()

    @property
    def in_flight(self) -> int:
        """How many submitted jobs have not ended."""
        return self._core.in_flight

    def daemon_of(self, job_id: str) -> Optional[str]:
        """The daemon an unfinished job of this master was sent to (its
        name, as messages give it), or None: not sent yet, or not in
        flight."""
        return self._core.daemon_of(job_id)

    @property
    def daemons(self) -> List[str]:
        """The names of all the daemons, as messages and errors give them."""
        return list(self.names)

    @property
    def unreachable(self) -> Dict[str, str]:
        """The daemons not connected now whose last connection attempt
        failed, each with why (one line)."""
        up = set(self._core.up())
        return {name: self._why[name] for name in self.names
                if name not in up and self._failures.get(name, 0) and name in self._why}

    # --- requests --------------------------------------------------------------------------

    async def submit(self, type: str, body: Any = None, priority: Optional[int] = 0, id: Optional[str] = None,
                     timeout: Optional[float] = None, *, detach: bool = False, delay: Any = None,
                     at: Any = None, retries: Optional[int] = None, backoff: bool = False,
                     unique: Optional[str] = None, on_progress: Optional[ProgressCallback] = None) -> Any:
        """Submit a job and return its answer body (a detached job's id,
        once the daemon acked it).  Cancelling the task that awaits it
        cancels the job.

        :param type: the job's type.
        :param body: any JSON value.
        :param priority: larger runs first.
        :param id: the job's id; by default a fresh uuid4 hex.
        :param timeout: the job's time limit on a slave, in seconds.
        :param detach: hand the job to the daemon: it outlives this
            master's connection and gets no answer here (`status` says how
            it went).
        :param delay: seconds to wait before the job is queued (a number or
            a ``timedelta``, up to 365 days).
        :param at: when to queue it: seconds since the epoch or a
            ``datetime``; a past time means now.  Not with ``delay``.
        :param retries: how many times a lost attempt is queued again (0 to
            1000); by default, the daemon's ``--retries``.
        :param backoff: retry lost attempts after a growing delay instead
            of at once (detached jobs always do).
        :param unique: a key (a non-empty string, at most 1024 bytes of
            UTF-8): while a job of this type with this key is queued,
            delayed or running on the daemon, this submit joins it instead
            of queueing another, and gets its progress and answer (the
            first submit's priority, timeout, delay and retries hold).
            Cancelling detaches only this submit.  Not with ``detach``.
        :param on_progress: a plain function, called in the event loop
            with each progress of the job (a dict of ``done``, ``total``
            and ``data``, those the worker sent), in order, before the
            answer is returned; not once the awaiting task is cancelled.
            An exception it raises is logged.
        :raises gloom.core.ServerError: the job failed, or the daemon
            refused it (``id_exists``, ``journal_error``...), or cleared
            it (``cleared``).
        :raises gloom.core.TransportError: its daemon's connection was
            lost (a detached job may then have been taken or not: ask
            `status`), or no daemon could be reached (see ``fail_after``).
        :raises gloom.core.EncodeError: the body is not JSON (at once).
        :raises ValueError: an option is out of range, both ``delay``
            and ``at``, or ``unique`` with ``detach`` (at once).
        :raises TypeError: ``on_progress`` is not callable (at once).
        """
        if on_progress is not None and not callable(on_progress):
            raise TypeError(f"on_progress must be callable, not {on_progress!r}")
        request = self._submit(type, body, priority, id, timeout, detach=detach, delay=delay, at=at,
                               retries=retries, backoff=backoff, unique=unique)
        if on_progress is not None and not request.done:
            self._watchers[request] = on_progress
        try:
            return await self._result(request)
        finally:
            self._watchers.pop(request, None)

    async def run(self, type: str, body: Any = None, priority: Optional[int] = 0, id: Optional[str] = None,
                  timeout: Optional[float] = None, *, detach: bool = False, delay: Any = None,
                  at: Any = None, retries: Optional[int] = None, backoff: bool = False,
                  unique: Optional[str] = None, on_progress: Optional[ProgressCallback] = None) -> Any:
        """`submit`, for a job whose answer is wanted: the same, except
        that ``detach`` is refused.

        :raises ValueError: with ``detach``: a detached job gets no answer
            (use ``submit(..., detach=True)``).
        """
        if detach:
            raise ValueError("run waits for the answer, and a detached job gets none: use submit(detach=True)")
        return await self.submit(type, body, priority, id, timeout, delay=delay, at=at, retries=retries,
                                 backoff=backoff, unique=unique, on_progress=on_progress)

    def map(self, type: str, bodies: Union[Iterable[Any], AsyncIterable[Any]], window: int = 64,
            priority: Optional[int] = 0, timeout: Optional[float] = None) -> "Answers":
        """Run a job for each body, at most ``window`` at once, and return
        an async iterator of their answers in the order of the bodies.

        A failed job raises its error when its turn comes.  Leaving the
        iteration early (``break``, an error, or ``aclose()``) cancels the
        jobs still in flight: ``async with master.map(...) as answers:``
        makes that happen at once, whatever the interpreter's garbage
        collection.

        :param bodies: an iterable or an async iterable of JSON values.
        """
        return Answers(self, type, bodies, window, priority, timeout)

    async def cancel(self, job_id: str) -> None:
        """Withdraw one of this master's unfinished jobs, or a detached job
        (anyone may; it ends ``failed``).  With several daemons, an id that
        is not this master's is asked of the daemons in its rendezvous
        order until one has it.

        :raises gloom.core.ServerError: ``unknown_job``, if no daemon has
            such an unfinished job of this master, nor a detached one.
        """
        self._check_open()
        await self._result(self._core.cancel(job_id))

    async def status(self, job_id: str) -> dict:
        """Where a job is: the daemon's reply as a dict, with ``id``,
        ``state`` (``queued``, ``delayed``, ``running``, ``completed``,
        ``failed``, ``dead`` or ``unknown``) and, where they apply,
        ``detached``, ``type``, ``priority``, ``attempts``, ``run_at``,
        ``result``, ``reason`` and ``ended_at``.  A daemon knows this
        master's own unfinished jobs and every detached job.  With several
        daemons, those up are asked in the id's rendezvous order until one
        knows the job, which the dict names as ``daemon``.

        :raises ValueError: if the id is not a non-empty string.
        """
        self._check_open()
        return await self._result(self._asked(self._core.status(job_id)))

    async def dead_list(self, offset: int = 0, limit: int = 100) -> core.DeadList:
        """A page of the dead list (detached jobs whose retries ran out),
        oldest first: a `gloom.core.DeadList` of dicts with ``id``,
        ``type``, ``priority``, ``attempts``, ``reason`` and ``ended_at``,
        whose ``total`` is the whole list's length.  With several daemons,
        the page is of the lists of those up merged oldest first, each
        entry naming its ``daemon`` (see `gloom.core.MasterCore.dead_list`).

        :param offset: how many of the oldest to skip.
        :param limit: the most entries (1 to 1000).
        :raises ValueError: if either is out of range.
        """
        self._check_open()
        return await self._result(self._asked(self._core.dead_list(offset, limit)))

    async def dead_retry(self, job_id: str) -> None:
        """Queue a dead job again, with fresh retries.

        :raises gloom.core.ServerError: ``unknown_job``, if no daemon up
            has a dead job by that id.
        """
        self._check_open()
        await self._result(self._asked(self._core.dead_retry(job_id)))

    async def dead_discard(self, job_id: str) -> None:
        """Forget a dead job.

        :raises gloom.core.ServerError: ``unknown_job``, if no daemon up
            has a dead job by that id.
        """
        self._check_open()
        await self._result(self._asked(self._core.dead_discard(job_id)))

    async def stats(self, daemon: Optional[str] = None) -> dict:
        """The daemons' figures: one daemon's (``daemon``, or the only one),
        or the sum of those up (`gloom.core.sum_stats`, each one's own under
        ``daemons``).

        :param daemon: the name or address of the one daemon to ask.
        :raises ValueError: if ``daemon`` is not one of this master's.
        """
        if daemon is not None:
            daemon = self._name_of(daemon)
        self._check_open()
        if daemon is not None or len(self.names) == 1:
            return await self._result(self._core.stats(daemon))
        await self._tried()
        up = self._core.up()
        if not up:
            request = self._core.stats()  # waits for the first daemon up
            value = await self._result(request)
            return core.sum_stats({request.daemon: value})
        outcomes = await asyncio.gather(*(self._result(self._core.stats(name)) for name in up),
                                        return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return core.sum_stats(dict(zip(up, outcomes)))

    # --- admin ------------------------------------------------------------------------------

    async def pause(self, type: str) -> None:
        """Have every daemon hand out no job of ``type`` until `resume`
        (submits are still taken, and queue).  The daemons must run with
        ``--admin``.

        :param type: the job type.
        :raises gloom.core.ServerError: ``forbidden``, if a daemon runs
            without ``--admin``.
        :raises gloom.core.TransportError: naming the daemons that are not
            connected (the others were asked).
        :raises ValueError: if the type is not a non-empty string.
        """
        await self._admin("pause", type)

    async def resume(self, type: str) -> None:
        """Have every daemon hand out jobs of ``type`` again (see `pause`).

        :param type: the job type.
        """
        await self._admin("resume", type)

    async def clear(self, type: str) -> int:
        """End every queued and delayed job of ``type`` on every daemon:
        each master waiting for one gets ``ServerError`` ``cleared``, and
        a detached one goes to the dead list.  Running jobs go on.  Raises
        as `pause` does.

        :param type: the job type.
        :returns: how many jobs were cleared, over every daemon.
        """
        replies = await self._admin("clear", type)
        return sum(reply.get("cleared", 0) for reply in replies.values())

    async def drain(self) -> None:
        """Have every daemon refuse new submits (``shutdown``), finish its
        queued and running jobs, then exit.  Raises as `pause` does."""
        await self._admin("drain")

    async def _admin(self, action: str, type: Optional[str] = None) -> Dict[str, dict]:
        """Ask every daemon connected; each one's reply, by name."""
        core.admin_message(action, type)  # a ValueError before anything is sent
        self._check_open()
        await self._tried()
        up = self._core.up()
        outcomes = await asyncio.gather(*(self._result(self._core.admin(action, type, name)) for name in up),
                                        return_exceptions=True)
        return core.admin_outcome(action, self.names, dict(zip(up, outcomes)))

    # --- inside ------------------------------------------------------------------------------

    def _check_open(self) -> None:
        """Refuse a request once closed; start the master if not yet."""
        if self._closed:
            raise TransportError("the master is closed")
        if self._loop is None:
            asyncio.get_running_loop()  # a RuntimeError out of a loop, before anything starts
            self._auto_started = True
            self._begin()

    def _begin(self) -> None:
        """Start a connection task for each daemon in the running loop."""
        self._launch((name, name) for name in self.names)

    def _name_of(self, daemon: str) -> str:
        """The name of one of this master's daemons, given its name or address."""
        if daemon in self._hosts:
            return daemon
        for address, name in zip(self.addresses, self.names):
            if daemon == address:
                return name
        if core.display_name(daemon) in self._hosts:
            return core.display_name(daemon)
        raise ValueError(f"{daemon!r} is not one of this client's daemons")

    def _submit(self, type: str, body: Any, priority: Optional[int], id: Optional[str],
                timeout: Optional[float], **options: Any) -> core.Request:
        self._check_open()
        return self._asked(self._core.submit(type, body, priority, id, timeout, **options))

    def _asked(self, request: core.Request) -> core.Request:
        """A new request: failed at once if no daemon can be reached."""
        if self._unreachable is not None and not request.sent:
            self._core.unreachable(self._unreachable)
        return request

    async def _result(self, request: core.Request) -> Any:
        """Wait for a request to end; return or raise its outcome."""
        if not request.done:
            future = asyncio.get_running_loop().create_future()
            request.waiter = future
            try:
                await future
            except asyncio.CancelledError:
                if request.kind == "submit" and not request.done and not self._closed:
                    self._core.cancel(request.id)
                raise
        return request.result()

    def _progressed(self, request: core.Request, progress: dict) -> None:
        """A progress of a submit in flight: call its ``on_progress``."""
        watcher = self._watchers.get(request)
        if watcher is not None:
            try:
                watcher(progress)
            except Exception:
                _log.exception("on_progress of job %r raised an exception", request.id)

    def _ended(self, request: core.Request) -> None:
        if self._watchers:
            self._watchers.pop(request, None)
        waiter = request.waiter
        if waiter is None:
            return
        if isinstance(waiter, asyncio.Future):
            if not waiter.done():
                waiter.set_result(None)
        else:
            waiter(request)

    def _send(self, daemon: str, data: bytes) -> None:
        connection = self._connections.get(daemon)
        if connection is not None:
            connection.write(data)

    def _receiver(self, key: Any) -> Callable[[dict], None]:
        def received(message: dict) -> None:
            try:
                self._core.received(key, message)
            except ProtocolError as e:
                self._connections[key].abort(str(e))
        return received

    def _up(self, key: Any, connection: _Connection) -> None:
        self._failures[key] = 0
        self._unreachable = None
        self._core.connected(key)

    def _down(self, key: Any, why: str, permanent: bool) -> None:
        self._core.lost(key, why)
        if permanent:
            self._attempt_failed(key, 1, why, True)

    def _attempt_failed(self, key: Any, failures: int, why: str, permanent: bool) -> None:
        self._failures[key] = float("inf") if permanent else failures
        self._why[key] = why
        self._core.attempt_failed(key)
        if self._core.up():
            return
        limit = float("inf") if self.fail_after is None else self.fail_after
        if all(self._failures.get(name, 0) >= limit for name in self.names):
            if len(self.names) == 1:
                line = why
            else:
                line = "no daemon can be reached: " + "; ".join(self._why[name] for name in self.names)
            self._unreachable = line
            self._core.unreachable(line)


class Answers:
    """The answers of `Master.map`, in the order of the bodies: an async
    iterator, and an async context manager that cancels the jobs still in
    flight on leaving."""

    def __init__(self, master: Master, type: str, bodies: Union[Iterable[Any], AsyncIterable[Any]],
                 window: int, priority: Optional[int], timeout: Optional[float]):
        self._master = master
        self._order = core.InOrder(window)
        self._submit = lambda body: master._submit(type, body, priority, None, timeout)
        self._flying: Set[core.Request] = set()
        self._wake: Optional[asyncio.Future] = None
        self._reading: Optional[asyncio.Future] = None
        self._closed = False
        self._exhausted = False
        if hasattr(bodies, "__aiter__"):
            self._sync: Optional[Iterator[Any]] = None
            self._async: Optional[AsyncIterator[Any]] = bodies.__aiter__()  # type: ignore[union-attr]
        else:
            self._sync = iter(bodies)  # type: ignore[arg-type]
            self._async = None
        # The requests' waiter must not keep this iterator alive: dropping
        # it is how a plain "break" cancels the jobs in flight.
        this = weakref.ref(self)

        def ended(request: core.Request) -> None:
            answers = this()
            if answers is not None:
                answers._ended(request)

        self._waiter = ended

    def __aiter__(self) -> "Answers":
        return self

    async def __aenter__(self) -> "Answers":
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()

    async def __anext__(self) -> Any:
        if self._closed:
            raise StopAsyncIteration
        try:
            while True:
                if self._sync is not None:
                    self._fill()
                else:
                    self._fill_async()
                request = next(self._order.ready(), None)
                if request is not None:
                    if request.error is not None:
                        self._finish()
                    return request.result()
                if self._exhausted and not len(self._order):
                    self._finish()
                    raise StopAsyncIteration
                self._wake = asyncio.get_running_loop().create_future()
                waits = [self._wake]
                if self._reading is not None:
                    waits.append(self._reading)
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            self._finish()
            raise

    async def aclose(self) -> None:
        """Stop: cancel the jobs still in flight, and read no more bodies."""
        self._finish()

    def __del__(self) -> None:
        try:
            self._finish()
        except Exception:
            pass

    def _add(self, request: core.Request) -> None:
        if not request.done:
            request.waiter = self._waiter
            self._flying.add(request)
        self._order.add(request)

    def _submit_body(self, body: Any) -> None:
        try:
            request = self._submit(body)
        except (EncodeError, ValueError, TransportError) as e:
            self._add(_failed(e))  # it fails in its turn; no more bodies are read
            self._exhausted = True
        else:
            self._add(request)

    def _fill(self) -> None:
        while not self._exhausted and self._order.room:
            try:
                body = next(self._sync)  # type: ignore[arg-type]
            except StopIteration:
                self._exhausted = True
                return
            self._submit_body(body)

    def _fill_async(self) -> None:
        """Submit the bodies the async iterable has produced while there is
        room, and ask it for the next one."""
        while not self._exhausted and self._order.room:
            reading = self._reading
            if reading is None:
                self._reading = asyncio.ensure_future(self._async.__anext__())  # type: ignore[union-attr]
                continue
            if not reading.done():
                return
            self._reading = None
            try:
                body = reading.result()
            except StopAsyncIteration:
                self._exhausted = True
            except Exception as e:
                self._add(_failed(e))
                self._exhausted = True
            else:
                self._submit_body(body)

    def _ended(self, request: core.Request) -> None:
        self._flying.discard(request)
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def _finish(self) -> None:
        """Cancel what is in flight; read no more bodies."""
        if self._closed:
            return
        self._closed = True
        self._exhausted = True
        flying, self._flying = self._flying, set()
        if not self._master._closed:
            for request in flying:
                if not request.done:
                    self._master._core.cancel(request.id)
        if self._reading is not None and not self._reading.done():
            self._reading.cancel()


def _failed(error: BaseException) -> core.Request:
    """A request that ended with ``error`` before it was sent."""
    request = core.Request("submit", {})
    request.done, request.error = True, error
    return request


# --- workers ---------------------------------------------------------------------------------


class Worker(_Shell):
    """Answers jobs of one type with ``handler``, holding at most
    ``concurrency`` jobs at once over one or more daemons.

    It keeps ``concurrency`` slave connections to each daemon, reconnecting
    with backoff; `gloom.core.WorkerCore` decides which of them ask for
    work.  Use ``async with Worker(...)``, or ``await start()``, then
    ``await stop()`` or ``await wait()``.

    :param type: the type of jobs to take (also ``.type`` and
        ``.job_type``, as on the Twisted client's worker).
    :param handler: called with each `gloom.core.Job`; returns the answer
        body.  A plain function runs in a thread of the worker's own pool
        of ``concurrency`` threads (made by `start`, shut down by `stop`
        once the jobs in hand are done), so that every job the worker
        holds runs at once, whatever the size of the loop's default
        executor; a coroutine function is awaited in the loop, and so is
        what a plain function returns if it is awaitable.  An exception
        fails the job with its text.  While it runs, ``job.progress(done,
        total, data=None)`` tells the masters how far it got and
        ``job.touch()`` restarts its timeout; both may be called from the
        loop or from the handler's thread (they are handed to the loop),
        and return whether they were sent (False once the job is answered
        or its connection lost).
        ``job.cancelled`` becomes True once the daemon answers either with
        ``cancelled``: every master that submitted the job withdrew it, and
        the work may stop (the job must still be answered or failed; the
        daemon drops that answer).  ``job.timed_out`` becomes True once it
        answers ``timed_out`` (the attempt was given up), and
        ``job.on_dropped(f)`` has ``f(code)`` called in the loop at the
        first of the two.
    :param concurrency: the most jobs run at once.
    :param slaves: the daemons' slave addresses, as for `Master`; None for
        ``GLOOM_SLAVES``, then ``GLOOM_SLAVE``, else ``127.0.0.1:9999``.
    :param ssl: as for `Master`; an ``ssl.SSLContext`` carrying this
        worker's certificate where the daemon asks for one.
    :param server_hostname: as for `Master`.
    :param connect_timeout: the seconds a connection attempt may take.
    :param retry_initial: the seconds before the first retry; doubled
        after each failed attempt, up to ``retry_max``.
    :param retry_max: the longest wait between attempts.
    :param report: called with each line of news for people (a connection
        lost or refused, a fatal error); by default a warning on the
        ``gloom.aio`` logger.
    :param on_job: called as ``on_job(job, seconds, error)`` after each job,
        ``error`` being the exception it raised or None.
    """

    def __init__(self, type: str, handler: Callable[[Job], Any], concurrency: int = 1,
                 slaves: Addresses = None, *, ssl: TLS = None, server_hostname: Optional[str] = None,
                 connect_timeout: float = 10.0, retry_initial: float = 0.5, retry_max: float = 30.0,
                 report: Optional[Callable[[str], None]] = None,
                 on_job: Optional[Callable[[Job, float, Optional[BaseException]], None]] = None):
        super().__init__(core.addresses(slaves, core.SLAVES_ENV, core.DEFAULT_SLAVE), ssl, server_hostname,
                         connect_timeout, retry_initial, retry_max)
        if not callable(handler):
            raise TypeError("the handler must be callable")
        self.handler = handler
        self._async = inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
            getattr(handler, "__call__", None))
        self._report = report if report is not None else _log.warning
        self._on_job = on_job
        self._core = core.WorkerCore(type, concurrency, self.names, self._send, self._run, self._reported)
        self._jobs: Set[asyncio.Task] = set()
        self._trouble: Dict[str, str] = {}
        """The last line reported of each daemon that has connection trouble."""
        self._fatal: Optional[str] = None
        self._stopping: Optional[asyncio.Task] = None
        self._done: Optional[asyncio.Future] = None
        self._changed: Optional[asyncio.Future] = None
        self._rotation: Optional[asyncio.TimerHandle] = None
        self._executor: Optional[concurrent.futures.ThreadPoolExecutor] = None
        """The threads a plain handler runs in, one per job the worker may hold."""

    @property
    def type(self) -> Optional[str]:
        """The type of jobs taken."""
        return self._core.job_type

    @property
    def job_type(self) -> Optional[str]:
        """The type of jobs taken (`type`, by the Twisted worker's name)."""
        return self._core.job_type

    @property
    def concurrency(self) -> int:
        """The most jobs held at once."""
        return self._core.concurrency

    @property
    def busy(self) -> int:
        """How many jobs are in hand now."""
        return self._core.in_hand

    @property
    def released(self) -> int:
        """How many jobs were handed back unrun, having come when the
        worker was full or stopping."""
        return self._core.released

    # --- life ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the connections, and return once each has been tried once.
        With several daemons, the core's ``rotate`` then runs every
        `gloom.core.WorkerCore.ROTATE_INTERVAL` seconds until the worker stops."""
        if self._loop is not None:
            raise RuntimeError("already started")
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        if not self._async:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                self._core.concurrency, thread_name_prefix=f"gloom-{self._core.job_type}")
        if len(self._core.daemons) > 1:
            self._rotation = loop.call_later(self._core.ROTATE_INTERVAL, self._rotate)
        await self._start((link, link.daemon) for link in self._core.links)

    async def stop(self) -> None:
        """Take no new job at once, let the jobs in hand finish and be
        answered, then shut the handler threads down and disconnect."""
        if self._loop is None:
            raise RuntimeError("the worker is not started")
        if self._stopping is None:
            self._stopping = self._loop.create_task(self._shutdown())
        await asyncio.shield(self._stopping)

    async def wait(self) -> None:
        """Wait until the worker has stopped.

        :raises gloom.core.WorkerError: if it stopped on an error that
            retrying cannot fix (the daemon refused the join, or TLS
            failed for good).
        """
        if self._done is None:
            raise RuntimeError("the worker is not started")
        await asyncio.shield(self._done)
        if self._fatal is not None:
            raise WorkerError(self._fatal)

    async def __aenter__(self) -> "Worker":
        if self._loop is None:
            await self.start()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.stop()

    # --- inside ----------------------------------------------------------------------------

    def _rotate(self) -> None:
        """Move the asks that brought nothing, and come again in an interval."""
        self._rotation = None
        if self._stopping is not None or self._closing:
            return
        self._rotation = self._loop.call_later(self._core.ROTATE_INTERVAL,  # type: ignore[union-attr]
                                               self._rotate)
        self._core.rotate()

    def _stop_rotation(self) -> None:
        if self._rotation is not None:
            self._rotation.cancel()
            self._rotation = None

    async def _shutdown(self) -> None:
        self._stop_rotation()
        self._core.stop()
        while self._jobs:
            await asyncio.gather(*self._jobs, return_exceptions=True)
        if self._executor is not None:
            # Every job is answered, so no thread runs a handler: this
            # only lets the idle threads end.
            self._executor.shutdown(wait=True)
        # Wait (a little) for the daemons' replies to what was sent, such as
        # the last answers, so that nothing is cut off.
        deadline = self._loop.time() + self.connect_timeout  # type: ignore[union-attr]
        while any(link.up and link.replies for link in self._core.links):
            remaining = deadline - self._loop.time()  # type: ignore[union-attr]
            if remaining <= 0:
                break
            self._changed = self._loop.create_future()  # type: ignore[union-attr]
            await asyncio.wait([self._changed], timeout=remaining)
        await self._close_connections()
        if not self._done.done():  # type: ignore[union-attr]
            self._done.set_result(None)  # type: ignore[union-attr]

    def _fail(self, text: str) -> None:
        """Stop on an error retrying cannot fix."""
        if self._fatal is None:
            self._fatal = text
        self._stop_rotation()
        self._core.stop()
        if self._stopping is None and self._loop is not None:
            self._stopping = self._loop.create_task(self._shutdown())

    def _trouble_with(self, daemon: str, text: str) -> None:
        """Report a daemon's connection trouble once, not once per
        connection or attempt."""
        if self._trouble.get(daemon) != text:
            self._trouble[daemon] = text
            self._report(text)

    def _reported(self, text: str, fatal: bool) -> None:
        if fatal:
            if self._fatal is None:
                self._report(text)
            self._fail(text)
        else:
            self._report(text)

    def _send(self, link: core.Link, data: bytes) -> None:
        connection = self._connections.get(link)
        if connection is not None:
            connection.write(data)

    def _receiver(self, key: Any) -> Callable[[dict], None]:
        def received(message: dict) -> None:
            self._core.received(key, message)
            self._poke()
        return received

    def _poke(self) -> None:
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)

    def _up(self, key: Any, connection: _Connection) -> None:
        if self._trouble.pop(key.daemon, None) is not None:
            self._report(f"connected to {key.daemon}")
        self._core.link_up(key)

    def _down(self, key: Any, why: str, permanent: bool) -> None:
        job = self._core.link_down(key)
        self._poke()
        if self._closing:
            return
        if permanent:
            self._reported(why, True)
        elif job is not None:
            self._trouble[key.daemon] = text = (f"{why}; job {job.id!r} cannot be answered (a daemon still "
                                                   "running queues it again)")
            self._report(text)
        else:
            self._trouble_with(key.daemon, f"{why} (reconnecting)")

    def _attempt_failed(self, key: Any, failures: int, why: str, permanent: bool) -> None:
        if permanent:
            self._reported(why, True)
        else:
            self._trouble_with(key.daemon, f"{why} (retrying)")

    def _run(self, link: core.Link, job: Job) -> None:
        job.bind(lambda done=None, total=None, data=None: self._report_progress(link, job, (done, total, data)),
                 lambda: self._report_progress(link, job, None))
        task = self._loop.create_task(self._work(link, job))  # type: ignore[union-attr]
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)

    def _report_progress(self, link: core.Link, job: Job, fields: Optional[Tuple[Any, Any, Any]]) -> bool:
        """Send a job's progress (``fields``: done, total, data) or touch
        (None).  In the event loop, at once; from another thread (a plain
        handler's), checked there, then handed to the loop
        (``call_soon_threadsafe``), with ``data`` copied as it is now.

        :returns: whether it was sent (from another thread: whether the
            job was still held when it was handed over).
        """
        try:
            here = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            here = False
        if here:
            return self._core.progress_or_touch(link, job, fields)
        if fields is not None:
            fields = core.progress_from_another_thread(*fields)
        held = link.up and link.job is job
        if held:
            try:
                self._loop.call_soon_threadsafe(self._core.progress_or_touch, link, job, fields)  # type: ignore[union-attr]
            except RuntimeError:  # the loop is closed
                return False
        return held

    async def _work(self, link: core.Link, job: Job) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        error: Optional[BaseException] = None
        outcome: Any = None
        # The handler runs in a task of its own, awaited through
        # asyncio.wait, which does not pass a cancel on: so a cancel of
        # this task (the loop shutting down) is told from a handler that
        # ended cancelled (it awaited something another task cancelled).
        running = loop.create_task(self._call(job))
        try:
            await asyncio.wait({running})
        except asyncio.CancelledError:
            running.cancel()
            raise  # the job is left to the daemon, as when the connection drops
        try:
            outcome = running.result()
        except Exception as e:
            error = e
        except asyncio.CancelledError:
            error = asyncio.CancelledError("the handler was cancelled")
        if error is None:
            self._core.finished(link, job, outcome)
        else:
            self._core.finished(link, job, failure=str(error) or error.__class__.__name__)
        if self._on_job is not None:
            try:
                self._on_job(job, loop.time() - started, error)
            except Exception:
                _log.exception("on_job raised an exception")

    async def _call(self, job: Job) -> Any:
        """The handler's answer to ``job``: awaited if it is a coroutine
        function, else run in the worker's threads (and awaited if it
        returns an awaitable)."""
        if self._async:
            return await self.handler(job)
        outcome = await asyncio.get_running_loop().run_in_executor(self._executor, self.handler, job)
        if inspect.isawaitable(outcome):
            outcome = await outcome
        return outcome


async def work(type: str, handler: Callable[[Job], Any], concurrency: int = 1, slaves: Addresses = None,
               **kw: Any) -> Worker:
    """Start a `Worker` and return it once its connections were tried.

    :param kw: `Worker`'s keyword arguments (``ssl``, ``report``...).
    """
    worker = Worker(type, handler, concurrency, slaves, **kw)
    await worker.start()
    return worker
