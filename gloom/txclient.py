"""Twisted clients for Gloom: a thin shell over `gloom.core`.

`MasterClient` submits jobs to one or more daemons; each submit is a
Deferred for the answer body (for a detached job, its id), and it asks
where jobs are (``status``) and handles the dead list.  A submit may
follow its job's progress (``on_progress``) or join a like job already
there (``unique``), and `MasterClient` also pauses, resumes and clears a
type's queue and drains the daemons.  `Worker` (and `work`) answers jobs
with a handler that may return a value or a Deferred, and may report its
progress (``job.progress``) or ask for more time (``job.touch``), serving
every daemon given while holding no more jobs than its concurrency.  Both are
``MultiService``\\ s of ``ClientService``\\ s, so they reconnect with backoff
when a daemon restarts.  Addresses are ``host:port`` or Twisted client
endpoint strings, such as
``tls:gloom.example.com:9999:trustRoots=ca/:certificate=c.pem:privateKey=k.pem``::

    from gloom.txclient import MasterClient, work

    master = MasterClient("127.0.0.1:9998")
    master.start()
    answer = yield master.submit("upper", "hello")          # "HELLO"

    worker = work("upper", lambda job: job.body.upper(), concurrency=4)

This module only moves bytes and fires Deferreds: matching replies,
routing jobs over daemons, windows and a worker's capacity are
`gloom.core`'s.
"""

from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService
from twisted.internet import endpoints
from twisted.internet.defer import CancelledError, Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHandshakeListener, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from gloom import core
from gloom.core import EncodeError, Job, ProtocolError, Request, ServerError, TransportError, WorkerError

ProgressCallback = Callable[[dict], Any]
"""What ``on_progress`` is: called with each progress dict of a job."""

# Named in the docstrings, and importable from here too.
_DOCUMENTED = (EncodeError, ServerError, TransportError)

try:
    from OpenSSL.SSL import Error as _SSLError
except ImportError:  # pragma: no cover (pyOpenSSL is a dependency)
    _SSLError = ()
try:
    from service_identity import VerificationError as _NameError
    from service_identity.exceptions import CertificateError as _CertificateError
except ImportError:  # pragma: no cover (service_identity is a dependency)
    _NameError = _CertificateError = ()

__all__ = ["MasterClient", "Worker", "work", "client_endpoint", "describe_failure"]

_ENDPOINT_STRING = re.compile(r"^[a-zA-Z0-9]+:.*=|^(tcp|tcp6|tls|ssl|unix):")

# Endpoint-string options that name files, checked to say which one cannot be read.
_FILE_OPTIONS = ("privateKey", "certificate", "certKey", "trustRoots", "caCertsDir", "extraCertChain")

REPLY_WAIT = 5.0
"""How long a stopping `Worker` waits, once its jobs are answered, for the
daemons' replies to its last requests (so that no job crossing its
``leave`` is left unreleased) before it disconnects all the same."""


# --- addresses and failures ----------------------------------------------------------------


def client_endpoint(reactor, address, default_host: str = "127.0.0.1") -> IStreamClientEndpoint:
    """An endpoint from ``host:port``, ``[v6addr]:port``, ``:port``, a client
    endpoint string, or an endpoint itself.

    :param reactor: the reactor the endpoint connects with.
    :param address: the address, as text, or an ``IStreamClientEndpoint``
        (returned as it is).
    :param default_host: the host for ``:port``.
    :raises ValueError: if ``address`` is none of these, or names TLS
        files that cannot be used (the message names the daemon and the
        option, not the file's path).
    """
    if IStreamClientEndpoint.providedBy(address):
        return address
    if not isinstance(address, str):
        raise ValueError(f"{address!r} is neither host:port nor a client endpoint string")
    if _ENDPOINT_STRING.match(address):
        try:
            return endpoints.clientFromString(reactor, address)
        except Exception as e:
            raise ValueError(_unusable(address, e)) from None
    try:
        host, port = core.host_port(address, default_host)
    except ValueError:
        raise ValueError(f"{address!r} is neither host:port nor a client endpoint string") from None
    return endpoints.HostnameEndpoint(reactor, host, port)


def _unusable(address: str, error: Exception) -> str:
    """Why an endpoint string cannot be used, in one line without paths."""
    name = core.display_name(address)
    if isinstance(error, (OSError, IOError)) or type(error).__name__ == "UnlistableError":
        options = dict(part.split("=", 1) for part in address.split(":") if "=" in part)
        unreadable = [option for option in options
                      if option in _FILE_OPTIONS and not os.access(options[option], os.R_OK)]
        which = " and ".join(unreadable) if unreadable else "a file it names"
        return f"the TLS settings for {name} cannot be used: {which} cannot be read"
    if isinstance(error, _SSLError) or type(error).__name__ in ("Error", "VerifyError"):
        reasons = _ssl_reasons(error)
        text = reasons[0] if reasons else (str(error) or type(error).__name__)
        if "do not match" in text or "key values mismatch" in text:
            text = "the private key does not match the certificate"
        elif "no start line" in text or "PEM" in text:
            text = f"a certificate or key is not in PEM form ({text})"
        return f"the TLS settings for {name} cannot be used: {text}"
    text = str(error).strip()
    if not text or "=" in text or "/" in text:  # it might quote a path
        text = type(error).__name__
    return f"{name} is not a usable client endpoint string: {text}"


def _ssl_reasons(error: BaseException) -> List[str]:
    """The reason strings of a pyOpenSSL error (a list of tuples in its args)."""
    args = getattr(error, "args", ())
    if args and isinstance(args[0], list):
        return [str(entry[-1]) for entry in args[0] if isinstance(entry, tuple) and entry]
    return [str(arg) for arg in args if isinstance(arg, str)]


# pyOpenSSL reasons that retrying cannot fix, and how to say them.
_TLS_PERMANENT = (
    ("certificate verify failed", "certificate verify failed"),
    ("alert certificate required", "the daemon requires a client certificate"),
    ("alert handshake failure", "the daemon refused the handshake (does it require a client certificate?)"),
    ("alert unknown ca", "the daemon does not trust this client's certificate (unknown CA)"),
    ("alert bad certificate", "the daemon refused this client's certificate (bad certificate)"),
    ("alert certificate unknown", "the daemon refused this client's certificate (certificate unknown)"),
    ("alert certificate expired", "the daemon refused this client's certificate (it has expired)"),
    ("alert certificate revoked", "the daemon refused this client's certificate (it was revoked)"),
    ("alert unsupported certificate", "the daemon refused this client's certificate (unsupported)"),
    ("alert access denied", "the daemon denied access"),
    ("alert protocol version", "no TLS version in common"),
    ("unsupported protocol", "no TLS version in common"),
    ("wrong version number", "the daemon does not speak TLS there (wrong version number)"),
    ("no shared cipher", "no cipher in common"),
)


def _tls_problem(error: BaseException) -> Optional[Tuple[str, bool]]:
    """``(reason, permanent)`` if ``error`` is a TLS failure, else None."""
    if _NameError and isinstance(error, (_NameError, _CertificateError)):
        host = None
        for mismatch in getattr(error, "errors", ()):
            identity = getattr(mismatch, "mismatched_id", None)
            host = getattr(identity, "hostname", None) or getattr(identity, "ip", None)
            if host is not None:
                break
        if isinstance(host, bytes):
            host = host.decode("ascii", "replace")
        return (f"the server's certificate is not for {host}" if host is not None
                else "the server's certificate is not for this host name"), True
    if _SSLError and isinstance(error, _SSLError):
        reasons = _ssl_reasons(error)
        for reason in reasons:
            for known, text in _TLS_PERMANENT:
                if known in reason:
                    return text, True
        return (reasons[0] if reasons and reasons[0] else "TLS error"), False
    return None


def describe_failure(failure: Failure) -> str:
    """One line for a connection failure, without a traceback (a TLS
    failure says so, and why, in words rather than pyOpenSSL's tuples).

    :param failure: why a connection attempt failed or a connection was
        lost.
    """
    error = failure.value
    tls = _tls_problem(error)
    if tls is not None:
        return f"TLS handshake failed: {tls[0]}"
    os_error = getattr(error, "osError", None)
    if isinstance(os_error, int):
        return os.strerror(os_error)
    if isinstance(os_error, OSError) and os_error.strerror:
        return os_error.strerror
    return str(error).strip().rstrip(".") or error.__class__.__name__


def _problem(name: str, failure: Failure, connection: Optional["_Connection"] = None) -> Tuple[str, bool]:
    """``(line, permanent)`` for a failed attempt (no ``connection``) or
    a lost connection to the daemon called ``name``."""
    tls = _tls_problem(failure.value)
    if tls is not None:
        return f"TLS handshake with {name} failed: {tls[0]}", tls[1]
    if connection is None:
        return f"cannot connect to {name}: {describe_failure(failure)}", False
    if connection.silent and failure.check(ConnectionDone):
        # A TLS port closes a plain connection at its first bytes, silently.
        return (f"the connection to {name} was closed before the daemon said anything (if that port "
                "expects TLS, give a tls: address)"), False
    if failure.check(ConnectionDone):
        return f"the connection to {name} was closed", False
    return f"the connection to {name} was lost ({describe_failure(failure)})", False


def _names(addresses: Sequence[Any]) -> List[str]:
    """Each address's `core.display_name`, made unique."""
    names: List[str] = []
    for address in addresses:
        name = core.display_name(address)
        candidate, number = name, 2
        while candidate in names:
            candidate, number = f"{name} ({number})", number + 1
        names.append(candidate)
    return names


def _addresses(given, env: Sequence[str], default: str) -> list:
    if IStreamClientEndpoint.providedBy(given):
        given = [given]
    return core.addresses(given, env, default)


def _default_policy() -> Callable[[int], float]:
    return backoffPolicy(initialDelay=0.5, maxDelay=30)


PROVEN_AFTER = 5.0
"""The seconds a connection must stay up, if the daemon sends no frame on
it, before it counts as a working one that resets the backoff."""


class _Backoff:
    """The retry policy of one connection's ``ClientService``.

    ``ClientService`` counts failed attempts from 0 again at every
    connection made, so a port that closes each new connection at once (a
    TLS port reached with a plain address) would be retried at the first
    delay for ever.  This also counts the connections closed before they
    proved themselves (`closed`: the daemon sent no frame, and they were
    up less than `PROVEN_AFTER` seconds) since the last one that did, and
    adds them to the attempt: so such a port is retried ever more slowly,
    while a daemon that comes back after a long outage is retried from the
    first delay (its refused attempts count no more once it accepted).

    :param policy: the delay before each attempt, given how many attempts
        in a row failed (1 for the first retry), as ``ClientService``
        takes it.
    """

    def __init__(self, policy: Callable[[int], float]):
        self.policy = policy
        self.unproven = 0

    def __call__(self, attempt: int) -> float:
        return self.policy(attempt + max(0, self.unproven - 1))

    def closed(self, proven: bool) -> None:
        """A connection closed: one that proved itself starts the count again."""
        self.unproven = 0 if proven else self.unproven + 1


# --- connections ------------------------------------------------------------------------------


@implementer(IHandshakeListener)
class _Connection(Int32StringReceiver):
    """A client connection: frames in (split by `core.FrameBuffer`, which
    takes linear time over a large frame where Int32StringReceiver's own
    parser copies the buffer on every read), frames out.  It counts as up
    once connected or, over TLS, once the handshake is done."""

    MAX_LENGTH = core.READ_LIMIT

    def __init__(self, owner, key, backoff: Optional[_Backoff] = None):
        self.owner = owner
        self.key = key
        self.backoff = backoff
        self.up = False
        self.up_at: Optional[float] = None
        self.problem: Optional[str] = None
        self.heard = False
        self.framed = False
        """Whether a whole frame came (bytes alone may be a TLS alert)."""
        self._frames = core.FrameBuffer(self.MAX_LENGTH)

    def connectionMade(self) -> None:
        for setting in ("setTcpNoDelay", "setTcpKeepAlive"):
            setter = getattr(self.transport, setting, None)
            if setter is not None:
                try:
                    setter(True)
                except OSError:
                    break
        if not isinstance(self.transport, TLSMemoryBIOProtocol):
            self._ready()

    def handshakeCompleted(self) -> None:
        if not self.up and self.problem is None:
            self._ready()

    def _ready(self) -> None:
        self.up = True
        self.up_at = self.owner.reactor.seconds()
        self.owner._up(self)

    @property
    def proven(self) -> bool:
        """Whether the connection works (see `_Backoff`): the daemon sent a
        frame on it, or it was up for `PROVEN_AFTER` seconds."""
        return self.framed or (self.up_at is not None
                               and self.owner.reactor.seconds() - self.up_at >= PROVEN_AFTER)

    @property
    def silent(self) -> bool:
        """Whether this plain (not TLS) connection was up and heard
        nothing, for less than `PROVEN_AFTER` seconds (an idle worker
        connection of long standing hears nothing either)."""
        return (self.up and not self.heard and not isinstance(self.transport, TLSMemoryBIOProtocol)
                and self.owner.reactor.seconds() - self.up_at < PROVEN_AFTER)

    def dataReceived(self, data: bytes) -> None:
        self.heard = True
        if self.problem is not None:
            return
        try:
            frames = self._frames.feed(data)
        except ProtocolError as e:
            self.abort(f"{self.owner._name(self.key)}: {e}")
            return
        if frames:
            self.framed = True
        for frame in frames:
            if self.problem is not None:
                return
            self.stringReceived(frame)

    def stringReceived(self, data: bytes) -> None:
        self.owner._received(self, data)

    def abort(self, text: str) -> None:
        """Close the connection at once; ``text`` says why."""
        if self.problem is None:
            self.problem = text
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = None) -> None:
        # Before ClientService asks its retry policy for the next delay.
        if self.backoff is not None:
            self.backoff.closed(self.proven)
        self.owner._lost(self, reason)


class _Factory(Factory):
    noisy = False

    def __init__(self, owner, key, backoff: Optional[_Backoff] = None):
        self.owner = owner
        self.key = key
        self.backoff = backoff

    def buildProtocol(self, addr):
        connection = _Connection(self.owner, self.key, self.backoff)
        connection.factory = self
        return connection


def _service(endpoint, owner, key, policy: Callable[[int], float], clock) -> ClientService:
    """A ``ClientService`` for one connection, backing off by `_Backoff`."""
    backoff = _Backoff(policy)
    return ClientService(endpoint, _Factory(owner, key, backoff), retryPolicy=backoff, clock=clock)


@implementer(IStreamClientEndpoint)
class _ReportingEndpoint:
    """Tells its owner of each failed connection attempt (a cancelled one
    is no failure)."""

    def __init__(self, endpoint, key, failed: Callable[[Any, Failure], None]):
        self.endpoint = endpoint
        self.key = key
        self.failed = failed

    def connect(self, factory):
        def failed(failure):
            if not failure.check(CancelledError):
                self.failed(self.key, failure)
            return failure

        return self.endpoint.connect(factory).addErrback(failed)


# --- masters -----------------------------------------------------------------------------------


class _MasterDaemon:
    """What a `MasterClient` keeps of one daemon: its service, its
    connection while up, and its failed attempts since the last success."""

    def __init__(self, name: str, address):
        self.name = name
        self.address = address
        self.service: Optional[ClientService] = None
        self.connection: Optional[_Connection] = None
        self.failures = 0
        self.problem: Optional[str] = None
        self.dead: Optional[str] = None


class MasterClient(MultiService):
    """Submits jobs over one (re)connecting master connection per daemon;
    `gloom.core.MasterCore` routes each job to a daemon by its id and
    matches the replies.  Nothing connects before `start`.

    A job in flight on a daemon whose connection drops fails with
    `TransportError` naming it (the daemon drops a departed master's jobs),
    or with ``resubmit=True`` is submitted again to another daemon.

    :param masters: the daemons' master ports: ``host:port`` or client
        endpoint strings, a list or one comma-separated string, or an
        endpoint; None for ``GLOOM_MASTERS``, ``GLOOM_MASTER``, else
        127.0.0.1:9998.
    :param reactor: the reactor, which also times the reconnections; by
        default, the global one.
    :param fail_after: once every daemon has failed this many connection
        attempts in a row with none up, the requests waiting for a
        connection fail with `TransportError` (None: they wait for ever).
    :param retry_policy: seconds to wait before each new connection attempt,
        given how many attempts in a row failed, as ``ClientService`` takes
        it; by default, backoff from 0.5 s to 30 s.  A connection that
        closes before the daemon sent a frame, within `PROVEN_AFTER`
        seconds, counts as a failed attempt.
    :param resubmit: submit a dropped daemon's jobs again elsewhere instead
        of failing them.
    :raises ValueError: if an address cannot be used.
    """

    log = Logger()

    def __init__(self, masters=None, reactor=None, fail_after: Optional[int] = None,
                 retry_policy: Optional[Callable[[int], float]] = None, resubmit: bool = False):
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.fail_after = fail_after
        addresses = _addresses(masters, core.MASTERS_ENV, core.DEFAULT_MASTER)
        names = _names(addresses)
        self._core = core.MasterCore(names, self._send, self._ended, resubmit=resubmit,
                                     progressed=self._progressed, acked=self._acked)
        self._resubmit = resubmit
        self._watchers: Dict[Request, ProgressCallback] = {}
        """The ``on_progress`` of each submit in flight that has one."""
        self._ack_watchers: Dict[Request, Callable[[bool], Any]] = {}
        """The ``on_ack`` of each submit in flight that has one."""
        self._daemons: Dict[str, _MasterDaemon] = OrderedDict()
        self._closed = False
        self._tried: set = set()
        self._tried_waiters: List[Deferred] = []
        policy = retry_policy or _default_policy()
        for address, name in zip(addresses, names):
            daemon = _MasterDaemon(name, address)
            endpoint = _ReportingEndpoint(client_endpoint(reactor, address), name, self._attempt_failed)
            daemon.service = _service(endpoint, self, name, policy, reactor)
            daemon.service.setServiceParent(self)
            self._daemons[name] = daemon

    # --- service ----------------------------------------------------------------------------

    def start(self) -> Deferred:
        """Connect to every daemon, and reconnect whenever a connection is lost.

        :returns: a Deferred that fires (with None) once every daemon has
            been tried once: connected, or its first attempt failed.  (A
            request made before that asks only the daemons up when it is
            sent; `status` and the dead-letter requests want them all.  A
            submit with a ``unique`` key waits for it: it goes by its key
            to one of the daemons up, once it is known which are.)
        """
        if not self.running:
            self.startService()
        if self._tried >= set(self._daemons):
            return succeed(None)
        waiter = Deferred()
        self._tried_waiters.append(waiter)
        return waiter

    def startService(self) -> None:
        """Start the connections (`start` does this)."""
        self._closed = False
        self._core.resubmit = self._resubmit
        self._core.restarting()
        self._tried = set()
        for daemon in self._daemons.values():
            daemon.dead, daemon.failures = None, 0
        super().startService()

    def stopService(self) -> Deferred:
        """Disconnect and stop reconnecting; unfinished requests fail with
        `TransportError`."""
        self._closed = True
        self._core.resubmit = False
        self._tried = set(self._daemons)
        self._fire_tried()
        stopping = super().stopService()
        return stopping.addBoth(lambda _: self._core.unreachable("the client was stopped"))

    def stop(self) -> Deferred:
        """Stop, on the next turn of the reactor (stop may be called from a
        callback of a service's own connection attempt, which must not be
        re-entered).

        :returns: a Deferred that fires once every connection is closed.
        """
        return deferLater(self.reactor, 0, self.stopService)

    def close(self) -> Deferred:
        """`stop`, by the name the asyncio client's ``close`` has."""
        return self.stop()

    def daemon_of(self, job_id: str) -> Optional[str]:
        """The daemon an unfinished job of this client was sent to (its
        name, as messages give it), or None: not sent yet, or not in
        flight."""
        return self._core.daemon_of(job_id)

    @property
    def connected(self) -> bool:
        """Whether a connection to any daemon is up right now."""
        return bool(self._core.up())

    @property
    def in_flight(self) -> int:
        """How many submitted jobs have not ended."""
        return self._core.in_flight

    @property
    def up(self) -> List[str]:
        """The names of the daemons connected now."""
        return self._core.up()

    @property
    def daemons(self) -> List[str]:
        """The names of all the daemons, as messages and errors give them."""
        return list(self._daemons)

    @property
    def unreachable(self) -> Dict[str, str]:
        """The daemons not connected now whose last connection attempt
        failed, each with why (one line)."""
        return OrderedDict((name, daemon.dead or daemon.problem) for name, daemon in self._daemons.items()
                           if daemon.connection is None and (daemon.dead or daemon.problem))

    # --- requests -----------------------------------------------------------------------------

    def submit(self, type: str, body: Any = None, priority: int = 0, id: Optional[str] = None,
               timeout: Optional[float] = None, *, detach: bool = False, delay: Any = None, at: Any = None,
               retries: Optional[int] = None, backoff: bool = False, unique: Optional[str] = None,
               on_progress: Optional[ProgressCallback] = None,
               on_ack: Optional[Callable[[bool], Any]] = None) -> Deferred:
        """Submit a job (now, or once a daemon is up).  Cancelling the
        Deferred cancels the job.

        :param type: the job's type.
        :param body: the job's body: any JSON value.
        :param priority: larger runs first.
        :param id: the job's id, unique among this client's jobs in flight
            (a detached job's, among the daemon's detached jobs); by default
            a fresh uuid4 hex.
        :param timeout: the job's own time limit on a slave, in seconds.
        :param detach: hand the job to the daemon: it outlives this
            client's connection, and the Deferred fires with its id once
            the daemon acked it (`status` says how it went).
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
            first submit's body, priority, timeout, delay and retries
            hold).  Cancelling detaches only this submit.  With several
            daemons, it is sent once every daemon has been tried (see
            `start`), to the first up in the key's rendezvous order, so
            that the submits sharing a key meet.  Not with ``detach``.
        :param on_progress: called in the reactor thread with each progress
            of the job (a dict of ``done``, ``total`` and ``data``, those
            the worker sent), in order, before the Deferred fires; not
            after the Deferred was cancelled.  An exception it raises is
            logged.
        :param on_ack: called in the reactor thread once the daemon has
            accepted the submit (again if ``resubmit`` sends it to another
            daemon), with whether it joined a job already there with the
            same ``unique`` key (the ack's ``coalesced``).  An exception it
            raises is logged.
        :returns: a Deferred that fires with the answer body (a detached
            job's id), or fails with `ServerError` (refused, such as
            ``id_exists`` or ``journal_error``, or ``job_failed``, or
            ``cleared``) or `TransportError` (for a detached job, it may
            then have been taken or not: ask `status`).
        :raises EncodeError: if the body cannot be sent as JSON.
        :raises ValueError: if a job with that id is in flight already, or
            an option is out of range (or both ``delay`` and ``at``, or
            ``unique`` with ``detach``).
        :raises TypeError: if ``on_progress`` or ``on_ack`` is not callable.
        """
        for name, given in (("on_progress", on_progress), ("on_ack", on_ack)):
            if given is not None and not callable(given):
                raise TypeError(f"{name} must be callable, not {given!r}")
        request = self._core.submit(type, body, priority, id, timeout, detach=detach, delay=delay, at=at,
                                    retries=retries, backoff=backoff, unique=unique)
        if on_progress is not None and not request.done:
            self._watchers[request] = on_progress
        if on_ack is not None and not request.done:
            self._ack_watchers[request] = on_ack
        waiter = Deferred(lambda d: self._abandon(request, d))
        self._wait(request, waiter)
        return waiter

    def run(self, type: str, body: Any = None, priority: int = 0, id: Optional[str] = None,
            timeout: Optional[float] = None, *, detach: bool = False, delay: Any = None, at: Any = None,
            retries: Optional[int] = None, backoff: bool = False, unique: Optional[str] = None,
            on_progress: Optional[ProgressCallback] = None,
            on_ack: Optional[Callable[[bool], Any]] = None) -> Deferred:
        """`submit`, for a job whose answer is wanted: the same, except
        that ``detach`` is refused.

        :raises ValueError: with ``detach``: a detached job gets no answer
            (use ``submit(..., detach=True)``).
        """
        if detach:
            raise ValueError("run waits for the answer, and a detached job gets none: use submit(detach=True)")
        return self.submit(type, body, priority, id, timeout, delay=delay, at=at, retries=retries,
                           backoff=backoff, unique=unique, on_progress=on_progress, on_ack=on_ack)

    def map(self, type: str, bodies: Iterable[Any], window: int = 64, priority: int = 0,
            timeout: Optional[float] = None) -> Deferred:
        """Submit a job for each body, ``window`` in flight at most.

        :returns: a Deferred that fires with the answer bodies in input
            order, or fails with the first failure in that order (the jobs
            still in flight are then cancelled).  Cancelling it cancels them.
        :raises ValueError: if ``window`` is below 1.
        """
        return _Mapping(self, type, iter(bodies), core.InOrder(window), priority, timeout).start()

    def cancel(self, job_id: str) -> Deferred:
        """Cancel a job by id: its submit Deferred fails with
        ``CancelledError`` now.  Or cancel a detached job (anyone may): it
        ends ``failed``; with several daemons, they are asked in the id's
        rendezvous order until one has it.

        :param job_id: the id the job was submitted with.
        :returns: a Deferred that fires once the daemon withdrew the job, or
            fails with `ServerError` ``unknown_job`` if it had ended or is
            neither this client's nor a detached job.
        """
        job = self._core.jobs.get(job_id)
        waiter = job.waiter if job is not None else None
        if isinstance(waiter, Deferred):
            job.waiter = None
        request = self._core.cancel(job_id)
        if isinstance(waiter, Deferred) and not waiter.called:
            waiter.cancel()
        result = Deferred()
        self._wait(request, result)
        return result

    def stats(self, daemon: Optional[str] = None) -> Deferred:
        """Figures of the daemons: one daemon's own stats, or with several,
        those of the daemons up added by `core.sum_stats` (each daemon's
        under ``daemons``).

        :param daemon: the name or address of the one daemon to ask.
        :returns: a Deferred for the stats dict.
        """
        if daemon is not None:
            name = self._name_of(daemon)
            result = Deferred()
            self._wait(self._core.stats(name), result)
            return result
        if len(self._daemons) == 1:
            result = Deferred()
            self._wait(self._core.stats(), result)
            return result
        up = self._core.up()
        if not up:
            request = self._core.stats()
            result = Deferred()
            self._wait(request, result)
            return result.addCallback(lambda stats: core.sum_stats({request.daemon: stats}))
        asked = []
        for name in up:
            waiter = Deferred()
            self._wait(self._core.stats(name), waiter)
            asked.append(waiter)

        def add_up(outcomes):
            figures = {name: value for name, (ok, value) in zip(up, outcomes) if ok}
            if not figures:
                return outcomes[0][1]
            return core.sum_stats(figures)

        return DeferredList(asked, consumeErrors=True).addCallback(add_up)

    def status(self, job_id: str) -> Deferred:
        """Where a job is.

        :param job_id: the job's id.
        :returns: a Deferred for the daemon's reply as a dict: ``id``,
            ``state`` (``queued``, ``delayed``, ``running``, ``completed``,
            ``failed``, ``dead`` or ``unknown``) and, where they apply,
            ``detached``, ``type``, ``priority``, ``attempts``, ``run_at``,
            ``result``, ``reason``, ``ended_at``.  A daemon knows this
            client's own unfinished jobs and every detached job.  With
            several daemons, those up are asked in the id's rendezvous
            order until one knows the job, which the dict names as
            ``daemon``.
        :raises ValueError: if the id is not a non-empty string.
        """
        return self._ask(self._core.status(job_id))

    def dead_list(self, offset: int = 0, limit: int = 100) -> Deferred:
        """A page of the dead list (detached jobs whose retries ran out),
        oldest first.

        :param offset: how many of the oldest to skip.
        :param limit: the most entries (1 to 1000).
        :returns: a Deferred for a `gloom.core.DeadList`: dicts with ``id``,
            ``type``, ``priority``, ``attempts``, ``reason`` and
            ``ended_at``, and ``total``, the whole list's length.  With
            several daemons, the page is of the lists of those up merged
            oldest first, each entry naming its ``daemon`` (see
            `gloom.core.MasterCore.dead_list`).
        :raises ValueError: if either is out of range.
        """
        return self._ask(self._core.dead_list(offset, limit))

    def dead_retry(self, job_id: str) -> Deferred:
        """Queue a dead job again, with fresh retries.

        :param job_id: the dead job's id.
        :returns: a Deferred that fires with None, or fails with
            `ServerError` ``unknown_job`` if no daemon up has such a dead job.
        """
        return self._ask(self._core.dead_retry(job_id))

    def dead_discard(self, job_id: str) -> Deferred:
        """Forget a dead job.

        :param job_id: the dead job's id.
        :returns: a Deferred that fires with None, or fails with
            `ServerError` ``unknown_job`` if no daemon up has such a dead job.
        """
        return self._ask(self._core.dead_discard(job_id))

    # --- admin ------------------------------------------------------------------------------

    def pause(self, type: str) -> Deferred:
        """Have every daemon hand out no job of ``type`` until `resume`
        (submits are still taken, and queue).  The daemons must run with
        ``--admin``.

        :param type: the job type.
        :returns: a Deferred that fires with None once every daemon
            connected has paused the type; or fails with `ServerError`
            ``forbidden`` (a daemon runs without ``--admin``), or with
            `TransportError` naming the daemons that are not connected
            (the others were asked).  It waits until every daemon has been
            tried once (see `start`).
        :raises ValueError: if the type is not a non-empty string.
        """
        return self._admin("pause", type).addCallback(lambda replies: None)

    def resume(self, type: str) -> Deferred:
        """Have every daemon hand out jobs of ``type`` again (see `pause`).

        :param type: the job type.
        :returns: a Deferred that fires with None, or fails as `pause`'s.
        :raises ValueError: if the type is not a non-empty string.
        """
        return self._admin("resume", type).addCallback(lambda replies: None)

    def clear(self, type: str) -> Deferred:
        """End every queued and delayed job of ``type`` on every daemon:
        each master waiting for one gets `ServerError` ``cleared``, and a
        detached one goes to the dead list.  Running jobs go on.

        :param type: the job type.
        :returns: a Deferred that fires with how many jobs were cleared,
            over every daemon; or fails as `pause`'s.
        :raises ValueError: if the type is not a non-empty string.
        """
        return self._admin("clear", type).addCallback(
            lambda replies: sum(reply.get("cleared", 0) for reply in replies.values()))

    def drain(self) -> Deferred:
        """Have every daemon refuse new submits (`ServerError`
        ``shutdown``), finish its queued and running jobs, then exit.

        :returns: a Deferred that fires with None once every daemon
            connected said it drains; or fails as `pause`'s.
        """
        return self._admin("drain").addCallback(lambda replies: None)

    def _admin(self, action: str, type: Optional[str] = None) -> Deferred:
        """Ask every daemon connected, once each has been tried; a Deferred
        for each one's reply, by name."""
        core.admin_message(action, type)  # a ValueError before anything is sent
        tried = self._tried >= set(self._daemons) and self.running
        if tried or self._closed:
            return self._admin_now(None, action, type)
        waiter = Deferred()
        self._tried_waiters.append(waiter)
        return waiter.addCallback(self._admin_now, action, type)

    def _admin_now(self, _: Any, action: str, type: Optional[str]) -> Deferred:
        if self._closed:
            return _failed(TransportError("the client was stopped"))
        up = self._core.up()
        asked = []
        for name in up:
            waiter = Deferred()
            self._wait(self._core.admin(action, type, name), waiter)
            asked.append(waiter)

        def gathered(outcomes: List[Tuple[bool, Any]]) -> Any:
            replies = {name: (value if ok else value.value) for name, (ok, value) in zip(up, outcomes)}
            try:
                return core.admin_outcome(action, list(self._daemons), replies)
            except Exception as e:
                return Failure(e)

        return DeferredList(asked, consumeErrors=True).addCallback(gathered)

    def _ask(self, request: Request) -> Deferred:
        result = Deferred()
        self._wait(request, result)
        return result

    def _name_of(self, daemon) -> str:
        if daemon in self._daemons:
            return daemon
        for name, state in self._daemons.items():
            if state.address == daemon or core.display_name(daemon) == name:
                return name
        raise ValueError(f"{daemon!r} is not one of this client's daemons")

    # --- the core's requests and Deferreds ----------------------------------------------------

    def _wait(self, request: Request, waiter) -> None:
        """Attach a waiter (a Deferred, or a function of the request) and
        fail the request at once if no daemon can ever take it."""
        request.waiter = waiter
        if request.done:
            self._ended(request)
        elif not request.sent and self._hopeless():
            self._core.unreachable(self._hopeless())

    def _hopeless(self) -> Optional[str]:
        """Why no daemon will take a request, if none will."""
        if self._closed:
            return "the client was stopped"
        if all(daemon.dead for daemon in self._daemons.values()):
            return "; ".join(daemon.dead for daemon in self._daemons.values())
        return None

    def _ended(self, request: Request) -> None:
        if self._watchers:
            self._watchers.pop(request, None)
        if self._ack_watchers:
            self._ack_watchers.pop(request, None)
        waiter, request.waiter = request.waiter, None
        if waiter is None:
            return
        if not isinstance(waiter, Deferred):
            waiter(request)
        elif not waiter.called:
            if request.error is not None:
                waiter.errback(Failure(request.error))
            else:
                waiter.callback(request.value)

    def _abandon(self, request: Request, waiter: Deferred) -> None:
        """A submit's Deferred was cancelled: cancel the job."""
        self._watchers.pop(request, None)
        self._ack_watchers.pop(request, None)
        if request.waiter is waiter:
            request.waiter = None
            if not request.done:
                self._core.cancel(request.id)

    def _progressed(self, request: Request, progress: dict) -> None:
        """A progress of a submit in flight: call its ``on_progress``."""
        watcher = self._watchers.get(request)
        if watcher is not None:
            try:
                watcher(progress)
            except Exception:
                self.log.failure("on_progress of job {id!r} raised", id=request.id)

    def _acked(self, request: Request) -> None:
        """A submit was accepted: call its ``on_ack``."""
        watcher = self._ack_watchers.get(request)
        if watcher is not None:
            try:
                watcher(request.coalesced)
            except Exception:
                self.log.failure("on_ack of job {id!r} raised", id=request.id)

    # --- connections ------------------------------------------------------------------------

    def _name(self, key: str) -> str:
        return key

    def _send(self, name: str, data: bytes) -> None:
        self._daemons[name].connection.transport.write(data)

    def _up(self, connection: _Connection) -> None:
        daemon = self._daemons[connection.key]
        daemon.connection = connection
        daemon.failures = 0
        daemon.problem = None
        self._core.connected(daemon.name)
        self._tried_once(daemon.name)

    def _tried_once(self, name: str) -> None:
        """Daemon ``name`` was tried (it connected, or an attempt failed)."""
        if name not in self._tried:
            self._tried.add(name)
            if self._tried >= set(self._daemons):
                self._fire_tried()

    def _fire_tried(self) -> None:
        waiters, self._tried_waiters = self._tried_waiters, []
        for waiter in waiters:
            if not waiter.called:
                waiter.callback(None)

    def _received(self, connection: _Connection, data: bytes) -> None:
        if not connection.up:
            return
        try:
            self._core.received(connection.key, core.decode(data, connection.key))
        except ProtocolError as e:
            connection.abort(str(e))

    def _lost(self, connection: _Connection, reason: Failure) -> None:
        daemon = self._daemons[connection.key]
        line, permanent = _problem(daemon.name, reason, connection)
        if daemon.connection is connection:
            daemon.connection = None
            if self._closed:
                why = "the client was stopped"
            else:
                why = connection.problem or line
            self._core.lost(daemon.name, why)
            if permanent:
                self._dead(daemon, line)
        elif not self._closed:
            # Lost before it was up (the TLS handshake failed): a failed attempt.
            self._failed(daemon, line, permanent)

    def _attempt_failed(self, name: str, failure: Failure) -> None:
        line, permanent = _problem(name, failure)
        self._failed(self._daemons[name], line, permanent)

    def _failed(self, daemon: _MasterDaemon, line: str, permanent: bool) -> None:
        daemon.failures += 1
        daemon.problem = line
        try:
            if permanent:
                self._dead(daemon, line)
                return
            if self.fail_after is None or self._core.up():
                return
            daemons = list(self._daemons.values())
            if all(state.dead or state.failures >= self.fail_after for state in daemons):
                why = "; ".join(state.dead or state.problem or f"cannot connect to {state.name}"
                                for state in daemons)
                for state in daemons:
                    state.failures = 0
                self._core.unreachable(why)
        finally:
            self._core.attempt_failed(daemon.name)
            self._tried_once(daemon.name)

    def _dead(self, daemon: _MasterDaemon, line: str) -> None:
        """Retrying cannot reach this daemon (its TLS settings are wrong):
        stop trying, and fail what waits if no daemon is left."""
        if daemon.dead is None:
            daemon.dead = line
            self.reactor.callLater(0, daemon.service.stopService)
        if not self._core.up():
            why = self._hopeless()
            if why is not None:
                self._core.unreachable(why)


class _Mapping:
    """One `MasterClient.map`: feeds an `InOrder` window from the bodies
    and collects its answers in order."""

    def __init__(self, client: MasterClient, type: str, bodies, window: "core.InOrder", priority: int,
                 timeout: Optional[float]):
        self.client = client
        self.type = type
        self.bodies = bodies
        self.window = window
        self.priority = priority
        self.timeout = timeout
        self.answers: List[Any] = []
        self.live: List[Request] = []
        self.exhausted = False
        self.pumping = False
        self.again = False
        self.result = Deferred(lambda d: self._cancel_all())

    def start(self) -> Deferred:
        self._pump()
        return self.result

    def _ended(self, request: Request) -> None:
        self._pump()

    def _pump(self) -> None:
        """Take out the answers ready and refill the window, until nothing
        changes (a request may end while the window is being refilled)."""
        if self.pumping:
            self.again = True
            return
        self.pumping = True
        try:
            self.again = True
            while self.again and not self.result.called:
                self.again = False
                self._step()
        finally:
            self.pumping = False

    def _step(self) -> None:
        for request in self.window.ready():
            self.live.remove(request)
            if request.error is not None:
                self._fail(request.error)
                return
            self.answers.append(request.value)
        while self.window.room and not self.exhausted:
            try:
                body = next(self.bodies)
                request = self.client._core.submit(self.type, body, self.priority, None, self.timeout)
            except StopIteration:
                self.exhausted = True
                break
            except Exception as e:
                self._fail(e)
                return
            self.window.add(request)
            self.live.append(request)
            self.client._wait(request, self._ended)
        if self.exhausted and not self.live:
            self.result.callback(self.answers)

    def _cancel_all(self) -> None:
        """Cancel the jobs still in flight."""
        self.exhausted = True
        live, self.live = self.live, []
        for request in live:
            request.waiter = None
            if not request.done:
                self.client._core.cancel(request.id)

    def _fail(self, error: BaseException) -> None:
        self._cancel_all()
        if not self.result.called:
            self.result.errback(Failure(error))


# --- workers -----------------------------------------------------------------------------------


class _WorkerDaemon:
    """What a `Worker` keeps of one daemon: whether an outage was
    reported, so it is reported once and its end too."""

    def __init__(self, name: str):
        self.name = name
        self.reported = False


class Worker(MultiService):
    """Answers jobs of one type from one or more daemons with a handler,
    ``concurrency`` at once at most: `gloom.core.WorkerCore` keeps
    ``concurrency`` slave connections to each daemon and asks for work on
    no more of them than there is room for.  Nothing connects before
    `start`.

    A fatal error (the daemon refused to serve the type, or TLS settings the
    daemon rejects) is reported, then the worker stops itself and `done`
    (and `wait`) fails with `WorkerError`.

    :param type: the type of jobs to take (also ``.type`` and
        ``.job_type``); ``job_type=`` is taken too, by keyword, as before.
    :param handler: called with each `Job`; returns the answer body or a
        Deferred for it, and an exception or failure fails the job with its
        text.  While it runs, ``job.progress(done, total, data=None)``
        tells the masters how far it got and ``job.touch()`` restarts its
        timeout; both may be called from the reactor thread or any other
        (they are handed to the reactor with ``callFromThread``), and
        return whether they were sent (False once the job is answered or
        its connection lost).  ``job.cancelled`` becomes True once the
        daemon answers either with ``cancelled``: every master that
        submitted the job withdrew it, and the work may stop (the job must
        still be answered or failed; the daemon drops that answer).
        ``job.timed_out`` becomes True once it answers ``timed_out`` (the
        attempt ran past its timeout and was given up), and
        ``job.on_dropped(f)`` has ``f(code)`` called in the reactor thread
        at the first of the two.
    :param concurrency: the most jobs in hand at once.
    :param slaves: the daemons' slave ports, as `MasterClient` takes its
        masters; None for ``GLOOM_SLAVES``, ``GLOOM_SLAVE``, else
        127.0.0.1:9999.
    :param reactor: the reactor, which also times the reconnections; by
        default, the global one.
    :param retry_policy: as `MasterClient` takes it.
    :param report: called with a line of text when a connection attempt
        fails (once until one succeeds, which is reported too), when a
        connection is lost, and on errors; by default, logged.
    :param on_job: called with ``(job, seconds, error)`` after each job ran:
        ``error`` is the exception it failed with, or None.
    :raises ValueError: if ``concurrency`` is below 1, the type is empty, or
        an address cannot be used.
    :raises TypeError: if the type is given twice (``type`` and
        ``job_type``) or not at all, or the handler is not callable.
    """

    log = Logger()

    def __init__(self, type: Optional[str] = None, handler: Optional[Callable[[Job], Any]] = None,
                 concurrency: int = 1, slaves=None, reactor=None,
                 retry_policy: Optional[Callable[[int], float]] = None,
                 report: Optional[Callable[[str], None]] = None,
                 on_job: Optional[Callable[[Job, float, Optional[BaseException]], None]] = None,
                 *, job_type: Optional[str] = None):
        super().__init__()
        if job_type is not None:
            if type is not None:
                raise TypeError("give the job type once: as type (or first), or as job_type")
            type = job_type
        if type is None:
            raise TypeError("Worker needs the type of jobs to take")
        job_type = type
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.type = self.job_type = job_type
        self.handler = handler
        self.concurrency = concurrency
        self.report = report or (lambda text: self.log.warn("{text}", text=text))
        self.on_job = on_job
        addresses = _addresses(slaves, core.SLAVES_ENV, core.DEFAULT_SLAVE)
        names = _names(addresses)
        self._core = core.WorkerCore(job_type, concurrency, names, self._send, self._run, self._said)
        self._daemons = {name: _WorkerDaemon(name) for name in names}
        self._handlers: Dict[int, Deferred] = {}
        self._stopping = False
        self._draining = False
        self._stopped = False
        self._reply_timer = None
        self._error: Optional[WorkerError] = None
        self._stop_waiters: List[Deferred] = []
        self._done_waiters: List[Deferred] = []
        self._rotation: Optional[LoopingCall] = None
        self._thread: Optional[int] = None
        """The reactor's thread, where handlers are called."""
        policy = retry_policy or _default_policy()
        endpoints_by_name = {
            name: _ReportingEndpoint(client_endpoint(reactor, address), name, self._attempt_failed)
            for address, name in zip(addresses, names)}
        for link in self._core.links:
            service = _service(endpoints_by_name[link.daemon], self, link, policy, reactor)
            service.setServiceParent(self)
        if not callable(handler):
            raise TypeError("the handler must be callable")

    # --- service ----------------------------------------------------------------------------

    def start(self) -> None:
        """Connect every slave connection, and reconnect each when lost."""
        self.startService()

    def startService(self) -> None:
        """Connect, as `start` does; with several daemons, also call the
        core's ``rotate`` every `gloom.core.WorkerCore.ROTATE_INTERVAL`
        seconds of the reactor's clock until the worker stops."""
        MultiService.startService(self)
        if len(self._core.daemons) > 1 and self._rotation is None and not self._stopping:
            self._rotation = LoopingCall(self._core.rotate)
            self._rotation.clock = self.reactor
            self._rotation.start(self._core.ROTATE_INTERVAL, now=False).addErrback(
                lambda failure: self.log.failure("rotating the asks failed", failure))

    def stopService(self) -> Deferred:
        """Stop gracefully, as `stop` does."""
        return self.stop()

    def stop(self) -> Deferred:
        """Take no new job (at once), finish and answer the jobs in hand,
        hand back any job that crossed the worker's ``leave``, then
        disconnect.

        :returns: a Deferred that fires once the worker has stopped.
        """
        if self._stopped:
            return succeed(None)
        waiter = Deferred()
        self._stop_waiters.append(waiter)
        if not self._stopping:
            self._stopping = True
            self._stop_rotation()
            self._core.stop()
            self._check_drained()
        return waiter

    @property
    def done(self) -> Deferred:
        """A new Deferred that fires (with None) once the worker has stopped,
        or fails with `WorkerError` if it stopped on a fatal error."""
        return self.wait()

    def wait(self) -> Deferred:
        """A new Deferred that fires (with None) once the worker has stopped,
        or fails with `WorkerError` if it stopped on a fatal error: `done`,
        by the name the asyncio worker's ``wait`` has."""
        if self._stopped:
            return succeed(None) if self._error is None else _failed(self._error)
        waiter = Deferred()
        self._done_waiters.append(waiter)
        return waiter

    @property
    def busy(self) -> int:
        """How many jobs the worker holds now."""
        return self._core.in_hand

    @property
    def released(self) -> int:
        """How many jobs were handed back unrun, having come when the
        worker was full or stopping."""
        return self._core.released

    # --- jobs -----------------------------------------------------------------------------------

    def _run(self, link: "core.Link", job: Job) -> None:
        self._thread = threading.get_ident()  # the reactor's: the core calls from there
        job.bind(lambda done=None, total=None, data=None: self._report_progress(link, job, (done, total, data)),
                 lambda: self._report_progress(link, job, None))
        started = self.reactor.seconds()
        running = maybeDeferred(self.handler, job)
        key = id(running)
        self._handlers[key] = running
        running.addBoth(self._ran, link, job, started, key)

    def _ran(self, outcome: Any, link: "core.Link", job: Job, started: float, key: int) -> None:
        self._handlers.pop(key, None)
        error = None
        if isinstance(outcome, Failure):
            error = outcome.value
            reason = outcome.getErrorMessage() or outcome.type.__name__
            self._core.finished(link, job, failure=reason)
        else:
            self._core.finished(link, job, outcome)
        if self.on_job is not None:
            try:
                self.on_job(job, self.reactor.seconds() - started, error)
            except Exception:
                self.log.failure("on_job raised")
        self._check_drained()

    def _report_progress(self, link: "core.Link", job: Job, fields: Optional[Tuple[Any, Any, Any]]) -> bool:
        """Send a job's progress (``fields``: done, total, data) or touch
        (None).  From the reactor thread, at once; from another thread,
        checked there, then handed to the reactor (``callFromThread``),
        with ``data`` copied as it is now.

        :returns: whether it was sent (from another thread: whether the
            job was still held when it was handed over).
        """
        if threading.get_ident() == self._thread:
            return self._core.progress_or_touch(link, job, fields)
        if fields is not None:
            fields = core.progress_from_another_thread(*fields)
        held = link.up and link.job is job
        if held:
            self.reactor.callFromThread(self._core.progress_or_touch, link, job, fields)
        return held

    # --- connections ------------------------------------------------------------------------

    def _name(self, link: "core.Link") -> str:
        return link.daemon

    def _send(self, link: "core.Link", data: bytes) -> None:
        link.handle.transport.write(data)

    def _up(self, connection: _Connection) -> None:
        link = connection.key
        daemon = self._daemons[link.daemon]
        if daemon.reported:
            daemon.reported = False
            self.report(f"connected to {daemon.name}")
        link.handle = connection
        self._core.link_up(link)

    def _received(self, connection: _Connection, data: bytes) -> None:
        link = connection.key
        if link.handle is not connection:
            return
        try:
            message = core.decode(data, link.daemon)
        except ProtocolError as e:
            self.report(str(e))
            connection.abort(str(e))
            return
        self._core.received(link, message)
        self._check_drained()

    def _lost(self, connection: _Connection, reason: Failure) -> None:
        link = connection.key
        daemon = self._daemons[link.daemon]
        line, permanent = _problem(daemon.name, reason, connection)
        if link.handle is connection:
            link.handle = None
            job = self._core.link_down(link)
            if permanent:
                self._fatal(line)
            elif not self._draining and not daemon.reported:
                daemon.reported = True
                held = (f" while running job {job.id!r} (its answer cannot be delivered; a daemon still "
                        "running queues the job again)") if job is not None else ""
                self.report(f"{connection.problem or line}{held}; reconnecting")
            self._check_drained()
        elif not self._draining:
            self._failed(daemon, line, permanent)

    def _attempt_failed(self, name: str, failure: Failure) -> None:
        line, permanent = _problem(name, failure)
        self._failed(self._daemons[name], line, permanent)

    def _failed(self, daemon: _WorkerDaemon, line: str, permanent: bool) -> None:
        if permanent:
            self._fatal(line)
        elif not daemon.reported and not self._draining:
            daemon.reported = True
            self.report(f"{line}; retrying")

    def _said(self, text: str, fatal: bool) -> None:
        if fatal:
            self._fatal(text)
        else:
            self.report(text)

    def _fatal(self, text: str) -> None:
        """An error retrying cannot fix: say it once, then stop."""
        if self._error is None:
            self._error = WorkerError(text)
            self.report(text)
            self.stop()

    # --- stopping ---------------------------------------------------------------------------

    def _stop_rotation(self) -> None:
        if self._rotation is not None and self._rotation.running:
            self._rotation.stop()

    def _check_drained(self) -> None:
        """Once stopping, no handler running and no reply awaited (so no job
        can be crossing a ``leave``), stop the connections."""
        if not self._stopping or self._draining or self._handlers:
            return
        if any(link.up and link.job is not None for link in self._core.links):
            return
        if any(link.up and link.replies for link in self._core.links):
            if self._reply_timer is None:
                self._reply_timer = self.reactor.callLater(REPLY_WAIT, self._disconnect)
            return
        self._disconnect()

    def _disconnect(self) -> None:
        self._stop_rotation()
        if self._reply_timer is not None and self._reply_timer.active():
            self._reply_timer.cancel()
        if self._draining:
            return
        self._draining = True
        stopping = MultiService.stopService(self)
        stopping.addBoth(self._finished)

    def _finished(self, _) -> None:
        self._stopped = True
        waiters, self._stop_waiters = self._stop_waiters, []
        for waiter in waiters:
            waiter.callback(None)
        waiters, self._done_waiters = self._done_waiters, []
        for waiter in waiters:
            if self._error is None:
                waiter.callback(None)
            else:
                waiter.errback(Failure(self._error))


def _failed(error: BaseException) -> Deferred:
    waiter = Deferred()
    waiter.errback(Failure(error))
    return waiter


def work(type: str, handler: Callable[[Job], Any], concurrency: int = 1, slaves=None,
         reactor=None, **kw: Any) -> Worker:
    """Start a `Worker` answering jobs of ``type`` with ``handler(job)``.

    :param type: the type of jobs to take.
    :param handler: called with each `Job`; returns the answer body or a
        Deferred for it (an exception or failure sends ``fail`` with its
        text).
    :param concurrency: the most jobs at once.
    :param slaves: the daemons' slave ports, as `Worker` takes them.
    :param reactor: the reactor; by default, the global one.
    :param kw: `Worker`'s other keyword arguments (``retry_policy``,
        ``report``, ``on_job``), as the asyncio ``work`` passes its own.
    :returns: the started `Worker`.
    """
    worker = Worker(type, handler, concurrency, slaves, reactor, **kw)
    worker.start()
    return worker
