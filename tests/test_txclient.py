"""The Twisted client against a real daemon in the same reactor."""

from twisted.internet import defer, endpoints, reactor, task
from twisted.internet.defer import inlineCallbacks
from twisted.internet.interfaces import IStreamClientEndpoint
from zope.interface import implementer

from gloom.client import ServerError, TransportError
from gloom.txclient import MasterClient, Worker, client_endpoint, work
from tests.support import live_ids, record_answers, reserved_port
from tests.test_integration import DaemonTestCase

FAST_RETRY = lambda attempt: 0.02  # noqa: E731  (reconnect at once in tests)


@implementer(IStreamClientEndpoint)
class ObservedEndpoint:
    """A TCP endpoint that keeps, for each connection it makes, a Deferred
    that fires once the client has seen that connection lost."""

    def __init__(self, port):
        self.endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        self.losses = []

    def connect(self, factory):
        def connected(protocol):
            lost = defer.Deferred()
            connection_lost = protocol.connectionLost

            def connectionLost(reason):
                try:
                    connection_lost(reason)
                finally:
                    lost.callback(None)

            protocol.connectionLost = connectionLost
            self.losses.append(lost)
            return protocol

        return self.endpoint.connect(factory).addCallback(connected)


class TxClientTestCase(DaemonTestCase):
    def master(self, address=None, **kwargs):
        if address is None:
            address = f"127.0.0.1:{self.port('master')}"
        client = MasterClient(address, reactor, retry_policy=FAST_RETRY, **kwargs)
        client.start()
        self.addCleanup(client.stop)
        return client

    def worker(self, job_type, handler, concurrency=1):
        worker = Worker(job_type, handler, concurrency, f"127.0.0.1:{self.port('slave')}", reactor,
                        retry_policy=FAST_RETRY)
        worker.start()
        self.addCleanup(worker.stop)
        return worker


class MasterClientTests(TxClientTestCase):
    @inlineCallbacks
    def test_answers_values_deferreds_and_failures(self):
        def handler(job):
            if job.body == "later":
                return task.deferLater(reactor, 0.01, lambda: "deferred answer")
            if job.body == "boom":
                raise KeyError("no such thing")
            return {"echo": job.body, "type": job.type}

        self.worker("t", handler, concurrency=3)
        master = self.master()
        answers = yield defer.gatherResults([master.submit("t", 1), master.submit("t", "later"),
                                             master.submit("t", [2**70], priority=5)])
        self.assertEqual(answers, [{"echo": 1, "type": "t"}, "deferred answer", {"echo": [2**70], "type": "t"}])
        failure = yield self.assertFailure(master.submit("t", "boom"), ServerError)
        self.assertEqual((failure.error, failure.reason), ("job_failed", "'no such thing'"))
        yield self.until(lambda: self.scheduler.idle_slaves("t") == 3)

    @inlineCallbacks
    def test_refusals_cancel_and_stats(self):
        master = self.master()
        first = master.submit("nobody", 1, id="same")
        refused = yield self.assertFailure(master.submit("nobody", 2, id="other", timeout=-1), ServerError)
        self.assertEqual((refused.error, refused.id), ("invalid_message", "other"))
        stats = yield master.stats()
        self.assertEqual(stats["types"]["nobody"]["queued"], 1)
        self.assertRaises(ValueError, master.submit, "nobody", 3, id="same")
        first.cancel()
        yield self.assertFailure(first, defer.CancelledError)
        # The cancel went out on the connection ahead of this request, so
        # the daemon handled it before answering.
        stats = yield master.stats()
        self.assertEqual((stats["types"], stats["totals"]["cancelled"]), ({}, 1))
        self.assertNotIn("same", live_ids(self.scheduler))
        self.assertEqual(self.scheduler.totals["cancelled"], 1)

    @inlineCallbacks
    def test_jobs_in_flight_fail_when_the_daemon_goes(self):
        master = self.master()
        pending = master.submit("nobody", 1)
        # The stats request follows the submit on the same connection: once
        # it is answered the daemon holds the job.  (A submit still on its
        # way when the daemon goes fails with TransportError instead: its
        # outcome is unknown.)
        stats = yield master.stats()
        self.assertEqual(stats["types"]["nobody"]["queued"], 1)
        yield self.service.stopService()
        # The daemon fails each job it holds with a shutdown frame before it
        # closes the connection, so the master hears why.
        error = yield self.assertFailure(pending, ServerError)
        self.assertEqual(error.error, "shutdown")

    @inlineCallbacks
    def test_unreachable_daemon(self):
        port = reserved_port(self)  # bound, never listening: connections are refused
        master = MasterClient(f"127.0.0.1:{port}", reactor, fail_after=1)
        master.start()
        self.addCleanup(master.stop)
        error = yield self.assertFailure(master.submit("t", 1), TransportError)
        self.assertIn(f"cannot connect to 127.0.0.1:{port}", str(error))

    def test_addresses(self):
        self.assertEqual(client_endpoint(reactor, "example.com:9998")._hostBytes, b"example.com")
        self.assertEqual(client_endpoint(reactor, ":9998")._hostBytes, b"127.0.0.1")
        self.assertEqual(client_endpoint(reactor, "[::1]:9998")._hostBytes, b"::1")
        self.assertEqual(client_endpoint(reactor, "tcp:host=h:port=1")._host, "h")
        self.assertRaises(ValueError, client_endpoint, reactor, "no-port-here")


class WorkerTests(TxClientTestCase):
    @inlineCallbacks
    def test_answers_name_their_job(self):
        seen = record_answers(self)

        def handler(job):
            if job.body == "boom":
                raise ValueError("boom")
            return job.body

        self.worker("t", handler)
        master = self.master()
        yield master.submit("t", 1, id="a")
        yield self.assertFailure(master.submit("t", "boom", id="b"), ServerError)
        self.assertEqual(seen, [("respond", "a"), ("fail", "b")])

    @inlineCallbacks
    def test_reconnects_when_the_daemon_restarts(self):
        self.worker("t", lambda job: job.body + 1)
        endpoint = ObservedEndpoint(self.port("master"))
        master = self.master(endpoint)
        self.assertEqual((yield master.submit("t", 1)), 2)
        yield self.service.stopService()
        yield endpoint.losses[-1]  # a submit now would go to the closed connection
        self.assertFalse(master.connected)
        self.start_daemon()  # on the same ports, reserved meanwhile
        self.assertEqual((yield master.submit("t", 41)), 42)
        self.assertEqual(len(endpoint.losses), 2)

    @inlineCallbacks
    def test_stop_finishes_the_job_in_hand(self):
        started, release = defer.Deferred(), defer.Deferred()

        def handler(job):
            started.callback(None)
            return release.addCallback(lambda _: "finished")

        worker = self.worker("t", handler, concurrency=2)
        master = self.master()
        answer = master.submit("t", None)
        yield started
        self.assertEqual(worker.busy, 1)
        stopping = worker.stop()
        yield self.until(lambda: self.scheduler.idle_slaves("t") == 0)
        self.assertFalse(stopping.called)
        release.callback(None)
        self.assertEqual((yield answer), "finished")
        yield stopping
        yield self.until(lambda: "t" not in self.scheduler.types())

    def test_work_starts_a_worker(self):
        worker = work("t", lambda job: None, concurrency=2, address=f"127.0.0.1:{self.port('slave')}")
        self.addCleanup(worker.stop)
        self.assertEqual(len(worker.slots), 2)
        return self.until(lambda: self.scheduler.idle_slaves("t") == 2)
