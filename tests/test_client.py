"""The blocking client, against a real daemon.  Each test body runs in a
thread (blocking calls) while the reactor serves the daemon in-process."""

import json
import os
import shutil
import socket
import struct
import tempfile
import threading
import time
from unittest import mock

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import blockingCallFromThread, deferToThread
from twisted.trial.unittest import SynchronousTestCase

from gloom.client import (
    EncodeError,
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
from gloom import client, core
from gloom.core import FrameBuffer, frame, rendezvous
from gloom.tap import makeService
from tests.certs import Authority
from tests.support import live_ids, record_answers, reserved_port
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


    def other_daemon(self):
        """A second daemon on its own loopback ports (call from the reactor
        thread, before the test body's thread starts)."""
        service = makeService({
            "master": f"tcp:{reserved_port(self)}:interface=127.0.0.1",
            "slave": f"tcp:{reserved_port(self)}:interface=127.0.0.1",
            "max-frame": self.max_frame,
            "retries": self.retries,
        }, reactor)
        service.startService()
        self.addCleanup(lambda: service.stopService() if service.running else None)
        return service

    @staticmethod
    def name(service, role="master"):
        return f"127.0.0.1:{service.getServiceNamed(role).port.getHost().port}"

    @staticmethod
    def drop_masters(service):
        """The daemon stops listening for masters and drops their
        connections, sending nothing more (as when its host dies), so a
        client's attempts to connect again are refused; call from the
        test's thread."""
        @inlineCallbacks
        def drop():
            yield service.getServiceNamed("master").disownServiceParent()
            for connection in list(service.factories[0].connections):
                connection.transport.abortConnection()
        blockingCallFromThread(reactor, drop)


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
                self.assertRaises(ValueError, slave.join, "")  # refused before it is sent
                self.assertRaises(Timeout, slave.job, 0.05)
        return deferToThread(body)

    def test_a_refused_join_is_raised_not_also_warned(self):
        import logging

        warnings = []
        handler = logging.Handler(logging.WARNING)
        handler.emit = warnings.append
        logger = logging.getLogger("gloom.client")
        logger.addHandler(handler)
        self.addCleanup(logger.removeHandler, handler)

        def body():
            with Slave(self.addresses()[0]) as slave:  # the master port
                self.assertEqual(self.assertRaises(ServerError, slave.join, "t").error, "wrong_port")
            self.assertEqual([record.getMessage() for record in warnings], [])
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


class AddressTests(ClientTestCase):
    def test_every_form_of_address(self):
        def body():
            (host, port), (_, slave_port) = self.addresses()
            name = f"{host}:{port}"
            for form in [(host, port), name, [name], [(host, port)], f" {name} ,"]:
                with Master(form) as master:
                    self.assertEqual(master.connected, [name])
                    self.assertEqual(master.stats()["types"], {})
            environment = {"GLOOM_MASTERS": name, "GLOOM_SLAVES": f"{host}:{slave_port}"}
            with mock.patch.dict(os.environ, environment), Master() as master, Slave() as slave:
                slave.join("t")
                master.submit("x", "t", 1)
                self.assertEqual(slave.job(5).id, "x")
        return deferToThread(body)

    def test_a_daemon_that_cannot_be_reached_is_left_out(self):
        down = [f"127.0.0.1:{reserved_port(self)}" for _ in range(2)]

        def body():
            up = f"127.0.0.1:{self.addresses()[0][1]}"
            with Master([down[0], up]) as master:
                self.assertEqual(master.connected, [up])
                for index in range(10):
                    master.submit(f"j{index}", "nobody", None)
                self.assertEqual(master.stats()["types"]["nobody"]["queued"], 10)
            error = self.assertRaises(TransportError, Master, ",".join(down))
            self.assertIn("cannot connect", str(error))
            for address in down:
                self.assertIn(address, str(error))
        return deferToThread(body)


class SeveralDaemonsTests(ClientTestCase):
    def test_jobs_spread_by_rendezvous_and_a_lost_daemon(self):
        here, other = self.service, self.other_daemon()

        def body():
            names = [self.name(here), self.name(other)]
            with Master(",".join(names)) as master:
                ids = [f"job-{index}" for index in range(40)]
                for job_id in ids:
                    master.submit(job_id, "nobody", job_id)
                expected = {name: {i for i in ids if rendezvous(i, names)[0] == name} for name in names}
                self.assertTrue(all(expected.values()), "each daemon gets some of the jobs")
                for service, name in ((here, names[0]), (other, names[1])):
                    self.assertEqual(blockingCallFromThread(reactor, live_ids, service.scheduler),
                                     expected[name])
                stats = master.stats()
                self.assertEqual(stats["types"]["nobody"]["queued"], 40)
                self.assertEqual(stats["daemons"][names[1]]["types"]["nobody"]["queued"],
                                 len(expected[names[1]]))

                self.drop_masters(other)
                lost = set()
                for _ in expected[names[1]]:
                    error = self.assertRaises(TransportError, master.receive, 5)
                    self.assertEqual(error.daemon, names[1])
                    self.assertIn(names[1], str(error))
                    self.assertIn(repr(error.id), str(error))
                    lost.add(error.id)
                self.assertEqual(lost, expected[names[1]])
                self.assertEqual(master.connected, [names[0]])
                for job_id in sorted(lost):  # ids that would go to the daemon that is gone
                    master.submit(job_id, "nobody", job_id)
                self.assertEqual(blockingCallFromThread(reactor, live_ids, here.scheduler), set(ids))
                self.assertEqual(master.stats()["types"]["nobody"]["queued"], 40)
                self.assertRaises(Timeout, master.receive, 0.05)
        return deferToThread(body)

    def test_resubmit_moves_a_lost_daemons_jobs(self):
        here, other = self.service, self.other_daemon()

        def body():
            self.serve_in_background(lambda job: job.body, "echo")  # on the first daemon only
            names = [self.name(here), self.name(other)]
            with Master(names, resubmit=True) as master:
                ids = [f"job-{index}" for index in range(20)]
                for job_id in ids:
                    master.submit(job_id, "echo", job_id)
                stranded = {i for i in ids if rendezvous(i, names)[0] == names[1]}
                answers = {}
                for _ in range(len(ids) - len(stranded)):
                    answer = master.receive(5)
                    answers[answer.id] = answer.body
                self.assertEqual(set(answers), set(ids) - stranded)
                self.drop_masters(other)
                for _ in stranded:
                    answer = master.receive(5)
                    answers[answer.id] = answer.body
                self.assertEqual(answers, {job_id: job_id for job_id in ids})
        return deferToThread(body)

    def test_a_slave_serves_several_daemons(self):
        here, other = self.service, self.other_daemon()

        def body():
            seen = []

            def handler(job):
                seen.append(job.id)
                return job.body * 2

            slave = Slave([self.name(here, "slave"), self.name(other, "slave")])
            thread = threading.Thread(target=slave.serve, args=(handler, "double"), daemon=True)
            thread.start()
            try:
                with Master([self.name(here), self.name(other)]) as master:
                    self.assertEqual(list(master.map("double", range(30), window=8, wait=10)),
                                     [2 * i for i in range(30)])
            finally:
                slave.disconnect()
                thread.join(10)
            self.assertFalse(thread.is_alive())
            self.assertEqual(len(seen), 30)
        return deferToThread(body)


class HangingListener:
    """A loopback port whose accept queue is full: a connection attempt to
    it hangs until it times out."""

    def __init__(self, test):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(0)
        test.addCleanup(self.listener.close)
        self.address = "127.0.0.1:%d" % self.listener.getsockname()[1]
        for _ in range(3):  # fill the queue
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(self.listener.getsockname())
            test.addCleanup(filler.close)


class ReconnectBoundsTests(ClientTestCase):
    def test_an_attempt_to_connect_again_ends_with_the_call(self):
        hanging = HangingListener(self)

        def body():
            with Master([f"127.0.0.1:{self.port('master')}", hanging.address], connect_timeout=2.0) as master:
                self.assertEqual(master.connected, [f"127.0.0.1:{self.port('master')}"])
                time.sleep(client.RETRY_INITIAL)  # an attempt is due
                started = time.monotonic()
                self.assertRaises(Timeout, master.receive, 0.2)
                # Not the 2 s the attempt could take: the call's own end bounds it
                # (an attempt gets at least RETRY_ATTEMPT_MIN).
                self.assertLess(time.monotonic() - started, 0.2 + client.RETRY_ATTEMPT_MIN + 0.4)
                # Cut short, it does not count as refused: the wait does not grow.
                self.assertEqual(master._retry[hanging.address][1], client.RETRY_INITIAL)
        return deferToThread(body)


class SlaveStopTests(ClientTestCase):
    def test_stop_with_queued_work_runs_none_of_it(self):
        def body():
            started, release = threading.Event(), threading.Event()
            ran = []

            def handler(job):
                ran.append(job.id)
                started.set()
                release.wait(10)
                return job.body

            slave = Slave(self.addresses()[1])
            slave.join("slow")
            thread = threading.Thread(target=slave.serve, args=(handler,), daemon=True)
            thread.start()
            with Master(self.addresses()[0]) as master:
                for n in range(3):
                    master.submit(f"job-{n}", "slow", n)
                self.assertTrue(started.wait(10))
                slave.stop()  # from another thread, during job 0
                release.set()
                thread.join(10)
                self.assertFalse(thread.is_alive())
                self.assertEqual(master.receive(5).id, "job-0")
                self.assertEqual(ran, ["job-0"])
                figures = master.stats()
                self.assertEqual(figures["types"]["slow"]["queued"], 2)
                self.assertEqual(figures["totals"].get("retried", 0), 0)
                self.assertEqual(blockingCallFromThread(reactor, self.scheduler.idle_slaves, "slow"), 0)
                self.assertRaises(TransportError, slave.job, 1)
            slave.disconnect()
        return deferToThread(body)

    def test_stop_while_waiting_for_a_job(self):
        def body():
            slave = Slave(self.addresses()[1])
            slave.join("idle")
            thread = threading.Thread(target=slave.serve, args=(lambda job: None,), daemon=True)
            thread.start()
            wait_idle = time.monotonic() + 10
            while blockingCallFromThread(reactor, self.scheduler.idle_slaves, "idle") != 1:
                self.assertLess(time.monotonic(), wait_idle)
                time.sleep(0.01)
            slave.stop()
            thread.join(10)
            self.assertFalse(thread.is_alive())
            self.assertEqual(blockingCallFromThread(reactor, self.scheduler.idle_slaves, "idle"), 0)
            slave.disconnect()
        return deferToThread(body)


class ReconnectTests(ClientTestCase):
    def test_a_daemon_that_comes_back_is_used_again(self):
        here, other = self.service, self.other_daemon()
        endpoints = {role: f"tcp:{other.getServiceNamed(role).port.getHost().port}:interface=127.0.0.1"
                     for role in ("master", "slave")}
        names = [self.name(here), self.name(other)]
        back = []

        def restart():
            yield other.stopService()
            service = makeService(dict(endpoints, **{"max-frame": self.max_frame, "retries": self.retries}),
                                  reactor)
            service.startService()
            self.addCleanup(service.stopService)
            back.append(service)

        def until(predicate, seconds=10):
            deadline = time.monotonic() + seconds
            while not predicate():
                self.assertLess(time.monotonic(), deadline, "not within 10 s")
                time.sleep(0.02)

        def body():
            slave = Slave([self.name(here, "slave"), self.name(other, "slave")])
            thread = threading.Thread(target=slave.serve, args=(lambda job: job.body, "echo"), daemon=True)
            thread.start()
            try:
                with Master(names) as master:
                    self.assertEqual(list(master.map("echo", range(10), window=4, wait=10)), list(range(10)))
                    blockingCallFromThread(reactor, lambda: inlineCallbacks(restart)())
                    (service,) = back
                    # The slave, waiting for work, connects again and asks there.
                    until(lambda: blockingCallFromThread(reactor, service.scheduler.idle_slaves, "echo") == 1)
                    # The master notices at its next calls, and connects again.
                    until(lambda: master.stats() and names[1] in master.connected)
                    ids = [i for i in (f"back-{n}" for n in range(40)) if rendezvous(i, names)[0] == names[1]]
                    for job_id in ids:
                        master.submit(job_id, "echo", job_id)
                    self.assertEqual({master.receive(10).id for _ in ids}, set(ids))
                    self.assertEqual(blockingCallFromThread(reactor, lambda: service.scheduler.totals["completed"]),
                                     len(ids))
            finally:
                slave.disconnect()
                thread.join(10)
            self.assertFalse(thread.is_alive())
        return deferToThread(body)


class ErrorTests(ClientTestCase):
    def test_a_body_that_is_not_json_is_refused_at_once(self):
        def body():
            self.serve_in_background(lambda job: job.body, "echo")
            with Master(self.addresses()[0]) as master:
                self.assertTrue(issubclass(EncodeError, ValueError))
                for bad in (float("nan"), {1, 2}, {"x": float("inf")}):
                    self.assertRaises(EncodeError, master.submit, None, "echo", bad)
                    self.assertRaises(EncodeError, master.run, "echo", bad)
                    self.assertRaises(EncodeError, list, master.map("echo", [1, bad, 3], wait=5))
                self.assertEqual(master.run("echo", "fine", wait=5), "fine")
                self.assertEqual(list(master.map("echo", [1, 2], wait=5)), [1, 2])
                self.assertRaises(Timeout, master.receive, 0.2)  # nothing strays from the stopped maps
        return deferToThread(body)

    def test_an_answer_that_is_not_json(self):
        def body():
            master_addr, slave_addr = self.addresses()
            with Master(master_addr) as master, Slave(slave_addr) as slave:
                slave.join("t")
                master.submit("a", "t", 1)
                job = slave.job(5)
                self.assertRaises(EncodeError, slave.respond, float("nan"))
                self.assertIs(slave.current, job)  # still held: answer it properly
                slave.respond("ok")
                self.assertEqual(master.receive(5), Job(id="a", body="ok"))
            self.serve_in_background(lambda job: {1, 2}, "set")  # serve fails such a job
            with Master(master_addr) as master:
                error = self.assertRaises(ServerError, master.run, "set", None, wait=5)
                self.assertEqual(error.error, "job_failed")
                self.assertIn("JSON", error.reason)
        return deferToThread(body)

    def test_a_master_on_the_slave_port_is_refused_quickly(self):
        def body():
            master_addr, slave_addr = self.addresses()
            with Master(slave_addr) as master:
                started = time.monotonic()
                error = self.assertRaises(ServerError, master.submit, "x", "t", 1)
                self.assertEqual(error.error, "wrong_port")
                self.assertLess(time.monotonic() - started, 5)
            with Slave(master_addr) as slave:
                error = self.assertRaises(ServerError, slave.join, "t")
                self.assertEqual(error.error, "wrong_port")
        return deferToThread(body)

    def test_a_dropped_daemon_fails_the_jobs_in_flight(self):
        def body():
            master_addr = self.addresses()[0]
            name = f"127.0.0.1:{master_addr[1]}"
            with Master(master_addr) as master:
                master.submit("a", "nobody", 1)
                master.submit("b", "nobody", 2)
                self.drop_masters(self.service)
                errors = [self.assertRaises(TransportError, master.receive, 5) for _ in range(2)]
                self.assertEqual({error.id for error in errors}, {"a", "b"})
                self.assertEqual({error.daemon for error in errors}, {name})
                self.assertIn(name, str(self.assertRaises(TransportError, master.receive, 5)))
                self.assertRaises(TransportError, master.submit, None, "t", 1)
                self.assertRaises(TransportError, master.run, "t", 1)
                self.assertRaises(TransportError, master.stats)
                self.assertEqual(master.connected, [])
        return deferToThread(body)

    def test_a_dropped_slave_connection(self):
        def body():
            master_addr, slave_addr = self.addresses()
            with Master(master_addr) as master, Slave(slave_addr) as slave:
                slave.join("t")
                master.submit("a", "t", 1)
                slave.job(5)
                blockingCallFromThread(reactor, lambda: [
                    c.transport.abortConnection() for c in list(self.service.factories[1].connections)])
                error = self.assertRaises(TransportError, slave.respond, "late")
                self.assertEqual((error.daemon, error.id), (f"127.0.0.1:{slave_addr[1]}", "a"))
                self.assertEqual(slave._core.in_hand, 0)  # counted until answered, then freed
                self.assertRaises(TransportError, slave.job, 5)
        return deferToThread(body)

    def test_map_stopped_early_cancels_its_jobs(self):
        def body():
            with Master(self.addresses()[0]) as master:
                results = master.map("nobody", range(5), window=3, wait=0.1)
                self.assertRaises(Timeout, next, results)
                self.assertEqual(master.stats()["types"], {})  # the cancels went first
                self.assertRaises(Timeout, master.receive, 0.1)
        return deferToThread(body)


class DisconnectTests(ClientTestCase):
    def test_disconnect_from_another_thread_ends_serve(self):
        def body():
            slave_addr = self.addresses()[1]
            for index in range(200):
                slave = Slave(slave_addr)
                escaped = []

                def serve():
                    try:
                        slave.serve(lambda job: job.body, "t")
                    except BaseException as e:
                        escaped.append(e)

                thread = threading.Thread(target=serve)
                thread.start()
                if index % 4:
                    time.sleep(index % 4 * 0.0005)
                slave.disconnect()
                thread.join(10)
                self.assertFalse(thread.is_alive())
                self.assertEqual(escaped, [])
        return deferToThread(body)

    def test_disconnect_from_another_thread_wakes_receive_and_job(self):
        def body():
            master_addr, slave_addr = self.addresses()
            slave = Slave(slave_addr)
            slave.join("t")
            for client, call in ((Master(master_addr), Master.receive), (slave, Slave.job)):
                outcome = []

                def wait():
                    try:
                        call(client)
                    except BaseException as e:
                        outcome.append(e)

                thread = threading.Thread(target=wait)
                thread.start()
                time.sleep(0.05)
                client.disconnect()
                thread.join(10)
                self.assertFalse(thread.is_alive())
                (error,) = outcome
                self.assertIsInstance(error, TransportError)
                self.assertIn("disconnected", str(error))
                self.assertIn("disconnected", str(self.assertRaises(TransportError, call, client)))
        return deferToThread(body)


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
            self.assertIn("certificate is not valid for 'not-the-server'", str(error))
            error = self.assertRaises(TransportError, Master, master_addr, tls=client_context())
            self.assertIn("TLS", str(error))
            self.assertIn("certificate verify failed", str(error))
            anonymous = Slave(slave_addr, tls=client_context(self.ca.path), server_hostname="localhost")
            self.addCleanup(anonymous.disconnect)
            error = self.assertRaises(TransportError, anonymous.join, "t")  # TLS 1.3: after the handshake
            self.assertIn("TLS", str(error))
            self.assertIn("certificate required", str(error))
            self.assertNotIn("\n", str(error))
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


class ScriptedDaemon:
    """A fake daemon on a real socket: each request it reads is answered,
    in one write, with the frames ``script(request)`` returns."""

    def __init__(self, test, script):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.address = self.listener.getsockname()
        self.script = script
        self.requests = []
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        test.addCleanup(self.listener.close)
        test.addCleanup(self.thread.join, 5)

    def run(self):
        connection, _ = self.listener.accept()
        splitter = FrameBuffer()
        with connection:
            while True:
                data = connection.recv(65536)
                if not data:
                    return
                for data in splitter.feed(data):
                    request = json.loads(data)
                    self.requests.append(request)
                    replies = self.script(request)
                    if replies:
                        connection.sendall(b"".join(frame(reply) for reply in replies))


def ack(request):
    return {"ok": True, "id": request["id"], "ref": request["ref"]}


class OrderingTests(SynchronousTestCase):
    """Replies in an order a real daemon produces only by chance."""

    def test_a_failure_that_crosses_a_cancel(self):
        def script(request):
            if request["action"] == "submit":
                return [ack(request)]
            return [{"error": "job_failed", "reason": "it broke", "id": request["id"]},
                    {"error": "unknown_job", "reason": "no such job", "id": request["id"],
                     "ref": request["ref"]}]

        daemon = ScriptedDaemon(self, script)
        with Master(daemon.address) as master:
            master.submit("j", "t", 1)
            error = self.assertRaises(ServerError, master.cancel, "j")
            self.assertEqual((error.error, error.id), ("unknown_job", "j"))
            self.assertEqual(master.receive(5), Job(id="j", error="job_failed", reason="it broke"))
            self.assertRaises(Timeout, master.receive, 0.05)

    def test_a_cancelled_job_sends_nothing_more(self):
        def script(request):
            if request["action"] == "submit":
                return [ack(request)]
            return [{"ok": True, "id": request["id"], "ref": request["ref"]}]

        daemon = ScriptedDaemon(self, script)
        with Master(daemon.address) as master:
            master.submit("j", "t", 1)
            self.assertIsNone(master.cancel("j"))
            self.assertRaises(Timeout, master.receive, 0.05)  # a cancelled job sends nothing
            self.assertEqual([r.get("ref") for r in daemon.requests], [1, 2])

    def test_a_refusal_without_id_or_ref_fails_the_oldest_request(self):
        def script(request):
            if request["action"] != "submit" or len(daemon.requests) == 1:
                return []
            return [{"error": "queue_full", "reason": "too many"}, ack(request),
                    {"id": request["id"], "body": "two"}]

        daemon = ScriptedDaemon(self, script)
        with Master(daemon.address) as master:
            results = master.map("t", [1, 2], window=2, wait=5)
            error = self.assertRaises(ServerError, next, results)
            self.assertEqual((error.error, error.reason), ("queue_full", "too many"))
            self.assertEqual(daemon.requests[0]["body"], 1)

    def test_a_refusal_without_id_or_ref_ends_a_submit(self):
        daemon = ScriptedDaemon(self, lambda request: [{"error": "wrong_port", "reason": "not here"}])
        with Master(daemon.address) as master:
            error = self.assertRaises(ServerError, master.submit, "x", "t", None)
            self.assertEqual(error.error, "wrong_port")

    def test_an_answer_in_the_same_read_as_its_ack(self):
        daemon = ScriptedDaemon(self, lambda request: [ack(request), {"id": request["id"], "body": "done"}])
        with Master(daemon.address) as master:
            self.assertEqual(master.run("t", 1, wait=5), "done")
            master.submit("x", "t", 2)
            self.assertEqual(master.receive(5), Job(id="x", body="done"))


class SlaveRotationTests(SynchronousTestCase):
    """A Slave on several daemons wakes at least every ROTATE_INTERVAL
    while it waits for a job, so an ask that brings nothing moves on; on
    one daemon it just waits."""

    @staticmethod
    def record_waits(slave):
        """Record the timeout of each wait of the slave's selector."""
        waits = []
        select = slave._selector.select
        slave._selector.select = lambda timeout=None: waits.append(timeout) or select(timeout)
        return waits

    def test_an_ask_that_brings_nothing_moves_to_the_daemon_with_work(self):
        def busy(request):
            if request["action"] == "join":
                return [{"ok": True}, {"action": "job", "id": "j1", "type": "t", "body": 1}]
            return [{"ok": True}]

        idle = ScriptedDaemon(self, lambda request: [{"ok": True}])
        working = ScriptedDaemon(self, busy)
        with Slave([idle.address, working.address]) as slave:
            slave.join("t")
            self.assertEqual(working.requests, [])  # one place: one ask, on the first daemon
            waits = self.record_waits(slave)
            started = time.monotonic()
            job = slave.job(5)
            self.assertLess(time.monotonic() - started, 2)
            self.assertEqual((job.id, job.body), ("j1", 1))
            self.assertEqual([r["action"] for r in idle.requests], ["join", "leave"])
            self.assertTrue(all(wait <= core.WorkerCore.ROTATE_INTERVAL + 0.001 for wait in waits), waits)
            slave.respond(2)
            self.assertEqual(working.requests[-1], {"action": "respond", "id": "j1", "body": 2})

    def test_one_daemon_waits_without_waking(self):
        daemon = ScriptedDaemon(self, lambda request: [{"ok": True}])
        with Slave([daemon.address]) as slave:
            slave.join("t")
            waits = self.record_waits(slave)
            self.assertRaises(Timeout, slave.job, 0.5)
            self.assertEqual(len(waits), 1)
            self.assertGreater(waits[0], 0.4)
            self.assertEqual(daemon.requests, [{"action": "join", "type": "t"}])


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
