"""Twisted clients for Gloom.

`MasterClient` submits jobs; each submit is a Deferred for the answer body.
`work` runs slave connections that answer jobs with a handler that may
return a value or a Deferred.  Both reconnect with backoff (``ClientService``)
when the daemon restarts.  Addresses are ``host:port`` or Twisted client
endpoint strings, such as ``tls:gloom.example.com:9999:trustRoots=ca/:certificate=c.pem:privateKey=k.pem``::

    from gloom.txclient import MasterClient, work

    master = MasterClient("127.0.0.1:9998")
    master.start()
    answer = yield master.submit("upper", "hello")          # "HELLO"

    worker = work("upper", lambda job: job.body.upper(), concurrency=4)
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections import deque
from typing import Any, Callable, Dict, List, Optional

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import endpoints
from twisted.internet.defer import CancelledError, Deferred, DeferredList, maybeDeferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from gloom import wire
from gloom.client import Job, ProtocolError, ServerError, TransportError, loads
from gloom.protocol import FrameReceiver, tune_connection

_ENDPOINT_STRING = re.compile(r"^[a-zA-Z0-9]+:.*=|^(tcp|tcp6|tls|ssl|unix):")


def client_endpoint(reactor, address, default_host: str = "127.0.0.1") -> IStreamClientEndpoint:
    """An endpoint from ``host:port``, ``[v6addr]:port``, ``:port``, a client
    endpoint string, or an endpoint itself.

    :param reactor: the reactor the endpoint connects with.
    :param address: the address, as text, or an ``IStreamClientEndpoint``
        (returned as it is).
    :param default_host: the host for ``:port``.
    :raises ValueError: if ``address`` is none of these.
    """
    if IStreamClientEndpoint.providedBy(address):
        return address
    if _ENDPOINT_STRING.match(address):
        return endpoints.clientFromString(reactor, address)
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or default_host
    if not port.isdigit():
        raise ValueError(f"{address!r} is neither host:port nor a client endpoint string")
    return endpoints.HostnameEndpoint(reactor, host, int(port))


def describe_failure(failure: Failure) -> str:
    """One line for a connection failure, without a traceback.

    :param failure: why a connection attempt failed or a connection was
        lost.
    """
    error = failure.value
    os_error = getattr(error, "osError", None)
    if isinstance(os_error, int):
        return os.strerror(os_error)
    if isinstance(os_error, OSError) and os_error.strerror:
        return os_error.strerror
    return str(error).strip().rstrip(".") or error.__class__.__name__


class _Connection(FrameReceiver):
    """A client connection: JSON frames in, JSON frames out."""

    MAX_LENGTH = wire.FRAME_LIMIT
    log = Logger()

    def connectionMade(self) -> None:
        tune_connection(self.transport)

    def stringReceived(self, data: bytes) -> None:
        try:
            frame = loads(data)
        except ValueError:
            self.log.error("The daemon sent a frame that is not JSON; closing the connection")
            self.transport.abortConnection()
            return
        self.frameReceived(frame)

    def send(self, message: dict) -> None:
        self.sendString(json.dumps(message, separators=(",", ":"), allow_nan=False).encode())


class _MasterConnection(_Connection):
    def connectionMade(self) -> None:
        super().connectionMade()
        self.factory.client._connected(self)

    def frameReceived(self, frame: dict) -> None:
        self.factory.client._frame(frame)

    def connectionLost(self, reason) -> None:
        self.factory.client._lost(self, reason)


class MasterClient:
    """Submits jobs over one (re)connecting master connection.

    Jobs in flight when the connection drops fail with `TransportError`:
    the daemon drops a disconnected master's jobs.  Nothing connects before
    `start`.

    :param address: the daemon's master port: ``host:port``, a client
        endpoint string or an endpoint (see `client_endpoint`).
    :param reactor: the reactor; by default, the global one.
    :param fail_after: how many failed connection attempts a submit waits
        through before failing with `TransportError` (None: wait for ever).
    :param retry_policy: how long to wait before each new connection
        attempt, as ``ClientService`` takes it; by default, backoff from
        0.5 s to 30 s.
    """

    def __init__(self, address="127.0.0.1:9998", reactor=None, fail_after: Optional[int] = None,
                 retry_policy=None):
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.address = address if isinstance(address, str) else repr(address)
        factory = Factory.forProtocol(_MasterConnection)
        factory.client = self
        self.fail_after = fail_after
        self._service = ClientService(client_endpoint(reactor, address), factory,
                                      retryPolicy=retry_policy or backoffPolicy(initialDelay=0.5, maxDelay=30))
        self._connection: Optional[_MasterConnection] = None
        self._pending: Dict[str, Deferred] = {}
        self._sent: Dict[str, _MasterConnection] = {}
        self._stats: deque = deque()

    def start(self) -> None:
        """Connect, and reconnect whenever the connection is lost."""
        self._service.startService()

    def stop(self) -> Deferred:
        """Disconnect and stop reconnecting; unfinished jobs fail.  (Done on
        the next turn of the reactor: stop may be called from a callback of
        the service's own connection attempt, which must not be re-entered.)"""
        return deferLater(self.reactor, 0, self._service.stopService)

    @property
    def connected(self) -> bool:
        """Whether a connection to the daemon is up right now."""
        return self._connection is not None

    # --- requests -----------------------------------------------------------------

    def _when_connected(self) -> Deferred:
        connected = self._service.whenConnected(failAfterFailures=self.fail_after)

        def refused(failure):
            if failure.check(CancelledError):
                return failure
            raise TransportError(f"cannot connect to {self.address}: {describe_failure(failure)}")

        return connected.addErrback(refused)

    def submit(self, type: str, body: Any = None, priority: int = 0, id: Optional[str] = None,
               timeout: Optional[float] = None) -> Deferred:
        """Submit a job, once connected.  Cancelling the Deferred cancels the
        job.

        :param type: the job's type.
        :param body: the job's body: any value ``json.dumps`` takes.
        :param priority: larger runs first.
        :param id: the job's id, unique among this client's jobs in flight;
            by default a fresh uuid4 hex.
        :param timeout: the job's own time limit on a slave, in seconds.
        :returns: a Deferred that fires with the answer body, or fails with
            `ServerError` (refused, or ``job_failed``) or `TransportError`.
        :raises ValueError: if a job with that id is in flight already.
        """
        job_id = id or uuid.uuid4().hex
        if job_id in self._pending:
            raise ValueError(f"job {job_id!r} is already in flight")
        message = {"action": "submit", "id": job_id, "type": type, "body": body, "priority": priority}
        if timeout is not None:
            message["timeout"] = timeout
        result = Deferred(lambda d: self._cancel(job_id))
        self._pending[job_id] = result

        def send(connection):
            if self._pending.get(job_id) is result:
                self._sent[job_id] = connection
                connection.send(message)

        def not_sent(failure):
            if self._pending.get(job_id) is result:
                del self._pending[job_id]
                result.errback(failure)

        self._when_connected().addCallbacks(send, not_sent)
        return result

    def _cancel(self, job_id: str) -> None:
        self._pending.pop(job_id, None)
        connection = self._sent.pop(job_id, None)
        if connection is not None and connection.transport.connected:
            connection.send({"action": "cancel", "id": job_id})

    def cancel(self, job_id: str) -> None:
        """Cancel a job by id (the same as cancelling its Deferred).

        :param job_id: the id the job was submitted with; a job not in
            flight is ignored.
        """
        pending = self._pending.get(job_id)
        if pending is not None:
            pending.cancel()

    def stats(self) -> Deferred:
        """The daemon's figures (a Deferred for the stats dict)."""
        reply = Deferred()

        def send(connection):
            self._stats.append(reply)
            connection.send({"action": "stats"})

        self._when_connected().addCallbacks(send, reply.errback)
        return reply

    # --- frames ---------------------------------------------------------------------

    def _connected(self, connection: _MasterConnection) -> None:
        self._connection = connection

    def _frame(self, frame: dict) -> None:
        job_id = frame.get("id")
        if "stats" in frame or (job_id is None and "error" in frame):
            if self._stats:
                waiting = self._stats.popleft()
                if "error" in frame:
                    waiting.errback(ServerError.from_frame(frame))
                else:
                    waiting.callback(frame["stats"])
            return
        if frame.get("ok"):
            return
        result = self._pending.pop(job_id, None)
        self._sent.pop(job_id, None)
        if result is None:
            return
        if "error" in frame:
            result.errback(ServerError.from_frame(frame))
        elif "body" in frame:
            result.callback(frame["body"])
        else:
            result.errback(ProtocolError(f"unexpected frame {frame!r}"))

    def _lost(self, connection: _MasterConnection, reason: Failure) -> None:
        if self._connection is connection:
            self._connection = None
        lost = [job_id for job_id, sent_on in self._sent.items() if sent_on is connection]
        why = "the connection to the daemon was lost" if not reason.check(ConnectionDone) else \
            "the connection to the daemon was closed"
        for job_id in lost:
            del self._sent[job_id]
            result = self._pending.pop(job_id, None)
            if result is not None:
                result.errback(TransportError(f"{why}; the outcome of job {job_id!r} is unknown"))
        while self._stats:
            self._stats.popleft().errback(TransportError(why))


class _SlaveConnection(_Connection):
    """Joins the worker's type, runs each job through the handler, answers."""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.slot = self.factory.slot
        self.busy = False
        self.slot.connection = self
        self.send({"action": "join", "type": self.slot.worker.job_type})

    def frameReceived(self, frame: dict) -> None:
        if frame.get("action") == "job":
            self.busy = True
            job = Job(frame)
            outcome = maybeDeferred(self.slot.worker.handler, job)
            outcome.addCallbacks(self._respond, self._fail, (job.id,), None, (job.id,))
            outcome.addErrback(lambda f: self.log.failure("Could not answer job {id!r}", f, id=job.id))
        elif "error" in frame:
            if frame["error"] == "timed_out":
                self.log.warn("Job {id!r} ran past its timeout; the answer was discarded", id=frame.get("id"))
            else:
                self.log.error("The daemon refused: {error}: {reason}", error=frame.get("error"),
                               reason=frame.get("reason"))
            self._answered()
        elif frame.get("ok") and self.busy:
            self._answered()

    def _respond(self, result: Any, job_id: str) -> None:
        self.send({"action": "respond", "id": job_id, "body": result})

    def _fail(self, failure: Failure, job_id: str) -> None:
        reason = failure.getErrorMessage() or failure.type.__name__
        self.send({"action": "fail", "id": job_id, "reason": reason})

    def _answered(self) -> None:
        if self.busy:
            self.busy = False
            self.slot.job_done()

    def connectionLost(self, reason) -> None:
        if self.slot.connection is self:
            self.slot.connection = None
        if not self.slot.stopping:
            self.slot.worker.report(f"connection to {self.slot.worker.address} lost: "
                                    f"{describe_failure(reason)}; reconnecting")
        if self.busy:
            self.busy = False
            self.slot.job_done()


@implementer(IStreamClientEndpoint)
class _ReportingEndpoint:
    """Reports each failed connection attempt (and the recovery after one),
    so a worker that cannot reach the daemon says so instead of retrying
    in silence."""

    def __init__(self, endpoint, address: str, report: Callable[[str], None]):
        self.endpoint = endpoint
        self.address = address
        self.report = report
        self.failing = False

    def connect(self, factory):
        def connected(connection):
            if self.failing:
                self.failing = False
                self.report(f"connected to {self.address}")
            return connection

        def failed(failure):
            if not failure.check(CancelledError):
                self.failing = True
                self.report(f"cannot connect to {self.address}: {describe_failure(failure)}; retrying")
            return failure

        return self.endpoint.connect(factory).addCallbacks(connected, failed)


class _Slot:
    """One of a worker's slave connections."""

    def __init__(self, worker: "Worker", endpoint, retry_policy):
        self.worker = worker
        factory = Factory.forProtocol(_SlaveConnection)
        factory.slot = self
        self.service = ClientService(endpoint, factory, retryPolicy=retry_policy)
        self.connection: Optional[_SlaveConnection] = None
        self.stopping = False
        self._drained: Optional[Deferred] = None

    def job_done(self) -> None:
        if self._drained is not None:
            drained, self._drained = self._drained, None
            drained.callback(None)

    def stop(self) -> Deferred:
        """Stop after the job in hand, if any, is answered."""
        self.stopping = True
        if self.connection is not None and self.connection.busy:
            self._drained = Deferred()
            return self._drained.addCallback(lambda _: self.service.stopService())
        return self.service.stopService()


class Worker:
    """``concurrency`` slave connections of one type sharing a handler.
    Nothing connects before `start`.

    :param job_type: the type of jobs to take.
    :param handler: called with each `Job`; returns the answer body or a
        Deferred for it, and an exception or failure fails the job with its
        text.
    :param concurrency: how many connections, so how many jobs at once.
    :param address: the daemon's slave port: ``host:port``, a client
        endpoint string or an endpoint (see `client_endpoint`).
    :param reactor: the reactor; by default, the global one.
    :param retry_policy: as `MasterClient` takes it.
    :param report: called with a line of text when a connection attempt
        fails, when one succeeds after that, and when a connection is lost;
        by default, a warning is logged.
    :raises ValueError: if ``concurrency`` is below 1.
    """

    log = Logger()

    def __init__(self, job_type: str, handler: Callable[[Job], Any], concurrency: int = 1,
                 address="127.0.0.1:9999", reactor=None, retry_policy=None,
                 report: Optional[Callable[[str], None]] = None):
        if reactor is None:
            from twisted.internet import reactor
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.job_type = job_type
        self.handler = handler
        self.address = str(address)
        self.report = report or (lambda message: self.log.warn("{message}", message=message))
        endpoint = _ReportingEndpoint(client_endpoint(reactor, address), self.address, self.report)
        policy = retry_policy or backoffPolicy(initialDelay=0.5, maxDelay=30)
        self.slots: List[_Slot] = [_Slot(self, endpoint, policy) for _ in range(concurrency)]

    def start(self) -> None:
        """Connect every slave connection, and reconnect each when lost."""
        for slot in self.slots:
            slot.service.startService()

    def stop(self) -> Deferred:
        """Take no new jobs; finish and answer the jobs in hand; disconnect."""
        return DeferredList([slot.stop() for slot in self.slots])

    @property
    def busy(self) -> int:
        """How many connections hold a job."""
        return sum(1 for slot in self.slots if slot.connection is not None and slot.connection.busy)


def work(type: str, handler: Callable[[Job], Any], concurrency: int = 1, address="127.0.0.1:9999",
         reactor=None) -> Worker:
    """Start ``concurrency`` slave connections answering jobs of ``type``
    with ``handler(job)``.

    :param type: the type of jobs to take.
    :param handler: called with each `Job`; returns the answer body or a
        Deferred for it (an exception or failure sends ``fail`` with its
        text).
    :param concurrency: how many jobs at once, each on its own connection.
    :param address: the daemon's slave port, as `Worker` takes it.
    :param reactor: the reactor; by default, the global one.
    :returns: the started `Worker`.
    """
    worker = Worker(type, handler, concurrency, address, reactor)
    worker.start()
    return worker
