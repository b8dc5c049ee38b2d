"""Warming the daemon up before it opens its ports.

Under PyPy the first hundred thousand jobs or so a fresh daemon carries run
before the JIT has compiled the hot path, at higher latency and lower
throughput.  `warm_up` runs synthetic jobs through the daemon's own classes
(a private scheduler and factories, over loopback TCP on ephemeral ports)
before the real ports open, so that the first real jobs find it compiled.
"""

from __future__ import annotations

import gc
import time
from typing import Any, Dict, List, Optional

from twisted.internet.base import ReactorBase
from twisted.internet.protocol import ClientFactory
from twisted.logger import LogLevel
from twisted.protocols.basic import Int32StringReceiver

from gloom import wire
from gloom.master import MasterFactory, MasterProtocol
from gloom.protocol import DEFAULT_FRAME_TIMEOUT, Outbox
from gloom.scheduler import Scheduler
from gloom.slave import SlaveFactory, SlaveProtocol

DEFAULT_SECONDS_LIMIT = 10.0
"""Most seconds the jobs of a warm-up may take; it stops there."""

JOB_TYPE = "warm-up"
MASTERS = 4
SLAVES = 8
IN_FLIGHT = 64
"""Submits each warm-up master keeps unanswered."""

QUEUED_FIRST = 4000
"""Most jobs queued before any slave joins, so that the path of a queue
drained by joining slaves is compiled too."""

BODIES = (
    b'{"payload":"' + b"w" * 64 + b'"}',
    b'{"n":12345,"ratio":0.25,"tags":["a","b"],"ok":true,"none":null,"nested":{"k":[1,2]}}',
    b'"' + b"w" * 62 + b'"',
    b"[1,-2,3.5e3,false]",
)
"""The jobs' bodies, in turn: objects, as most are, and other JSON, so that
scanning each kind of value is compiled (PyPy)."""

PRIORITIES = 5
"""The jobs queued before any slave joins have priorities 0 to 4, so
that a queue of several priorities is compiled too."""

CLOSE_LIMIT = 5.0
"""Most seconds spent closing the warm-up's connections and ports."""

LOOP_WAIT = 0.01
"""Longest a turn of the hand-driven loop waits for I/O."""


class WarmUpError(Exception):
    """The daemon refused or failed a warm-up request."""


class WarmUpResult:
    """How a warm-up went."""

    def __init__(self, jobs: int, wanted: int, seconds: float):
        """
        :param jobs: how many jobs were answered.
        :param wanted: how many were asked for.
        :param seconds: how long the jobs took.
        """
        self.jobs = jobs
        self.wanted = wanted
        self.seconds = seconds

    @property
    def complete(self) -> bool:
        """Whether every job asked for was answered (not cut short by the time limit)."""
        return self.jobs >= self.wanted

    def __repr__(self) -> str:
        return f"WarmUpResult(jobs={self.jobs}, wanted={self.wanted}, seconds={self.seconds:.3f})"


class _Load:
    """The state the warm-up's clients share: what is left to submit, and
    what has been answered."""

    def __init__(self, jobs: int):
        self.to_submit = jobs
        self.answered = 0
        self.acked = 0
        self.error: Optional[bytes] = None
        self.masters: List["_Master"] = []
        self.slaves: List["_Slave"] = []
        self.closing = False
        self.stopping: list = []  # the Deferreds of the ports stopped already

    def take(self, count: int) -> int:
        """Up to ``count`` of the jobs left to submit."""
        taken = min(count, self.to_submit)
        self.to_submit -= taken
        return taken


class _Client(Int32StringReceiver):
    """A warm-up connection to the daemon's own ports."""

    MAX_LENGTH = wire.FRAME_LIMIT

    def __init__(self, load: _Load):
        self.load = load
        self.open = False

    def connectionMade(self) -> None:
        self.open = True
        self.transport.setTcpNoDelay(True)

    def connectionLost(self, reason) -> None:
        self.open = False


class _Master(_Client):
    """Submits attached jobs, keeping `IN_FLIGHT` unanswered once running."""

    def __init__(self, load: _Load):
        super().__init__(load)
        self.next_id = 0
        self.in_flight = 0
        self.topping_up = False

    def submit(self, count: int) -> None:
        """Send ``count`` submits in one write."""
        frames = []
        prioritised = not self.topping_up
        for _ in range(count):
            self.next_id += 1
            head = b'{"action":"submit","id":"w%d","type":"' % self.next_id
            if prioritised:
                head += JOB_TYPE.encode("ascii") + b'","priority":%d,"body":' % (
                    self.next_id % PRIORITIES)
            else:
                head += JOB_TYPE.encode("ascii") + b'","body":'
            data = head + BODIES[self.next_id % len(BODIES)] + b"}"
            frames.append(len(data).to_bytes(4, "big"))
            frames.append(data)
        self.in_flight += count
        self.transport.write(b"".join(frames))

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if self.topping_up and self.in_flight < IN_FLIGHT:
            count = self.load.take(IN_FLIGHT - self.in_flight)
            if count:
                self.submit(count)

    def stringReceived(self, frame: bytes) -> None:
        if frame.startswith(b'{"id":'):
            self.in_flight -= 1
            self.load.answered += 1
        elif frame.startswith(b'{"ok":true'):
            self.load.acked += 1
        elif self.load.error is None:
            self.load.error = frame


class _Slave(_Client):
    """Joins the warm-up type and answers each job with its own body."""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.sendString(b'{"action":"join","type":"' + JOB_TYPE.encode("ascii") + b'"}')

    def stringReceived(self, frame: bytes) -> None:
        if frame.startswith(b'{"action":"job"'):
            body = frame[frame.rindex(b',"body":') + 8:-1]
            self.sendString(b'{"action":"respond","body":' + body + b"}")
        elif not frame.startswith(b'{"ok":true') and self.load.error is None:
            self.load.error = frame


class _ClientFactory(ClientFactory):
    noisy = False

    def __init__(self, kind, load: _Load, into: list):
        self.kind = kind
        self.load = load
        self.into = into

    def buildProtocol(self, addr):
        client = self.kind(self.load)
        client.factory = self
        self.into.append(client)
        return client

    def clientConnectionFailed(self, connector, reason) -> None:
        if self.load.error is None:
            self.load.error = f"could not connect: {reason.getErrorMessage()}".encode()

    def clientConnectionLost(self, connector, reason) -> None:
        if not self.load.closing and self.load.error is None:
            self.load.error = f"the daemon closed a connection: {reason.getErrorMessage()}".encode()


class _Quiet:
    """A log observer passing on every event but the info-level ones of the
    warm-up's own connections ("master connected from ...")."""

    def __init__(self, observer, factories):
        self.observer = observer
        self.factories = factories

    def __call__(self, event: Dict[str, Any]) -> None:
        if event.get("log_level") is LogLevel.info:
            factory = getattr(event.get("log_source"), "factory", None)
            if factory is not None and any(factory is f for f in self.factories):
                return
        self.observer(event)


def _loggers() -> list:
    """The ``Logger`` objects the daemon's connections log through (their
    classes' ``log`` attributes)."""
    found = []
    for kind in (MasterProtocol, SlaveProtocol):
        for klass in kind.__mro__:
            logger = klass.__dict__.get("log")
            if logger is not None:
                if all(logger is not other for other in found):
                    found.append(logger)
                break
    return found


def _turn(reactor) -> None:
    """One turn of the reactor, driven by hand: run what is due, then wait
    for I/O, no longer than until the next call is due."""
    reactor.runUntilCurrent()
    due = reactor.timeout()
    reactor.doIteration(LOOP_WAIT if due is None else min(due, LOOP_WAIT))


def warm_up(reactor, jobs: int, seconds_limit: float = DEFAULT_SECONDS_LIMIT,
            max_frame: int = wire.DEFAULT_MAX_FRAME,
            frame_timeout: float = DEFAULT_FRAME_TIMEOUT) -> WarmUpResult:
    """Run ``jobs`` synthetic jobs through a private scheduler and the
    daemon's own factories and protocols over loopback TCP, on a private
    reactor of the daemon's reactor's class (never installed, never run:
    driven by hand), so that nothing scheduled on the daemon's reactor
    runs or is touched.  It stops after ``seconds_limit`` seconds even if
    jobs are left, and leaves no port or connection behind.

    :param reactor: the daemon's reactor (only its class is used).
    :param jobs: how many jobs to run (0: none).
    :param seconds_limit: most seconds the jobs may take.
    :param max_frame: as the daemon's factories have it.
    :param frame_timeout: as the daemon's factories have it.
    :returns: how many jobs were answered, and in how long (closing included).
    :raises Exception: whatever went wrong (the ports and connections are
        closed first).
    """
    if jobs <= 0:
        return WarmUpResult(0, 0, 0.0)
    if getattr(type(reactor), "doIteration", None) is ReactorBase.doIteration:
        # Such a reactor (the asyncio one) runs only inside its own loop,
        # which a second instance would share.
        raise WarmUpError(f"{type(reactor).__name__} cannot be driven by hand")
    started = time.monotonic()
    private = type(reactor)()
    try:
        answered = _run(private, jobs, started + seconds_limit, max_frame, frame_timeout)
    finally:
        _dispose(private)
        del private
        # Everything the warm-up made is garbage now: collected at once,
        # PyPy's heap does not grow the first real load on top of it (a
        # daemon kept about 27 MB more after its first run without this).
        gc.collect()
    return WarmUpResult(answered, jobs, time.monotonic() - started)


def _run(reactor, jobs: int, deadline: float, max_frame: int, frame_timeout: float) -> int:
    """The warm-up's jobs on ``reactor`` (private) until ``deadline``:
    how many were answered."""
    scheduler = Scheduler(clock=reactor)
    outbox = Outbox(reactor)
    masters = MasterFactory(scheduler, reactor, max_frame, outbox, frame_timeout, detached=None)
    slaves = SlaveFactory(scheduler, reactor, max_frame, outbox, frame_timeout)
    load = _Load(jobs)
    ports: list = []
    connectors: list = []
    loggers = _loggers()
    observers = [logger.observer for logger in loggers]
    for logger in loggers:
        logger.observer = _Quiet(logger.observer, (masters, slaves))
    try:
        ports.append(reactor.listenTCP(0, masters, interface="127.0.0.1"))
        ports.append(reactor.listenTCP(0, slaves, interface="127.0.0.1"))
        master_port, slave_port = (port.getHost().port for port in ports)

        def until(condition) -> bool:
            while not condition():
                if load.error is not None:
                    raise WarmUpError(load.error.decode("utf-8", "replace"))
                if time.monotonic() > deadline:
                    return False
                _turn(reactor)
            return True

        factory = _ClientFactory(_Master, load, load.masters)
        for _ in range(MASTERS):
            connectors.append(reactor.connectTCP("127.0.0.1", master_port, factory))
        if until(lambda: _all_accepted(masters, load.masters, MASTERS)):
            _only_our_own(ports[0], masters, load.masters)
            # Jobs queued before any slave joins, then drained by the slaves.
            queued = load.take(min(QUEUED_FIRST, jobs // 4))
            for index, master in enumerate(load.masters):
                share = queued // MASTERS + (index < queued % MASTERS)
                if share:
                    master.submit(share)
            if until(lambda: load.acked >= queued):
                for master in load.masters:
                    master.topping_up = True
                    count = load.take(max(0, IN_FLIGHT - master.in_flight))
                    if count:
                        master.submit(count)
                factory = _ClientFactory(_Slave, load, load.slaves)
                for _ in range(SLAVES):
                    connectors.append(reactor.connectTCP("127.0.0.1", slave_port, factory))
                if until(lambda: _all_accepted(slaves, load.slaves, SLAVES)):
                    _only_our_own(ports[1], slaves, load.slaves)
                    until(lambda: load.answered >= jobs)
        return load.answered
    finally:
        try:
            _close(reactor, load, connectors, ports, (masters, slaves))
        finally:
            for logger, observer in zip(loggers, observers):
                logger.observer = observer


def _all_accepted(factory, clients: list, count: int) -> bool:
    """Whether all ``count`` of the warm-up's clients are connected, and
    the daemon side has accepted each."""
    if len(clients) < count or not all(client.open for client in clients):
        return False
    peers = {connection.transport.getPeer().port for connection in factory.connections}
    return all(client.transport.getHost().port in peers for client in clients)


def _only_our_own(port, factory, clients: list) -> None:
    """Stop listening once the warm-up's own clients are in, and drop any
    other connection (another local process that connected meanwhile), so
    that nobody else can hold up or join the warm-up."""
    load = clients[0].load
    load.stopping.append(port.stopListening())
    ours = {client.transport.getHost().port for client in clients}
    for connection in list(factory.connections):
        if connection.transport.getPeer().port not in ours:
            connection.abort()


def _dispose(reactor) -> None:
    """Free what a private reactor holds: its calls, its descriptors, and
    what it made when it was built (its waker's pipe, its poller), where it
    has them."""
    for call in reactor.getDelayedCalls():
        if call.active():
            call.cancel()
    reactor.removeAll()
    waker = getattr(reactor, "waker", None)
    if waker is not None:
        try:
            reactor.removeReader(waker)
        except Exception:
            pass
        waker.connectionLost(None)
    close = getattr(getattr(reactor, "_poller", None), "close", None)
    if close is not None:
        close()


def _close(reactor, load: _Load, connectors: list, ports: list, factories) -> None:
    """Close every connection and port of the warm-up (on its private
    reactor, whose calls are then cancelled)."""
    load.closing = True
    for client in load.masters + load.slaves:
        if client.open:
            client.transport.loseConnection()
    for connector in connectors:
        if connector.state == "connecting":
            connector.stopConnecting()
    for factory in factories:
        for connection in list(factory.connections):
            connection.close()
    stopped = load.stopping + [port.stopListening() for port in ports
                               if not getattr(port, "disconnecting", False)]
    deadline = time.monotonic() + CLOSE_LIMIT
    aborted = False

    def open_connections() -> bool:
        return (any(factory.connections for factory in factories)
                or any(client.open for client in load.masters + load.slaves)
                or any(connector.state != "disconnected" for connector in connectors))

    while open_connections() or not all(d is None or d.called for d in stopped):
        now = time.monotonic()
        if now > deadline:
            break
        if not aborted and now > deadline - CLOSE_LIMIT / 2:
            aborted = True
            for factory in factories:
                for connection in list(factory.connections):
                    connection.abort()
            for client in load.masters + load.slaves:
                if client.open:
                    client.transport.abortConnection()
        _turn(reactor)
