"""``--http``: the daemon's figures as JSON (/status) and in Prometheus text
format (/metrics), and the JSON API under /api/ (figures, connections, job
lookup, and the administrative actions when the daemon has an admin
credential), all served from the reactor thread so a request reads a
consistent snapshot without locks."""

from __future__ import annotations

import hmac
import json
import os
import sys
from typing import Any, Callable, Optional, Set, Tuple

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.internet.interfaces import ISSLTransport
from twisted.logger import Logger
from twisted.web.pages import notFound
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from gloom import wire
from gloom.protocol import address_name
from gloom.quoting import quoted
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


DASHBOARD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dashboard")
"""Where the dashboard's files are (package data: the page loads nothing else)."""

_DASHBOARD_FILES = {b"": ("index.html", "text/html; charset=utf-8"),
                    b"dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
                    b"dashboard.css": ("dashboard.css", "text/css; charset=utf-8")}

_PAGE_HEADERS = (
    (b"Content-Security-Policy",
     b"default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'"),
    (b"X-Content-Type-Options", b"nosniff"),
    (b"Referrer-Policy", b"no-referrer"),
    (b"Cache-Control", b"no-cache"),
)


class _DashboardFile(Resource):
    """One of the dashboard's files, read once, served with headers that
    let it load only from the daemon itself."""

    isLeaf = True

    def __init__(self, name: str, content_type: str):
        super().__init__()
        with open(os.path.join(DASHBOARD, name), "rb") as file:
            self.body = file.read()
        self.content_type = content_type.encode()

    def render_GET(self, request):
        request.setHeader(b"Content-Type", self.content_type)
        for name, value in _PAGE_HEADERS:
            request.setHeader(name, value)
        return self.body

    def render_HEAD(self, request):
        """The headers of GET and no body."""
        self.render_GET(request)
        request.setHeader(b"Content-Length", b"%d" % len(self.body))
        return b""


class _Root(Resource):
    """``/``: the dashboard, and 404 for what is not there."""

    def __init__(self) -> None:
        super().__init__()
        self.files = {path: _DashboardFile(name, kind) for path, (name, kind) in _DASHBOARD_FILES.items()}

    def getChild(self, path, request):
        page = self.files.get(path)
        if page is not None and not request.postpath:
            return page
        return notFound()

    def render_GET(self, request):
        """``/`` itself is the dashboard's page."""
        return self.files[b""].render_GET(request)

    def render_HEAD(self, request):
        """The headers of ``/``."""
        return self.files[b""].render_HEAD(request)


MAX_BODY = 64 * 1024
"""The largest request body the HTTP endpoint reads: none of its requests
needs one, and a bigger one is refused before it is read."""


class _SmallRequest(Request):
    """A request whose body may not be bigger than `MAX_BODY`: a bigger one
    is answered 413 and the connection closed, before the body is read
    (Twisted would otherwise spool it to a temporary file first)."""

    _body_bytes = 0
    _refused = False

    def gotLength(self, length):
        if length is not None and length > MAX_BODY:
            super().gotLength(0)
            self._refuse()
            return
        super().gotLength(length)

    def handleContentChunk(self, data):
        if self._refused:
            return
        self._body_bytes += len(data)
        if self._body_bytes > MAX_BODY:
            self._refuse()
            return
        super().handleContentChunk(data)

    def _refuse(self) -> None:
        self._refused = True
        body = wire.encode_value({"error": "too_large",
                                  "reason": f"a request body may be at most {MAX_BODY} bytes"})
        transport = self.channel.transport
        transport.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        transport.loseConnection()


class _QuietSite(Site):
    """No access log line per request: scrapes come every few seconds.
    Request bodies are limited to `MAX_BODY` bytes."""

    requestFactory = _SmallRequest

    def log(self, request):
        pass


READ_ONLY = ("the HTTP API is read-only: start the daemon with --admin-token-file or an mtls: "
             "--http endpoint")
"""Why every POST is refused when the daemon has no admin credential."""

MAX_LISTED = 1000
"""Most masters, and most slaves, /api/connections lists."""

API_ENDPOINTS = (
    "GET /api/", "GET /api/totals", "GET /api/types", "GET /api/connections", "GET /api/series",
    "GET /api/jobs/<id>", "GET /api/dead", "POST /api/types/<type>/pause",
    "POST /api/types/<type>/resume", "POST /api/types/<type>/clear",
    "POST /api/jobs/<id>/cancel", "POST /api/dead/<id>/retry", "POST /api/dead/<id>/discard",
    "POST /api/drain",
)
"""What GET /api/ lists."""

_EMPTY_SERIES = ("answered", "failed", "submitted", "depth")

_GET = (b"GET", b"HEAD")


class ApiError(Exception):
    """A request the API refuses: its status code, error and reason."""

    def __init__(self, code: int, error: str, reason: str, headers: Tuple = ()):
        """
        :param code: the HTTP status code.
        :param error: the ``error`` field of the JSON body.
        :param reason: the ``reason`` field, for people.
        :param headers: more (name, value) headers, as bytes.
        """
        super().__init__(reason)
        self.code = code
        self.error = error
        self.reason = reason
        self.headers = headers


def _peer_certificate(request):
    """The certificate the client of ``request`` presented over TLS, or None."""
    for transport in (request.transport, getattr(request.channel, "transport", None)):
        if transport is not None and ISSLTransport.providedBy(transport):
            try:
                return transport.getPeerCertificate()
            except Exception:
                return None
    return None


def tls_subject(transport) -> Optional[str]:
    """The subject of the certificate a peer presented on ``transport``,
    as RFC 4514 text, or None (no TLS, or no certificate).

    :param transport: a connection's transport.
    """
    if not ISSLTransport.providedBy(transport):
        return None
    try:
        certificate = transport.getPeerCertificate()
        if certificate is None:
            return None
        return certificate.to_cryptography().subject.rfc4514_string()
    except Exception:
        return None


def _same_site(request) -> bool:
    """Whether a request is not a browser's on behalf of another web site:
    a client certificate is sent by the browser whatever page asks, so an
    action must not come from another origin (``Sec-Fetch-Site``,
    ``Origin``).  Clients that are not browsers send neither header."""
    fetch_site = request.getHeader(b"sec-fetch-site")
    if fetch_site is not None and fetch_site not in (b"same-origin", b"none"):
        return False
    origin = request.getHeader(b"origin")
    if origin is None:
        return True
    host = request.getHeader(b"host")
    return host is not None and origin.split(b"://", 1)[-1] == host


def _name(segment: bytes, what: str) -> str:
    """A path segment as a job id or type: URL-decoded UTF-8, 1 to
    `wire.MAX_NAME_BYTES` bytes.

    :raises ApiError: 400, if it is not.
    """
    raw = segment  # Twisted has URL-decoded each segment of the path already
    if not raw:
        raise ApiError(400, "bad_request", f"the {what} is empty")
    if len(raw) > wire.MAX_NAME_BYTES:
        raise ApiError(400, "bad_request",
                       f"the {what} is {len(raw)} bytes long, over {wire.MAX_NAME_BYTES}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "bad_request", f"the {what} is not UTF-8") from None


def _count(request, name: str, default: Optional[int], least: int, most: int) -> Optional[int]:
    """The whole-number query argument ``name``, or ``default``.

    :raises ApiError: 400, if it is not a whole number from ``least`` to ``most``.
    """
    values = request.args.get(name.encode())
    if not values:
        return default
    text = values[-1].decode("ascii", "replace")
    try:
        number = int(text)
    except ValueError:
        raise ApiError(400, "bad_request",
                       f"{name} takes a whole number, not {quoted(text)}") from None
    if not least <= number <= most:
        raise ApiError(400, "bad_request", f"{name} must be from {least} to {most}, not {number}")
    return number


class Api(Resource):
    """The JSON API under /api/: GETs read the daemon's figures; POSTs act,
    only for a request that carries the admin credential.

    :ivar service: the daemon (a ``gloom.tap.GloomService``).
    :ivar series: the daemon's time series (``snapshot()`` and
        ``type_figures()``), or None.
    """

    isLeaf = True
    log = Logger()

    def __init__(self, service, series: Any = None, admin_token: Optional[bytes] = None,
                 mtls: bool = False):
        """
        :param service: the daemon, a ``gloom.tap.GloomService``.
        :param series: the daemon's time series, or None: then /api/series
            has empty lists and types have no rates.
        :param admin_token: the bearer token POSTs must carry, or None.
        :param mtls: whether the --http endpoint is ``mtls:`` (a client
            that presented a verified certificate may POST).
        """
        super().__init__()
        self.service = service
        self.series = series
        self.admin_token = admin_token
        self.mtls = mtls

    # --- dispatch -----------------------------------------------------------

    def render(self, request):
        """Route the request; every answer, errors included, is JSON."""
        head = request.method == b"HEAD"
        try:
            body = self._route(request)
        except ApiError as e:
            request.setResponseCode(e.code)
            for name, value in e.headers:
                request.setHeader(name, value)
            body = wire.encode_value({"error": e.error, "reason": e.reason}) + b"\n"
        except Exception:
            self.log.failure("HTTP API {method} {path}", method=request.method.decode("latin-1"),
                             path=quoted(request.path.decode("utf-8", "replace")))
            request.setResponseCode(500)
            body = wire.encode_value({"error": "internal_error",
                                      "reason": "the daemon failed to answer; see its log"}) + b"\n"
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        if head:
            request.setHeader(b"Content-Length", b"%d" % len(body))
            return b""
        return body

    def _route(self, request) -> bytes:
        path = list(request.postpath)
        if path and path[-1] == b"" and len(path) > 1:
            path.pop()  # a trailing slash
        count = len(path)
        first = path[0] if path else b""
        if count <= 1 and first == b"":
            return self._get(request, self.get_index)
        if count == 1 and first in (b"totals", b"types", b"connections", b"series", b"dead"):
            return self._get(request, getattr(self, f"get_{first.decode()}"))
        if count == 2 and first == b"jobs":
            return self._get(request, self.get_job, path[1], "job id")
        if count == 1 and first == b"drain":
            return self._post(request, self.drain)
        if count == 3 and first == b"types" and path[2] in (b"pause", b"resume", b"clear"):
            return self._post(request, getattr(self, path[2].decode()), path[1], "type")
        if count == 3 and first == b"jobs" and path[2] == b"cancel":
            return self._post(request, self.cancel, path[1], "job id")
        if count == 3 and first == b"dead" and path[2] in (b"retry", b"discard"):
            return self._post(request, getattr(self, f"dead_{path[2].decode()}"), path[1],
                              "job id")
        path_text = quoted(request.path.decode("utf-8", "replace"))
        raise ApiError(404, "not_found", f"no such API path: {path_text} (GET /api/ lists them)")

    def _get(self, request, handler, segment: Optional[bytes] = None, what: str = "") -> bytes:
        if request.method not in _GET:
            raise ApiError(405, "method_not_allowed", "use GET here",
                           ((b"Allow", b"GET, HEAD"),))
        if segment is None:
            return self._json(handler(request))
        return self._json(handler(request, _name(segment, what)))

    def _post(self, request, handler, segment: Optional[bytes] = None, what: str = "") -> bytes:
        if request.method != b"POST":
            raise ApiError(405, "method_not_allowed", "use POST here", ((b"Allow", b"POST"),))
        self._authorize(request)
        if segment is None:
            return self._json(handler(request))
        return self._json(handler(request, _name(segment, what)))

    @staticmethod
    def _json(value) -> bytes:
        if isinstance(value, bytes):
            return value + b"\n"
        return wire.encode_value(value) + b"\n"

    def _authorize(self, request) -> None:
        """Let a POST through only with the admin credential.

        :raises ApiError: 403 without any credential configured or with a
            wrong token, 401 without the Authorization header.
        """
        if not _same_site(request):
            raise ApiError(403, "forbidden", "a request from another web site is refused")
        if len(request.requestHeaders.getRawHeaders(b"authorization", [])) > 1:
            raise ApiError(400, "bad_request", "more than one Authorization header")
        if self.mtls and _peer_certificate(request) is not None:
            return  # the handshake verified it against the endpoint's caCerts
        if self.admin_token is None:
            raise ApiError(403, "forbidden", READ_ONLY if not self.mtls else
                           "this request presented no client certificate")
        header = request.getHeader(b"authorization")
        if not header or not header[:7].lower() == b"bearer ":
            raise ApiError(401, "unauthorized",
                           "this action needs the header Authorization: Bearer <admin token>",
                           ((b"WWW-Authenticate", b'Bearer realm="gloom"'),))
        if not hmac.compare_digest(header[7:].strip(), self.admin_token):
            raise ApiError(403, "forbidden", "the bearer token is not the admin token",
                           ((b"WWW-Authenticate", b'Bearer realm="gloom", error="invalid_token"'),))

    def _who(self, request) -> str:
        return address_name(request.getClientAddress())

    # --- reads --------------------------------------------------------------

    def get_index(self, request) -> dict:
        """GET /api/: the endpoints, and whether actions are allowed."""
        if self.mtls and _peer_certificate(request) is not None:
            actions, why = True, "this request presented a verified client certificate"
        elif self.admin_token is not None:
            actions, why = True, ("actions (POST) need the header Authorization: Bearer <token>, "
                                  "the token in the daemon's --admin-token-file")
        elif self.mtls:
            actions, why = False, "this request presented no client certificate"
        else:
            actions, why = False, READ_ONLY
        needs_token = actions and not (self.mtls and _peer_certificate(request) is not None)
        return {"endpoints": list(API_ENDPOINTS), "actions": actions, "why": why,
                "needs_token": needs_token}

    def get_totals(self, request) -> dict:
        """GET /api/totals: the daemon's figures as /status gives them,
        without the per-type table (a dashboard's poll, cheap however many
        types there are)."""
        figures = self.service.stats(types_limit=0)
        figures.pop("types", None)
        figures.pop("types_omitted", None)
        return figures

    def get_types(self, request) -> dict:
        """GET /api/types[?limit=N]: every type, the busiest first."""
        limit = _count(request, "limit", None, 0, 2**31)
        scheduler = self.service.scheduler
        names = scheduler.type_names()
        types = scheduler.types(limit, names)  # the busiest, in O(types log limit)
        ordered = sorted(types.items(), key=lambda item: -(item[1]["queued"] + item[1]["running"]))
        omitted = len(names) - len(types)
        figures = self.series.type_figures() if self.series is not None else None
        if figures is not None:
            for name, counts in ordered:
                rates = figures.get(name)
                counts.update(rates if rates is not None else
                              {"answered_per_s": 0.0, "failed_per_s": 0.0,
                               "p50_ms": None, "p99_ms": None})
        return {"types": dict(ordered), "types_omitted": omitted,
                "paused": sorted(scheduler.paused), "draining": scheduler.draining}

    def get_connections(self, request) -> dict:
        """GET /api/connections: masters and slaves, at most `MAX_LISTED` of each."""
        factories = self.service.factories
        masters = [c for f in factories[:1] + factories[2:] for c in f.connections]
        slaves = list(factories[1].connections)
        now = self.service.reactor.seconds()
        masters.sort(key=lambda c: c.peer)
        slaves.sort(key=lambda c: c.peer)
        listed_masters = [{"peer": c.peer, "tls": tls_subject(c.transport),
                           "unfinished": len(c._unfinished)} for c in masters[:MAX_LISTED]]
        listed_slaves = []
        for c in slaves[:MAX_LISTED]:
            job = c.job
            listed_slaves.append({
                "peer": c.peer, "tls": tls_subject(c.transport), "type": c.job_type,
                "state": c.state.value, "job": job.id if job is not None else None,
                "held_s": round(now - c.held_since, 3)
                if job is not None and c.held_since is not None else None})
        return {"masters": listed_masters, "masters_omitted": max(0, len(masters) - MAX_LISTED),
                "slaves": listed_slaves, "slaves_omitted": max(0, len(slaves) - MAX_LISTED)}

    def get_series(self, request) -> dict:
        """GET /api/series: the per-second counts of the last minutes."""
        if self.series is not None:
            return self.series.snapshot()
        return {"interval": 1, "end": self.service.reactor.seconds(),
                **{name: [] for name in _EMPTY_SERIES}}

    def get_job(self, request, job_id: str) -> bytes:
        """GET /api/jobs/<id>: a detached job's status, else the first
        master's unfinished job with that id."""
        from gloom.detached import describe

        status = self.service.detached.status(job_id)
        if status is not None:
            return wire.status(job_id, status)
        factories = self.service.factories
        for factory in factories[:1] + factories[2:]:
            for connection in factory.connections:
                job = connection._unfinished.get(job_id)
                if job is not None:
                    status = describe(job, detached=False)
                    status["master"] = connection.peer
                    return wire.status(job_id, status)
        raise ApiError(404, "unknown_job",
                       f"no detached job and no master's unfinished job has id {quoted(job_id)}")

    def get_dead(self, request) -> dict:
        """GET /api/dead[?offset=&limit=]: a page of the dead list, oldest first."""
        offset = _count(request, "offset", 0, 0, 2**31)
        limit = _count(request, "limit", 100, 1, wire.MAX_PAGE)
        total, page = self.service.detached.dead_page(offset, limit)
        return {"total": total, "offset": offset, "dead": page}

    # --- actions ------------------------------------------------------------

    def pause(self, request, job_type: str) -> bytes:
        """POST /api/types/<type>/pause."""
        self.service.scheduler.pause(sys.intern(job_type))
        self.log.info("HTTP admin {peer} paused type {type}", peer=self._who(request),
                      type=quoted(job_type))
        return wire.OK

    def resume(self, request, job_type: str) -> bytes:
        """POST /api/types/<type>/resume."""
        self.service.scheduler.resume(job_type)
        self.log.info("HTTP admin {peer} resumed type {type}", peer=self._who(request),
                      type=quoted(job_type))
        return wire.OK

    def clear(self, request, job_type: str) -> dict:
        """POST /api/types/<type>/clear: end its queued and delayed jobs."""
        cleared = self.service.scheduler.clear(job_type)
        self.log.info("HTTP admin {peer} cleared type {type}: {count} jobs",
                      peer=self._who(request), type=quoted(job_type), count=cleared)
        return {"ok": True, "cleared": cleared}

    def cancel(self, request, job_id: str) -> dict:
        """POST /api/jobs/<id>/cancel: withdraw a detached job (a master's
        own jobs are its to cancel)."""
        if not self.service.detached.cancel(job_id):
            raise ApiError(404, "unknown_job", f"no detached job has id {quoted(job_id)} (the API "
                           "cancels detached jobs only; a master cancels its own)")
        self.log.info("HTTP admin {peer} cancelled detached job {id}", peer=self._who(request),
                      id=quoted(job_id))
        return {"ok": True, "id": job_id}

    def dead_retry(self, request, job_id: str) -> dict:
        """POST /api/dead/<id>/retry: queue a dead job again."""
        try:
            found = self.service.factories[0].retry_dead(job_id)
        except wire.MessageError as e:
            raise ApiError(409, e.code, e.reason) from None
        if not found:
            raise ApiError(404, "unknown_job", f"no dead job has id {quoted(job_id)}")
        self.log.info("HTTP admin {peer} retried dead job {id}", peer=self._who(request),
                      id=quoted(job_id))
        return {"ok": True, "id": job_id}

    def dead_discard(self, request, job_id: str) -> dict:
        """POST /api/dead/<id>/discard: forget a dead job."""
        if not self.service.detached.discard_dead(job_id):
            raise ApiError(404, "unknown_job", f"no dead job has id {quoted(job_id)}")
        self.log.info("HTTP admin {peer} discarded dead job {id}", peer=self._who(request),
                      id=quoted(job_id))
        return {"ok": True, "id": job_id}

    def drain(self, request) -> bytes:
        """POST /api/drain: as the drain action (GloomService.drain)."""
        self.log.info("HTTP admin {peer} asked the daemon to drain", peer=self._who(request))
        self.service.drain()
        return wire.OK


def make_site(stats: Callable[[], dict], latency: LatencyHistogram,
              registry: CollectorRegistry, service: Any = None, series: Any = None,
              admin_token: Optional[bytes] = None, mtls: bool = False) -> Site:
    """The HTTP site: /status (JSON), /metrics (Prometheus) and, given the
    daemon, the JSON API under /api/ (`Api`).

    :param stats: returns the daemon's figures (``GloomService.stats``);
        called with no argument for /status and with ``types_limit=None``
        (every type) for /metrics.
    :param latency: the job latency histogram; it is in ``registry``
        already, which is how /metrics shows it.
    :param registry: the Prometheus registry /metrics renders; the figures
        of ``stats`` are added to it.
    :param service: the daemon (``gloom.tap.GloomService``); without it
        there is no /api/.
    :param series: the daemon's time series for /api/series and the
        per-type rates, or None.
    :param admin_token: the bearer token that allows the API's actions, or None.
    :param mtls: whether the site listens on an ``mtls:`` endpoint, where a
        client's verified certificate allows the API's actions.
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
    if service is not None:
        root.putChild(b"api", Api(service, series, admin_token, mtls))
    site = _QuietSite(root)
    site.noisy = False
    return site
