"""``gloom bench``: drive running daemons with masters that keep a window
of jobs in flight and slaves that echo them, then report throughput and
latency percentiles.  In drain mode one master first queues every job (at
random priorities) with no slave present, then the slaves drain the queue:
the cost of the priority queue at depth.

Each load master has a connection to every daemon and deals its jobs to
them in turn; each echo slave has a connection to every daemon.  The
connections are minimal protocols on Int32StringReceiver and `gloom.core`,
with the fastest JSON encoder at hand, so the client costs the daemon as
little CPU time as it can.
"""

from __future__ import annotations

import json
import random
import struct
import time
from typing import Any, List, Optional

from twisted.internet import defer, task
from twisted.internet.defer import CancelledError
from twisted.internet.protocol import Factory
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure

from gloom import core
from gloom.core import ProtocolError, TransportError
from gloom.txclient import client_endpoint, describe_failure

try:
    from msgspec.json import encode as _encode
except ImportError:  # PyPy: the standard library does the work
    _encode = None

_HEADER = struct.Struct("!I")


def _frame(message: dict) -> bytes:
    if _encode is not None:
        data = _encode(message)
        return _HEADER.pack(len(data)) + data
    return core.frame(message)


class _BenchConnection(Int32StringReceiver):
    """A bench connection: frames in, decoded by `gloom.core.decode`,
    handed to its owner; frames out, encoded as fast as possible."""

    MAX_LENGTH = core.READ_LIMIT

    def connectionMade(self) -> None:
        setter = getattr(self.transport, "setTcpNoDelay", None)
        if setter is not None:
            try:
                setter(True)
            except OSError:
                pass
        self.owner = self.factory.owner
        self.owner.connected(self)

    def stringReceived(self, data: bytes) -> None:
        try:
            message = core.decode(data)
        except ProtocolError as e:
            self.owner.bench.errors.append({"error": "protocol_error", "reason": str(e)})
            self.transport.abortConnection()
            return
        self.owner.received(self, message)

    def send(self, message: dict) -> None:
        self.transport.write(_frame(message))

    def connectionLost(self, reason=None) -> None:
        self.owner.bench.connection_lost(self)


class _EchoSlave:
    """An echo slave: joins the bench's type on every daemon and answers
    each job with its own body, after ``reports`` progress reports."""

    def __init__(self, bench: "Bench"):
        self.bench = bench

    def connected(self, connection: _BenchConnection) -> None:
        connection.send({"action": "join", "type": self.bench.job_type})

    def received(self, connection: _BenchConnection, message: dict) -> None:
        if message.get("action") == "job":
            reports = self.bench.reports
            if reports:
                connection.transport.writeSequence(
                    [_frame({"action": "progress", "id": message["id"], "done": done,
                             "total": reports}) for done in range(reports)])
            connection.transport.write(_frame({"action": "respond", "id": message["id"],
                                               "body": message["body"]}))
        elif "error" in message:
            self.bench.errors.append(message)


class _LoadMaster:
    """A load master: keeps up to ``window`` jobs in flight, dealt to its
    connections (one per daemon) in turn."""

    def __init__(self, bench: "Bench", number: int):
        self.bench = bench
        self.connections: List[_BenchConnection] = []
        self.sent_at: dict = {}
        self.acked: set = set()
        self.sequence = 0
        self.prefix = f"bench-{random.randrange(1 << 40):x}-{number}"
        self.priority = random.Random(1).randrange if bench.drain else None

    def connected(self, connection: _BenchConnection) -> None:
        self.connections.append(connection)

    def fill(self) -> None:
        bench = self.bench
        connections = self.connections
        count = len(connections)
        sent_at = self.sent_at
        while len(sent_at) < bench.window and bench.unsent > 0:
            bench.unsent -= 1
            self.sequence += 1
            job_id = f"{self.prefix}-{self.sequence}"
            sent_at[job_id] = time.perf_counter()
            message = {"action": "submit", "id": job_id, "type": bench.job_type, "body": bench.body}
            if self.priority is not None:
                message["priority"] = self.priority(-1000, 1000)
            connections[self.sequence % count].transport.write(_frame(message))

    def received(self, connection: _BenchConnection, message: dict) -> None:
        bench = self.bench
        job_id = message.get("id")
        if "progress" in message:
            bench.reports_received += 1
            return
        if message.get("ok"):
            self.acked.add(job_id)
            bench.settled_ack()
            return
        started = self.sent_at.pop(job_id, None)
        if job_id in self.acked:
            self.acked.discard(job_id)
        elif "error" in message:
            bench.settled_ack()  # a refused submit is settled too: it will not be drained
        if "error" in message:
            bench.errors.append(message)
        elif started is not None:
            bench.latencies.append(time.perf_counter() - started)
        bench.done += 1
        if bench.done >= bench.jobs:
            if not bench.finished.called:
                bench.finished.callback(None)
        else:
            self.fill()


def percentile(values: List[float], fraction: float) -> float:
    """The value below which ``fraction`` of the (sorted) values fall.

    :param values: the values, sorted, at least one.
    :param fraction: from 0 to 1; 0.5 for the median.
    """
    return values[min(len(values) - 1, int(fraction * len(values)))]


class BenchResult:
    """What a `Bench` run measured.

    :param jobs: how many jobs were settled: answered, failed or refused.
    :param seconds: how long answering them took (after queueing them, in
        drain mode).
    :param latencies: each answered job's seconds from submit to answer.
    :param errors: the error frames received, as dicts.
    :param settings: the run's ``masters``, ``slaves``, ``window``,
        ``body_size`` and ``daemons``, reported with the figures.
    :param queue_seconds: in drain mode, how long queueing every job took.
    :param interrupted: whether the run was stopped (`Bench.stop`) before
        every job was settled.
    :param planned: how many jobs the run was to settle.
    """

    def __init__(self, jobs: int, seconds: float, latencies: List[float], errors: list, settings: dict,
                 queue_seconds: Optional[float] = None, interrupted: bool = False,
                 planned: Optional[int] = None):
        self.jobs = jobs
        self.queue_seconds = queue_seconds
        self.seconds = seconds
        self.latencies = sorted(latencies)
        self.errors = errors
        self.settings = settings
        self.interrupted = interrupted
        self.planned = jobs if planned is None else planned

    @property
    def jobs_per_second(self) -> float:
        """Jobs settled per second."""
        return self.jobs / self.seconds if self.seconds else 0.0

    def figures(self) -> dict:
        """The figures as a JSON-able dict (``gloom bench --json``):
        throughput, latency percentiles in milliseconds, the error count and
        the settings (and ``"interrupted": true`` if the run was stopped)."""
        lat = self.latencies
        ms = (lambda f: round(percentile(lat, f) * 1000, 3)) if lat else (lambda f: None)
        return {"jobs": self.jobs, "seconds": round(self.seconds, 3),
                "jobs_per_s": round(self.jobs_per_second, 1), "p50_ms": ms(0.5), "p90_ms": ms(0.9),
                "p99_ms": ms(0.99), "max_ms": round(lat[-1] * 1000, 3) if lat else None,
                "errors": len(self.errors), **self.settings,
                **({"queue_seconds": round(self.queue_seconds, 3),
                    "queue_per_s": round(self.jobs / self.queue_seconds, 1)}
                   if self.queue_seconds else {}),
                **({"interrupted": True} if self.interrupted else {})}

    def table(self) -> str:
        """The figures as a few lines of text, as ``gloom bench`` prints them."""
        f = self.figures()
        daemons = f.get("daemons", 1)
        over = f" over {daemons} daemons" if daemons > 1 else ""
        count = f.get("reports", 0)
        reports = f", {count} progress report{'s' if count != 1 else ''} per job" if count else ""
        head = f"{f['jobs']} jobs in {f['seconds']} s: {f['jobs_per_s']:,.0f} jobs/s"
        if self.interrupted:
            head = f"interrupted after {f['jobs']} of {self.planned} jobs in {f['seconds']} s: " \
                   f"{f['jobs_per_s']:,.0f} jobs/s"
        lines = [
            head + (" drained" if self.queue_seconds else ""),
            f"latency ms: p50 {f['p50_ms']}  p90 {f['p90_ms']}  p99 {f['p99_ms']}  max {f['max_ms']}",
            f"({f['masters']} masters x {f['window']} in flight, {f['slaves']} slaves, "
            f"{f['body_size']}-byte bodies{reports}{over}; {f['errors']} errors)",
        ]
        if self.queue_seconds:
            lines.insert(1, f"queued first in {f['queue_seconds']} s: {f['queue_per_s']:,.0f} jobs/s")
            lines[-1] = (f"(1 master queued them all, then {f['slaves']} slaves drained them{over}; "
                         f"{f['errors']} errors)")
        if self.errors:
            lines.append(f"first error: {json.dumps(self.errors[0])}")
        return "\n".join(lines)


class Bench:
    """One benchmark run against daemons at the ``master``/``slave``
    addresses.  `stop` (or cancelling the Deferred `run` returns) ends it
    early with an interrupted `BenchResult`.

    :param reactor: the reactor to run on.
    :param master: the daemons' master ports: one address, a list, or a
        comma-separated string, each as `gloom.txclient.client_endpoint`
        takes it; None for the environment's or the default.
    :param slave: the daemons' slave ports, likewise.
    :param masters: how many load masters submit jobs (one in drain mode),
        each with a connection to every daemon.
    :param slaves: how many echo slaves answer them, each with a connection
        to every daemon.
    :param window: how many jobs each master keeps in flight (every job, in
        drain mode).
    :param body_size: the length of each job's body (a string), in
        characters.
    :param jobs: how many jobs in all.
    :param progress: a text file to draw a progress bar on, or None.
    :param drain: queue every job first, with no slave connected, then
        connect the slaves to drain the queue.
    :param reports: how many progress reports each slave sends on each
        job before its answer.
    :raises ValueError: if an address cannot be used.
    """

    def __init__(self, reactor, master=None, slave=None, masters=4, slaves=8, window=64, body_size=64,
                 jobs=20000, progress=None, drain=False, reports=0):
        self.reactor = reactor
        master_addresses = core.addresses(master, core.MASTERS_ENV, core.DEFAULT_MASTER)
        slave_addresses = core.addresses(slave, core.SLAVES_ENV, core.DEFAULT_SLAVE)
        self.master_endpoints = [(core.display_name(a), client_endpoint(reactor, a)) for a in master_addresses]
        self.slave_endpoints = [(core.display_name(a), client_endpoint(reactor, a)) for a in slave_addresses]
        self.drain = drain
        self.reports = reports
        self.reports_received = 0
        self.master_count, self.slave_count = (1 if drain else masters), slaves
        self.window, self.jobs = (jobs if drain else window), jobs
        self.acks = 0
        self.queued = defer.Deferred()
        self.body = "x" * body_size
        self.settings = {"masters": masters, "slaves": slaves, "window": window, "body_size": body_size,
                         "daemons": max(len(master_addresses), len(slave_addresses))}
        if reports:
            self.settings["reports"] = reports
        self.job_type = f"gloom-bench-{random.randrange(1 << 40):x}"
        self.progress = progress
        self.unsent = jobs
        self.done = 0
        self.latencies: List[float] = []
        self.errors: list = []
        self.masters: List[_LoadMaster] = []
        self.finished = defer.Deferred()
        self.interrupted = False
        self._connections: List[_BenchConnection] = []
        self._waiting: Optional[defer.Deferred] = None
        self._stop_waiters: List[defer.Deferred] = []
        self._ended = False

    # --- what the connections tell the bench -----------------------------------------------

    def settled_ack(self) -> None:
        """One more submit was acked or refused (drain mode waits for all)."""
        self.acks += 1
        if self.acks == self.jobs and not self.queued.called:
            self.queued.callback(None)

    def connection_lost(self, connection: _BenchConnection) -> None:
        """A connection closed: unless the run is over, it failed."""
        if not self.finished.called and not self.interrupted and not self._ended:
            self.finished.errback(TransportError("a daemon closed a bench connection"))

    # --- running ----------------------------------------------------------------------------

    def stop(self) -> defer.Deferred:
        """End the run early (on Ctrl-C): close the connections; `run`
        then fires with a `BenchResult` whose ``interrupted`` is True.  The
        reactor's shutdown calls it too.

        :returns: a Deferred that fires once the run has ended.
        """
        if self._ended:
            return defer.succeed(None)
        self.interrupted = True
        waiter = defer.Deferred()
        self._stop_waiters.append(waiter)
        if self._waiting is not None and not self._waiting.called:
            self._waiting.cancel()
        return waiter

    def _wait(self, deferred: defer.Deferred) -> defer.Deferred:
        """Await ``deferred`` so that `stop` can cancel it."""
        if self.interrupted:
            deferred.cancel()
        self._waiting = deferred
        return deferred

    @defer.inlineCallbacks
    def _connect(self, endpoint, name, owner):
        factory = Factory.forProtocol(_BenchConnection)
        factory.noisy = False
        factory.owner = owner
        try:
            connection = yield self._wait(endpoint.connect(factory))
        except Exception as e:
            if self.interrupted or isinstance(e, CancelledError):
                raise CancelledError() from None
            raise TransportError(f"cannot connect to {name}: {describe_failure(Failure(e))}", name)
        self._connections.append(connection)
        return connection

    @defer.inlineCallbacks
    def _connect_all(self, count, endpoints, make):
        for number in range(count):
            owner = make(number)
            for name, endpoint in endpoints:
                yield self._connect(endpoint, name, owner)

    def _draw(self, started: float) -> None:
        width = 30
        filled = int(width * self.done / self.jobs)
        elapsed = time.perf_counter() - started
        rate = self.done / elapsed if elapsed else 0
        self.progress.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.jobs} "
                            f"{rate:,.0f} jobs/s ")
        self.progress.flush()

    def _new_master(self, number: int) -> _LoadMaster:
        master = _LoadMaster(self, number)
        self.masters.append(master)
        return master

    def run(self) -> defer.Deferred:
        """Connect, run the jobs, disconnect.

        :returns: a Deferred that fires with the `BenchResult` (interrupted,
            if `stop` was called or the Deferred cancelled), or fails with
            `TransportError` if a connection cannot be made or is lost.
        """
        result = defer.Deferred(lambda d: self.stop())
        # A reactor shutting down mid-run (Ctrl-C) interrupts the run rather
        # than failing it for the connections it closes.
        trigger = self.reactor.addSystemEventTrigger("before", "shutdown", self.stop)
        self._run().addBoth(self._after_run, result, trigger)
        return result

    def _after_run(self, outcome: Any, result: defer.Deferred, trigger) -> None:
        self._ended = True
        try:
            self.reactor.removeSystemEventTrigger(trigger)
        except (ValueError, KeyError):
            pass  # it fired: the reactor is shutting down
        if not result.called:
            if isinstance(outcome, Failure):
                result.errback(outcome)
            else:
                result.callback(outcome)
        elif isinstance(outcome, Failure):
            outcome.trap(CancelledError)
        waiters, self._stop_waiters = self._stop_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    @defer.inlineCallbacks
    def _run(self):
        queue_seconds = None
        drawing: Optional[task.LoopingCall] = None
        started = seconds = None
        slave = _EchoSlave(self)
        try:
            if not self.drain:
                yield self._connect_all(self.slave_count, self.slave_endpoints, lambda n: slave)
            yield self._connect_all(self.master_count, self.master_endpoints, self._new_master)
            yield self._wait(task.deferLater(self.reactor, 0.05, lambda: None))
            started = time.perf_counter()
            if self.progress is not None:
                drawing = task.LoopingCall(self._draw, started)
                drawing.start(0.2)
            for master in self.masters:
                master.fill()
            if self.drain:
                yield self._wait(self.queued)
                queue_seconds = time.perf_counter() - started
                started = time.perf_counter()
                yield self._connect_all(self.slave_count, self.slave_endpoints, lambda n: slave)
            yield self._wait(self.finished)
            seconds = time.perf_counter() - started
        except CancelledError:
            self.interrupted = True
        finally:
            self._ended = True
            if drawing is not None:
                drawing.stop()
                self._draw(started)
                self.progress.write("\n")
            for connection in self._connections:
                connection.transport.loseConnection()
        if seconds is None:
            seconds = time.perf_counter() - started if started is not None else 0.0
        return BenchResult(self.done, seconds, self.latencies, self.errors, self.settings, queue_seconds,
                           interrupted=self.interrupted, planned=self.jobs)
