"""``gloom bench``: drive running daemons with masters that keep a window
of jobs in flight and slaves that echo them, then report throughput and
latency percentiles.  In drain mode one master first queues every job (at
random priorities) with no slave present, then the slaves drain the queue:
the cost of the priority queue at depth.

Each load master is a `gloom.core.MasterCore` with a connection to every
daemon, routing each job as every Gloom master does (by its id's
rendezvous hash); each echo slave connection is a `gloom.core.WorkerCore`
of concurrency 1 on its daemon.  The connections are bare
Int32StringReceivers, so the client costs the daemon's machine little more
CPU time than the protocol itself.
"""

from __future__ import annotations

import json
import random
import time
from typing import Any, Dict, List, Optional

from twisted.internet import defer, task
from twisted.internet.defer import CancelledError
from twisted.internet.protocol import Factory
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure

from gloom import core
from gloom.core import ProtocolError, ServerError, TransportError
from gloom.txclient import client_endpoint, describe_failure


class _BenchConnection(Int32StringReceiver):
    """A bench connection to one daemon (its ``name``): frames in, decoded
    by `gloom.core.decode`, handed to its owner, a load master or an echo
    slave, whose core writes the frames out."""

    MAX_LENGTH = core.READ_LIMIT

    def connectionMade(self) -> None:
        setter = getattr(self.transport, "setTcpNoDelay", None)
        if setter is not None:
            try:
                setter(True)
            except OSError:
                pass
        self.name = self.factory.name
        self.owner = self.factory.owner
        self.owner.connected(self)

    def stringReceived(self, data: bytes) -> None:
        try:
            message = core.decode(data, self.name)
        except ProtocolError as e:
            self.owner.bench.errors.append({"error": "protocol_error", "reason": str(e)})
            self.transport.abortConnection()
            return
        try:
            self.owner.received(self, message)
        except ProtocolError as e:  # a frame that answers nothing
            self.owner.bench.errors.append({"error": "protocol_error", "reason": str(e)})
            self.transport.abortConnection()

    def connectionLost(self, reason=None) -> None:
        self.owner.bench.connection_lost(self)


def _error_entry(error: BaseException) -> dict:
    """An error as the bench lists it: the daemon's error frame's fields."""
    if isinstance(error, ServerError):
        return {"error": error.error, "reason": error.reason}
    return {"error": error.__class__.__name__, "reason": str(error)}


class _EchoSlave:
    """The echo slaves: each connection joins the bench's type on its
    daemon and answers each job with its own body, after ``reports``
    progress reports (a `gloom.core.WorkerCore` per connection)."""

    def __init__(self, bench: "Bench"):
        self.bench = bench

    def connected(self, connection: _BenchConnection) -> None:
        transport = connection.transport
        worker = core.WorkerCore(self.bench.job_type, 1, [connection.name],
                                 lambda link, data: transport.write(data), self._run,
                                 self._said, self._replied)
        connection.worker = worker
        connection.link = link = worker.links[0]
        link.handle = worker
        worker.link_up(link)  # it joins

    def received(self, connection: _BenchConnection, message: dict) -> None:
        connection.worker.received(connection.link, message)

    def _run(self, link: core.Link, job: core.Job) -> None:
        worker = link.handle
        reports = self.bench.reports
        for done in range(reports):
            worker.progress(link, job, done, reports)
        worker.finished(link, job, job.body)

    def _replied(self, link: core.Link, kind: str, error: Optional[ServerError]) -> None:
        if error is not None:
            self.bench.errors.append(_error_entry(error))

    def _said(self, text: str, fatal: bool) -> None:
        if fatal:
            self.bench.errors.append({"error": "worker_error", "reason": text})


class _LoadMaster:
    """A load master: a `gloom.core.MasterCore` over a connection to each
    daemon, keeping up to ``window`` jobs in flight."""

    def __init__(self, bench: "Bench", number: int):
        self.bench = bench
        self.connections: Dict[str, _BenchConnection] = {}
        self.core = core.MasterCore([name for name, _ in bench.master_endpoints], self._send,
                                    ended=self._ended, acked=self._acked, progressed=self._progressed)
        self.sequence = 0
        self.prefix = f"bench-{random.randrange(1 << 40):x}-{number}"
        self.priority = random.Random(1).randrange if bench.drain else None

    def connected(self, connection: _BenchConnection) -> None:
        self.connections[connection.name] = connection
        self.core.connected(connection.name)

    def _send(self, daemon: str, data: bytes) -> None:
        self.connections[daemon].transport.write(data)

    def received(self, connection: _BenchConnection, message: dict) -> None:
        self.core.received(connection.name, message)

    def fill(self) -> None:
        bench = self.bench
        submits = self.core
        jobs = submits.jobs
        submit = submits.submit
        priority = self.priority
        clock = time.perf_counter
        while len(jobs) < bench.window and bench.unsent > 0:
            bench.unsent -= 1
            self.sequence += 1
            started = clock()
            request = submit(bench.job_type, bench.body, None if priority is None else priority(-1000, 1000),
                             id=f"{self.prefix}-{self.sequence}")
            request.waiter = started

    def _acked(self, request: core.Request) -> None:
        self.bench.settled_ack()

    def _progressed(self, request: core.Request, progress: dict) -> None:
        self.bench.reports_received += 1

    def _ended(self, request: core.Request) -> None:
        bench = self.bench
        error = request.error
        if error is None:
            bench.latencies.append(time.perf_counter() - request.waiter)
        else:
            if not request.acked:
                bench.settled_ack()  # a refused submit is settled too: it will not be drained
            bench.errors.append(_error_entry(error))
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
            "latency ms: " + "  ".join(f"{name} {'-' if f[key] is None else f[key]}" for name, key in
                                      (("p50", "p50_ms"), ("p90", "p90_ms"), ("p99", "p99_ms"), ("max", "max_ms"))),
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
        factory.name = name
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
