"""Detached and delayed jobs, status, retries with backoff and dead letters,
on the daemon's protocols in memory with a `Clock` (no sockets)."""

from twisted.trial.unittest import SynchronousTestCase

from gloom import wire
from tests.support import Daemon


def submit(job_id, **fields):
    return {"action": "submit", "id": job_id, "type": fields.pop("type", "t"),
            "body": fields.pop("body", None), **fields}


class DetachedTests(SynchronousTestCase):
    def setUp(self):
        self.daemon = Daemon()
        self.master = self.daemon.master()

    def status(self, job_id, master=None):
        (reply,) = (master or self.master).send({"action": "status", "id": job_id})
        self.assertEqual((reply["ok"], reply["id"]), (True, job_id))
        return reply

    def test_acked_like_any_job_and_survives_its_master(self):
        self.assertEqual(self.master.send(submit("mail-1", detach=True, body={"to": "x"})),
                         [{"ok": True, "id": "mail-1"}])
        self.master.disconnect()
        slave = self.daemon.slave("t")
        self.assertEqual(slave.received(),
                         [{"action": "job", "id": "mail-1", "type": "t", "body": {"to": "x"}}])
        self.assertEqual(slave.send({"action": "respond", "body": {"sent": True}}), [{"ok": True}])
        other = self.daemon.master()
        self.assertEqual(self.status("mail-1", other),
                         {"ok": True, "id": "mail-1", "state": "completed", "detached": True,
                          "type": "t", "priority": 0, "attempts": 1, "ended_at": 0.0,
                          "result": {"sent": True}})

    def test_no_answer_is_pushed(self):
        slave = self.daemon.slave("t")
        self.master.send(submit("a", detach=True))
        slave.send({"action": "respond", "body": 1})
        self.assertEqual(self.master.received(), [])

    def test_the_result_is_kept_as_the_slave_sent_it(self):
        slave = self.daemon.slave("t")
        self.master.send(submit("a", detach=True))
        slave.protocol.dataReceived(wire_frame(b'{"action":"respond","body":{"b" : 1.50}}'))
        self.master.transport.clear()
        self.master.protocol.dataReceived(wire_frame(b'{"action":"status","id":"a"}'))
        self.assertIn(b'"result":{"b" : 1.50}}', self.master.transport.value())

    def test_one_namespace_for_detached_ids(self):
        self.master.send(submit("x", detach=True))
        other = self.daemon.master()
        (refusal,) = other.send(submit("x", detach=True))
        self.assertEqual((refusal["error"], refusal["id"]), ("id_exists", "x"))
        # Attached jobs keep their per-master ids.
        self.assertEqual(other.send(submit("x")), [{"ok": True, "id": "x"}])
        self.assertEqual(self.master.send(submit("x")), [{"ok": True, "id": "x"}])

    def test_an_ended_id_may_be_used_again(self):
        slave = self.daemon.slave("t")
        self.master.send(submit("x", detach=True))
        slave.send({"action": "respond", "body": 1})
        self.assertEqual(self.master.send(submit("x", detach=True)), [{"ok": True, "id": "x"}])
        self.assertEqual(self.status("x")["state"], "running")

    def test_a_master_disconnecting_drops_attached_keeps_detached(self):
        self.master.send(submit("att"), submit("det", detach=True),
                         submit("att-later", delay=10), submit("det-later", detach=True, delay=10))
        self.master.disconnect()
        self.assertEqual(len(self.daemon.scheduler), 2)
        self.assertEqual(self.daemon.scheduler.delayed(), 1)
        slave = self.daemon.slave("t")
        self.assertEqual([m["id"] for m in slave.received()], ["det"])
        slave.send({"action": "respond", "body": None})
        self.daemon.clock.advance(10)
        self.assertEqual([m["id"] for m in slave.received()], ["det-later"])

    def test_status_of_each_state(self):
        daemon, master = self.daemon, self.master
        self.assertEqual(self.status("nothing"), {"ok": True, "id": "nothing", "state": "unknown"})
        master.send(submit("q"), submit("later", delay=30, priority=2))
        self.assertEqual(self.status("q"), {"ok": True, "id": "q", "state": "queued",
                                            "detached": False, "type": "t", "priority": 0,
                                            "attempts": 0})
        self.assertEqual(self.status("later"), {"ok": True, "id": "later", "state": "delayed",
                                                "detached": False, "type": "t", "priority": 2,
                                                "attempts": 0, "run_at": 30.0})
        daemon.slave("t")
        self.assertEqual(self.status("q")["state"], "running")
        self.assertEqual(self.status("q")["attempts"], 1)

    def test_status_never_shows_another_masters_attached_job(self):
        self.master.send(submit("mine"), submit("theirs-too", detach=True))
        other = self.daemon.master()
        self.assertEqual(self.status("mine", other)["state"], "unknown")
        self.assertEqual(self.status("theirs-too", other)["state"], "queued")

    def test_own_attached_job_comes_before_a_detached_one(self):
        self.daemon.master().send(submit("x", detach=True, priority=5))
        self.master.send(submit("x", priority=1))
        reply = self.status("x")
        self.assertEqual((reply["detached"], reply["priority"]), (False, 1))

    def test_status_echoes_the_ref(self):
        (reply,) = self.master.send({"action": "status", "id": "x", "ref": 9})
        self.assertEqual(reply, {"ok": True, "id": "x", "state": "unknown", "ref": 9})

    def test_cancel_a_detached_job(self):
        self.master.send(submit("d", detach=True))
        other = self.daemon.master()
        self.assertEqual(other.send({"action": "cancel", "id": "d"}), [{"ok": True, "id": "d"}])
        reply = self.status("d")
        self.assertEqual((reply["state"], reply["reason"]), ("failed", "cancelled by a master"))
        slave = self.daemon.slave("t")
        self.assertEqual(slave.received(), [])

    def test_cancel_a_running_detached_job_drops_its_answer(self):
        slave = self.daemon.slave("t")
        self.master.send(submit("d", detach=True))
        self.master.send({"action": "cancel", "id": "d"})
        self.assertEqual([m["id"] for m in slave.received()], ["d"])
        self.assertEqual(slave.send({"action": "respond", "body": 1}), [{"ok": True}])
        self.assertEqual(self.status("d")["state"], "failed")

    def test_stats(self):
        from gloom.tap import GloomService

        service = GloomService(self.daemon.scheduler, (self.daemon.masters, self.daemon.slaves),
                               self.daemon.clock)
        self.daemon.masters.stats = service.stats
        self.master.send(submit("a", detach=True), submit("b", delay=5), submit("c", detach=True, delay=9))
        (reply,) = self.master.send({"action": "stats"})
        stats = reply["stats"]
        self.assertEqual(stats["types"]["t"], {"queued": 1, "delayed": 2, "running": 0,
                                               "idle_slaves": 0, "busy_slaves": 0, "paused": False})
        self.assertEqual(stats["delayed"], 2)
        self.assertEqual(stats["detached"], {"live": 2, "results": 0, "results_bytes": 0, "dead": 0})
        self.assertEqual((stats["totals"]["detached"], stats["totals"]["delayed"]), (2, 2))


def wire_frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + payload


class DelayTests(SynchronousTestCase):
    def setUp(self):
        self.daemon = Daemon()
        self.daemon.clock.advance(1_000_000)
        self.master = self.daemon.master()

    def test_delay_then_queued_with_its_priority(self):
        self.master.send(submit("low", delay=5, priority=1), submit("high", delay=5, priority=9),
                         submit("now", priority=0))
        slave = self.daemon.slave("t")
        self.assertEqual([m["id"] for m in slave.received()], ["now"])
        slave.send({"action": "leave"})
        slave.send({"action": "respond", "body": None})
        self.daemon.clock.advance(4.9)
        self.assertEqual(self.daemon.scheduler.queued("t"), 0)
        self.daemon.clock.advance(0.1)
        self.assertEqual(self.daemon.scheduler.queued("t"), 2)
        self.assertEqual([m.get("id") for m in slave.send({"action": "join", "type": "t"})],
                         [None, "high"])

    def test_an_idle_slave_gets_the_job_when_its_time_comes(self):
        slave = self.daemon.slave("t")
        self.master.send(submit("j", at=1_000_030))
        self.assertEqual(slave.received(), [])
        self.daemon.clock.advance(30)
        self.assertEqual([m["id"] for m in slave.received()], ["j"])

    def test_at_in_the_past_or_a_zero_delay_runs_now(self):
        self.master.send(submit("past", at=5), submit("zero", delay=0))
        self.assertEqual(self.daemon.scheduler.queued("t"), 2)

    def test_the_earliest_job_sets_the_one_timer(self):
        self.master.send(submit("late", delay=100))
        self.master.send(submit("early", delay=10))
        self.assertEqual(len(self.daemon.clock.getDelayedCalls()), 1)
        self.daemon.clock.advance(10)
        self.assertEqual(self.daemon.scheduler.queued("t"), 1)
        self.assertEqual(self.daemon.scheduler.delayed("t"), 1)

    def test_cancelled_delayed_jobs_leave_the_heap(self):
        self.master.send(*[submit(str(n), delay=60) for n in range(200)])
        self.master.send(*[{"action": "cancel", "id": str(n)} for n in range(150)])
        scheduler = self.daemon.scheduler
        self.assertEqual(scheduler.delayed(), 50)
        self.assertLessEqual(len(scheduler._delayed), 100)  # compacted once most were withdrawn
        self.daemon.clock.advance(60)
        self.assertEqual((scheduler.delayed(), scheduler.queued("t")), (0, 50))

    def test_bad_delays_are_refused(self):
        for fields, words in (({"delay": -1}, "'delay'"), ({"delay": "5"}, "'delay'"),
                              ({"delay": wire.MAX_DELAY + 1}, "'delay'"),
                              ({"delay": True}, "'delay'"), ({"at": "tomorrow"}, "'at'"),
                              ({"at": -5}, "'at'"),
                              ({"at": 1_000_000 + wire.MAX_DELAY + 1}, "a year"),
                              ({"delay": 1, "at": 5}, "not both")):
            (refusal,) = self.master.send(submit("j", **fields))
            self.assertEqual((refusal["error"], refusal["id"]), ("invalid_message", "j"), fields)
            self.assertIn(words, refusal["reason"])
        self.assertEqual(len(self.daemon.scheduler), 0)


class RetryTests(SynchronousTestCase):
    def setUp(self):
        self.daemon = Daemon(max_retries=2)
        self.master = self.daemon.master()
        self.slave = self.daemon.slave("t")

    def status(self, job_id):
        (reply,) = self.master.send({"action": "status", "id": job_id})
        return reply

    def test_a_failed_detached_job_backs_off_then_goes_dead(self):
        self.master.send(submit("d", detach=True))
        waits = []
        for attempt in range(3):
            (job,) = self.slave.received()
            self.assertEqual(job["id"], "d")
            self.slave.send({"action": "fail", "reason": f"boom {attempt}"})
            reply = self.status("d")
            if attempt < 2:
                self.assertEqual(reply["state"], "delayed")
                waits.append(reply["run_at"] - self.daemon.clock.seconds())
                self.daemon.clock.advance(waits[-1])
        self.assertEqual(waits, [0.5, 1.0])  # 1 s then 2 s, less the jitter's half
        self.assertEqual(self.status("d"), {
            "ok": True, "id": "d", "state": "dead", "detached": True, "type": "t", "priority": 0,
            "attempts": 3, "ended_at": 1.5,
            "reason": "its slave failed it: boom 2; gave up after 3 attempts"})

    def test_dead_list_retry_and_discard(self):
        self.daemon.scheduler.max_retries = 0
        for n in range(3):
            self.master.send(submit(f"d{n}", detach=True, priority=n))
            self.slave.send({"action": "fail", "reason": "no"})
        (page,) = self.master.send({"action": "dead_list", "limit": 2, "offset": 1, "ref": "p"})
        self.assertEqual(page["total"], 3)
        self.assertEqual([entry["id"] for entry in page["dead"]], ["d1", "d2"])
        self.assertEqual(page["dead"][0], {"id": "d1", "type": "t", "priority": 1, "attempts": 1,
                                           "reason": "its slave failed it: no; gave up after 1 attempt",
                                           "ended_at": 0.0})
        self.assertEqual(page["ref"], "p")
        self.assertEqual(self.master.send({"action": "dead_retry", "id": "d0"}), [{"ok": True, "id": "d0"}])
        self.assertEqual([m["id"] for m in self.slave.received()], ["d0"])
        self.assertEqual(self.status("d0")["attempts"], 1)  # fresh: this is its first attempt
        self.assertEqual(self.master.send({"action": "dead_discard", "id": "d1"}), [{"ok": True, "id": "d1"}])
        self.assertEqual(self.status("d1")["state"], "unknown")
        for action in ("dead_retry", "dead_discard"):
            (refusal,) = self.master.send({"action": action, "id": "d1"})
            self.assertEqual((refusal["error"], refusal["id"]), ("unknown_job", "d1"))
        (page,) = self.master.send({"action": "dead_list"})
        self.assertEqual((page["total"], [e["id"] for e in page["dead"]]), (1, ["d2"]))

    def test_a_dead_id_cannot_be_submitted_again(self):
        self.master.send(submit("d", detach=True, retries=0))
        self.slave.send({"action": "fail", "reason": "no"})
        (refusal,) = self.master.send(submit("d", detach=True))
        self.assertEqual(refusal["error"], "id_exists")

    def test_disconnect_and_timeout_are_retried_with_backoff(self):
        self.master.send(submit("d", detach=True, timeout=5))
        self.slave.disconnect()
        self.assertEqual(self.status("d")["state"], "delayed")
        slave = self.daemon.slave("t")
        self.daemon.clock.advance(0.5)
        self.assertEqual([m["id"] for m in slave.received()], ["d"])
        self.daemon.clock.advance(5)  # the attempt times out
        self.assertEqual(self.status("d")["state"], "delayed")
        self.assertEqual(self.daemon.scheduler.totals["timed_out"], 1)

    def test_per_job_retries(self):
        self.master.send(submit("d", detach=True, retries=0))
        self.slave.send({"action": "fail", "reason": "no"})
        self.assertEqual(self.status("d")["state"], "dead")

    def test_attached_jobs_keep_their_semantics(self):
        self.master.send(submit("a"))
        self.slave.send({"action": "fail", "reason": "no"})
        self.assertEqual(self.master.received(), [{"error": "job_failed", "reason": "no", "id": "a"}])
        self.master.send(submit("b"))
        self.slave.disconnect()
        self.assertEqual(self.daemon.scheduler.queued("t"), 1)  # at once, no backoff

    def test_attached_jobs_may_ask_for_backoff_and_retries(self):
        self.master.send(submit("a", backoff=True, retries=1))
        self.slave.disconnect()
        self.assertEqual(self.status("a")["state"], "delayed")
        slave = self.daemon.slave("t")
        self.daemon.clock.advance(0.5)
        slave.disconnect()
        self.assertEqual(self.master.received(), [{
            "error": "job_failed", "id": "a",
            "reason": "slave disconnected during the job; gave up after 2 attempts"}])

    def test_the_dead_list_is_bounded(self):
        self.daemon.detached.dead_max = 2
        for n in range(3):
            self.master.send(submit(f"d{n}", detach=True, retries=0))
            self.slave.send({"action": "fail", "reason": "no"})
        (page,) = self.master.send({"action": "dead_list"})
        self.assertEqual([e["id"] for e in page["dead"]], ["d1", "d2"])
        self.assertEqual(self.daemon.detached.totals["dead_dropped"], 1)
        self.assertEqual(self.status("d0")["state"], "unknown")

    def test_without_a_dead_list_jobs_end_failed(self):
        self.daemon.detached.dead_max = 0
        self.master.send(submit("d", detach=True, retries=0))
        self.slave.send({"action": "fail", "reason": "no"})
        reply = self.status("d")
        self.assertEqual((reply["state"], reply["reason"]),
                         ("failed", "its slave failed it: no; gave up after 1 attempt"))

    def test_bad_retry_fields_are_refused(self):
        for fields in ({"retries": -1}, {"retries": 1001}, {"retries": 1.5}, {"detach": "yes"},
                       {"backoff": 1}, {"detach": None}):
            (refusal,) = self.master.send(submit("j", **fields))
            self.assertEqual((refusal["error"], refusal["id"]), ("invalid_message", "j"), fields)
        for request in ({"action": "dead_list", "limit": 0}, {"action": "dead_list", "limit": 1001},
                        {"action": "dead_list", "offset": -1}, {"action": "dead_list", "offset": "a"},
                        {"action": "status"}, {"action": "status", "id": 5},
                        {"action": "dead_retry"}, {"action": "dead_discard", "id": ""}):
            (refusal,) = self.master.send(request)
            self.assertEqual(refusal["error"], "invalid_message", request)
        self.assertEqual(len(self.daemon.scheduler), 0)

    def test_new_actions_on_the_slave_port(self):
        for action in ("status", "dead_list", "dead_retry", "dead_discard"):
            (refusal,) = self.slave.send({"action": action, "id": "x"})
            self.assertEqual(refusal["error"], "wrong_port")


class KeptResultTests(SynchronousTestCase):
    def setUp(self):
        self.daemon = Daemon(keep_results=60, keep_results_max=3, keep_results_bytes=10_000)
        self.master = self.daemon.master()
        self.slave = self.daemon.slave("t")

    def run_job(self, job_id, answer=None):
        self.master.send(submit(job_id, detach=True))
        self.slave.send({"action": "respond", "body": answer})

    def state(self, job_id):
        (reply,) = self.master.send({"action": "status", "id": job_id})
        return reply["state"]

    def test_kept_for_keep_results_seconds(self):
        self.run_job("a")
        self.daemon.clock.advance(59)
        self.run_job("b")
        self.assertEqual(self.state("a"), "completed")
        self.daemon.clock.advance(1)
        self.assertEqual((self.state("a"), self.state("b")), ("unknown", "completed"))
        self.daemon.clock.advance(59)
        self.assertEqual(len(self.daemon.detached.results), 0)
        self.assertEqual(self.daemon.detached.totals["results_dropped"], 0)  # expired, not dropped

    def test_bounded_in_number(self):
        for n in range(5):
            self.run_job(str(n))
        self.assertEqual([self.state(str(n)) for n in range(5)],
                         ["unknown", "unknown", "completed", "completed", "completed"])
        self.assertEqual(self.daemon.detached.totals["results_dropped"], 2)

    def test_bounded_in_bytes(self):
        self.run_job("small", "x")
        self.run_job("big", "y" * 6000)
        self.run_job("bigger", "z" * 6000)
        self.assertEqual([self.state(n) for n in ("small", "big", "bigger")],
                         ["unknown", "unknown", "completed"])
        self.assertLessEqual(self.daemon.detached.results_bytes, 10_000)
        self.run_job("huge", "h" * 20_000)  # over the bound on its own: not kept
        self.assertEqual(self.state("huge"), "unknown")
        self.assertEqual(self.state("bigger"), "completed")


class HostileInputTests(SynchronousTestCase):
    def test_a_long_failure_reason_is_kept_short(self):
        daemon = Daemon()
        master, slave = daemon.master(), daemon.slave("t")
        master.send(submit("d", detach=True, retries=0))
        slave.send({"action": "fail", "reason": "x" * 100_000})
        (reply,) = master.send({"action": "status", "id": "d"})
        self.assertEqual(reply["state"], "dead")
        self.assertLess(len(reply["reason"]), 1100)
        self.assertIn("characters in all", reply["reason"])

    def test_detached_jobs_are_bounded_daemon_wide(self):
        daemon = Daemon(max_detached=3)
        masters = [daemon.master() for _ in range(2)]
        masters[0].send(submit("a", detach=True), submit("b", detach=True, delay=50))
        masters[1].send(submit("c", detach=True))
        (refusal,) = masters[1].send(submit("d", detach=True))
        self.assertEqual((refusal["error"], refusal["id"]), ("queue_full", "d"))
        self.assertEqual(masters[1].send(submit("attached")), [{"ok": True, "id": "attached"}])

    def test_delayed_attached_jobs_count_towards_max_queued(self):
        daemon = Daemon(max_queued=2)
        master = daemon.master()
        master.send(submit("a", delay=10), submit("b", delay=10))
        (refusal,) = master.send(submit("c"))
        self.assertEqual(refusal["error"], "queue_full")

    def test_stopping_ends_delayed_jobs_and_their_timer(self):
        daemon = Daemon()
        master = daemon.master()
        master.send(submit("a", delay=10), submit("d", detach=True, delay=10))
        daemon.scheduler.stopService()
        daemon.detached.stop()
        self.assertEqual(master.received(), [{"error": "shutdown", "id": "a",
                                              "reason": "the daemon is shutting down"}])
        self.assertEqual(daemon.clock.getDelayedCalls(), [])
        self.assertEqual(daemon.scheduler.delayed(), 0)
        (refusal,) = master.send(submit("e", detach=True))
        self.assertEqual(refusal["error"], "shutdown")

    def test_dead_retry_is_bounded_like_a_submit(self):
        daemon = Daemon(max_detached=2)
        master, slave = daemon.master(), daemon.slave("t")
        master.send(submit("d", detach=True, retries=0))
        slave.send({"action": "fail", "reason": "no"})
        master.send(submit("a", detach=True, type="u"), submit("b", detach=True, type="u"))
        (refusal,) = master.send({"action": "dead_retry", "id": "d"})
        self.assertEqual((refusal["error"], refusal["id"]), ("queue_full", "d"))
        (reply,) = master.send({"action": "status", "id": "d"})
        self.assertEqual(reply["state"], "dead")
