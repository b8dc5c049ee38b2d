"""The whole daemon over real TCP on loopback, built by makeService."""

import socket
import struct

from twisted.internet import defer, reactor, task
from twisted.internet.defer import DeferredList, inlineCallbacks
from twisted.trial.unittest import TestCase

from gloom.tap import makeService
from tests.support import accepted, connect, daemon_side, live_ids, occupied_port, reserved_port


def wait_until(predicate, timeout=30.0):
    """Poll the reactor until ``predicate()`` is true.  Only for conditions
    no event signals (a file a subprocess writes): wait on a Deferred, or
    `DaemonTestCase.until`, whenever there is one."""
    deadline = reactor.seconds() + timeout

    @inlineCallbacks
    def poll():
        while not predicate():
            if reactor.seconds() > deadline:
                raise AssertionError("condition not reached in time")
            yield task.deferLater(reactor, 0.02, lambda: None)

    return poll()


class DaemonTestCase(TestCase):
    """A daemon from makeService on loopback ports; ``options`` adds settings.

    Its master and slave ports are reserved for the whole test (see
    `reserved_port`): they stay the daemon's after it stops, so a test may
    restart it there (`start_daemon`) or count on a refused connection."""

    max_frame = 64 * 1024
    retries = 3
    options: dict = {}

    def setUp(self):
        self.clients = []
        self._waiters = []
        self._check_call = None
        self.endpoints = {role: f"tcp:{reserved_port(self)}:interface=127.0.0.1"
                          for role in ("master", "slave")}
        self.start_daemon()
        self.addCleanup(self.stop)

    def start_daemon(self):
        """Start the daemon (again, once stopped) on this test's endpoints."""
        self.service = makeService(
            dict({
                "master": self.endpoints["master"],
                "slave": self.endpoints["slave"],
                "max-frame": self.max_frame,
                "retries": self.retries,
            }, **self.options),
            reactor,
        )
        for factory in self.service.factories:
            factory.buildProtocol = self._watched(factory.buildProtocol)
        self.service.startService()
        self.scheduler = self.service.scheduler

    @inlineCallbacks
    def stop(self):
        if self._check_call is not None:
            self._check_call.cancel()
            self._check_call = None
        if self.service.running:
            yield self.service.stopService()
        for client in self.clients:
            client.transport.loseConnection()
        yield DeferredList([c.lost for c in self.clients])

    # --- waiting on the daemon's state, without polling ----------------------

    def until(self, predicate, timeout=30.0):
        """A Deferred that fires once ``predicate()`` holds.  It is checked
        now, and then after each new connection of the daemon and each
        read, disconnection, pause and resume of one: whatever changes the
        daemon's state in answer to its peers (not its own timers, such as
        a job's timeout; wait for what the peers see of those instead)."""
        if predicate():
            return defer.succeed(None)
        waiter = defer.Deferred(lambda d: self._waiters.remove(entry))
        entry = (predicate, waiter)
        self._waiters.append(entry)

        def timed_out(failure):
            failure.trap(defer.TimeoutError)
            raise AssertionError(f"the daemon did not reach the condition in {timeout} s")

        return waiter.addTimeout(timeout, reactor).addErrback(timed_out)

    def _watched(self, build):
        """Wrap a factory's buildProtocol: the daemon's protocols check the
        `until` waiters after each event (on the next reactor turn, outside
        the daemon's own call)."""

        def buildProtocol(address):
            protocol = build(address)
            if protocol is not None:
                for name in ("connectionMade", "dataReceived", "connectionLost", "pauseProducing",
                             "resumeProducing"):
                    setattr(protocol, name, self._then_check(getattr(protocol, name)))
            return protocol

        return buildProtocol

    def _then_check(self, method):
        def checked(*args):
            try:
                return method(*args)
            finally:
                if self._waiters and self._check_call is None:
                    self._check_call = reactor.callLater(0, self._check_waiters)

        return checked

    def _check_waiters(self):
        self._check_call = None
        for entry in list(self._waiters):
            predicate, waiter = entry
            if predicate():
                self._waiters.remove(entry)
                waiter.callback(None)

    # --- clients ---------------------------------------------------------------

    def port(self, role):
        return self.service.getServiceNamed(role).port.getHost().port

    @inlineCallbacks
    def client(self, role):
        """A FrameClient connected to the daemon, once the daemon has
        accepted the connection (the client's end can be up first)."""
        client = yield connect(self.port(role))
        self.clients.append(client)
        factory = self.service.factories[0 if role == "master" else 1]
        yield self.until(lambda: accepted(factory, client.transport) is not None)
        return client

    @inlineCallbacks
    def slave(self, job_type):
        slave = yield self.client("slave")
        slave.send({"action": "join", "type": job_type})
        self.assertEqual((yield slave.next()), {"ok": True})
        return slave

    @inlineCallbacks
    def frames(self, client, count):
        """The next ``count`` frames a client receives."""
        received = []
        for _ in range(count):
            received.append((yield client.next()))
        return received

    @inlineCallbacks
    def expect_error(self, client, message, code, job_id=None):
        client.send(message)
        reply = yield client.next()
        self.assertEqual(reply["error"], code, reply)
        self.assertIsInstance(reply["reason"], str)
        self.assertEqual(reply.get("id"), job_id)
        return reply


class JobTests(DaemonTestCase):
    @inlineCallbacks
    def test_job_round_trip(self):
        slave = yield self.slave("echo")
        master = yield self.client("master")
        master.send({"action": "submit", "id": "j1", "type": "echo", "body": {"n": [1, 2**100, 0.5]}})
        self.assertEqual((yield master.next()), {"ok": True, "id": "j1"})
        job = yield slave.next()
        self.assertEqual(job, {"action": "job", "id": "j1", "type": "echo", "body": {"n": [1, 2**100, 0.5]}})
        slave.send({"action": "respond", "body": {"echo": job["body"]}})
        self.assertEqual((yield slave.next()), {"ok": True})
        self.assertEqual((yield master.next()), {"id": "j1", "body": {"echo": {"n": [1, 2**100, 0.5]}}})

    @inlineCallbacks
    def test_every_connection_has_tcp_nodelay(self):
        yield self.slave("t")
        yield self.client("master")
        connections = self.service.factories[0].connections | self.service.factories[1].connections
        self.assertEqual(len(connections), 2)
        for connection in connections:
            self.assertTrue(connection.transport.getTcpNoDelay())

    @inlineCallbacks
    def test_priority_order_and_ack_before_answer(self):
        master = yield self.client("master")
        for job_id, priority in [("low", -5), ("a", 0), ("top", 7), ("b", 0)]:
            master.send({"action": "submit", "id": job_id, "type": "p", "body": None, "priority": priority})
        acks = yield self.frames(master, 4)
        self.assertEqual([a["id"] for a in acks], ["low", "a", "top", "b"])
        slave = yield self.client("slave")
        slave.send({"action": "join", "type": "p"})
        self.assertEqual((yield slave.next()), {"ok": True})
        order = []
        for _ in range(4):
            job = yield slave.next()
            order.append(job["id"])
            slave.send({"action": "respond", "body": job["id"]})
            self.assertEqual((yield slave.next()), {"ok": True})
        self.assertEqual(order, ["top", "a", "b", "low"])
        answers = yield self.frames(master, 4)
        self.assertEqual([a["body"] for a in answers], order)

    @inlineCallbacks
    def test_large_body_in_many_reads(self):
        self.service.factories[0].max_frame = self.service.factories[1].max_frame = 8 * 1024 * 1024
        slave = yield self.slave("big")
        master = yield self.client("master")
        body = ["x" * 1000] * 5000
        master.send({"action": "submit", "id": "big", "type": "big", "body": body})
        yield master.next()
        job = yield slave.next()
        slave.send({"action": "respond", "body": job["body"]})
        yield slave.next()
        self.assertEqual((yield master.next()), {"id": "big", "body": body})


class ErrorTests(DaemonTestCase):
    max_frame = 1024

    @inlineCallbacks
    def test_every_error_code(self):
        master = yield self.client("master")
        slave = yield self.slave("t")
        yield self.expect_error(master, b"{nope", "invalid_json")
        yield self.expect_error(slave, b'"\xff"', "invalid_json")
        yield self.expect_error(master, {"action": "submit", "id": "x", "type": "t"}, "invalid_message", "x")
        yield self.expect_error(master, {"action": "launch"}, "unknown_action")
        yield self.expect_error(master, {"action": "join", "type": "t"}, "wrong_port")
        yield self.expect_error(slave, {"action": "submit", "id": "y", "type": "t", "body": 1}, "wrong_port")
        yield self.expect_error(slave, {"action": "respond", "body": 1}, "not_processing")

        master.send({"action": "submit", "id": "held", "type": "t", "body": 1})
        yield master.next()
        yield slave.next()
        yield self.expect_error(master, {"action": "submit", "id": "held", "type": "t", "body": 2}, "id_exists", "held")
        slave.send({"action": "fail", "reason": "no luck"})
        self.assertEqual((yield slave.next()), {"ok": True})
        reply = yield master.next()
        self.assertEqual(reply, {"error": "job_failed", "reason": "no luck", "id": "held"})

        master.send({"action": "submit", "id": "pending", "type": "none-such", "body": 1})
        yield master.next()
        server = daemon_side(self.service.factories[0], master.transport)
        yield self.expect_error(master, b"x" * 1025, "size_error")
        yield master.lost
        yield server.closed
        self.assertNotIn("pending", live_ids(self.scheduler))

    @inlineCallbacks
    def test_shutdown_frames(self):
        master = yield self.client("master")
        slave = yield self.slave("t")
        master.send({"action": "submit", "id": "running", "type": "t", "body": 1},
                    {"action": "submit", "id": "queued", "type": "t", "body": 2})
        yield master.next()
        yield master.next()
        yield slave.next()
        master_port = self.port("master")
        yield self.service.stopService()
        errors = yield self.frames(master, 2)
        self.assertEqual(sorted((e["error"], e["id"]) for e in errors), [("shutdown", "queued"), ("shutdown", "running")])
        yield master.lost
        yield slave.lost
        refused = socket.socket()
        self.addCleanup(refused.close)
        self.assertNotEqual(refused.connect_ex(("127.0.0.1", master_port)), 0)

    @inlineCallbacks
    def test_bad_peer_does_not_disturb_others(self):
        slave = yield self.slave("t")
        good = yield self.client("master")
        bad = yield self.client("master")
        bad.send({"action": "submit", "id": "b1", "type": "t", "body": 1})
        yield bad.next()
        bad_server = daemon_side(self.service.factories[0], bad.transport)
        self.assertEqual((yield slave.next())["id"], "b1")
        bad.transport.write(b"\x00\x00\x00\x05{{{{{" + struct.pack("!I", 10**9) + b"zzz")
        good.send({"action": "submit", "id": "g1", "type": "t", "body": 2})
        self.assertEqual((yield good.next()), {"ok": True, "id": "g1"})
        slave.send({"action": "respond", "body": "to b1"})
        yield slave.next()
        self.assertEqual((yield slave.next())["id"], "g1")
        slave.send({"action": "respond", "body": "to g1"})
        self.assertEqual((yield good.next()), {"id": "g1", "body": "to g1"})
        yield bad.lost
        yield bad_server.closed
        masters = self.service.factories[0]
        self.assertEqual(masters.connections, {daemon_side(masters, good.transport)})

    def test_port_in_use_stops_start_up_with_one_line(self):
        port = occupied_port(self)
        service = makeService({"master": f"tcp:{port}:interface=127.0.0.1",
                               "slave": "tcp:0:interface=127.0.0.1",
                               "max-frame": 100, "retries": 0}, reactor)
        error = self.assertRaises(SystemExit, service.privilegedStartService)
        message = str(error.code)
        self.assertIn(f"cannot listen for masters on tcp:{port}:interface=127.0.0.1", message)
        self.assertIn("in use", message)
        self.assertNotIn("\n", message)


class DisconnectTests(DaemonTestCase):
    retries = 1

    @inlineCallbacks
    def test_master_leaving_drops_queued_and_discards_running(self):
        slave = yield self.slave("t")
        master = yield self.client("master")
        master.send({"action": "submit", "id": "run", "type": "t", "body": 1},
                    {"action": "submit", "id": "queued", "type": "t", "body": 2})
        yield master.next()
        yield master.next()
        self.assertEqual((yield slave.next())["id"], "run")
        server = daemon_side(self.service.factories[0], master.transport)
        yield master.close()
        yield server.closed
        self.assertNotIn("queued", live_ids(self.scheduler))
        self.assertIn("run", live_ids(self.scheduler))
        slave.send({"action": "respond", "body": "nobody listens"})
        self.assertEqual((yield slave.next()), {"ok": True})
        self.assertNotIn("run", live_ids(self.scheduler))
        other = yield self.client("master")
        other.send({"action": "submit", "id": "run", "type": "t", "body": 3})
        self.assertEqual((yield other.next()), {"ok": True, "id": "run"})
        self.assertEqual((yield slave.next())["id"], "run")

    @inlineCallbacks
    def test_slave_leaving_requeues_until_retries_run_out(self):
        master = yield self.client("master")
        master.send({"action": "submit", "id": "fragile", "type": "t", "body": 1},
                    {"action": "submit", "id": "later", "type": "t", "body": 2})
        yield master.next()
        yield master.next()
        for attempt in range(2):
            slave = yield self.slave("t")
            self.assertEqual((yield slave.next())["id"], "fragile")
            yield slave.close()
        reply = yield master.next()
        self.assertEqual((reply["error"], reply["id"]), ("job_failed", "fragile"))
        self.assertIn("2 attempts", reply["reason"])
        slave = yield self.slave("t")
        self.assertEqual((yield slave.next())["id"], "later")
