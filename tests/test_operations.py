"""Running in production, over real TCP: timeouts, cancel, stats, HTTP
metrics, TLS and mutual TLS, backpressure, limits and keepalive."""

import json
import socket
import tempfile
import shutil

from twisted.internet import endpoints, reactor, ssl
from twisted.internet.defer import inlineCallbacks
from twisted.web.client import Agent, readBody

from gloom import protocol as gloom_protocol
from tests.certs import Authority
from tests.support import FrameClient, daemon_side
from tests.test_integration import DaemonTestCase


class TimeoutTests(DaemonTestCase):
    retries = 1
    options = {"job-timeout": 30.0}

    @inlineCallbacks
    def test_slow_slave_is_given_up_and_told(self):
        slow = yield self.slave("t")
        master = yield self.client("master")
        master.send({"action": "submit", "id": "j", "type": "t", "body": 1, "timeout": 0.2})
        yield master.next()
        self.assertEqual((yield slow.next())["id"], "j")
        fast = yield self.slave("t")
        job = yield fast.next()
        self.assertEqual(job["id"], "j")
        slow.send({"action": "respond", "body": "late"})
        refusal = yield slow.next()
        self.assertEqual((refusal["error"], refusal["id"]), ("timed_out", "j"))
        fast.send({"action": "respond", "body": "in time"})
        self.assertEqual((yield master.next()), {"id": "j", "body": "in time"})
        self.assertEqual(self.scheduler.totals["timed_out"], 1)

    @inlineCallbacks
    def test_server_default_timeout_applies(self):
        self.scheduler.default_timeout = 0.1
        self.scheduler.max_retries = 0
        slave = yield self.slave("t")
        master = yield self.client("master")
        master.send({"action": "submit", "id": "d", "type": "t", "body": 1})
        yield master.next()
        yield slave.next()
        failure = yield master.next()
        self.assertEqual((failure["error"], failure["id"]), ("job_failed", "d"))
        self.assertTrue(failure["reason"].startswith("timeout"))


class CancelAndLimitTests(DaemonTestCase):
    options = {"max-queued": 3}

    @inlineCallbacks
    def test_cancel_and_queue_full(self):
        master = yield self.client("master")
        for i in range(4):
            master.send({"action": "submit", "id": f"c{i}", "type": "t", "body": i})
        replies = yield self.frames(master, 4)
        self.assertEqual([r.get("ok") for r in replies[:3]], [True] * 3)
        self.assertEqual((replies[3]["error"], replies[3]["id"]), ("queue_full", "c3"))
        master.send({"action": "cancel", "id": "c1"}, {"action": "cancel", "id": "c1"})
        self.assertEqual((yield master.next()), {"ok": True, "id": "c1"})
        self.assertEqual((yield master.next())["error"], "unknown_job")
        slave = yield self.slave("t")
        got = [(yield slave.next())["id"]]
        slave.send({"action": "respond", "body": None})
        yield slave.next()
        got.append((yield slave.next())["id"])
        self.assertEqual(got, ["c0", "c2"])


class StatsTests(DaemonTestCase):
    options = {"http": "tcp:0:interface=127.0.0.1"}

    @inlineCallbacks
    def fetch(self, path):
        port = self.port("http")
        response = yield Agent(reactor).request(b"GET", f"http://127.0.0.1:{port}{path}".encode())
        body = yield readBody(response)
        content_type = response.headers.getRawHeaders(b"content-type")[0].decode()
        return response.code, content_type, body.decode()

    @inlineCallbacks
    def busy_daemon(self):
        """One answered job, one running, one queued (type t); one idle slave (type u)."""
        master = yield self.client("master")
        worker = yield self.slave("t")
        yield self.slave("u")
        master.send({"action": "submit", "id": "done", "type": "t", "body": 1})
        yield master.next()
        yield worker.next()
        worker.send({"action": "respond", "body": 2})
        yield worker.next()
        yield master.next()
        master.send({"action": "submit", "id": "run", "type": "t", "body": 1},
                    {"action": "submit", "id": "wait", "type": "t", "body": 1})
        yield self.frames(master, 2)
        yield worker.next()
        return master

    @inlineCallbacks
    def test_stats_action(self):
        master = yield self.busy_daemon()
        master.send({"action": "stats"})
        reply = yield master.next()
        self.assertTrue(reply["ok"])
        stats = reply["stats"]
        self.assertEqual(stats["types"], {
            "t": {"queued": 1, "delayed": 0, "running": 1, "idle_slaves": 0, "busy_slaves": 1, "paused": False},
            "u": {"queued": 0, "delayed": 0, "running": 0, "idle_slaves": 1, "busy_slaves": 0, "paused": False},
        })
        self.assertEqual(stats["totals"], {"submitted": 3, "completed": 1, "failed": 0, "cancelled": 0,
                                           "retried": 0, "timed_out": 0, "released": 0,
                                           "delayed": 0, "coalesced": 0, "progress": 0,
                                           "touched": 0, "cleared": 0, "detached": 0, "dead": 0,
                                           "dead_dropped": 0, "results_dropped": 0,
                                           "progress_replaced": 0})
        self.assertEqual((stats["paused"], stats["draining"]), ([], False))
        self.assertEqual(stats["delayed"], 0)
        self.assertEqual(stats["detached"], {"live": 0, "results": 0, "results_bytes": 0, "dead": 0})
        self.assertIsNone(stats["journal"])
        self.assertEqual((stats["masters"], stats["slaves"]), (1, 2))
        self.assertGreaterEqual(stats["uptime"], 0)
        import gloom

        self.assertEqual(stats["version"], gloom.__version__)

    @inlineCallbacks
    def test_http_status_and_metrics(self):
        yield self.busy_daemon()
        code, content_type, body = yield self.fetch("/status")
        self.assertEqual((code, content_type), (200, "application/json"))
        status = json.loads(body)
        self.assertEqual(status["types"]["t"]["queued"], 1)
        self.assertEqual(status["totals"]["completed"], 1)
        code, content_type, text = yield self.fetch("/metrics")
        self.assertEqual(code, 200)
        self.assertTrue(content_type.startswith("text/plain"))
        lines = set(text.splitlines())
        for expected in ('gloom_jobs_submitted_total 3.0', 'gloom_jobs_completed_total 1.0',
                         'gloom_jobs_queued{type="t"} 1.0', 'gloom_jobs_running{type="t"} 1.0',
                         'gloom_slaves_idle{type="u"} 1.0', 'gloom_slaves_busy{type="t"} 1.0',
                         'gloom_masters_connected 1.0', 'gloom_slaves_connected 2.0',
                         'gloom_job_latency_seconds_count{type="t"} 1.0'):
            self.assertIn(expected, lines)
        self.assertIn("# TYPE gloom_job_latency_seconds histogram", lines)
        code, _, _ = yield self.fetch("/nothing")
        self.assertEqual(code, 404)

    @inlineCallbacks
    def test_latency_series_of_a_vanished_type_is_dropped(self):
        master = yield self.client("master")
        slave = yield self.slave("brief")
        master.send({"action": "submit", "id": "b", "type": "brief", "body": 1})
        yield master.next()
        yield slave.next()
        slave.send({"action": "respond", "body": 1})
        yield master.next()
        _, _, text = yield self.fetch("/metrics")
        self.assertIn('type="brief"', text)
        server = daemon_side(self.service.factories[1], slave.transport)
        yield slave.close()
        yield server.closed
        self.assertNotIn("brief", self.scheduler.types())
        _, _, text = yield self.fetch("/metrics")
        self.assertNotIn('type="brief"', text)


class TLSTestCase(DaemonTestCase):
    """Masters on TLS; slaves behind mutual TLS with a test CA."""

    more_options: dict = {}

    def setUp(self):
        self.certs = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.certs, True)
        self.ca = Authority(self.certs)
        key, cert = self.ca.issue("localhost", server=True)
        self.server_key, self.server_cert = key, cert
        self.options = {
            "slave": f"mtls:0:interface=127.0.0.1:privateKey={key}:certKey={cert}:caCerts={self.ca.path}",
            "master": f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}",
            **self.more_options,
        }
        return super().setUp()

    @inlineCallbacks
    def tls_client(self, role, client_cert=None, trust=None):
        trust_root = ssl.Certificate.loadPEM(open(trust or self.ca.path, "rb").read())
        client_certificate = None
        if client_cert is not None:
            key, cert = client_cert
            client_certificate = ssl.PrivateCertificate.loadPEM(open(key, "rb").read() + open(cert, "rb").read())
        options = ssl.optionsForClientTLS("localhost", trustRoot=trust_root,
                                          clientCertificate=client_certificate)
        endpoint = endpoints.wrapClientTLS(
            options, endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.port(role)))
        client = yield endpoints.connectProtocol(endpoint, FrameClient())
        self.clients.append(client)
        return client


class TLSTests(TLSTestCase):
    @inlineCallbacks
    def test_job_over_tls_and_mutual_tls(self):
        slave = yield self.tls_client("slave", self.ca.issue("worker-1", server=False))
        slave.send({"action": "join", "type": "t"})
        self.assertEqual((yield slave.next()), {"ok": True})
        master = yield self.tls_client("master")
        master.send({"action": "submit", "id": "s", "type": "t", "body": "secret"})
        self.assertEqual((yield master.next()), {"ok": True, "id": "s"})
        self.assertEqual((yield slave.next())["body"], "secret")
        slave.send({"action": "respond", "body": "terces"})
        yield slave.next()
        self.assertEqual((yield master.next()), {"id": "s", "body": "terces"})

    @inlineCallbacks
    def check_refused(self, client_cert):
        slave = yield self.tls_client("slave", client_cert)
        slave.send({"action": "join", "type": "t"})
        yield slave.lost
        self.assertEqual(slave.buffer, b"")
        self.assertTrue(slave.frames.pending == [])
        self.assertEqual(self.scheduler.types(), {})

    def test_slave_without_certificate_never_reaches_the_protocol(self):
        return self.check_refused(None)

    def test_slave_with_certificate_from_another_ca_is_refused(self):
        other = Authority(self.certs, name="Someone Else")
        return self.check_refused(other.issue("intruder", server=False))


class BackpressureTests(DaemonTestCase):
    max_frame = 1024 * 1024

    @inlineCallbacks
    def test_master_that_does_not_read_is_not_read_either(self):
        slave = yield self.slave("big")
        padding = "x" * 65536

        def echo(frame_dict, original=slave.frames.put):
            if frame_dict.get("action") == "job":
                slave.send({"action": "respond", "body": [frame_dict["id"], padding]})
            original(frame_dict)

        slave.frames.put = echo
        master = yield self.client("master")
        master.send({"action": "stats"})
        yield master.next()  # a round trip: the daemon has accepted the connection
        server_master = daemon_side(self.service.factories[0], master.transport)
        master.transport.pauseProducing()
        jobs = 2000
        load = "y" * 16384
        master.send(*({"action": "submit", "id": str(i), "type": "big", "body": load} for i in range(jobs)))
        totals = self.scheduler.totals
        yield self.until(lambda: server_master.paused and totals["completed"] == totals["submitted"] > 0)
        settled = totals["submitted"]
        # Nothing more can happen until the master reads: the daemon has
        # stopped reading its connection, and has no job left for the slave.
        self.assertNotIn(server_master.transport, reactor.getReaders())
        self.assertEqual((self.scheduler.queued("big"), self.scheduler.idle_slaves("big")), (0, 1))
        # Other masters are still served meanwhile, and that one still not read.
        other = yield self.client("master")
        other.send({"action": "stats"})
        self.assertEqual((yield other.next())["stats"]["totals"]["submitted"], settled)
        self.assertTrue(server_master.paused)
        self.assertEqual(totals["submitted"], settled)
        self.assertLess(settled, jobs)
        master.transport.resumeProducing()
        replies = yield self.frames(master, 2 * jobs)
        # Every frame in order, though most waited in the daemon's buffers:
        # each job's ack, then (one slave, oldest job first) the answers in
        # the order submitted, none ahead of an ack it follows.
        acked, answered = [], []
        for reply in replies:
            if "body" in reply:
                self.assertEqual(reply["body"], [reply["id"], padding])
                self.assertIn(reply["id"], acked)
                answered.append(reply["id"])
            else:
                self.assertEqual(reply, {"ok": True, "id": reply["id"]})
                acked.append(reply["id"])
        self.assertEqual(acked, [str(i) for i in range(jobs)])
        self.assertEqual(answered, acked)


class KeepaliveTests(DaemonTestCase):
    @inlineCallbacks
    def test_keepalive_on_every_connection(self):
        yield self.slave("t")
        yield self.client("master")
        for factory in self.service.factories:
            (connection,) = factory.connections
            sock = connection.transport.getHandle()
            self.assertTrue(sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE))
            if hasattr(socket, "TCP_KEEPIDLE"):
                self.assertEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                                 gloom_protocol.KEEPALIVE_IDLE)
