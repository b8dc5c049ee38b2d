"""The JSON API under /api/ on the ``--http`` endpoint (gloom/http.py): every
read, every action, and the admin credential (``--admin-token-file``, or an
``mtls:`` endpoint) without which the actions are refused."""

import json
import os
import shutil
import socket
import tempfile
from urllib.parse import quote

from twisted.internet import reactor, ssl
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.internet.testing import MemoryReactorClock
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from gloom import tap
from gloom.http import READ_ONLY
from tests.certs import Authority
from tests.support import TwistdDaemon
from tests.test_integration import DaemonTestCase, wait_until

TOKEN = "s3cret-admin-token-0123456789"

ACTIONS = ("/api/types/t/pause", "/api/types/t/resume", "/api/types/t/clear",
           "/api/jobs/j/cancel", "/api/dead/d/retry", "/api/dead/d/discard", "/api/drain")


class ApiTestCase(DaemonTestCase):
    """A daemon with ``--http`` on loopback; ``token`` (if set) is written
    to an ``--admin-token-file``."""

    token = None
    http = "tcp:0:interface=127.0.0.1"

    def setUp(self):
        self.directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.options = {"http": self.http, **self.more_options()}
        if self.token is not None:
            path = os.path.join(self.directory, "token")
            with open(path, "w") as f:
                f.write(f"  {self.token}\n")
            self.options["admin-token-file"] = path
        super().setUp()
        self.drains = []
        self.service.stop_reactor = lambda: self.drains.append("stopped")

    def more_options(self):
        return {}

    def api(self):
        """The daemon's `gloom.http.Api` resource."""
        return self.service.getServiceNamed("http").factory.resource.children[b"api"]

    def agent(self):
        return Agent(reactor)

    def url(self, path):
        return f"http://127.0.0.1:{self.port('http')}{path}".encode()

    @inlineCallbacks
    def request(self, path, method="GET", token=None, authorization=None, extra=()):
        """Send a request; return (code, headers, the decoded JSON body)."""
        headers = Headers()
        for name, value in extra:
            headers.addRawHeader(name, value)
        if token is not None:
            headers.addRawHeader(b"Authorization", f"Bearer {token}".encode())
        if authorization is not None:
            headers.addRawHeader(b"Authorization", authorization.encode())
        response = yield self.agent().request(method.encode(), self.url(path), headers)
        body = yield readBody(response)
        if method != "HEAD":
            self.assertEqual(response.headers.getRawHeaders(b"content-type"),
                             [b"application/json"], body)
        return response.code, response.headers, json.loads(body) if body else None

    def post(self, path, token=None, **kwargs):
        """POST ``path`` (with the bearer ``token``, if given)."""
        return self.request(path, "POST", token, **kwargs)

    @inlineCallbacks
    def submit(self, master, job_id, job_type="t", **options):
        master.send({"action": "submit", "id": job_id, "type": job_type, "body": 1, **options})
        reply = yield master.next()
        self.assertEqual(reply, {"ok": True, "id": job_id})

    @inlineCallbacks
    def dead_jobs(self, *job_ids):
        """Detached jobs that failed with no retries left: on the dead list."""
        master = yield self.client("master")
        slave = yield self.slave("doomed")
        for job_id in job_ids:
            yield self.submit(master, job_id, "doomed", detach=True, retries=0)
            self.assertEqual((yield slave.next())["id"], job_id)
            slave.send({"action": "fail", "reason": "boom"})
            self.assertEqual((yield slave.next()), {"ok": True})
        yield self.until(lambda: all(j in self.service.detached.dead for j in job_ids))
        return master, slave


class ReadOnlyTests(ApiTestCase):
    """No credential: everything reads, no action acts."""

    @inlineCallbacks
    def test_index_says_read_only_and_why(self):
        for path in ("/api/", "/api"):
            code, _, body = yield self.request(path)
            self.assertEqual(code, 200)
            self.assertEqual((body["actions"], body["why"]), (False, READ_ONLY))
            self.assertIn("POST /api/types/<type>/pause", body["endpoints"])
            self.assertIn("GET /api/connections", body["endpoints"])

    @inlineCallbacks
    def test_every_action_is_forbidden(self):
        master = yield self.client("master")
        yield self.submit(master, "q")
        for path in ACTIONS:
            for token in (None, TOKEN):
                code, _, body = yield self.post(path, token)
                self.assertEqual((code, body), (403, {"error": "forbidden", "reason": READ_ONLY}),
                                 path)
        stats = self.service.stats()
        self.assertEqual((stats["paused"], stats["draining"], stats["types"]["t"]["queued"]),
                         ([], False, 1))
        self.assertEqual(self.drains, [])

    @inlineCallbacks
    def test_types_busiest_first_with_a_limit(self):
        master = yield self.client("master")
        yield self.slave("idle")
        for job_id in ("a1", "a2"):
            yield self.submit(master, job_id, "two")
        yield self.submit(master, "b1", "one")
        self.api().series = None
        code, _, body = yield self.request("/api/types")
        self.assertEqual(code, 200)
        self.assertEqual(list(body["types"]), ["two", "one", "idle"])
        self.assertEqual(body["types"]["two"], {"queued": 2, "delayed": 0, "running": 0,
                                                "idle_slaves": 0, "busy_slaves": 0,
                                                "paused": False})
        self.assertEqual(body["types"]["idle"]["idle_slaves"], 1)
        self.assertEqual((body["paused"], body["draining"], body["types_omitted"]), ([], False, 0))
        self.assertNotIn("answered_per_s", body["types"]["two"])  # no series: no rates
        code, _, body = yield self.request("/api/types?limit=1")
        self.assertEqual((list(body["types"]), body["types_omitted"]), (["two"], 2))
        code, _, body = yield self.request("/api/types?limit=many")
        self.assertEqual((code, body["error"]), (400, "bad_request"))

    @inlineCallbacks
    def test_connections_show_a_busy_slaves_job_and_how_long_it_held_it(self):
        master = yield self.client("master")
        busy = yield self.slave("t")
        yield self.slave("u")
        yield self.submit(master, "held")
        yield self.submit(master, "waiting")
        self.assertEqual((yield busy.next())["id"], "held")
        code, _, body = yield self.request("/api/connections")
        self.assertEqual(code, 200)
        self.assertEqual(body["masters"], [{"peer": f"127.0.0.1:{master.transport.getHost().port}",
                                            "tls": None, "unfinished": 2}])
        slaves = {s["type"]: s for s in body["slaves"]}
        self.assertEqual(slaves["t"]["job"], "held")
        self.assertEqual(slaves["t"]["state"], "busy")
        self.assertIsInstance(slaves["t"]["held_s"], float)
        self.assertGreaterEqual(slaves["t"]["held_s"], 0)
        self.assertLess(slaves["t"]["held_s"], 30)
        self.assertEqual((slaves["u"]["job"], slaves["u"]["held_s"], slaves["u"]["state"]),
                         (None, None, "waiting"))
        self.assertEqual(slaves["t"]["peer"], f"127.0.0.1:{busy.transport.getHost().port}")
        self.assertEqual((body["masters_omitted"], body["slaves_omitted"]), (0, 0))

    @inlineCallbacks
    def test_connections_are_listed_up_to_a_limit(self):
        import gloom.http

        self.patch(gloom.http, "MAX_LISTED", 1)
        yield self.slave("t")
        yield self.slave("t")
        _, _, body = yield self.request("/api/connections")
        self.assertEqual((len(body["slaves"]), body["slaves_omitted"]), (1, 1))
        self.assertEqual((body["masters"], body["masters_omitted"]), ([], 0))

    @inlineCallbacks
    def test_job_lookup_detached_attached_and_unknown(self):
        master = yield self.client("master")
        yield self.submit(master, "attached/1", "t", priority=3)
        yield self.submit(master, "det é", "t", detach=True)
        code, _, body = yield self.request("/api/jobs/" + quote("attached/1", safe=""))
        self.assertEqual(code, 200)
        self.assertEqual(body, {"ok": True, "id": "attached/1", "state": "queued",
                                "detached": False, "type": "t", "priority": 3, "attempts": 0,
                                "master": f"127.0.0.1:{master.transport.getHost().port}"})
        code, _, body = yield self.request("/api/jobs/" + quote("det é", safe=""))
        self.assertEqual((code, body["state"], body["detached"], body["id"]),
                         (200, "queued", True, "det é"))
        code, _, body = yield self.request("/api/jobs/nobody")
        self.assertEqual((code, body["error"]), (404, "unknown_job"))

    @inlineCallbacks
    def test_a_completed_detached_jobs_result_is_shown(self):
        master = yield self.client("master")
        slave = yield self.slave("t")
        yield self.submit(master, "done", detach=True)
        yield slave.next()
        slave.send({"action": "respond", "body": {"answer": [1, 2]}})
        yield slave.next()
        code, _, body = yield self.request("/api/jobs/done")
        self.assertEqual((code, body["state"], body["result"]), (200, "completed", {"answer": [1, 2]}))

    @inlineCallbacks
    def test_dead_list_pages(self):
        yield self.dead_jobs("d1")
        code, _, body = yield self.request("/api/dead")
        self.assertEqual(code, 200)
        self.assertEqual((body["total"], body["offset"], [d["id"] for d in body["dead"]]),
                         (1, 0, ["d1"]))
        self.assertIn("boom", body["dead"][0]["reason"])
        _, _, body = yield self.request("/api/dead?offset=1&limit=5")
        self.assertEqual((body["total"], body["offset"], body["dead"]), (1, 1, []))
        for query in ("limit=0", "limit=1001", "offset=-1", "offset=x"):
            code, _, body = yield self.request(f"/api/dead?{query}")
            self.assertEqual((code, body["error"]), (400, "bad_request"), query)

    @inlineCallbacks
    def test_series_without_a_series_is_empty(self):
        self.api().series = None
        code, _, body = yield self.request("/api/series")
        self.assertEqual(code, 200)
        self.assertEqual({k: body[k] for k in ("interval", "answered", "failed", "submitted", "depth")},
                         {"interval": 1, "answered": [], "failed": [], "submitted": [], "depth": []})
        self.assertIsInstance(body["end"], float)

    @inlineCallbacks
    def test_unknown_paths_wrong_methods_and_bad_ids(self):
        for path in ("/api/nothing", "/api/types/t", "/api/types/t/explode", "/api/jobs",
                     "/api/jobs/a/b/c", "/api/dead/d", "/api/drain/now"):
            code, _, body = yield self.request(path)
            self.assertEqual((code, body["error"]), (404, "not_found"), path)
        for path in ("/api/types", "/api/connections", "/api/series", "/api/dead", "/api/jobs/x",
                     "/api/"):
            code, headers, body = yield self.post(path)
            self.assertEqual((code, body["error"]), (405, "method_not_allowed"), path)
            self.assertEqual(headers.getRawHeaders(b"allow"), [b"GET, HEAD"])
        for path in ACTIONS:
            for method in ("GET", "PUT", "DELETE"):
                code, headers, body = yield self.request(path, method)
                self.assertEqual((code, body["error"]), (405, "method_not_allowed"), path)
                self.assertEqual(headers.getRawHeaders(b"allow"), [b"POST"])
        for path in ("/api/jobs/%FF%FE", "/api/jobs/" + "x" * 1025, "/api/jobs/%C3",
                     "/api/jobs/" + quote("é" * 513)):
            code, _, body = yield self.request(path)
            self.assertEqual((code, body["error"]), (400, "bad_request"), path)
        code, _, body = yield self.request("/api/jobs/" + "x" * 1024)
        self.assertEqual((code, body["error"]), (404, "unknown_job"))

    @inlineCallbacks
    def test_a_failure_inside_is_a_json_500_and_logged(self):
        def broken(*args):
            raise RuntimeError("bug")

        self.patch(self.scheduler, "types", broken)
        code, _, body = yield self.request("/api/types")
        self.assertEqual((code, body["error"]), (500, "internal_error"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    @inlineCallbacks
    def test_head_has_the_headers_and_no_body(self):
        code, headers, body = yield self.request("/api/types", "HEAD")
        self.assertEqual((code, body), (200, None))
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertGreater(int(headers.getRawHeaders(b"content-length")[0]), 10)


class FakeSeries:
    """What the API reads of ``gloom.series.Series``."""

    def snapshot(self):
        return {"interval": 1, "end": 1000.0, "answered": [1, 2], "failed": [0, 1],
                "submitted": [3, 3], "depth": [5, 4]}

    def type_figures(self):
        return {"t": {"answered_per_s": 2.5, "failed_per_s": 0.5, "p50_ms": 1.25, "p99_ms": 9.0},
                "gone": {"answered_per_s": 1.0, "failed_per_s": 0.0, "p50_ms": 1.0, "p99_ms": 1.0}}


class SeriesTests(ApiTestCase):
    @inlineCallbacks
    def test_series_and_per_type_rates_come_from_the_series(self):
        self.api().series = FakeSeries()
        master = yield self.client("master")
        yield self.submit(master, "a", "t")
        yield self.submit(master, "b", "quiet")
        _, _, body = yield self.request("/api/series")
        self.assertEqual(body, FakeSeries().snapshot())
        _, _, body = yield self.request("/api/types")
        self.assertEqual(set(body["types"]), {"t", "quiet"})
        self.assertEqual({k: body["types"]["t"][k] for k in ("answered_per_s", "failed_per_s",
                                                             "p50_ms", "p99_ms", "queued")},
                         {"answered_per_s": 2.5, "failed_per_s": 0.5, "p50_ms": 1.25,
                          "p99_ms": 9.0, "queued": 1})
        self.assertEqual({k: body["types"]["quiet"][k] for k in ("answered_per_s", "p99_ms")},
                         {"answered_per_s": 0.0, "p99_ms": None})


class DaemonSeriesTests(ApiTestCase):
    """The daemon's own `gloom.series.Series`, as makeService wires it."""

    @inlineCallbacks
    def test_answers_and_failures_reach_the_series_and_the_rates(self):
        series = self.service.series
        self.assertIs(self.api().series, series)
        master = yield self.client("master")
        slave = yield self.slave("t")
        series.sample()
        for job_id in ("a", "b", "c"):
            yield self.submit(master, job_id)
            yield slave.next()
            slave.send({"action": "respond", "body": 1} if job_id != "c"
                       else {"action": "fail", "reason": "no"})
            yield slave.next()
            yield master.next()
        series.sample()
        _, _, body = yield self.request("/api/series")
        self.assertEqual((body["interval"], body["answered"][-1], body["failed"][-1],
                          body["submitted"][-1]), (1, 2, 1, 3))
        _, _, body = yield self.request("/api/types")
        figures = body["types"]["t"]
        self.assertIsInstance(figures["p50_ms"], float)
        self.assertIn("answered_per_s", figures)
        self.assertIn("failed_per_s", figures)
        response = yield self.agent().request(b"GET", self.url("/metrics"))
        metrics = yield readBody(response)
        self.assertIn(b'gloom_job_latency_seconds_count{type="t"} 2.0', metrics)

    def test_the_series_runs_while_the_daemon_does(self):
        series = self.service.series
        self.assertTrue(series._loop.running)
        d = self.service.stopService()
        self.assertFalse(series._loop.running)
        return d


class TokenTests(ApiTestCase):
    """``--admin-token-file``: actions need ``Authorization: Bearer TOKEN``."""

    token = TOKEN

    @inlineCallbacks
    def test_index_says_actions_need_the_token(self):
        code, _, body = yield self.request("/api/")
        self.assertEqual((code, body["actions"]), (200, True))
        self.assertIn("Authorization: Bearer", body["why"])

    @inlineCallbacks
    def test_without_the_header_401_and_with_a_wrong_token_403(self):
        master = yield self.client("master")
        yield self.submit(master, "q")
        for path in ACTIONS:
            code, headers, body = yield self.post(path)
            self.assertEqual((code, body["error"]), (401, "unauthorized"), path)
            self.assertTrue(headers.getRawHeaders(b"www-authenticate")[0].startswith(b"Bearer"))
            for wrong in (TOKEN + "x", TOKEN[:-1], "nope", TOKEN.upper()):
                code, _, body = yield self.post(path, wrong)
                self.assertEqual((code, body["error"]), (403, "forbidden"), (path, wrong))
            code, _, body = yield self.post(path, authorization=f"Basic {TOKEN}")
            self.assertEqual(code, 401, path)
        stats = self.service.stats()
        self.assertEqual((stats["paused"], stats["draining"], stats["types"]["t"]["queued"]),
                         ([], False, 1))

    @inlineCallbacks
    def test_ids_are_url_decoded_once(self):
        """The page encodes an id once: ``a%20b`` is that id, not ``a b``."""
        yield self.dead_jobs("a b", "a%20b")
        code, _, body = yield self.post("/api/dead/a%2520b/discard", TOKEN)
        self.assertEqual((code, body), (200, {"ok": True, "id": "a%20b"}))
        self.assertEqual(list(self.service.detached.dead), ["a b"])
        code, _, body = yield self.request("/api/jobs/a%20b")
        self.assertEqual((code, body["state"]), (200, "dead"))

    @inlineCallbacks
    def test_cross_site_posts_are_refused(self):
        port = self.port("http")
        for extra in (((b"Origin", b"http://evil.example"),),
                      ((b"Sec-Fetch-Site", b"cross-site"),),
                      ((b"Origin", b"null"),)):
            code, _, body = yield self.post("/api/types/t/pause", TOKEN, extra=extra)
            self.assertEqual((code, body["error"]), (403, "forbidden"), extra)
            self.assertIn("another web site", body["reason"])
        self.assertEqual(self.service.scheduler.paused, set())
        same = ((b"Origin", f"http://127.0.0.1:{port}".encode()), (b"Sec-Fetch-Site", b"same-origin"))
        code, _, _ = yield self.post("/api/types/t/pause", TOKEN, extra=same)
        self.assertEqual((code, self.service.scheduler.paused), (200, {"t"}))

    @inlineCallbacks
    def test_two_authorization_headers_are_refused(self):
        code, _, body = yield self.post("/api/types/t/pause", "wrong", authorization=f"Bearer {TOKEN}")
        self.assertEqual((code, body["error"]), (400, "bad_request"))
        self.assertEqual(self.service.scheduler.paused, set())

    @inlineCallbacks
    def test_a_big_body_is_refused_before_it_is_read(self):
        def send():
            with socket.create_connection(("127.0.0.1", self.port("http")), timeout=10) as sock:
                sock.sendall(b"POST /api/drain HTTP/1.1\r\nHost: x\r\n"
                             b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
                             b"Content-Length: 100000000\r\n\r\n")  # and no byte of it
                answer = b""
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        return answer
                    answer += chunk

        answer = yield deferToThread(send)
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer[:100])
        self.assertIn(b'"error":"too_large"', answer)
        self.assertFalse(self.service.scheduler.draining)

    @inlineCallbacks
    def test_totals_without_the_types(self):
        code, _, body = yield self.request("/api/totals")
        self.assertEqual(code, 200)
        self.assertNotIn("types", body)
        self.assertEqual((body["draining"], body["totals"]["submitted"]), (False, 0))

    @inlineCallbacks
    def test_gets_need_no_token(self):
        for path in ("/api/", "/api/types", "/api/connections", "/api/series", "/api/dead"):
            code, _, _ = yield self.request(path)
            self.assertEqual(code, 200, path)

    @inlineCallbacks
    def test_pause_resume_and_clear(self):
        master = yield self.client("master")
        yield self.submit(master, "q1")
        yield self.submit(master, "q2")
        code, _, body = yield self.post("/api/types/t/pause", TOKEN)
        self.assertEqual((code, body), (200, {"ok": True}))
        self.assertEqual(self.service.stats()["paused"], ["t"])
        _, _, body = yield self.request("/api/types")
        self.assertEqual((body["paused"], body["types"]["t"]["paused"]), (["t"], True))
        slave = yield self.slave("t")
        code, _, body = yield self.post("/api/types/t/resume", TOKEN)
        self.assertEqual((code, body), (200, {"ok": True}))
        self.assertEqual(self.service.stats()["paused"], [])
        self.assertEqual((yield slave.next())["id"], "q1")
        code, _, body = yield self.post("/api/types/t/clear", TOKEN)
        self.assertEqual((code, body), (200, {"ok": True, "cleared": 1}))
        error = yield master.next()
        self.assertEqual((error["error"], error["id"]), ("cleared", "q2"))
        stats = self.service.stats()
        self.assertEqual((stats["totals"]["cleared"], stats["types"]["t"]["queued"]), (1, 0))
        name = quote("a type/with é", safe="")
        code, _, body = yield self.post(f"/api/types/{name}/pause", TOKEN)
        self.assertEqual(code, 200)
        self.assertIn("a type/with é", self.service.stats()["paused"])
        code, _, body = yield self.post("/api/types/%FF/pause", TOKEN)
        self.assertEqual((code, body["error"]), (400, "bad_request"))

    @inlineCallbacks
    def test_actions_are_logged_with_the_peer(self):
        from twisted.logger import formatEvent, globalLogPublisher

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        yield self.post("/api/types/t/pause", TOKEN)
        yield self.post("/api/types/t/resume", TOKEN)
        yield self.post("/api/types/t/clear", TOKEN)
        yield self.post("/api/drain", TOKEN)
        lines = [formatEvent(e) for e in events if "HTTP admin" in e.get("log_format", "")]
        self.assertEqual(len(lines), 4, lines)
        self.assertRegex(lines[0], r"^HTTP admin 127\.0\.0\.1:\d+ paused type 't'$")
        self.assertRegex(lines[1], r"^HTTP admin 127\.0\.0\.1:\d+ resumed type 't'$")
        self.assertRegex(lines[2], r"^HTTP admin 127\.0\.0\.1:\d+ cleared type 't': 0 jobs$")
        self.assertRegex(lines[3], r"^HTTP admin 127\.0\.0\.1:\d+ asked the daemon to drain$")
        yield wait_until(lambda: self.drains == ["stopped"])

    @inlineCallbacks
    def test_cancel_a_detached_job_only(self):
        master = yield self.client("master")
        yield self.submit(master, "det", detach=True)
        yield self.submit(master, "att")
        code, _, body = yield self.post("/api/jobs/det/cancel", TOKEN)
        self.assertEqual((code, body), (200, {"ok": True, "id": "det"}))
        _, _, body = yield self.request("/api/jobs/det")
        self.assertEqual((body["state"], body["reason"]), ("failed", "cancelled by a master"))
        code, _, body = yield self.post("/api/jobs/att/cancel", TOKEN)
        self.assertEqual((code, body["error"]), (404, "unknown_job"))
        self.assertIn("detached jobs only", body["reason"])
        self.assertEqual(self.service.stats()["types"]["t"]["queued"], 1)

    @inlineCallbacks
    def test_retry_and_discard_dead_jobs(self):
        yield self.dead_jobs("d1", "d2")
        _, _, body = yield self.request("/api/dead")
        self.assertEqual([d["id"] for d in body["dead"]], ["d1", "d2"])
        code, _, body = yield self.post("/api/dead/d1/retry", TOKEN)
        self.assertEqual((code, body), (200, {"ok": True, "id": "d1"}))
        self.assertIn("d1", self.service.detached.live)
        _, _, body = yield self.request("/api/jobs/d1")
        self.assertIn(body["state"], ("queued", "running"))
        code, _, body = yield self.post("/api/dead/d2/discard", TOKEN)
        self.assertEqual((code, body), (200, {"ok": True, "id": "d2"}))
        self.assertEqual(self.service.stats()["detached"]["dead"], 0)
        _, _, body = yield self.request("/api/dead")
        self.assertEqual((body["total"], body["dead"]), (0, []))
        for path in ("/api/dead/d2/discard", "/api/dead/d2/retry", "/api/dead/nobody/retry"):
            code, _, body = yield self.post(path, TOKEN)
            self.assertEqual((code, body["error"]), (404, "unknown_job"), path)

    @inlineCallbacks
    def test_drain_drains_the_daemon_and_refuses_dead_retries(self):
        yield self.dead_jobs("d1")
        code, _, body = yield self.post("/api/drain", TOKEN)
        self.assertEqual((code, body), (200, {"ok": True}))
        self.assertTrue(self.service.stats()["draining"])
        _, _, body = yield self.request("/api/types")
        self.assertTrue(body["draining"])
        code, _, body = yield self.post("/api/dead/d1/retry", TOKEN)
        self.assertEqual((code, body["error"]), (409, "shutdown"))
        yield wait_until(lambda: self.drains == ["stopped"])


class MutualTLSTests(ApiTestCase):
    """An ``mtls:`` --http endpoint: a client's verified certificate allows
    the actions; a client without one never gets an answer."""

    def more_options(self):
        self.ca = Authority(self.directory)
        key, cert = self.ca.issue("localhost", server=True)
        self.client_certificate = None
        return {"http": f"mtls:0:interface=127.0.0.1:privateKey={key}:certKey={cert}:"
                        f"caCerts={self.ca.path}"}

    def url(self, path):
        return f"https://localhost:{self.port('http')}{path}".encode()

    def agent(self):
        trust = ssl.Certificate.loadPEM(open(self.ca.path, "rb").read())
        certificate = self.client_certificate

        @implementer(IPolicyForHTTPS)
        class Policy:
            def creatorForNetloc(self, hostname, port):
                return ssl.optionsForClientTLS("localhost", trustRoot=trust,
                                               clientCertificate=certificate)

        from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS

        class Loopback:
            """Every connection goes to 127.0.0.1 (``localhost`` may be ::1)."""

            def endpointForURI(self, uri):
                endpoint = HostnameEndpoint(reactor, "127.0.0.1", uri.port)
                return wrapClientTLS(Policy().creatorForNetloc(b"localhost", uri.port),
                                         endpoint)

        return Agent.usingEndpointFactory(reactor, Loopback())

    def use_certificate(self, name):
        key, cert = self.ca.issue(name, server=False)
        self.client_certificate = ssl.PrivateCertificate.loadPEM(
            open(key, "rb").read() + open(cert, "rb").read())

    @inlineCallbacks
    def test_a_client_certificate_allows_actions(self):
        self.use_certificate("operator")
        code, _, body = yield self.request("/api/")
        self.assertEqual((code, body["actions"]), (200, True))
        code, _, body = yield self.post("/api/types/t/pause")
        self.assertEqual((code, body), (200, {"ok": True}))
        self.assertEqual(self.service.stats()["paused"], ["t"])

    @inlineCallbacks
    def test_a_client_without_a_certificate_is_refused(self):
        from twisted.web._newclient import ResponseNeverReceived

        try:
            yield self.post("/api/types/t/pause")
        except ResponseNeverReceived:
            pass
        else:
            self.fail("a client without a certificate got an answer")
        self.assertEqual(self.service.stats()["paused"], [])


class TokenFileTests(SynchronousTestCase):
    """A token file that cannot be used stops start-up with one line."""

    def setUp(self):
        self.directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.directory, True)

    def options(self, token_path):
        options = tap.Options()
        options.parseOptions(["--http", "tcp:0:interface=127.0.0.1",
                              "--admin-token-file", token_path])
        return options

    def write(self, text):
        path = os.path.join(self.directory, "token")
        with open(path, "w") as f:
            f.write(text)
        return path

    def refusal(self, path):
        error = self.assertRaises(SystemExit, tap.makeService, self.options(path),
                                  MemoryReactorClock())
        self.assertNotIn("\n", str(error))
        self.assertTrue(str(error).startswith("gloom: "), str(error))
        return str(error)

    def test_missing_empty_short_and_odd_tokens_are_refused(self):
        missing = os.path.join(self.directory, "missing")
        self.assertIn(f"cannot read --admin-token-file {missing}: No such file", self.refusal(missing))
        self.assertIn("is empty", self.refusal(self.write(" \n\t\n")))
        self.assertIn("is 15 characters long; it needs at least 16",
                      self.refusal(self.write("  " + "x" * 15 + "\n")))
        self.assertIn("printable ASCII", self.refusal(self.write("x" * 10 + " " + "y" * 10)))
        self.assertIn("cannot read", self.refusal(self.directory))

    def test_a_good_token_is_stripped(self):
        path = self.write("\n  " + "k" * 16 + "  \n")
        service = tap.makeService(self.options(path), MemoryReactorClock())
        api = service.getServiceNamed("http").factory.resource.children[b"api"]
        self.assertEqual((api.admin_token, api.mtls), (b"k" * 16, False))

    def test_the_option_needs_http_and_a_path(self):
        for arguments in (["--admin-token-file", "/x"], ["--http", "tcp:0", "--admin-token-file", " "]):
            error = self.assertRaises(UsageError, tap.Options().parseOptions, arguments)
            self.assertNotIn("\n", str(error))

    def test_twistd_says_one_line_and_exits(self):
        path = self.write("short")
        daemon = TwistdDaemon(self, "-n", "gloom", "--master", "tcp:0:interface=127.0.0.1",
                              "--slave", "tcp:0:interface=127.0.0.1",
                              "--http", "tcp:0:interface=127.0.0.1", "--admin-token-file", path)
        status, output = daemon.finish()
        self.assertNotEqual(status, 0, output)
        lines = [line for line in output.splitlines() if "--admin-token-file" in line]
        self.assertEqual(len(lines), 1, output)
        self.assertIn("is 5 characters long; it needs at least 16", lines[0])
        self.assertNotIn("Traceback", output)
