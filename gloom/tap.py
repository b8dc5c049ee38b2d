"""``twistd gloom``: command-line options and the service they build.

The twistd plugin and ``etc/gloom.tac`` both call `makeService`, so the two
ways of running the daemon cannot drift apart.
"""

from __future__ import annotations

import os
import platform
import signal
import sys
import threading
import time
from typing import Callable, Optional

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet import endpoints
from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure
from zope.interface import implementer

import gloom
from gloom import transport, wire
from gloom import detached as detached_jobs
from gloom.master import DEFAULT_MAX_DETACHED, DEFAULT_MAX_QUEUED, MasterFactory
from gloom.protocol import DEFAULT_FRAME_TIMEOUT, Outbox, address_name
from gloom.scheduler import DEFAULT_BACKOFF, DEFAULT_BACKOFF_MAX, Scheduler
from gloom.slave import SlaveFactory

DEFAULT_MASTER = "tcp:9998:interface=127.0.0.1"
DEFAULT_SLAVE = "tcp:9999:interface=127.0.0.1"
DEFAULT_RETRIES = 3

# How long stopping waits for clients to read their last frames.
CLOSE_TIMEOUT = 5.0

# Synthetic jobs run at start-up under PyPy by default (--warm-up).
DEFAULT_WARM_UP_PYPY = 30000

# The stats action and /status list at most this many types (the busiest).
STATS_TYPES_LIMIT = 1000


def _frame_size(value: str) -> int:
    size = _whole_number(value, "--max-frame")
    if not 1 <= size <= wire.FRAME_LIMIT:
        raise ValueError(f"--max-frame must be between 1 and {wire.FRAME_LIMIT} bytes, not {size}")
    return size


def _seconds_up_to(option: str, most: float):
    """A coercer for an option of seconds: positive, finite, at most ``most``."""

    def seconds(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"{option} takes a number of seconds, not {value!r}") from None
        if not 0 < number <= most:
            raise ValueError(
                f"{option} must be a positive number of seconds, at most {most:g}, not {value}")
        return number

    return seconds


def _count_from(option: str, least: int):
    """A coercer for an option of a whole number, at least ``least``."""

    def count(value: str) -> int:
        number = _whole_number(value, option)
        if number < least:
            limit = "not be negative" if least == 0 else f"be at least {least}"
            raise ValueError(f"{option} must {limit}, not {number}")
        return number

    return count


def default_warm_up(implementation: str) -> int:
    """How many synthetic jobs warm the daemon up by default: PyPy's JIT
    needs them to compile the hot path before the first real jobs; CPython
    has no JIT to warm."""
    return DEFAULT_WARM_UP_PYPY if implementation == "PyPy" else 0


def _journal_sync(value: str) -> str:
    if value not in ("full", "normal"):
        raise ValueError(f"--journal-sync takes full or normal, not {value!r}")
    return value


def _whole_number(value: str, option: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{option} takes a whole number, not {value!r}") from None


class Options(usage.Options):
    """Options of ``twistd gloom``.

    Each option's help is one sentence without a final stop, which
    ``usage.Options`` follows with ``[default: ...]`` (written out here
    for the options whose default is None).  The coercers have no
    ``coerceDoc``, which ``usage.Options`` would add after the default as
    a sentence of its own; what values they take is said in the help.
    """

    synopsis = "[options]"
    longdesc = (
        "Run the Gloom job daemon: masters submit jobs on one endpoint, "
        "slaves take them on another. Endpoints are Twisted endpoint strings, "
        "e.g. tcp:9998:interface=0.0.0.0 to listen on every interface."
    )
    optFlags = [
        ["admin", None,
         "Let masters pause, resume and clear types and drain the daemon "
         "[default: off, refused with forbidden]"],
    ]

    optParameters = [
        ["master", None, DEFAULT_MASTER, "Endpoint where masters connect"],
        ["slave", None, DEFAULT_SLAVE, "Endpoint where slaves connect"],
        ["max-frame", None, wire.DEFAULT_MAX_FRAME,
         f"Largest frame a peer may send, in bytes (1 to {wire.FRAME_LIMIT})", _frame_size],
        ["retries", None, DEFAULT_RETRIES,
         "Times a job is queued again after its slave disconnects or its attempt times out "
         "(0 or more)", _count_from("--retries", 0)],
        ["job-timeout", None, None,
         "Seconds one attempt of a job may run when its submit names no timeout "
         f"(a positive number up to {wire.MAX_TIMEOUT}, which is 30 days) [default: no limit]",
         _seconds_up_to("--job-timeout", wire.MAX_TIMEOUT)],
        ["frame-timeout", None, DEFAULT_FRAME_TIMEOUT,
         "Seconds a connection may stay part way through a frame or a TLS handshake "
         f"without sending more before it is closed (a positive number up to {wire.MAX_TIMEOUT})",
         _seconds_up_to("--frame-timeout", wire.MAX_TIMEOUT)],
        ["max-queued", None, DEFAULT_MAX_QUEUED,
         "Unfinished (queued or running) jobs one master may have at once (1 or more)",
         _count_from("--max-queued", 1)],
        ["retry-backoff", None, DEFAULT_BACKOFF,
         "Seconds before the first retry of a detached job (or of a job submitted with "
         "backoff); each retry waits twice as long, less a random part of up to a half",
         _seconds_up_to("--retry-backoff", wire.MAX_TIMEOUT)],
        ["retry-backoff-max", None, DEFAULT_BACKOFF_MAX,
         "Most seconds a retry waits", _seconds_up_to("--retry-backoff-max", wire.MAX_TIMEOUT)],
        ["keep-results", None, detached_jobs.DEFAULT_KEEP_RESULTS,
         "Seconds the end (answer or reason) of a detached job is kept for status",
         _seconds_up_to("--keep-results", wire.MAX_TIMEOUT)],
        ["keep-results-max", None, detached_jobs.DEFAULT_KEEP_RESULTS_MAX,
         "Most ends of detached jobs kept at once, the oldest dropped first (0 or more)",
         _count_from("--keep-results-max", 0)],
        ["keep-results-bytes", None, detached_jobs.DEFAULT_KEEP_RESULTS_BYTES,
         "Most bytes of answers of detached jobs kept at once (0 or more)",
         _count_from("--keep-results-bytes", 0)],
        ["dead-max", None, detached_jobs.DEFAULT_DEAD_MAX,
         "Most detached jobs kept on the dead list, the oldest dropped first "
         "(0: none; such jobs end failed)", _count_from("--dead-max", 0)],
        ["max-detached", None, DEFAULT_MAX_DETACHED,
         "Most detached jobs queued, delayed or running at once (1 or more)",
         _count_from("--max-detached", 1)],
        ["journal", None, None,
         "SQLite file keeping detached, delayed and dead jobs and kept results across "
         "restarts [default: off, nothing on disk]"],
        ["journal-sync", None, "normal",
         "How hard each journal commit is synced: full survives a power cut, normal a crash "
         "of the daemon (full or normal)",
         _journal_sync],
        ["http", None, None,
         "Endpoint serving /status (JSON), /metrics (Prometheus) and the JSON API under /api/, "
         "e.g. tcp:9997:interface=127.0.0.1 [default: off]"],
        ["admin-token-file", None, None,
         "File holding the bearer token (at least 16 characters) that allows the actions "
         "(POSTs) of the HTTP API under /api/ [default: none, read-only unless the http "
         "endpoint is mtls:]"],
        ["admin-endpoint", None, None,
         "Another endpoint for masters, on which the administrative actions are always "
         "allowed, e.g. unix:/run/gloom/admin.sock or an mtls: endpoint [default: off]"],
        ["warm-up", None, None,
         "Synthetic jobs run through the daemon over loopback before its ports open, so that "
         "PyPy's JIT has compiled the hot path when the first real jobs come (0 or more; "
         f"0: none) [default: {DEFAULT_WARM_UP_PYPY} on PyPy, 0 (none) on CPython]",
         _count_from("--warm-up", 0)],
    ]

    def opt_version(self) -> None:
        """Display Gloom's version and exit."""
        print(f"gloom {gloom.__version__}")
        sys.exit(0)

    def postOptions(self) -> None:
        from twisted.internet import reactor

        if self["journal"] is not None and not self["journal"].strip():
            raise usage.UsageError("--journal needs the path of a file")
        if self["admin-token-file"] is not None and not self["admin-token-file"].strip():
            raise usage.UsageError("--admin-token-file needs the path of a file")
        if self["admin-token-file"] is not None and self["http"] is None:
            raise usage.UsageError("--admin-token-file is for the --http API: give --http too")

        for role in ("master", "slave", "http", "admin-endpoint"):
            if self[role] is None:
                continue
            try:
                endpoints.serverFromString(reactor, self[role])
            except Exception as e:
                raise usage.UsageError(
                    f"--{role}: {self[role]!r} is not a usable endpoint: {e}"
                ) from None


@implementer(IStreamServerEndpoint)
class _ReportingEndpoint:
    """An endpoint that tells its `ListenService` how listening went."""

    def __init__(self, endpoint, service: "ListenService"):
        """
        :param endpoint: the server endpoint that listens.
        :param service: told through its ``listened`` and ``refused``.
        """
        self.endpoint = endpoint
        self.service = service

    def listen(self, factory):
        return self.endpoint.listen(factory).addCallbacks(self.service.listened,
                                                          self.service.refused)


class ListenService(StreamServerEndpointService):
    """Twisted's endpoint service, saying what it listens for.  A port that
    cannot be bound stops start-up with one clear line (twistd prints a
    ``SystemExit`` message as its own start-up errors) instead of a daemon
    that serves nothing; one that fails later, with an endpoint that
    listens asynchronously, stops the reactor."""

    log = Logger()

    def __init__(self, role: str, description: str, endpoint, factory, reactor):
        """
        :param role: ``master``, ``slave`` or ``http``: the service's name.
        :param description: the endpoint string, for messages.
        :param endpoint: the server endpoint to listen on.
        :param factory: the protocol factory to listen with.
        :param reactor: stopped if listening fails after start-up.
        """
        StreamServerEndpointService.__init__(self, _ReportingEndpoint(endpoint, self), factory)
        self.name = role
        self.audience = {"master": "masters", "slave": "slaves",
                         "admin-endpoint": "administrators"}.get(role, role.upper())
        self.description = description
        self.reactor = reactor
        self.port = None
        self._starting = False
        self._refusal: Optional[str] = None

    def privilegedStartService(self) -> None:
        self._starting = True
        try:
            StreamServerEndpointService.privilegedStartService(self)
        finally:
            self._starting = False
        if self._refusal is not None:
            raise SystemExit(self._refusal)

    def listened(self, port):
        """The endpoint is listening on ``port``."""
        self.port = port
        self.log.info("Listening for {audience} on {address} ({description})",
                      audience=self.audience, address=address_name(port.getHost()),
                      description=self.description)
        return port

    def refused(self, failure: Failure) -> None:
        """The endpoint could not listen: say why, in one line."""
        if failure.check(CancelledError):
            return None
        error = failure.value
        if isinstance(error, CannotListenError) and error.socketError is not None:
            error = error.socketError
        self._refusal = f"gloom: cannot listen for {self.audience} on {self.description}: {error}"
        if not self._starting:
            self.log.critical("{message}", message=self._refusal)
            self.reactor.stop()
        return None

    def stopService(self):
        self.port = None
        return StreamServerEndpointService.stopService(self)


def nursery_advice(implementation: str, environ) -> Optional[str]:
    """Under PyPy without PYPY_GC_NURSERY, what to set and why (PyPy reads
    it only at start-up, so the daemon cannot set it for itself)."""
    if implementation != "PyPy" or environ.get("PYPY_GC_NURSERY"):
        return None
    return ("PYPY_GC_NURSERY is not set: with PYPY_GC_NURSERY=32MB in the environment "
            "PyPy carries more jobs per second at lower latency (see Running on PyPy "
            "in the README)")


class GloomService(MultiService):
    """The whole daemon: a scheduler and its two listeners.

    Stopping stops listening, fails every unfinished job (masters get a
    ``shutdown`` frame for each), then closes every connection once its
    last frames are written.
    """

    log = Logger()

    name = "gloom"

    def __init__(self, scheduler: Scheduler, factories, reactor, warm_up: int = 0):
        """
        :param scheduler: the daemon's scheduler, started and stopped as a child.
        :param factories: the master and slave factories, in that order,
            then the admin endpoint's master factory if there is one.
        :param reactor: the reactor, for the clock.
        :param warm_up: how many synthetic jobs to run (see `gloom.warmup`)
            before the ports open; 0: none.
        """
        MultiService.__init__(self)
        self.warm_up = warm_up
        self.scheduler = scheduler
        self.factories = factories
        self.detached = factories[0].detached
        self.reactor = reactor
        self.started_at = reactor.seconds()
        self.stop_reactor: Callable[[], None] = getattr(reactor, "stop", lambda: None)
        """How the daemon ends itself once drained (the reactor's ``stop``)."""
        self._previous_usr1 = None
        self.series = None
        """The time series of the --http API (a `gloom.series.Series`), started
        and stopped with the daemon; None without --http."""
        scheduler.setServiceParent(self)
        for factory in factories[:1] + factories[2:]:
            factory.drain = self.drain

    def drain(self) -> Deferred:
        """Take no new jobs (submits are refused with ``shutdown``), finish
        the queued and running ones, then stop the reactor, so the daemon
        exits 0 (the ``drain`` action and SIGUSR1).

        :returns: a Deferred that fires once the jobs are finished.
        """
        first = not self.scheduler.draining
        drained = self.scheduler.drain()
        if first:
            self.log.info("Draining: no new jobs; stopping once the {count} queued and running "
                          "jobs are finished", count=self.scheduler.waited_for())
            drained.addCallback(self._drained)
        return drained

    def _drained(self, _) -> None:
        if self.running:
            self.log.info("Drained: every job is finished; stopping")
            self.stop_reactor()

    def _usr1(self, signum, frame) -> None:
        """SIGUSR1: drain (the handler runs between bytecodes; the drain
        runs in the reactor's turn).  Once the daemon is stopping, it is
        ignored, rather than left to the default action, which would kill
        the daemon in the middle of its shutdown."""
        self.reactor.callFromThread(self._usr1_in_reactor)

    def _usr1_in_reactor(self) -> None:
        if self.running:
            self.drain()
        else:
            self.log.info("SIGUSR1: the daemon is stopping already")

    def startService(self) -> None:
        """Start, and drain on SIGUSR1 (when started in the main thread)."""
        MultiService.startService(self)
        if self.series is not None:
            self.series.start()
        if hasattr(signal, "SIGUSR1") and threading.current_thread() is threading.main_thread():
            self._previous_usr1 = signal.signal(signal.SIGUSR1, self._usr1)

    def stopService(self):
        if self.series is not None:
            self.series.stop()
        stopped = MultiService.stopService(self)
        stopped.addCallback(self._settle_journal)
        stopped.addCallback(lambda _: self._close_connections())
        stopped.addBoth(self._close_journal)
        return stopped

    def _settle_journal(self, result):
        """Before the connections close, write what the journal holds, so
        the detached submits it takes are acked (they run after a restart)."""
        if self.detached.journal is not None:
            self.detached.journal.settle()
        return result

    def _close_journal(self, result):
        """Once every connection is closed, write what the journal holds."""
        self.detached.stop()
        if self.detached.journal is not None:
            self.detached.journal.close()
        return result

    def privilegedStartService(self) -> None:
        self.log.info("Gloom {version} starting", version=gloom.__version__)
        advice = nursery_advice(platform.python_implementation(), os.environ)
        if advice:
            self.log.warn("{advice}", advice=advice)
        if not transport.direct_sends_available():
            self.log.warn("Connections write through Twisted's transport interface only, "
                          "with more system calls per job: {why}",
                          why=transport.why_direct_sends_unavailable())
        if self.warm_up:
            self._warm_up()
        self.started_at = self.reactor.seconds()
        MultiService.privilegedStartService(self)

    def _warm_up(self) -> None:
        """Run the synthetic jobs of ``--warm-up``; if that fails, say so in
        one line and start all the same (the daemon is only slower at first)."""
        from gloom import warmup

        masters = self.factories[0]
        try:
            result = warmup.warm_up(self.reactor, self.warm_up, max_frame=masters.max_frame,
                                    frame_timeout=masters.frame_timeout)
        except Exception as e:
            self.log.warn("warm-up skipped: {error}", error=f"{type(e).__name__}: {e}")
            return
        self.log.info("Warmed up: {jobs} jobs in {seconds:.1f} s{short}", jobs=result.jobs,
                      seconds=result.seconds,
                      short="" if result.complete else
                      f" (of {result.wanted}: stopped at the {warmup.DEFAULT_SECONDS_LIMIT:g} s "
                      "limit)")

    def stats(self, types_limit: Optional[int] = STATS_TYPES_LIMIT) -> dict:
        """What the stats action and /status report: the ``types_limit``
        busiest types (all with None), and how many more there are."""
        masters, slaves = self.factories[:2]
        admins = self.factories[2:]
        names = self.scheduler.type_names()
        types = self.scheduler.types(types_limit, names)
        return {
            "version": gloom.__version__,
            "uptime": round(self.reactor.seconds() - self.started_at, 3),
            "masters": len(masters.connections) + sum(len(f.connections) for f in admins),
            "slaves": len(slaves.connections),
            "types": types,
            "types_omitted": len(names) - len(types),
            "totals": {**self.scheduler.totals, **self.detached.totals,
                       "progress_replaced": masters.progress_replaced
                       + sum(f.progress_replaced for f in admins)},
            "paused": sorted(self.scheduler.paused),
            "draining": self.scheduler.draining,
            "delayed": self.scheduler.delayed(),
            "detached": self.detached.stats(),
            "journal": self.detached.journal.stats() if self.detached.journal is not None else None,
        }

    def _close_connections(self):
        return gatherResults([f.close_all(CLOSE_TIMEOUT) for f in self.factories])


def _detached_jobs(config, scheduler: Scheduler, reactor) -> detached_jobs.DetachedJobs:
    """The daemon's detached jobs, with the journal's loaded if there is
    one.  A journal that cannot be used stops start-up with one line."""
    def setting(name, default):
        value = config.get(name)
        return default if value is None else value

    journal = None
    path = config.get("journal")
    if path:
        from twisted.internet.interfaces import IReactorThreads

        from gloom.journal import Journal, JournalOpenError

        try:
            journal = Journal(path, setting("journal-sync", "normal"), clock=reactor,
                              threads=reactor if IReactorThreads.providedBy(reactor) else None)
            journal.lock()
        except JournalOpenError as e:
            if journal is not None:
                journal.close()
            raise SystemExit(str(e)) from None
    detached = detached_jobs.DetachedJobs(
        scheduler, reactor, journal,
        keep_results=setting("keep-results", detached_jobs.DEFAULT_KEEP_RESULTS),
        keep_results_max=setting("keep-results-max", detached_jobs.DEFAULT_KEEP_RESULTS_MAX),
        keep_results_bytes=setting("keep-results-bytes", detached_jobs.DEFAULT_KEEP_RESULTS_BYTES),
        dead_max=setting("dead-max", detached_jobs.DEFAULT_DEAD_MAX))
    if journal is not None:
        started = time.monotonic()
        counts = detached.load(journal.load())
        Logger().info("Journal {path}: loaded {total} jobs ({counts}) in {seconds:.2f} s",
                      path=path, total=sum(counts.values()),
                      counts=", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
                      or "none", seconds=time.monotonic() - started)
    return detached


MIN_ADMIN_TOKEN = 16
"""Fewest characters of the admin token (``--admin-token-file``)."""


def admin_token(path: str) -> bytes:
    """The admin token in the file ``path``, surrounding whitespace stripped.

    :param path: the ``--admin-token-file``.
    :raises SystemExit: with one line, if the file cannot be read, or its
        token is empty or shorter than `MIN_ADMIN_TOKEN` characters.
    """
    try:
        with open(path, "rb") as f:
            token = f.read(64 * 1024 + 1).strip()
    except OSError as e:
        raise SystemExit(f"gloom: cannot read --admin-token-file {path}: "
                         f"{e.strerror or e}") from None
    if not token:
        raise SystemExit(f"gloom: --admin-token-file {path} is empty: put a token of at least "
                         f"{MIN_ADMIN_TOKEN} characters in it")
    if len(token) < MIN_ADMIN_TOKEN:
        raise SystemExit(f"gloom: the token in --admin-token-file {path} is {len(token)} "
                         f"characters long; it needs at least {MIN_ADMIN_TOKEN}")
    if len(token) > 64 * 1024 or any(byte < 0x21 or byte > 0x7e for byte in token):
        raise SystemExit(f"gloom: the token in --admin-token-file {path} must be one line of "
                         "printable ASCII without spaces, at most 65536 characters")
    return token


def makeService(config, reactor: Optional[object] = None) -> GloomService:
    """Build the daemon from parsed `Options` (or any mapping with its keys;
    the keys added after the first release are optional)."""
    if reactor is None:
        from twisted.internet import reactor
    token = None
    if config.get("admin-token-file"):
        token = admin_token(config["admin-token-file"])
    scheduler = Scheduler(max_retries=config["retries"], clock=reactor,
                          default_timeout=config.get("job-timeout"),
                          backoff=config.get("retry-backoff") or DEFAULT_BACKOFF,
                          backoff_max=config.get("retry-backoff-max") or DEFAULT_BACKOFF_MAX)
    max_frame = config["max-frame"]
    frame_timeout = config.get("frame-timeout") or DEFAULT_FRAME_TIMEOUT
    outbox = Outbox(reactor)
    detached = _detached_jobs(config, scheduler, reactor)

    def master_factory(admin: bool) -> MasterFactory:
        return MasterFactory(scheduler, reactor, max_frame, outbox, frame_timeout,
                             max_queued=config.get("max-queued") or DEFAULT_MAX_QUEUED,
                             detached=detached,
                             max_detached=config.get("max-detached") or DEFAULT_MAX_DETACHED,
                             admin=admin)

    masters = master_factory(bool(config.get("admin")))
    slaves = SlaveFactory(scheduler, reactor, max_frame, outbox, frame_timeout)
    factories = [masters, slaves]
    listeners = [("master", masters), ("slave", slaves)]
    if config.get("admin-endpoint"):
        admins = master_factory(True)
        factories.append(admins)
        listeners.append(("admin-endpoint", admins))
    # Options gives None for the platform's default; a mapping without the
    # key (a caller from before the option) gets no warm-up.
    warm_up = config.get("warm-up", 0)
    if warm_up is None:
        warm_up = default_warm_up(platform.python_implementation())
    root = GloomService(scheduler, tuple(factories), reactor, warm_up)
    for factory in factories[:1] + factories[2:]:
        factory.stats = root.stats
    if config.get("http"):
        from prometheus_client import CollectorRegistry

        from gloom.http import LatencyHistogram, make_site
        from gloom.series import Series

        registry = CollectorRegistry()
        latency = LatencyHistogram(registry)
        # The series reads the latency histogram once a second: no more
        # work per answered job than the histogram already does.
        series = root.series = Series(reactor, scheduler, latency)

        def unused(job_type: str) -> None:
            latency.forget(job_type)
            series.forget(job_type)

        scheduler.on_answer = latency.observe
        scheduler.on_failure = series.failed
        scheduler.on_type_unused = unused
        site = make_site(root.stats, latency, registry, service=root, series=series,
                         admin_token=token,
                         mtls=config["http"].strip().lower().startswith("mtls:"))
        listeners.append(("http", site))
    for role, factory in listeners:
        endpoint = endpoints.serverFromString(reactor, config[role])
        ListenService(role, config[role], endpoint, factory, reactor).setServiceParent(root)
    return root
