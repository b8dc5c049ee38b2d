"""The Twisted client's detached, delayed and retried jobs, status and dead
letters, without sockets: against in-memory daemons connected with
twisted.test.iosim on a MemoryReactorClock (each daemon on a Clock of its
own), and against scripted daemons on StringTransports."""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionLost
from twisted.trial.unittest import SynchronousTestCase

from gloom import core
from gloom.core import DeadList, ServerError, TransportError
from gloom.txclient import MasterClient, Worker
from tests.test_txclient import RETRY, Memory, MemoryTestCase, Scripted


def fail_all(job):
    raise RuntimeError(f"cannot do {job.body!r}")


class DetachedMemoryTests(MemoryTestCase):
    def test_a_detached_submit_fires_with_the_id_and_status_follows_the_job(self):
        held = defer.Deferred()
        self.worker(lambda job: held)
        master = self.master()
        submitted = master.submit("t", "x", id="d1", detach=True)
        self.memory.flush()
        self.assertEqual(self.successResultOf(submitted), "d1")
        self.assertEqual(master._core.in_flight, 0)
        running = master.status("d1")
        self.memory.flush()
        figures = self.successResultOf(running)
        self.assertEqual((figures["id"], figures["state"], figures["detached"], figures["type"],
                          figures["attempts"]), ("d1", "running", True, "t", 1))
        self.assertNotIn("daemon", figures)
        held.callback({"done": [1, 2]})
        self.memory.flush()
        done = master.status("d1")
        self.memory.flush()
        figures = self.successResultOf(done)
        self.assertEqual((figures["state"], figures["result"]), ("completed", {"done": [1, 2]}))
        self.assertIsInstance(figures["ended_at"], float)

    def test_a_detached_job_outlives_its_master(self):
        first = self.master()
        self.successResultOf(self.flushed(first.submit("nobody", 1, id="d", detach=True, priority=3)))
        stopping = first.stop()
        self.memory.reactor.advance(0)
        self.memory.flush()
        self.successResultOf(stopping)
        second = self.master()
        figures = self.successResultOf(self.flushed(second.status("d")))
        self.assertEqual((figures["state"], figures["priority"]), ("queued", 3))
        # Anyone may cancel a detached job; it then ends failed.
        self.assertIsNone(self.successResultOf(self.flushed(second.cancel("d"))))
        figures = self.successResultOf(self.flushed(second.status("d")))
        self.assertEqual((figures["state"], figures["reason"]), ("failed", "cancelled by a master"))
        error = self.failureResultOf(self.flushed(second.cancel("d")), ServerError).value
        self.assertEqual(error.error, "unknown_job")

    def test_another_masters_attached_job_is_unknown(self):
        first, second = self.master(), self.master()
        first.submit("nobody", 1, id="mine")
        self.memory.flush()
        self.assertEqual(self.successResultOf(self.flushed(first.status("mine")))["state"], "queued")
        self.assertEqual(self.successResultOf(self.flushed(second.status("mine"))),
                         {"id": "mine", "state": "unknown"})

    def test_a_delayed_job_waits_then_runs(self):
        self.worker(lambda job: job.body * 2)
        master = self.master()
        daemon_clock = self.memory.daemons[0].clock
        answer = master.submit("t", 21, id="later", delay=10)
        self.memory.flush()
        self.assertNoResult(answer)
        figures = self.successResultOf(self.flushed(master.status("later")))
        self.assertEqual(figures["state"], "delayed")
        self.assertAlmostEqual(figures["run_at"], daemon_clock.seconds() + 10)
        daemon_clock.advance(10)
        self.memory.flush()
        self.assertEqual(self.successResultOf(answer), 42)
        at = master.run("t", 1, at=daemon_clock.seconds() + 5)
        self.memory.flush()
        self.assertNoResult(at)
        daemon_clock.advance(5)
        self.memory.flush()
        self.assertEqual(self.successResultOf(at), 2)

    def test_options_are_checked_before_anything_is_sent(self):
        master = self.master()
        self.assertRaises(ValueError, master.submit, "t", 1, delay=1, at=2)
        self.assertRaises(ValueError, master.submit, "t", 1, retries=1001)
        self.assertRaises(ValueError, master.run, "t", 1, detach=True)
        self.assertRaises(ValueError, master.status, "")
        self.assertRaises(ValueError, master.dead_list, limit=0)
        self.memory.flush()
        self.assertEqual(self.memory.daemons[0].scheduler.totals["submitted"], 0)

    def test_dead_letters(self):
        self.worker(fail_all)
        master = self.master()
        for job_id in ("d1", "d2"):
            self.successResultOf(self.flushed(master.submit("t", job_id, id=job_id, detach=True, retries=0)))
        figures = self.successResultOf(self.flushed(master.status("d1")))
        self.assertEqual((figures["state"], figures["attempts"]), ("dead", 1))
        self.assertIn("cannot do 'd1'", figures["reason"])
        page = self.successResultOf(self.flushed(master.dead_list()))
        self.assertIsInstance(page, DeadList)
        self.assertEqual(([entry["id"] for entry in page], page.total, page.offset), (["d1", "d2"], 2, 0))
        self.assertIn("cannot do 'd1'", page[0]["reason"])
        page = self.successResultOf(self.flushed(master.dead_list(offset=1, limit=1)))
        self.assertEqual(([entry["id"] for entry in page], page.total, page.offset), (["d2"], 2, 1))
        self.assertIsNone(self.successResultOf(self.flushed(master.dead_discard("d2"))))
        self.assertIsNone(self.successResultOf(self.flushed(master.dead_retry("d1"))))  # fails again
        page = self.successResultOf(self.flushed(master.dead_list()))
        self.assertEqual([entry["id"] for entry in page], ["d1"])
        error = self.failureResultOf(self.flushed(master.dead_retry("d2")), ServerError).value
        self.assertEqual((error.error, error.id), ("unknown_job", "d2"))
        error = self.failureResultOf(self.flushed(master.dead_discard("never")), ServerError).value
        self.assertEqual(error.error, "unknown_job")

    def test_start_fires_once_every_daemon_was_tried(self):
        memory = Memory(2)
        memory.reactor.tcpServers = [server for server in memory.reactor.tcpServers
                                     if server[0] != memory.port(1, "master")]
        master = MasterClient(memory.addresses("master"), memory.reactor, retry_policy=RETRY)
        started = master.start()
        self.assertNoResult(started)
        memory.flush()
        self.assertNoResult(started)  # the second daemon's attempt is pending
        self.assertEqual(master.unreachable, {})
        memory.refuse()
        self.successResultOf(started)
        self.assertEqual(master.up, [memory.name(0)])
        self.assertEqual(master.unreachable,
                         {memory.name(1): f"cannot connect to {memory.name(1)}: Connection refused"})
        self.successResultOf(master.start())  # tried already

    def flushed(self, deferred):
        self.memory.flush()
        return deferred


class SeveralDaemonsMemoryTests(SynchronousTestCase):
    def setUp(self):
        self.memory = Memory(3)
        self.names = self.memory.addresses("master")

    def master(self):
        master = MasterClient(self.names, self.memory.reactor, retry_policy=RETRY)
        started = self.flushed(master.start())
        self.memory.refuse()  # the daemons not listening
        self.successResultOf(started)
        return master

    def flushed(self, deferred):
        self.memory.flush()
        return deferred

    def test_a_detached_job_is_found_where_its_submit_put_it(self):
        first = self.master()
        ids = [f"d{n}" for n in range(12)]
        for job_id in ids:
            self.successResultOf(self.flushed(first.submit("nobody", job_id, id=job_id, detach=True)))
        second = self.master()
        for job_id in ids:
            figures = self.successResultOf(self.flushed(second.status(job_id)))
            home = core.rendezvous(job_id, self.names)[0]
            self.assertEqual((figures["state"], figures["daemon"]), ("queued", home))
        self.assertEqual(self.successResultOf(self.flushed(second.status("none"))),
                         {"id": "none", "state": "unknown"})

    def test_found_on_a_later_daemon_when_the_first_was_down_at_submit(self):
        job_id = next(f"d{n}" for n in range(1000) if core.rendezvous(f"d{n}", self.names)[0] == self.names[0])
        self.memory.kill(0)
        first = self.master()
        self.successResultOf(self.flushed(first.submit("nobody", 1, id=job_id, detach=True)))
        self.memory.listen(0)
        self.memory.reactor.advance(1)
        self.memory.flush()
        second = self.master()
        self.assertEqual(second.up, self.names)
        figures = self.successResultOf(self.flushed(second.status(job_id)))
        self.assertEqual(figures["daemon"], core.rendezvous(job_id, self.names)[1])
        self.assertIsNone(self.successResultOf(self.flushed(second.cancel(job_id))))

    def test_dead_lists_gathered_and_retry_finds_the_daemon(self):
        clocks = [daemon.clock for daemon in self.memory.daemons]
        worker = Worker("t", fail_all, 2, self.memory.addresses("slave"), self.memory.reactor, retry_policy=RETRY)
        worker.start()
        self.memory.flush()
        master = self.master()
        ids = [f"d{n}" for n in range(6)]
        for job_id in ids:
            for clock in clocks:
                clock.advance(1)  # each dies at a later time
            self.successResultOf(self.flushed(master.submit("t", job_id, id=job_id, detach=True, retries=0)))
            for _ in range(20):  # the asks move from daemon to daemon until one brings the job
                self.memory.reactor.advance(core.WorkerCore.ROTATE_INTERVAL)
                self.memory.flush()
        page = self.successResultOf(self.flushed(master.dead_list()))
        self.assertEqual([entry["id"] for entry in page], ids)
        self.assertEqual([entry["daemon"] for entry in page],
                         [core.rendezvous(job_id, self.names)[0] for job_id in ids])
        self.assertEqual(page.total, 6)
        page = self.successResultOf(self.flushed(master.dead_list(offset=2, limit=3)))
        self.assertEqual([entry["id"] for entry in page], ids[2:5])
        self.assertIsNone(self.successResultOf(self.flushed(master.dead_discard("d4"))))
        page = self.successResultOf(self.flushed(master.dead_list()))
        self.assertEqual((page.total, [entry["id"] for entry in page]), (5, ["d0", "d1", "d2", "d3", "d5"]))
        self.flushed(worker.stop())


class DetachedScriptedTests(SynchronousTestCase):
    def setUp(self):
        self.script = Scripted()
        self.master = MasterClient("tcp:127.0.0.1:9000", self.script.reactor, fail_after=1)
        self.started = self.master.start()
        (self.peer,) = self.script.accept()

    def test_the_frames(self):
        self.successResultOf(self.started)
        self.master.submit("t", 1, id="d", detach=True, delay=2.5, retries=7, backoff=True)
        self.master.status("d")
        self.master.dead_list(3, 40)
        self.master.dead_retry("x")
        self.master.dead_discard("y")
        self.master.cancel("z")
        self.assertEqual(self.peer.received(), [
            {"action": "submit", "id": "d", "type": "t", "body": 1, "priority": 0, "detach": True, "delay": 2.5,
             "retries": 7, "backoff": True, "ref": 1},
            {"action": "status", "id": "d", "ref": 2},
            {"action": "dead_list", "offset": 3, "limit": 40, "ref": 3},
            {"action": "dead_retry", "id": "x", "ref": 4},
            {"action": "dead_discard", "id": "y", "ref": 5},
            {"action": "cancel", "id": "z", "ref": 6},
        ])

    def test_a_journalled_ack_may_come_after_later_replies(self):
        detached = self.master.submit("t", 1, id="d", detach=True)
        status = self.master.status("d")
        self.peer.received()
        self.peer.send({"ok": True, "id": "d", "state": "queued", "ref": 2})
        self.assertEqual(self.successResultOf(status), {"id": "d", "state": "queued"})
        self.assertNoResult(detached)
        self.peer.send({"ok": True, "id": "d", "ref": 1})
        self.assertEqual(self.successResultOf(detached), "d")

    def test_a_journal_error(self):
        detached = self.master.submit("t", 1, id="d", detach=True)
        self.peer.send({"error": "journal_error", "reason": "the journal could not record the job: disk full",
                        "id": "d", "ref": 1})
        error = self.failureResultOf(detached, ServerError).value
        self.assertEqual((error.error, error.id), ("journal_error", "d"))

    def test_a_connection_lost_before_the_ack(self):
        detached = self.master.submit("t", 1, id="d", detach=True)
        self.peer.drop(ConnectionLost())
        error = self.failureResultOf(detached, TransportError).value
        self.assertIn("may or may not have taken detached job 'd'", str(error))

    def test_cancelling_the_deferred_before_the_ack_cancels_the_job(self):
        detached = self.master.submit("t", 1, id="d", detach=True)
        detached.cancel()
        self.failureResultOf(detached, CancelledError)
        self.assertEqual([m["action"] for m in self.peer.received()], ["submit", "cancel"])
