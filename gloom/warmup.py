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
    daemon's own factories and protocols over loopback TCP, driving a
    reactor that is not running yet by hand.  It stops after
    ``seconds_limit`` seconds even if jobs are left, and leaves no port,
    connection or delayed call of its own behind.

    :param reactor: the daemon's reactor, not yet running.
    :param jobs: how many jobs to run (0: none).
    :param seconds_limit: most seconds the jobs may take.
    :param max_frame: as the daemon's factories have it.
    :param frame_timeout: as the daemon's factories have it.
    :returns: how many jobs were answered, and in how long.
    :raises Exception: whatever went wrong (the ports and connections are
        closed first).
    """
    if jobs <= 0:
        return WarmUpResult(0, 0, 0.0)
    calls_before = set(reactor.getDelayedCalls())
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
    started = time.monotonic()
    try:
        ports.append(reactor.listenTCP(0, masters, interface="127.0.0.1"))
        ports.append(reactor.listenTCP(0, slaves, interface="127.0.0.1"))
        master_port, slave_port = (port.getHost().port for port in ports)
        deadline = started + seconds_limit

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
        if until(lambda: len(masters.connections) >= MASTERS
                 and all(m.open for m in load.masters)
                 and len(load.masters) == MASTERS):
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
                until(lambda: load.answered >= jobs)
        seconds = time.monotonic() - started
        return WarmUpResult(load.answered, jobs, seconds)
    finally:
        try:
            _close(reactor, load, connectors, ports, (masters, slaves), calls_before)
        finally:
            for logger, observer in zip(loggers, observers):
                logger.observer = observer
            del load, masters, slaves, scheduler
            # Everything the warm-up made is garbage now: collected at once,
            # PyPy's heap does not grow the first real load on top of it (a
            # daemon kept about 27 MB more after its first run without this).
            gc.collect()


def _close(reactor, load: _Load, connectors: list, ports: list, factories,
           calls_before: set) -> None:
    """Close every connection and port of the warm-up, and cancel what it
    left scheduled."""
    for client in load.masters + load.slaves:
        if client.open:
            client.transport.loseConnection()
    for connector in connectors:
        if connector.state == "connecting":
            connector.stopConnecting()
    for factory in factories:
        for connection in list(factory.connections):
            connection.close()
    stopped = [port.stopListening() for port in ports]
    deadline = time.monotonic() + CLOSE_LIMIT
    aborted = False

    def left() -> list:
        return [call for call in reactor.getDelayedCalls()
                if call.active() and call not in calls_before]

    def open_connections() -> bool:
        return (any(factory.connections for factory in factories)
                or any(client.open for client in load.masters + load.slaves)
                or any(connector.state != "disconnected" for connector in connectors))

    while open_connections() or left() or not all(d is None or d.called for d in stopped):
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
    for call in left():
        call.cancel()
