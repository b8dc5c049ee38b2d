"""The blocking client, against a real daemon.  Each test body runs in a
thread (blocking calls) while the reactor serves the daemon in-process."""

import json
import shutil
import socket
import struct
import tempfile
import threading
import time

from twisted.internet import reactor
from twisted.internet.threads import blockingCallFromThread, deferToThread
from twisted.trial.unittest import SynchronousTestCase

from gloom.client import (
    GloomError,
    Job,
    Master,
    ProtocolError,
    ServerError,
    Slave,
    Timeout,
    TransportError,
    client_context,
)
from tests.certs import Authority
from tests.support import record_answers, reserved_port
from tests.test_integration import DaemonTestCase


class ClientTestCase(DaemonTestCase):
    def addresses(self):
        return ("127.0.0.1", self.port("master")), ("127.0.0.1", self.port("slave"))

    def serve_in_background(self, handler, job_type, **kwargs):
        """A Slave.serve loop in its own thread (call from the test's
        thread).  At cleanup the daemon drops the connection, which ends
        the loop as a daemon going away would; the client's socket is
        closed only once the thread is done with it."""
        slaves = self.service.factories[1]
        before = blockingCallFromThread(reactor, lambda: set(slaves.connections))
        slave = Slave(self.addresses()[1], **kwargs)
        slave.join(job_type)  # a round trip: the daemon has the connection now
        (connection,) = blockingCallFromThread(reactor, lambda: set(slaves.connections) - before)
        thread = threading.Thread(target=slave.serve, args=(handler,), daemon=True)
        thread.start()

        def stopped(_):
            self.assertFalse(thread.is_alive(), "Slave.serve went on after the daemon closed the connection")
            slave.disconnect()

        def stop():
            connection.transport.abortConnection()
            return deferToThread(thread.join, 30).addCallback(stopped)

        self.addCleanup(stop)
        return slave


class MasterAndSlaveTests(ClientTestCase):
    def test_the_2009_api(self):
        def body():
            master_addr, slave_addr = self.addresses()
            with Master(master_addr) as master, Slave(slave_addr) as slave:
                slave.join("echo")
                job_id = master.submit(type="echo", body={"n": [1, 2**80]})
                self.assertRegex(job_id, r"^[0-9a-f]{32}$")
                self.assertEqual(master.submit("mine", "echo", "two", priority=5), "mine")
                job = slave.job(timeout=5)
                self.assertIsInstance(job, Job)
                self.assertEqual((job.id, job.type, job.body), (job_id, "echo", {"n": [1, 2**80]}))
                slave.respond({"echo": job.body})
                second = slave.job(timeout=5)
                slave.respond(second.body.upper())
                answers = {a.id: a.body for a in (master.receive(5), master.receive(5))}
                self.assertEqual(answers, {job_id: {"echo": {"n": [1, 2**80]}}, "mine": "TWO"})
        return deferToThread(body)

    def test_do_many_yields_answers_as_they_arrive(self):
        def body():
            self.serve_in_background(lambda job: job.body * 2, "double")
            with Master(self.addresses()[0]) as master:
                answers = list(master.do_many([("double", 1), {"type": "double", "body": 2, "id": "two"},
                                               ("double", 3)], timeout=5))
            self.assertEqual(sorted(a.body for a in answers), [2, 4, 6])
            self.assertIn("two", [a.id for a in answers])
        return deferToThread(body)

    def test_run_and_map(self):
        def body():
            def handler(job):
                if job.body == "bad":
                    raise ValueError("bad body")
                return job.body * 3

            self.serve_in_background(handler, "triple")
            self.serve_in_background(handler, "triple")
            with Master(self.addresses()[0]) as master:
                self.assertEqual(master.run("triple", 5, wait=5), 15)
                self.assertEqual(list(master.map("triple", range(20), window=4, wait=5)),
                                 [i * 3 for i in range(20)])
                error = self.assertRaises(ServerError, master.run, "triple", "bad", wait=5)
                self.assertEqual((error.error, error.reason), ("job_failed", "bad body"))
                self.assertIsNotNone(error.id)
                results = master.map("triple", [1, "bad", 2], window=3, wait=5)
                self.assertEqual(next(results), 3)
                self.assertRaises(ServerError, next, results)
        return deferToThread(body)

    def test_run_leaves_other_answers_for_receive(self):
        def body():
            self.serve_in_background(lambda job: job.body, "echo")
            with Master(self.addresses()[0]) as master:
                master.submit("early", "echo", "first")
                self.assertEqual(master.run("echo", "second", wait=5), "second")
                self.assertEqual(master.receive(5), Job(id="early", body="first"))
        return deferToThread(body)

    def test_cancel_stats_and_errors(self):
        def body():
            with Master(self.addresses()[0]) as master:
                master.submit("q1", "nobody", None)
                stats = master.stats()
                self.assertEqual(stats["types"]["nobody"]["queued"], 1)
                master.cancel("q1")
                self.assertEqual(master.stats()["types"], {})
                error = self.assertRaises(ServerError, master.cancel, "q1")
                self.assertEqual((error.error, error.id), ("unknown_job", "q1"))
                master.submit("dup", "nobody", None)
                error = self.assertRaises(ServerError, master.submit, "dup", "nobody", None)
                self.assertEqual(error.error, "id_exists")
                self.assertRaises(ValueError, master.submit, "no-type")
                self.assertRaises(Timeout, master.receive, 0.05)
                self.assertTrue(issubclass(Timeout, TimeoutError) and issubclass(Timeout, GloomError))
        return deferToThread(body)

    def test_serve_reports_failures_and_survives_a_timeout(self):
        def body():
            release = threading.Event()

            def handler(job):
                if job.body == "slow":
                    release.wait(5)
                    return "too late"
                if job.body == "boom":
                    raise RuntimeError("it broke")
                return "fine"

            self.scheduler.max_retries = 0
            self.serve_in_background(handler, "t")
            with Master(self.addresses()[0]) as master:
                error = self.assertRaises(ServerError, master.run, "t", "slow", timeout=0.1, wait=5)
                self.assertTrue(error.reason.startswith("timeout"))
                release.set()
                error = self.assertRaises(ServerError, master.run, "t", "boom", wait=5)
                self.assertEqual(error.reason, "it broke")
                self.assertEqual(master.run("t", "ok", wait=5), "fine")
        return deferToThread(body)

    def test_answers_name_their_job(self):
        seen = record_answers(self)

        def body():
            master_addr, slave_addr = self.addresses()
            with Master(master_addr) as master, Slave(slave_addr) as slave:
                slave.join("t")
                master.submit("a", "t", 1)
                master.submit("b", "t", 2)
                slave.job(timeout=5)
                slave.respond("one")
                slave.job(timeout=5)
                slave.fail("two")
        return deferToThread(body).addCallback(
            lambda _: self.assertEqual(seen, [("respond", "a"), ("fail", "b")]))

    def test_slave_errors(self):
        def body():
            with Slave(self.addresses()[1]) as slave:
                error = self.assertRaises(ServerError, slave.respond, 1)
                self.assertEqual(error.error, "not_processing")
                self.assertRaises(ServerError, slave.join, "")
                self.assertRaises(Timeout, slave.job, 0.05)
        return deferToThread(body)

    def test_connection_closed_by_the_daemon(self):
        def body():
            master = Master(self.addresses()[0])
            return master

        def close_daemon(master):
            self.addCleanup(master.disconnect)
            stopped = self.service.stopService()
            return stopped.addCallback(lambda _: deferToThread(
                lambda: self.assertRaises(TransportError, master.receive, 5)))

        return deferToThread(body).addCallback(close_daemon)


class TLSClientTests(ClientTestCase):
    def setUp(self):
        self.certs = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.certs, True)
        self.ca = Authority(self.certs)
        key, cert = self.ca.issue("localhost", server=True)
        self.options = {
            "master": f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}",
            "slave": f"mtls:0:interface=127.0.0.1:privateKey={key}:certKey={cert}:caCerts={self.ca.path}",
        }
        return super().setUp()

    def test_tls_with_name_checking_and_a_client_certificate(self):
        def body():
            master_addr, slave_addr = self.addresses()
            key, cert = self.ca.issue("worker-1", server=False)
            slave_tls = client_context(self.ca.path, cert, key)
            self.serve_in_background(lambda job: job.body + "!", "t", tls=slave_tls,
                                     server_hostname="localhost")
            with Master(master_addr, tls=client_context(self.ca.path), server_hostname="localhost") as master:
                self.assertEqual(master.run("t", "hi", wait=5), "hi!")
            error = self.assertRaises(TransportError, Master, master_addr, tls=client_context(self.ca.path),
                                      server_hostname="not-the-server")
            self.assertIn("TLS", str(error))
            anonymous = Slave(slave_addr, tls=client_context(self.ca.path), server_hostname="localhost")
            self.assertRaises(GloomError, anonymous.join, "t")
        return deferToThread(body)


class FakeServer:
    """A socket server that sends exactly the bytes it is given, in pieces."""

    def __init__(self, test, pieces):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.address = self.listener.getsockname()
        self.pieces = pieces
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        test.addCleanup(self.listener.close)
        test.addCleanup(self.thread.join, 5)

    def run(self):
        connection, _ = self.listener.accept()
        with connection:
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection.recv(65536)
            for piece in self.pieces:
                connection.sendall(piece)
                time.sleep(0.001)


class FramingTests(SynchronousTestCase):
    def test_short_reads(self):
        frame = json.dumps({"ok": True, "id": "x"}).encode()
        data = struct.pack("!I", len(frame)) + frame
        server = FakeServer(self, [data[i:i + 1] for i in range(len(data))])
        with Master(server.address) as master:
            self.assertEqual(master.submit("x", "t", None), "x")

    def test_invalid_json_from_the_server(self):
        server = FakeServer(self, [struct.pack("!I", 3) + b"{{{"])
        with Master(server.address) as master:
            self.assertRaises(ProtocolError, master.submit, "x", "t", None)

    def test_connection_refused(self):
        address = ("127.0.0.1", reserved_port(self))  # bound, never listening
        error = self.assertRaises(TransportError, Master, address)
        self.assertIn("cannot connect", str(error))
        self.assertIn(str(address[1]), str(error))

    def test_server_closes_mid_frame(self):
        server = FakeServer(self, [struct.pack("!I", 100) + b"{"])
        with Master(server.address) as master:
            self.assertRaises(TransportError, master.submit, "x", "t", None)

    def test_numbers_any_decoder_refuses_still_arrive(self):
        from gloom.client import loads

        self.assertEqual(loads(b'{"big": 1e400, "n": ' + b"9" * 50 + b"}"), {"big": float("inf"), "n": 10**50 - 1})
        self.assertRaises(ValueError, loads, b"{nope")

    def test_job_properties(self):
        job = Job(id="1", type="t", body=[1])
        self.assertEqual((job.id, job.type, job.body, job.error), ("1", "t", [1], None))
        self.assertEqual(job.result(), [1])
        failed = Job(id="1", error="job_failed", reason="no")
        error = self.assertRaises(ServerError, failed.result)
        self.assertEqual((error.error, error.reason, error.id), ("job_failed", "no", "1"))
