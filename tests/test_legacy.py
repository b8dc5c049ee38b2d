"""gloom.legacy, the 2009 client's API, against a real daemon.  Each test
body runs in a thread (blocking calls), written as 2009 code would call the
client, while the reactor serves the daemon in-process."""

import json
import os
import socket
import struct
import subprocess
import sys
import threading

from twisted.internet import reactor
from twisted.internet.threads import blockingCallFromThread, deferToThread
from twisted.trial.unittest import SynchronousTestCase

from gloom import client as modern
import gloom.legacy as gloom
from tests.support import BlockingClient, reserved_port
from tests.test_integration import DaemonTestCase


class LegacyTestCase(DaemonTestCase):
    def ports(self):
        return self.port("master"), self.port("slave")

    def daemon_side(self, role, sock):
        """The daemon's protocol for a client socket (after a round trip on
        it, so the daemon has accepted it); call from the test's thread."""
        factory = self.service.factories[0 if role == "master" else 1]
        local = sock.getsockname()[:2]

        def find():
            (found,) = [c for c in factory.connections
                        if (c.transport.getPeer().host, c.transport.getPeer().port) == local]
            return found

        return blockingCallFromThread(reactor, find)

    def answer_in_background(self, job_type, count, handler):
        """A 2009-style slave in its own thread: answers ``count`` jobs of
        ``job_type`` with ``handler(job)``, then disconnects."""
        slave = gloom.Slave("127.0.0.1", self.ports()[1])
        self.assertIs(slave.join(job_type, timeout=5), True)

        def run():
            try:
                for served, job in enumerate(slave, 1):
                    slave.respond(handler(job), timeout=5)
                    if served == count:
                        break
            finally:
                slave.disconnect()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.addCleanup(lambda: deferToThread(thread.join, 5))


class MasterAndSlaveTests(LegacyTestCase):
    def test_the_2009_test_suite_single_job(self):
        # clients/python/tests/test-both.py, with 2009's constructors.
        def body():
            master_port, slave_port = self.ports()
            master = gloom.Master("127.0.0.1", master_port)
            slave = gloom.Slave(ip="127.0.0.1", port=slave_port)
            self.assertEqual(master.submit(id="hi", type="foo", body="Here"), "hi")
            self.assertIs(slave.join("foo"), True)
            job = slave.job(timeout=1)
            self.assertEqual(job, {"action": "job", "id": "hi", "type": "foo", "body": "Here"})
            self.assertEqual((job.id, job.type, job.body), ("hi", "foo", "Here"))
            self.assertIs(slave.respond(body="ohai!"), True)
            answer = master.receive(timeout=1)
            self.assertIsInstance(answer, gloom.Job)
            self.assertEqual(answer, {"id": "hi", "body": "ohai!"})
            master.disconnect()
            slave.disconnect()
        return deferToThread(body)

    def test_constructors(self):
        def body():
            master_port, slave_port = self.ports()
            master = gloom.Master(addr=("127.0.0.1", master_port))
            slave = gloom.Slave(("127.0.0.1", slave_port))
            self.assertIs(slave.join("t", timeout=5), True)
            # Master(sock) and Slave(sock) take an existing socket, and a
            # connection can be built on another one.
            raw = socket.create_connection(("127.0.0.1", master_port))
            on_socket = gloom.Master(raw)
            self.assertIs(on_socket.sock, raw)
            again = gloom.Master(gloom.Protocol(raw))
            self.assertEqual(on_socket.submit(id="s", type="t", body=1, timeout=5), "s")
            self.assertEqual(master.submit(id="a", type="u", body=2, timeout=5), "a")
            self.assertEqual(slave.job(timeout=5).id, "s")
            slave.respond("one", timeout=5)
            self.assertEqual(again.receive(timeout=5), {"id": "s", "body": "one"})
            slave_sock = gloom.Slave(socket.create_connection(("127.0.0.1", slave_port)))
            slave_sock.join("u")
            self.assertEqual(slave_sock.job(timeout=5).body, 2)
            slave_sock.respond(3)
            self.assertEqual(master.receive(timeout=5).body, 3)
            self.assertRaises(TypeError, gloom.Master, 42)
            self.assertRaises(TypeError, gloom.Master, ("127.0.0.1", master_port), 9998)
            for connection in (master, slave, on_socket, slave_sock):
                connection.disconnect()
        return deferToThread(body)

    def test_new_job_id_and_submit_without_id(self):
        def body():
            master = gloom.Master("127.0.0.1", self.ports()[0])
            self.assertRegex(master.new_job_id(), r"^[0-9A-F]{32}$")
            self.assertNotEqual(master.new_job_id(), master.new_job_id())
            job_id = master.submit(type="nobody", body=None)
            self.assertRegex(job_id, r"^[0-9A-F]{32}$")
            master.disconnect()
        return deferToThread(body)

    def test_refused_submits_raise_and_the_master_goes_on(self):
        def body():
            master = gloom.Master("127.0.0.1", self.ports()[0])
            error = self.assertRaises(gloom.ServerError, master.submit, id="x", body=1)  # no type
            self.assertEqual((error.error, error.id), ("invalid_message", "x"))
            self.assertEqual(error.reason, error.detail)
            self.assertIn("type", error.reason)
            self.assertEqual(master.submit("dup", "nobody", 1, 5), "dup")
            error = self.assertRaises(gloom.ServerError, master.submit, "dup", "nobody", 2, 5)
            # The Erlang daemon's id_exists carried the id as its reason.
            self.assertEqual((error.error, error.reason, error.id), ("id_exists", "dup", "dup"))
            self.assertTrue(str(error).startswith("id_exists -> dup ("))
            self.assertEqual(error.args, ({"error": "id_exists", "reason": error.detail, "id": "dup"},))
            self.assertIsInstance(error, gloom.GloomError)
            self.assertIsInstance(error, modern.ServerError)
            self.assertEqual(master.submit("ok", "nobody", 3, 5), "ok")
            master.disconnect()
        return deferToThread(body)

    def test_receive_raises_a_failed_job(self):
        self.scheduler.max_retries = 0

        def body():
            master_port, slave_port = self.ports()
            master = gloom.Master("127.0.0.1", master_port)
            slave = gloom.Slave("127.0.0.1", slave_port)
            slave.join("t")
            job_id = master.submit(type="t", body="doomed")
            self.assertEqual(slave.job(timeout=5).id, job_id)
            slave.disconnect()  # holding the job, with no retries left
            error = self.assertRaises(gloom.ServerError, master.receive, 5)
            self.assertEqual((error.error, error.reason, error.id), ("job_failed", job_id, job_id))
            self.assertIn("slave disconnected", error.detail)
            master.disconnect()
        return deferToThread(body)

    def test_progress_from_a_new_slave_is_not_an_answer(self):
        """A 2009 master whose job's slave (a newer one) reports progress
        receives only the answer."""
        def body():
            master_port, slave_port = self.ports()
            master = gloom.Master("127.0.0.1", master_port)
            slave = BlockingClient(slave_port)
            slave.send({"action": "join", "type": "t"})
            self.assertEqual(slave.receive(), {"ok": True})
            job_id = master.submit(type="t", body="x")
            self.assertEqual(slave.receive()["id"], job_id)
            slave.send({"action": "progress", "done": 1, "total": 2})
            self.assertEqual(slave.receive(), {"ok": True})
            slave.send({"action": "respond", "body": "X"})
            self.assertEqual(slave.receive(), {"ok": True})
            self.assertEqual(master.receive(timeout=5), {"id": job_id, "body": "X"})
            master.disconnect()
            slave.close()
        return deferToThread(body)

    def test_do_many(self):
        def body():
            self.answer_in_background("double", 4, lambda job: job.body * 2)
            master = gloom.Master("127.0.0.1", self.ports()[0])
            early = master.submit(type="double", body=10)
            jobs = [{"type": "double", "body": 1}, {"id": "two", "type": "double", "body": 2},
                    {"type": "double", "body": 3, "timeout": 5}]
            answers = list(master.do_many(jobs, timeout=5))
            self.assertEqual(sorted(a.body for a in answers), [2, 4, 6])
            self.assertIn("two", [a.id for a in answers])
            # The answer to the job submitted before is left for receive.
            self.assertEqual(master.receive(timeout=5), {"id": early, "body": 20})
            master.disconnect()
        return deferToThread(body)

    def test_do_many_raises_a_failed_job(self):
        def body():
            self.answer_in_background("t", 1, lambda job: job.body)
            master = gloom.Master("127.0.0.1", self.ports()[0])
            answers = master.do_many([{"type": "t", "body": 1}, {"type": "t", "body": 2}], timeout=5)
            self.assertEqual(next(answers).body, 1)
            # The slave answered one job and left; stopping the daemon ends
            # the other one with a shutdown frame, which do_many raises.
            blockingCallFromThread(reactor, self.service.stopService)
            error = self.assertRaises(gloom.ServerError, next, answers)
            self.assertEqual((error.error, error.reason), ("shutdown", error.detail))
            self.assertIsNotNone(error.id)
            self.assertRaises(StopIteration, next, answers)
            master.disconnect()
        return deferToThread(body)

    def test_slave_join_respond_and_their_errors(self):
        def body():
            master_port, slave_port = self.ports()
            slave = gloom.Slave(port=slave_port)
            error = self.assertRaises(gloom.ServerError, slave.respond, body={"some": "stuff"})
            self.assertEqual(error.error, "not_processing")
            self.assertRaises(gloom.ServerError, slave.join, "")
            self.assertIs(slave.join(type="foo", timeout=5), True)
            self.assertIs(slave.join(type="bar", timeout=5), True)
            master = gloom.Master(port=master_port)
            master.submit("j", "bar", [1, 2**80])
            job = next(iter(slave))
            self.assertEqual(job.body, [1, 2**80])
            self.assertIs(slave.respond(job.body, timeout=5), True)
            # A second answer is refused, not taken for the next job's.
            master.submit("k", "bar", None)
            error = self.assertRaises(gloom.ServerError, slave.respond, "again")
            self.assertEqual((error.error, error.id), ("wrong_job", "j"))
            self.assertEqual(slave.job(timeout=5).id, "k")
            self.assertIs(slave.respond("k's"), True)
            self.assertEqual([master.receive(5).body for _ in range(2)], [[1, 2**80], "k's"])
            master.disconnect()
            slave.disconnect()
        return deferToThread(body)

    def test_the_2009_test_suite_protocol_errors(self):
        # clients/python/tests/test-master.py, in both versions' spelling:
        # send and write each take raw text or a JSON value.
        def body():
            master = gloom.Master(port=self.ports()[0])
            master.write("foo")
            self.assertEqual(self.assertRaises(gloom.ServerError, master.read).error, "invalid_json")
            master.send("foo")
            self.assertEqual(self.assertRaises(gloom.ServerError, master.read).error, "invalid_json")
            for message in ({"foo": "bar"}, {"action": "join", "type": "foo"},
                            {"action": "respond", "body": "bizzle"}):
                master.send(message)
                self.assertRaises(gloom.ServerError, master.read)
                master.write(message)
                self.assertRaises(gloom.ServerError, master.read)
            master.sock.send(struct.pack("!i", 2**30))
            self.assertEqual(self.assertRaises(gloom.ServerError, master.read).error, "size_error")
            self.assertRaises(gloom.TransportError, master.recv, 5)  # the daemon closed it
            master.disconnect()
        return deferToThread(body)

    def test_first_versions_send_and_recv_after_a_wait(self):
        def body():
            master_port, slave_port = self.ports()
            master = gloom.Master("127.0.0.1", master_port)
            master.send({"action": "stats"}, check_error=True)  # the first version's keyword
            self.assertIn("stats", master.read(5))
            master.send({"action": "stats"}, False)  # ... given by position
            self.assertIn("stats", master.read(5))
            slave = gloom.Slave("127.0.0.1", slave_port)
            slave.join("t")
            master.submit("a", "t", 1)
            slave.respond(slave.job(timeout=5).body + 1)  # once it returns, a's answer was sent
            master.submit("b", "t", 2)  # a's answer is read, and set aside, while this waits
            self.assertEqual(json.loads(master.recv(5)), {"id": "a", "body": 2})
            slave.respond(slave.job(timeout=5).body + 1)
            self.assertEqual(json.loads(master.recv(5)), {"id": "b", "body": 3})
            master.disconnect()
            slave.disconnect()
        return deferToThread(body)

    def test_a_late_answer_returns_false(self):
        self.scheduler.max_retries = 0

        def body():
            master_port, slave_port = self.ports()
            master = gloom.Master("127.0.0.1", master_port)
            slave = gloom.Slave("127.0.0.1", slave_port)
            slave.join("t")
            # A newer master sets a time limit the 2009 slave knows nothing of.
            master.write({"action": "submit", "id": "slow", "type": "t", "body": 1, "timeout": 0.05})
            self.assertEqual(master.read(5), {"ok": True, "id": "slow"})
            self.assertEqual(slave.job(timeout=5).id, "slow")
            self.assertEqual(self.assertRaises(gloom.ServerError, master.receive, 5).error, "job_failed")
            self.assertIs(slave.respond("too late"), False)
            master.submit("next", "t", 2)
            self.assertEqual(slave.job(timeout=5).id, "next")
            self.assertIs(slave.respond("in time"), True)
            self.assertEqual(master.receive(5).body, "in time")
        return deferToThread(body)


class TimeoutTests(LegacyTestCase):
    def test_submit_times_out_waiting_for_the_ack(self):
        def body():
            master_port, slave_port = self.ports()
            master = gloom.Master("127.0.0.1", master_port)
            master.submit("first", "t", 1)  # a round trip: the daemon has the connection
            server = self.daemon_side("master", master.sock)
            blockingCallFromThread(reactor, server.pauseProducing)  # it stops reading
            error = self.assertRaises(socket.timeout, master.submit, "late", "t", 2, timeout=0.05)
            self.assertIsInstance(error, gloom.Timeout)
            self.assertIsInstance(error, modern.Timeout)
            self.assertNotIsInstance(error, gloom.GloomError)  # as socket.timeout was not
            self.assertRaises(gloom.Timeout, master.submit, "first", "t", 3, timeout=0.05)  # a duplicate
            blockingCallFromThread(reactor, server.resumeProducing)
            # The late ack is skipped, the late refusal kept for receive.
            self.assertEqual(master.submit("after", "t", 4, timeout=5), "after")
            slave = gloom.Slave("127.0.0.1", slave_port)
            slave.join("t")
            for _ in range(3):
                job = slave.job(timeout=5)
                slave.respond(job.body * 10)
            error = self.assertRaises(gloom.ServerError, master.receive, 5)
            self.assertEqual((error.error, error.id), ("id_exists", "first"))
            answers = {master.receive(5).id: 0, master.receive(5).id: 0, master.receive(5).id: 0}
            self.assertEqual(set(answers), {"first", "late", "after"})
            master.disconnect()
            slave.disconnect()
        return deferToThread(body)

    def test_receive_and_job_time_out(self):
        def body():
            master_port, slave_port = self.ports()
            master = gloom.Master("127.0.0.1", master_port)
            slave = gloom.Slave("127.0.0.1", slave_port)
            self.assertRaises(socket.timeout, master.receive, timeout=0.05)
            slave.join("t")
            self.assertRaises(socket.timeout, slave.job, timeout=0.05)
            master.submit("j", "t", None)
            self.assertEqual(slave.job(timeout=5).id, "j")
            master.disconnect()
            slave.disconnect()
        return deferToThread(body)

    def test_connection_closed_by_the_daemon(self):
        def body():
            master = gloom.Master("127.0.0.1", self.ports()[0])
            master.submit(type="t", body=None)
            blockingCallFromThread(reactor, self.service.stopService)
            self.assertEqual(self.assertRaises(gloom.ServerError, master.receive, 5).error, "shutdown")
            error = self.assertRaises(gloom.TransportError, master.receive, 5)
            self.assertIsInstance(error, OSError)
            self.assertIsInstance(error, modern.TransportError)
            master.disconnect()
        return deferToThread(body)


class StandaloneTests(SynchronousTestCase):
    def test_connection_refused(self):
        port = reserved_port(self)  # bound, never listening
        error = self.assertRaises(gloom.TransportError, gloom.Master, "127.0.0.1", port)
        self.assertIsInstance(error, socket.error)
        self.assertIsNotNone(error.errno)
        self.assertIn(str(port), str(error))

    def test_exceptions(self):
        for name in ("GloomError", "TransportError", "ProtocolError", "ServerError"):
            cls = getattr(gloom, name)
            self.assertTrue(issubclass(cls, gloom.GloomError))
            self.assertTrue(issubclass(cls, getattr(modern, name)))
        error = gloom.ServerError({"error": "job_failed", "reason": "it broke", "id": "J"})
        self.assertEqual((error.error, error.reason, error.detail, error.id), ("job_failed", "J", "it broke", "J"))
        self.assertEqual(str(error), "job_failed -> J (it broke)")
        self.assertEqual(str(gloom.ServerError({})), "unknown error -> unknown cause")

    def test_no_twisted_and_no_daemon_modules(self):
        code = ("import sys, gloom.legacy; "
                "print(sorted(m for m in sys.modules if m.split('.')[0] == 'twisted' "
                "or m in ('gloom.wire', 'gloom.protocol', 'gloom.scheduler', 'gloom.master', "
                "'gloom.slave', 'gloom.rawjson', 'zope.interface')))")
        root = os.path.dirname(os.path.dirname(os.path.abspath(gloom.__file__)))
        output = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                                check=True)
        self.assertEqual(output.stdout.strip(), "[]")
