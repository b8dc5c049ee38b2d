"""The slave actions ``leave`` (take back a join) and ``release`` (hand the
held job back unrun), through the protocol and in the scheduler."""

from twisted.trial.unittest import SynchronousTestCase

from gloom.scheduler import QUEUED, ScheduledJob, _COMPACT_MINIMUM, _JobQueue
from gloom.slave import SlaveState
from tests.support import Daemon, live_ids


def submit(master, job_id, job_type="t", **fields):
    replies = master.send(dict({"action": "submit", "id": job_id, "type": job_type, "body": job_id}, **fields))
    assert replies == [{"ok": True, "id": job_id}], replies


class LeaveTests(SynchronousTestCase):
    def setUp(self):
        self.daemon = Daemon()
        self.scheduler = self.daemon.scheduler
        self.master = self.daemon.master()

    def test_an_idle_slave_stops_waiting_at_once(self):
        slave = self.daemon.slave("t")
        self.assertEqual(self.scheduler.idle_slaves("t"), 1)
        self.assertEqual(slave.send({"action": "leave"}), [{"ok": True}])
        self.assertEqual(self.scheduler.idle_slaves("t"), 0)
        self.assertIs(slave.protocol.state, SlaveState.JOINED)
        submit(self.master, "1")
        self.assertEqual(slave.received(), [])
        self.assertEqual(self.scheduler.queued("t"), 1)
        self.assertEqual(slave.send({"action": "join", "type": "t"}),
                         [{"ok": True}, {"action": "job", "id": "1", "type": "t", "body": "1"}])

    def test_a_busy_slave_keeps_its_job_and_gets_no_other(self):
        slave = self.daemon.slave("t")
        submit(self.master, "1")
        submit(self.master, "2")
        self.assertEqual(slave.received()[0]["id"], "1")
        self.assertEqual(slave.send({"action": "leave"}), [{"ok": True}])
        self.assertIs(slave.protocol.state, SlaveState.BUSY)
        self.assertEqual(slave.send({"action": "respond", "body": "one"}), [{"ok": True}])
        self.assertEqual(self.master.received(), [{"id": "1", "body": "one"}])
        self.assertIs(slave.protocol.state, SlaveState.JOINED)
        self.assertEqual((self.scheduler.queued("t"), self.scheduler.idle_slaves("t")), (1, 0))
        self.assertEqual(slave.send({"action": "join", "type": "t"})[1]["id"], "2")

    def test_after_a_failure_or_a_late_answer_too(self):
        daemon = Daemon(max_retries=0)
        master, slave = daemon.master(), daemon.slave("t")
        submit(master, "1", timeout=1)
        submit(master, "2")
        slave.received()
        slave.send({"action": "leave"})
        daemon.clock.advance(1)
        (refusal,) = slave.send({"action": "fail", "reason": "late"})
        self.assertEqual(refusal["error"], "timed_out")
        self.assertEqual(daemon.scheduler.queued("t"), 1)
        slave.send({"action": "join", "type": "t"})
        self.assertEqual(slave.send({"action": "leave"}, {"action": "fail", "reason": "no"}),
                         [{"ok": True}, {"ok": True}])
        self.assertEqual(daemon.scheduler.types(), {})

    def test_leave_without_a_join_or_twice(self):
        slave = self.daemon.slave()
        self.assertEqual(slave.send({"action": "leave"}, {"action": "leave"}), [{"ok": True}, {"ok": True}])
        self.assertIs(slave.protocol.state, SlaveState.NEW)
        submit(self.master, "1")
        self.assertEqual(slave.send({"action": "join", "type": "t"})[1]["id"], "1")
        self.assertEqual(slave.send({"action": "leave"}, {"action": "leave"}), [{"ok": True}, {"ok": True}])
        self.assertEqual(slave.send({"action": "respond", "body": None}), [{"ok": True}])

    def test_the_slave_keeps_its_type(self):
        slave = self.daemon.slave("t")
        forgotten = []
        self.scheduler.on_type_unused = forgotten.append
        slave.send({"action": "leave"})
        self.assertEqual(forgotten, [])
        self.assertEqual(slave.protocol.job_type, "t")
        slave.disconnect()
        self.assertEqual(forgotten, ["t"])

    def test_joining_another_type_while_busy_after_leaving(self):
        slave = self.daemon.slave("a")
        submit(self.master, "1", "a")
        submit(self.master, "2", "b")
        slave.received()
        self.assertEqual(slave.send({"action": "leave"}, {"action": "join", "type": "b"}),
                         [{"ok": True}, {"ok": True}])
        self.assertEqual(slave.send({"action": "respond", "body": None}),
                         [{"ok": True}, {"action": "job", "id": "2", "type": "b", "body": "2"}])

    def test_a_slave_that_left_and_disconnects_holding_a_job(self):
        slave = self.daemon.slave("t")
        submit(self.master, "1")
        slave.received()
        slave.send({"action": "leave"})
        slave.disconnect()
        self.assertEqual((self.scheduler.queued("t"), self.scheduler.totals["retried"]), (1, 1))

    def test_leave_while_closing(self):
        slave = self.daemon.slave("t")
        submit(self.master, "1")
        slave.received()
        slave.protocol.closing()
        self.assertEqual(slave.send({"action": "leave"}), [{"ok": True}])
        self.assertIs(slave.protocol.state, SlaveState.CLOSING)
        self.assertEqual(slave.send({"action": "respond", "body": 1}), [{"ok": True}])
        self.assertIs(slave.protocol.state, SlaveState.CLOSING)

    def test_master_port_refuses_them(self):
        for action in ("leave", "release"):
            (reply,) = self.master.send({"action": action, "id": "1"})
            self.assertEqual(reply["error"], "wrong_port")


class ReleaseTests(SynchronousTestCase):
    def setUp(self):
        self.daemon = Daemon()
        self.scheduler = self.daemon.scheduler
        self.master = self.daemon.master()

    def job(self, job_id):
        (job,) = [job for job in self.scheduler.jobs() if job.id == job_id]
        return job

    def test_the_job_goes_to_the_head_of_its_priority(self):
        slave = self.daemon.slave("t")
        submit(self.master, "1")
        for job_id, priority in (("2", 0), ("3", 0), ("high", 5), ("low", -1)):
            submit(self.master, job_id, priority=priority)
        self.assertEqual(slave.received()[0]["id"], "1")
        self.assertEqual(slave.send({"action": "leave"}, {"action": "release", "id": "1"}),
                         [{"ok": True}, {"ok": True}])
        self.assertEqual(self.master.received(), [])
        order = [slave.send({"action": "join", "type": "t"})[1]["id"]]
        for _ in range(4):
            order.append(slave.send({"action": "respond", "body": None})[1]["id"])
        self.assertEqual(order, ["high", "1", "2", "3", "low"])

    def test_without_leave_the_slave_asks_again(self):
        slave = self.daemon.slave("t")
        submit(self.master, "1")
        submit(self.master, "2")
        slave.received()
        self.assertEqual(slave.send({"action": "release", "id": "1"}),
                         [{"ok": True}, {"action": "job", "id": "1", "type": "t", "body": "1"}])

    def test_an_idle_slave_gets_the_job_at_once(self):
        first = self.daemon.slave("t")
        submit(self.master, "1")
        second = self.daemon.slave("t")
        first.received()
        self.assertEqual(first.send({"action": "leave"}, {"action": "release", "id": "1"}),
                         [{"ok": True}, {"ok": True}])
        self.assertEqual(second.received(), [{"action": "job", "id": "1", "type": "t", "body": "1"}])

    def test_no_attempt_or_retry_is_counted(self):
        daemon = Daemon(max_retries=0)
        master, first = daemon.master(), daemon.slave("t")
        submit(master, "1")
        first.received()
        job = daemon.scheduler.jobs()[0]
        self.assertEqual((job.attempt, job.retries), (1, 0))
        first.send({"action": "leave"}, {"action": "release", "id": "1"})
        self.assertEqual((job.attempt, job.retries, job.state), (0, 0, QUEUED))
        self.assertEqual(daemon.scheduler.totals,
                         {"submitted": 1, "completed": 0, "failed": 0, "cancelled": 0, "retried": 0,
                          "timed_out": 0, "released": 1, "delayed": 0, "coalesced": 0,
                          "progress": 0, "touched": 0, "cleared": 0})
        second = daemon.slave("t")
        self.assertEqual(second.received()[0]["id"], "1")
        second.disconnect()  # the only attempt lost: no retries allowed
        (failure,) = master.received()
        self.assertEqual(failure["error"], "job_failed")
        self.assertIn("gave up after 1 attempt", failure["reason"])

    def test_the_timer_is_cancelled(self):
        slave = self.daemon.slave("t")
        submit(self.master, "1", timeout=2)
        slave.received()
        self.daemon.clock.advance(1)
        slave.send({"action": "leave"}, {"action": "release", "id": "1"})
        self.assertEqual([call for call in self.daemon.clock.getDelayedCalls() if call.active()], [])
        self.daemon.clock.advance(10)
        self.assertEqual(self.scheduler.totals["timed_out"], 0)
        self.assertEqual(self.scheduler.queued("t"), 1)
        other = self.daemon.slave("t")
        self.assertEqual(other.received()[0]["id"], "1")
        self.daemon.clock.advance(2)  # a new attempt, timed afresh
        self.assertEqual(self.scheduler.totals["timed_out"], 1)

    def test_the_id_is_required_and_must_be_the_held_job(self):
        slave = self.daemon.slave("t")
        (reply,) = slave.send({"action": "release", "id": "1"})
        self.assertEqual((reply["error"], reply["id"]), ("not_processing", "1"))
        submit(self.master, "1")
        slave.received()
        for request, code in (({}, "invalid_message"), ({"id": 1}, "invalid_message"),
                              ({"id": ""}, "invalid_message"), ({"id": "2"}, "wrong_job")):
            (reply,) = slave.send(dict(request, action="release"))
            self.assertEqual(reply["error"], code, request)
            self.assertIn("'id'" if code == "invalid_message" else "holds job '1'", reply["reason"])
        self.assertEqual(self.job("1").holder, slave.protocol)
        self.assertEqual(slave.send({"action": "respond", "body": "done"}), [{"ok": True}])
        self.assertEqual(self.master.received(), [{"id": "1", "body": "done"}])

    def test_a_timed_out_attempt_cannot_be_released(self):
        daemon = Daemon(max_retries=1)
        master = daemon.master()
        slow, fast = daemon.slave("t"), daemon.slave("t")
        submit(master, "1", timeout=1)
        slow.received()
        daemon.clock.advance(1)
        self.assertEqual(fast.received()[0]["id"], "1")
        (refusal,) = slow.send({"action": "release", "id": "1"})
        self.assertEqual((refusal["error"], refusal["id"]), ("timed_out", "1"))
        self.assertIn("this release was discarded", refusal["reason"])
        self.assertEqual(daemon.scheduler.totals["released"], 0)
        self.assertEqual(daemon.scheduler.idle_slaves("t"), 1)
        self.assertEqual(fast.send({"action": "respond", "body": "ok"}), [{"ok": True}])
        self.assertEqual(master.received(), [{"id": "1", "body": "ok"}])

    def test_a_cancelled_job_is_not_resurrected(self):
        slave = self.daemon.slave("t")
        submit(self.master, "1")
        slave.received()
        self.assertEqual(self.master.send({"action": "cancel", "id": "1"}), [{"ok": True, "id": "1"}])
        self.assertEqual(slave.send({"action": "release", "id": "1"}), [{"ok": True}])
        self.assertEqual((len(self.scheduler), self.scheduler.queued("t")), (0, 0))
        self.assertEqual(self.scheduler.totals["cancelled"], 1)
        self.assertEqual(self.scheduler.totals["released"], 0)
        self.assertEqual(self.scheduler.idle_slaves("t"), 1)
        self.assertEqual(self.master.received(), [])
        submit(self.master, "1")  # the id is free; the new job is the one handed out
        self.assertEqual(slave.received(), [{"action": "job", "id": "1", "type": "t", "body": "1"}])

    def test_a_job_of_a_departed_master_ends(self):
        slave = self.daemon.slave("t")
        submit(self.master, "1")
        slave.received()
        self.master.disconnect()
        slave.send({"action": "release", "id": "1"})
        self.assertEqual((len(self.scheduler), self.scheduler.totals["cancelled"]), (0, 1))

    def test_release_while_the_daemon_stops(self):
        self.scheduler.startService()
        slave = self.daemon.slave("t")
        submit(self.master, "1")
        slave.received()
        self.scheduler.stopService()
        self.assertEqual(self.master.received()[0]["error"], "shutdown")
        self.assertEqual(slave.send({"action": "release", "id": "1"}), [{"ok": True}])
        self.assertEqual(len(self.scheduler), 0)

    def test_totals_add_up_and_metrics_show_releases(self):
        from prometheus_client import CollectorRegistry

        from gloom.http import LatencyHistogram, make_site
        from gloom.tap import GloomService

        service = GloomService(self.scheduler, (self.daemon.masters, self.daemon.slaves), self.daemon.clock)
        registry = CollectorRegistry()
        site = make_site(service.stats, LatencyHistogram(registry), registry)
        slave = self.daemon.slave("t")
        submit(self.master, "1")
        slave.send({"action": "release", "id": "1"}, {"action": "release", "id": "1"})
        totals = service.stats()["totals"]
        self.assertEqual(totals["released"], 2)
        self.assertEqual(totals["submitted"], totals["completed"] + totals["failed"] + totals["cancelled"] + 1)
        metrics = site.resource.children[b"metrics"].render_body().decode()
        self.assertIn("gloom_jobs_released_total 2.0", metrics)
        self.assertEqual(live_ids(self.scheduler), {"1"})


def queued_job(job_id, priority=0, sequence=0):
    job = ScheduledJob(None, job_id, "t", None, priority, sequence, None, 0.0)
    job.state = QUEUED
    return job


def drain(queue):
    taken = []
    while True:
        job = queue.pop()
        if job is None:
            return taken
        taken.append(job.id)


class JobQueueFrontTests(SynchronousTestCase):
    def test_push_front_onto_nothing_a_lone_job_and_a_deque(self):
        queue = _JobQueue()
        queue.push_front(queued_job("a", sequence=5))
        self.assertEqual(len(queue), 1)
        queue.push(queued_job("b", sequence=6))
        queue.push_front(queued_job("c", sequence=9))
        queue.push_front(queued_job("d", priority=1, sequence=10))
        lone = _JobQueue()
        lone.push(queued_job("y", sequence=1))
        lone.push_front(queued_job("x", sequence=2))
        self.assertEqual((drain(queue), drain(lone)), (["d", "c", "a", "b"], ["x", "y"]))
        self.assertEqual((queue.entries, queue.keys, queue.levels), (0, [], {}))

    def test_withdrawn_jobs_and_compaction_keep_the_front(self):
        queue = _JobQueue()
        jobs = [queued_job(str(n), sequence=n) for n in range(3 * _COMPACT_MINIMUM)]
        for job in jobs:
            queue.push(job)
        queue.push_front(queued_job("front", sequence=-1))
        for job in jobs[: 2 * _COMPACT_MINIMUM]:
            job.state = "ended"
            queue.discard()
        self.assertLess(queue.entries, len(jobs))  # compacted on the way
        queue.push_front(queued_job("newer front", sequence=1000))
        self.assertEqual(len(queue), _COMPACT_MINIMUM + 2)
        self.assertEqual(drain(queue)[:3], ["newer front", "front", str(2 * _COMPACT_MINIMUM)])
        self.assertEqual(queue.entries, 0)

    def test_dead_entries_at_the_front_are_skipped(self):
        queue = _JobQueue()
        released = queued_job("released", sequence=3)
        queue.push(queued_job("a", sequence=4))
        queue.push_front(released)
        released.state = "ended"
        queue.discard()
        self.assertEqual((len(queue), drain(queue)), (1, ["a"]))
