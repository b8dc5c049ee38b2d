"""``--http``: the daemon's figures as JSON (/status) and in Prometheus text
format (/metrics), served from the reactor thread so a scrape reads a
consistent snapshot without locks."""

from __future__ import annotations

import json
from typing import Callable, Set

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.web.pages import notFound
from twisted.web.resource import Resource
from twisted.web.server import Site

from gloom.scheduler import TOTALS

DETACHED_TOTALS = ("detached", "dead", "dead_dropped", "results_dropped", "progress_replaced")
"""The totals of detached jobs (and of progress held for masters that do
not read), besides the scheduler's `TOTALS`."""

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1, 2.5, 5, 10, 30, 60, 300, 900, 3600)

_TOTAL_HELP = {
    "submitted": "Jobs accepted from masters.",
    "completed": "Jobs answered by a slave, the answer delivered to their master.",
    "failed": "Jobs that ended in a job_failed error (slave fail, or retries used up).",
    "cancelled": "Jobs withdrawn by cancel, by their master disconnecting or by the daemon stopping.",
    "retried": "Times a job was queued again after losing its slave or timing out.",
    "timed_out": "Attempts given up for running past their timeout.",
    "released": "Jobs a slave handed back unrun (release), queued again at the front.",
    "delayed": "Jobs submitted with a delay or a start time.",
    "coalesced": "Submits with a unique key that joined a job already queued or running.",
    "progress": "Progress reports slaves sent on the jobs they hold.",
    "touched": "Touches: slaves restarting the timeout of the job they hold.",
    "cleared": "Queued and delayed jobs ended by an administrator's clear.",
    "progress_replaced": "Progress reports replaced, unsent, by a later one while their master "
                         "was not reading.",
    "detached": "Detached jobs accepted (submitted, retried from the dead list, or loaded).",
    "dead": "Detached jobs that used up their retries and went to the dead list.",
    "dead_dropped": "Dead jobs dropped, oldest first, to keep the dead list within --dead-max.",
    "results_dropped": "Kept ends of detached jobs dropped early to stay within their bounds.",
}

_DETACHED_HELP = {
    "live": "Detached jobs queued, delayed or running.",
    "results": "Ends of detached jobs kept for status.",
    "results_bytes": "Bytes of answers kept for status.",
    "dead": "Jobs on the dead list.",
}

_JOURNAL_HELP = {
    "bytes": "Bytes of the journal on disk (database and write-ahead log).",
    "commits": "Group commits written to the journal.",
    "errors": "Journal commits that failed.",
    "last_commit_ms": "Milliseconds the last journal commit took.",
    "max_commit_ms": "Most milliseconds a journal commit took.",
}


class StatsCollector:
    """Counters and gauges read from the daemon's stats at scrape time (a
    ``prometheus_client`` custom collector).

    :param stats: returns the daemon's figures, as /status shows them but
        with every type included (the daemon's ``GloomService.stats``, in
        ``gloom.tap``, with ``types_limit=None``).
    """

    def __init__(self, stats: Callable[[], dict]):
        self.stats = stats

    def collect(self):
        """Read the figures once and yield them as metric families: the job
        totals, the per-type queue and slave gauges, the connected masters
        and slaves, and the uptime."""
        figures = self.stats()
        for name in TOTALS + DETACHED_TOTALS:
            counter = CounterMetricFamily(f"gloom_jobs_{name}", _TOTAL_HELP[name])
            counter.add_metric([], figures["totals"][name])
            yield counter
        per_type = {
            "queued": GaugeMetricFamily("gloom_jobs_queued", "Jobs waiting for a slave.", labels=["type"]),
            "delayed": GaugeMetricFamily("gloom_jobs_delayed", "Jobs waiting for their time to run.",
                                         labels=["type"]),
            "running": GaugeMetricFamily("gloom_jobs_running", "Jobs held by a slave.", labels=["type"]),
            "idle_slaves": GaugeMetricFamily("gloom_slaves_idle", "Slaves waiting for a job.", labels=["type"]),
            "busy_slaves": GaugeMetricFamily("gloom_slaves_busy", "Slaves holding a job.", labels=["type"]),
            "paused": GaugeMetricFamily("gloom_type_paused", "1 if the type is paused, else 0.",
                                        labels=["type"]),
        }
        for job_type, counts in figures["types"].items():
            for key, gauge in per_type.items():
                gauge.add_metric([job_type], int(counts[key]))
        yield from per_type.values()
        draining = GaugeMetricFamily("gloom_draining", "1 while the daemon drains, else 0.")
        draining.add_metric([], int(figures.get("draining", False)))
        yield draining
        for name, help_text in _DETACHED_HELP.items():
            gauge = GaugeMetricFamily(f"gloom_detached_{name}", help_text)
            gauge.add_metric([], figures["detached"][name])
            yield gauge
        journal = figures.get("journal")
        if journal is not None:
            for name, help_text in _JOURNAL_HELP.items():
                family = CounterMetricFamily if name in ("commits", "errors") else GaugeMetricFamily
                metric = family(f"gloom_journal_{name}", help_text)
                metric.add_metric([], journal[name] or 0)
                yield metric
        for role in ("masters", "slaves"):
            gauge = GaugeMetricFamily(f"gloom_{role}_connected", f"Connected {role}.")
            gauge.add_metric([], figures[role])
            yield gauge
        uptime = GaugeMetricFamily("gloom_uptime_seconds", "Seconds since the daemon started.")
        uptime.add_metric([], figures["uptime"])
        yield uptime


class LatencyHistogram:
    """Seconds from submit to answer, per type.  A type's series is dropped
    (`forget`, called by the scheduler) as soon as the type has no jobs and
    no slaves, so short-lived type names do not accumulate.

    :param registry: the Prometheus registry the histogram is registered in.
    """

    def __init__(self, registry: CollectorRegistry):
        self.histogram = Histogram("gloom_job_latency_seconds", "Seconds from submit to answer.",
                                   ["type"], registry=registry, buckets=LATENCY_BUCKETS)
        self._types: Set[str] = set()

    def observe(self, job_type: str, seconds: float) -> None:
        """Count one answered job.

        :param job_type: the job's type, the series' ``type`` label.
        :param seconds: how long the job took from submit to answer.
        """
        self.histogram.labels(job_type).observe(seconds)
        self._types.add(job_type)

    def forget(self, job_type: str) -> None:
        """Drop the series of ``job_type``, if it has one."""
        if job_type in self._types:
            self._types.discard(job_type)
            self.histogram.remove(job_type)

    def __len__(self) -> int:
        """How many types have a series."""
        return len(self._types)


class _Page(Resource):
    """A page of figures, built afresh for each request."""

    isLeaf = True

    def __init__(self, content_type: str, render: Callable[[], bytes]):
        super().__init__()
        self.content_type = content_type
        self.render_body = render

    def render_GET(self, request):
        request.setHeader(b"Content-Type", self.content_type.encode())
        return self.render_body()

    def render_HEAD(self, request):
        """The headers of GET, the length of its body included, and no
        body (Twisted Web warns of a HEAD that returns one)."""
        body = self.render_GET(request)
        request.setHeader(b"Content-Length", b"%d" % len(body))
        return b""


class _Root(Resource):
    def getChild(self, path, request):
        return notFound()


class _QuietSite(Site):
    """No access log line per request: scrapes come every few seconds."""

    def log(self, request):
        pass


def make_site(stats: Callable[[], dict], latency: LatencyHistogram,
              registry: CollectorRegistry) -> Site:
    """The HTTP site: /status (JSON) and /metrics (Prometheus).

    :param stats: returns the daemon's figures (``GloomService.stats``);
        called with no argument for /status and with ``types_limit=None``
        (every type) for /metrics.
    :param latency: the job latency histogram; it is in ``registry``
        already, which is how /metrics shows it.
    :param registry: the Prometheus registry /metrics renders; the figures
        of ``stats`` are added to it.
    :returns: a site with no per-request access log.
    """

    def status() -> bytes:
        return json.dumps(stats(), indent=2).encode() + b"\n"

    def metrics() -> bytes:
        return generate_latest(registry)

    registry.register(StatsCollector(lambda: stats(types_limit=None)))
    root = _Root()
    root.putChild(b"status", _Page("application/json", status))
    root.putChild(b"metrics", _Page(CONTENT_TYPE_LATEST, metrics))
    site = _QuietSite(root)
    site.noisy = False
    return site
