"""``gloom bench``: drive a running daemon with masters that keep a window
of jobs in flight and slaves that echo them, then report throughput and
latency percentiles.  In drain mode one master first queues every job (at
random priorities) with no slave present, then the slaves drain the queue:
the cost of the priority queue at depth."""

from __future__ import annotations

import json
import random
import time
from typing import List, Optional

from twisted.internet import defer, task
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

from gloom.client import TransportError
from gloom.txclient import _Connection, client_endpoint, describe_failure


try:
    from msgspec.json import encode as _encode
except ImportError:  # PyPy
    _encode = None


class _BenchConnection(_Connection):
    """Sends its own plain frames with the fastest encoder at hand."""

    if _encode is not None:
        def send(self, message: dict) -> None:
            self.sendString(_encode(message))


class _EchoSlave(_BenchConnection):
    def connectionMade(self):
        super().connectionMade()
        self.send({"action": "join", "type": self.factory.bench.job_type})

    def frameReceived(self, frame):
        if frame.get("action") == "job":
            self.send({"action": "respond", "id": frame["id"], "body": frame["body"]})
        elif "error" in frame:
            self.factory.bench.errors.append(frame)


class _LoadMaster(_BenchConnection):
    def connectionMade(self):
        super().connectionMade()
        self.bench = self.factory.bench
        self.sent_at = {}
        self.acked = set()
        self.sequence = 0
        self.prefix = f"bench-{random.randrange(1 << 40):x}-{len(self.bench.masters)}"
        self.bench.masters.append(self)

    def fill(self):
        bench = self.bench
        priority = random.Random(1).randrange if bench.drain else None
        while len(self.sent_at) < bench.window and bench.unsent > 0:
            bench.unsent -= 1
            self.sequence += 1
            job_id = f"{self.prefix}-{self.sequence}"
            self.sent_at[job_id] = time.perf_counter()
            message = {"action": "submit", "id": job_id, "type": bench.job_type, "body": bench.body}
            if priority is not None:
                message["priority"] = priority(-1000, 1000)
            self.send(message)

    def frameReceived(self, frame):
        bench = self.bench
        job_id = frame.get("id")
        if frame.get("ok"):
            self.acked.add(job_id)
            bench.acks += 1
            if bench.acks == bench.jobs and not bench.queued.called:
                bench.queued.callback(None)
            return
        started = self.sent_at.pop(job_id, None)
        if job_id in self.acked:
            self.acked.discard(job_id)
        elif "error" in frame:
            bench.acks += 1  # a refused submit is settled too: it will not be drained
            if bench.acks == bench.jobs and not bench.queued.called:
                bench.queued.callback(None)
        if "error" in frame:
            bench.errors.append(frame)
        elif started is not None:
            bench.latencies.append(time.perf_counter() - started)
        bench.done += 1
        if bench.done >= bench.jobs:
            if not bench.finished.called:
                bench.finished.callback(None)
        else:
            self.fill()

    def connectionLost(self, reason):
        if not self.bench.finished.called:
            self.bench.finished.errback(TransportError("the daemon closed a master connection"))


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
    :param settings: the run's ``masters``, ``slaves``, ``window`` and
        ``body_size``, reported with the figures.
    :param queue_seconds: in drain mode, how long queueing every job took.
    """

    def __init__(self, jobs: int, seconds: float, latencies: List[float], errors: list, settings: dict,
                 queue_seconds: Optional[float] = None):
        self.jobs = jobs
        self.queue_seconds = queue_seconds
        self.seconds = seconds
        self.latencies = sorted(latencies)
        self.errors = errors
        self.settings = settings

    @property
    def jobs_per_second(self) -> float:
        """Jobs settled per second."""
        return self.jobs / self.seconds if self.seconds else 0.0

    def figures(self) -> dict:
        """The figures as a JSON-able dict (``gloom bench --json``):
        throughput, latency percentiles in milliseconds, the error count and
        the settings."""
        lat = self.latencies
        ms = (lambda f: round(percentile(lat, f) * 1000, 3)) if lat else (lambda f: None)
        return {"jobs": self.jobs, "seconds": round(self.seconds, 3),
                "jobs_per_s": round(self.jobs_per_second, 1), "p50_ms": ms(0.5), "p90_ms": ms(0.9),
                "p99_ms": ms(0.99), "max_ms": round(lat[-1] * 1000, 3) if lat else None,
                "errors": len(self.errors), **self.settings,
                **({"queue_seconds": round(self.queue_seconds, 3),
                    "queue_per_s": round(self.jobs / self.queue_seconds, 1)}
                   if self.queue_seconds else {})}

    def table(self) -> str:
        """The figures as a few lines of text, as ``gloom bench`` prints them."""
        f = self.figures()
        lines = [
            f"{f['jobs']} jobs in {f['seconds']} s: {f['jobs_per_s']:,.0f} jobs/s"
            + (" drained" if self.queue_seconds else ""),
            f"latency ms: p50 {f['p50_ms']}  p90 {f['p90_ms']}  p99 {f['p99_ms']}  max {f['max_ms']}",
            f"({f['masters']} masters x {f['window']} in flight, {f['slaves']} slaves, "
            f"{f['body_size']}-byte bodies; {f['errors']} errors)",
        ]
        if self.queue_seconds:
            lines.insert(1, f"queued first in {f['queue_seconds']} s: {f['queue_per_s']:,.0f} jobs/s")
            lines[-1] = f"(1 master queued them all, then {f['slaves']} slaves drained them; {f['errors']} errors)"
        if self.errors:
            lines.append(f"first error: {json.dumps(self.errors[0])}")
        return "\n".join(lines)


class Bench:
    """One benchmark run against a daemon at ``master``/``slave`` addresses.

    :param reactor: the reactor to run on.
    :param master: the daemon's master port, as
        `gloom.txclient.client_endpoint` takes it.
    :param slave: the daemon's slave port, likewise.
    :param masters: how many master connections submit jobs (one in drain
        mode).
    :param slaves: how many slave connections echo them.
    :param window: how many jobs each master keeps in flight (every job, in
        drain mode).
    :param body_size: the length of each job's body (a string), in
        characters.
    :param jobs: how many jobs in all.
    :param progress: a text file to draw a progress bar on, or None.
    :param drain: queue every job first, with no slave connected, then
        connect the slaves to drain the queue.
    """

    def __init__(self, reactor, master, slave, masters=4, slaves=8, window=64, body_size=64,
                 jobs=20000, progress=None, drain=False):
        self.reactor = reactor
        self.master_endpoint = client_endpoint(reactor, master)
        self.slave_endpoint = client_endpoint(reactor, slave)
        self.addresses = (master, slave)
        self.drain = drain
        self.master_count, self.slave_count = (1 if drain else masters), slaves
        self.window, self.jobs = (jobs if drain else window), jobs
        self.acks = 0
        self.queued = defer.Deferred()
        self.body = "x" * body_size
        self.settings = {"masters": masters, "slaves": slaves, "window": window, "body_size": body_size}
        self.job_type = f"gloom-bench-{random.randrange(1 << 40):x}"
        self.progress = progress
        self.unsent = jobs
        self.done = 0
        self.latencies: List[float] = []
        self.errors: list = []
        self.masters: List[_LoadMaster] = []
        self.finished = defer.Deferred()

    @defer.inlineCallbacks
    def _connect(self, endpoint, protocol_class, address):
        factory = Factory.forProtocol(protocol_class)
        factory.bench = self
        try:
            connection = yield endpoint.connect(factory)
        except Exception as e:
            raise TransportError(f"cannot connect to {address}: {describe_failure(Failure(e))}")
        return connection

    def _draw(self, started: float) -> None:
        width = 30
        filled = int(width * self.done / self.jobs)
        elapsed = time.perf_counter() - started
        rate = self.done / elapsed if elapsed else 0
        self.progress.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.jobs} "
                            f"{rate:,.0f} jobs/s ")
        self.progress.flush()

    @defer.inlineCallbacks
    def _connect_all(self, count, endpoint, protocol_class, address, connections):
        for _ in range(count):
            connections.append((yield self._connect(endpoint, protocol_class, address)))

    @defer.inlineCallbacks
    def run(self):
        """Connect, run the jobs, disconnect.

        :returns: a Deferred that fires with the `BenchResult`, or fails
            with ``TransportError`` if a connection cannot be made or is
            lost.
        """
        connections = []
        queue_seconds = None
        drawing: Optional[task.LoopingCall] = None
        try:
            if not self.drain:
                yield self._connect_all(self.slave_count, self.slave_endpoint, _EchoSlave,
                                        self.addresses[1], connections)
            yield self._connect_all(self.master_count, self.master_endpoint, _LoadMaster,
                                    self.addresses[0], connections)
            yield task.deferLater(self.reactor, 0.05, lambda: None)
            started = time.perf_counter()
            if self.progress is not None:
                drawing = task.LoopingCall(self._draw, started)
                drawing.start(0.2)
            for master in self.masters:
                master.fill()
            if self.drain:
                yield self.queued
                queue_seconds = time.perf_counter() - started
                started = time.perf_counter()
                yield self._connect_all(self.slave_count, self.slave_endpoint, _EchoSlave,
                                        self.addresses[1], connections)
            yield self.finished
            seconds = time.perf_counter() - started
        finally:
            if drawing is not None:
                drawing.stop()
                self._draw(started)
                self.progress.write("\n")
            for connection in connections:
                connection.transport.loseConnection()
        return BenchResult(self.done, seconds, self.latencies, self.errors, self.settings, queue_seconds)
