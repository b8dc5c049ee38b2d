"""Unique jobs: submits of one type with the same ``unique`` key share one
job while it is queued, delayed or running (issue 13).  On the daemon's
protocols in memory with a `Clock` (no sockets), and once end to end over
TCP with ``twistd``."""

import platform

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from gloom.scheduler import Attachment, Scheduler, Submitters
from gloom.tap import GloomService
from tests.support import ANY_PORT, BlockingClient, Daemon, TwistdDaemon


PLAIN = object()  # a submit without "unique"


def submit(job_id, key="k", **fields):
    """A submit frame; ``key=PLAIN`` leaves ``unique`` out."""
    frame = {"action": "submit", "id": job_id, "type": fields.pop("type", "t"),
             "body": fields.pop("body", None), **fields}
    if key is not PLAIN:
        frame["unique"] = key
    return frame


def ack(job_id, coalesced=False):
    return {"ok": True, "id": job_id, "coalesced": True} if coalesced else {"ok": True, "id": job_id}


class UniqueTestCase(SynchronousTestCase):
    def setUp(self):
        self.daemon = self.make_daemon()
        self.scheduler = self.daemon.scheduler
        service = GloomService(self.scheduler, (self.daemon.masters, self.daemon.slaves),
                               self.daemon.clock)
        self.daemon.masters.stats = service.stats

    def make_daemon(self):
        return Daemon()

    def masters(self, count):
        return [self.daemon.master() for _ in range(count)]

    def attach_all(self, masters, key="k", **fields):
        """Each master submits ``m<n>`` with the key: the first is acked
        plainly, every later one coalesced."""
        ids = []
        for n, master in enumerate(masters):
            job_id = f"m{n}"
            self.assertEqual(master.send(submit(job_id, key, **fields)), [ack(job_id, n > 0)])
            ids.append(job_id)
        return ids

    def totals(self):
        self.daemon.clock.advance(0)  # the stats frame is built once per reactor turn
        (reply,) = self.daemon.master().send({"action": "stats"})
        return reply["stats"]["totals"]

    def status(self, master, job_id):
        (reply,) = master.send({"action": "status", "id": job_id})
        self.assertEqual((reply["ok"], reply["id"]), (True, job_id))
        return reply

    def assertNothingLeft(self):
        """No job, no unique key, no unfinished submit is left anywhere."""
        self.assertEqual(len(self.scheduler), 0)
        self.assertEqual(self.scheduler._unique, {})
        for master in self.daemon.masters.connections:
            self.assertEqual(master._unfinished, {})


class CoalescingTests(UniqueTestCase):
    def test_a_second_submit_is_coalesced(self):
        first, second, third = self.masters(3)
        self.assertEqual(first.send(submit("a", body=1)), [ack("a")])
        self.assertEqual(second.send(submit("b", body=2)), [ack("b", True)])
        self.assertEqual(third.send(submit("c", ref=7)), [{**ack("c", True), "ref": 7}])
        self.assertEqual(len(self.scheduler), 1)
        self.assertEqual(self.scheduler.queued("t"), 1)

    def test_each_submitter_gets_the_answer_under_its_own_id(self):
        masters = self.masters(3)
        ids = self.attach_all(masters, body="first")
        slave = self.daemon.slave("t")
        # The one job carries the first submitter's id and body.
        self.assertEqual(slave.received(), [{"action": "job", "id": "m0", "type": "t",
                                             "body": "first"}])
        self.assertEqual(slave.send({"action": "respond", "body": {"n": 1}}), [{"ok": True}])
        for master, job_id in zip(masters, ids):
            self.assertEqual(master.received(), [{"id": job_id, "body": {"n": 1}}])
        self.assertEqual(slave.received(), [])
        totals = self.totals()
        self.assertEqual((totals["submitted"], totals["coalesced"], totals["completed"]), (1, 2, 1))
        self.assertNothingLeft()

    def test_progress_fans_out_to_every_submitter_before_the_answer(self):
        masters = self.masters(3)
        ids = self.attach_all(masters)
        slave = self.daemon.slave("t")
        slave.received()
        self.assertEqual(slave.send({"action": "progress", "done": 1, "total": 4}), [{"ok": True}])
        self.assertEqual(slave.send({"action": "progress", "id": "m0", "data": {"stage": "b"}}),
                         [{"ok": True}])
        slave.send({"action": "respond", "body": "done"})
        for master, job_id in zip(masters, ids):
            self.assertEqual(master.received(), [
                {"id": job_id, "progress": {"done": 1, "total": 4}},
                {"id": job_id, "progress": {"data": {"stage": "b"}}},
                {"id": job_id, "body": "done"}])
        self.assertEqual(self.totals()["progress"], 2)

    def test_a_submitter_that_does_not_read_gets_the_latest_progress(self):
        slow, reading = self.masters(2)
        self.assertEqual(slow.send(submit("a"), submit("a2")), [ack("a"), ack("a2", True)])
        reading.send(submit("b"))
        slave = self.daemon.slave("t")
        slave.received()
        slow.protocol.pauseProducing()
        for done in (1, 2, 3):
            slave.send({"action": "progress", "done": done})
        self.assertEqual(slow.received(), [])
        self.assertEqual(reading.received(), [{"id": "b", "progress": {"done": done}}
                                              for done in (1, 2, 3)])
        slow.protocol.resumeProducing()
        self.assertEqual(slow.received(), [{"id": "a", "progress": {"done": 3}},
                                           {"id": "a2", "progress": {"done": 3}}])
        slave.send({"action": "respond", "body": 1})
        self.assertEqual(slow.received(), [{"id": "a", "body": 1}, {"id": "a2", "body": 1}])
        self.assertEqual(self.totals()["progress_replaced"], 4)

    def test_a_failure_fans_out(self):
        masters = self.masters(3)
        ids = self.attach_all(masters)
        slave = self.daemon.slave("t")
        slave.received()
        self.assertEqual(slave.send({"action": "fail", "reason": "disk full"}), [{"ok": True}])
        for master, job_id in zip(masters, ids):
            self.assertEqual(master.received(),
                             [{"error": "job_failed", "reason": "disk full", "id": job_id}])
        totals = self.totals()
        self.assertEqual((totals["submitted"], totals["failed"]), (1, 1))
        self.assertNothingLeft()

    def test_a_lost_slave_retries_the_job_for_every_submitter(self):
        masters = self.masters(3)
        ids = self.attach_all(masters)
        lost = self.daemon.slave("t")
        self.assertEqual([job["id"] for job in lost.received()], ["m0"])
        lost.disconnect()
        for master in masters:
            self.assertEqual(master.received(), [])
        self.assertEqual(self.status(masters[2], "m2")["state"], "queued")
        slave = self.daemon.slave("t")
        self.assertEqual([job["id"] for job in slave.received()], ["m0"])
        self.assertEqual(self.status(masters[1], "m1")["attempts"], 2)
        slave.send({"action": "respond", "body": "second try"})
        for master, job_id in zip(masters, ids):
            self.assertEqual(master.received(), [{"id": job_id, "body": "second try"}])
        totals = self.totals()
        self.assertEqual((totals["submitted"], totals["retried"], totals["completed"]), (1, 1, 1))
        self.assertNothingLeft()

    def test_a_timed_out_attempt_is_retried_for_every_submitter(self):
        masters = self.masters(2)
        ids = self.attach_all(masters, timeout=1)
        slow, fast = self.daemon.slave("t"), self.daemon.slave("t")
        self.assertEqual([job["id"] for job in slow.received()], ["m0"])
        self.daemon.clock.advance(1)
        self.assertEqual([job["id"] for job in fast.received()], ["m0"])
        (late,) = slow.send({"action": "respond", "body": "late"})
        self.assertEqual((late["error"], late["id"]), ("timed_out", "m0"))
        fast.send({"action": "respond", "body": "on time"})
        for master, job_id in zip(masters, ids):
            self.assertEqual(master.received(), [{"id": job_id, "body": "on time"}])
        self.assertNothingLeft()

    def test_retries_used_up_fail_every_submitter(self):
        masters = self.masters(2)
        ids = self.attach_all(masters, retries=0)
        slave = self.daemon.slave("t")
        slave.received()
        slave.disconnect()
        for master, job_id in zip(masters, ids):
            (failure,) = master.received()
            self.assertEqual((failure["error"], failure["id"]), ("job_failed", job_id))
            self.assertIn("gave up after 1 attempt", failure["reason"])
        self.assertNothingLeft()

    def test_one_master_submitting_twice_with_different_ids_attaches(self):
        (master,) = self.masters(1)
        self.assertEqual(master.send(submit("x"), submit("y")), [ack("x"), ack("y", True)])
        slave = self.daemon.slave("t")
        self.assertEqual([job["id"] for job in slave.received()], ["x"])
        slave.send({"action": "progress", "done": 1})
        slave.send({"action": "respond", "body": 5})
        self.assertEqual(master.received(), [
            {"id": "x", "progress": {"done": 1}}, {"id": "y", "progress": {"done": 1}},
            {"id": "x", "body": 5}, {"id": "y", "body": 5}])
        self.assertNothingLeft()

    def test_the_first_submitter_defines_the_job(self):
        first, second = self.masters(2)
        self.assertEqual(first.send(submit("a", body="first's", priority=1, delay=10)), [ack("a")])
        self.assertEqual(second.send(submit("b", body="second's", priority=9, timeout=1)),
                         [ack("b", True)])
        wanted = {"ok": True, "state": "delayed", "detached": False, "type": "t", "priority": 1,
                  "attempts": 0, "run_at": 10.0, "unique": "k"}
        self.assertEqual(self.status(second, "b"), {**wanted, "id": "b"})
        self.assertEqual(self.status(first, "a"), {**wanted, "id": "a"})
        slave = self.daemon.slave("t")
        self.assertEqual(slave.received(), [])
        self.daemon.clock.advance(10)
        self.assertEqual(slave.received(), [{"action": "job", "id": "a", "type": "t",
                                             "body": "first's"}])
        self.daemon.clock.advance(5)  # the second submitter's timeout of 1 s is not the job's
        slave.send({"action": "respond", "body": "ok"})
        self.assertEqual(second.received(), [{"id": "b", "body": "ok"}])
        self.assertEqual(self.totals()["timed_out"], 0)

    def test_an_attacher_with_a_delay_joins_a_running_job(self):
        first, second = self.masters(2)
        slave = self.daemon.slave("t")
        first.send(submit("a"))
        self.assertEqual(second.send(submit("b", delay=60)), [ack("b", True)])
        slave.send({"action": "respond", "body": 1})
        self.assertEqual(second.received(), [{"id": "b", "body": 1}])
        self.assertNothingLeft()

    def test_status_of_each_submitter_shows_the_key_and_the_shared_state(self):
        first, second = self.masters(2)
        self.attach_all([first, second], key="report-7", priority=3)
        queued = {"ok": True, "state": "queued", "detached": False, "type": "t", "priority": 3,
                  "attempts": 0, "unique": "report-7"}
        self.assertEqual(self.status(first, "m0"), {**queued, "id": "m0"})
        self.assertEqual(self.status(second, "m1"), {**queued, "id": "m1"})
        slave = self.daemon.slave("t")
        slave.send({"action": "progress", "done": 2, "total": 3})
        first.received(), second.received()
        running = {**queued, "state": "running", "attempts": 1, "progress": {"done": 2, "total": 3}}
        self.assertEqual(self.status(first, "m0"), {**running, "id": "m0"})
        self.assertEqual(self.status(second, "m1"), {**running, "id": "m1"})
        # Another master sees neither (they are attached, not detached, jobs).
        self.assertEqual(self.status(self.daemon.master(), "m1"),
                         {"ok": True, "id": "m1", "state": "unknown"})

    def test_different_types_with_the_same_key_are_separate_jobs(self):
        first, second = self.masters(2)
        self.assertEqual(first.send(submit("a", type="t")), [ack("a")])
        self.assertEqual(second.send(submit("b", type="u")), [ack("b")])
        self.assertEqual(len(self.scheduler), 2)
        t, u = self.daemon.slave("t"), self.daemon.slave("u")
        self.assertEqual([job["id"] for job in t.received()], ["a"])
        self.assertEqual([job["id"] for job in u.received()], ["b"])
        t.send({"action": "respond", "body": "t"})
        u.send({"action": "respond", "body": "u"})
        self.assertEqual((first.received(), second.received()),
                         ([{"id": "a", "body": "t"}], [{"id": "b", "body": "u"}]))
        self.assertEqual(self.totals()["coalesced"], 0)

    def test_a_plain_submit_never_coalesces(self):
        first, second = self.masters(2)
        first.send(submit("a"))
        self.assertEqual(second.send(submit("b", key=PLAIN)), [ack("b")])
        self.assertEqual(len(self.scheduler), 2)

    def test_once_the_job_ends_the_key_is_free(self):
        first, second = self.masters(2)
        slave = self.daemon.slave("t")
        first.send(submit("a", body=1))
        slave.send({"action": "respond", "body": "one"})
        self.assertEqual(first.received(), [{"id": "a", "body": "one"}])
        self.assertEqual(self.scheduler._unique, {})
        self.assertEqual(second.send(submit("b", body=2)), [ack("b")])
        self.assertEqual(slave.received(), [{"action": "job", "id": "b", "type": "t", "body": 2}])
        slave.send({"action": "fail", "reason": "no"})
        self.assertEqual(self.scheduler._unique, {})
        self.assertEqual(first.send(submit("a", body=3)), [ack("a")])
        self.assertEqual([m.get("id") for m in slave.received()], ["a"])
        self.assertEqual(self.totals()["submitted"], 3)


class WithdrawingTests(UniqueTestCase):
    def test_cancel_by_one_submitter_detaches_only_it(self):
        masters = self.masters(3)
        self.attach_all(masters)
        slave = self.daemon.slave("t")
        slave.received()
        self.assertEqual(masters[0].send({"action": "cancel", "id": "m0"}), [ack("m0")])
        self.assertEqual(masters[1].send({"action": "cancel", "id": "m1"}), [ack("m1")])
        self.assertEqual(self.status(masters[0], "m0")["state"], "unknown")
        self.assertEqual(slave.send({"action": "progress", "done": 1}), [{"ok": True}])
        slave.send({"action": "respond", "body": "r"})
        self.assertEqual(masters[0].received(), [])
        self.assertEqual(masters[1].received(), [])
        self.assertEqual(masters[2].received(), [{"id": "m2", "progress": {"done": 1}},
                                                 {"id": "m2", "body": "r"}])
        self.assertEqual(slave.received(), [])  # the job ran once
        totals = self.totals()
        self.assertEqual((totals["submitted"], totals["completed"], totals["cancelled"]), (1, 1, 0))
        self.assertNothingLeft()

    def test_cancel_of_a_queued_job_by_every_submitter_takes_it_out_of_the_queue(self):
        masters = self.masters(2)
        self.attach_all(masters)
        masters[1].send({"action": "cancel", "id": "m1"})
        self.assertEqual(self.scheduler.queued("t"), 1)
        masters[0].send({"action": "cancel", "id": "m0"})
        self.assertEqual(self.scheduler.queued("t"), 0)
        self.assertEqual(self.scheduler.types(), {})
        self.assertNothingLeft()
        slave = self.daemon.slave("t")
        self.assertEqual(slave.received(), [])
        self.assertEqual(self.totals()["cancelled"], 1)

    def test_cancel_of_a_running_job_by_every_submitter_refuses_its_progress(self):
        masters = self.masters(2)
        self.attach_all(masters)
        slave = self.daemon.slave("t")
        slave.received()
        for master, job_id in zip(masters, ("m0", "m1")):
            master.send({"action": "cancel", "id": job_id})
        for request in ({"action": "progress", "done": 1}, {"action": "progress", "id": "m0", "total": 2},
                        {"action": "touch"}, {"action": "touch", "id": "m0", "ref": "r"}):
            (refusal,) = slave.send(request)
            self.assertEqual((refusal["error"], refusal["id"]), ("cancelled", "m0"))
            self.assertEqual(refusal.get("ref"), request.get("ref"))
        # The slave still holds the job: it answers it (the answer is dropped).
        self.assertEqual(slave.send({"action": "respond", "body": "nobody"}), [{"ok": True}])
        self.assertEqual((masters[0].received(), masters[1].received()), ([], []))
        self.assertEqual(self.totals()["cancelled"], 1)
        self.assertNothingLeft()

    def test_a_new_job_with_the_key_of_a_withdrawn_running_one(self):
        """The key is free once every submitter withdrew: a new submit makes
        a new job, and the withdrawn job's end does not free the new one's key."""
        first, second, third = self.masters(3)
        slave = self.daemon.slave("t")
        first.send(submit("old", body="old"))
        self.assertEqual([job["id"] for job in slave.received()], ["old"])
        first.send({"action": "cancel", "id": "old"})
        self.assertEqual(second.send(submit("new", body="new")), [ack("new")])
        self.assertEqual(slave.send({"action": "respond", "body": "for old"}),
                         [{"ok": True}, {"action": "job", "id": "new", "type": "t", "body": "new"}])
        self.assertEqual(third.send(submit("later")), [ack("later", True)])
        slave.send({"action": "respond", "body": "for new"})
        self.assertEqual(first.received(), [])
        self.assertEqual(second.received(), [{"id": "new", "body": "for new"}])
        self.assertEqual(third.received(), [{"id": "later", "body": "for new"}])
        self.assertNothingLeft()

    def test_a_master_disconnecting_detaches_only_its_submits(self):
        leaving, staying = self.masters(2)
        self.assertEqual(leaving.send(submit("a"), submit("a2")), [ack("a"), ack("a2", True)])
        self.assertEqual(staying.send(submit("b")), [ack("b", True)])
        (job,) = self.scheduler.jobs()
        self.assertEqual(len(job.unique.attached), 3)
        leaving.disconnect()
        self.assertEqual(len(job.unique.attached), 1)
        self.assertEqual(self.scheduler.queued("t"), 1)
        slave = self.daemon.slave("t")
        self.assertEqual([m["id"] for m in slave.received()], ["a"])
        slave.send({"action": "progress", "done": 1})
        slave.send({"action": "respond", "body": "kept"})
        self.assertEqual(staying.received(), [{"id": "b", "progress": {"done": 1}},
                                              {"id": "b", "body": "kept"}])
        self.assertEqual(leaving.transport.value(), b"")
        self.assertNothingLeft()

    def test_every_master_disconnecting_cancels_the_job(self):
        masters = self.masters(3)
        self.attach_all(masters)
        for master in masters:
            master.disconnect()
        self.assertNothingLeft()
        self.assertEqual(self.scheduler.types(), {})
        self.assertEqual(self.totals()["cancelled"], 1)


class LimitTests(UniqueTestCase):
    def make_daemon(self):
        return Daemon(max_queued=2)

    def test_id_exists_applies_per_master(self):
        first, second = self.masters(2)
        self.assertEqual(first.send(submit("a", key=PLAIN)), [ack("a")])
        (refusal,) = first.send(submit("a", key="shared"))
        self.assertEqual((refusal["error"], refusal["id"]), ("id_exists", "a"))
        self.assertEqual(self.scheduler._unique, {})
        self.assertEqual(second.send(submit("a", key="shared")), [ack("a")])
        (refusal,) = second.send(submit("a", key="shared"))
        self.assertEqual((refusal["error"], refusal["id"]), ("id_exists", "a"))
        self.assertEqual(first.send(submit("b", key="shared")), [ack("b", True)])
        (job,) = [job for job in self.scheduler.jobs() if job.unique is not None]
        self.assertEqual(len(job.unique.attached), 2)

    def test_max_queued_applies_per_master(self):
        first, second = self.masters(2)
        self.assertEqual(first.send(submit("a", key="one"), submit("b", key="two")),
                         [ack("a"), ack("b")])
        (refusal,) = first.send(submit("c", key="one"))
        self.assertEqual((refusal["error"], refusal["id"]), ("queue_full", "c"))
        # Attaching counts against the attacher's limit, not the first submitter's.
        self.assertEqual(second.send(submit("c", key="one"), submit("d", key="two")),
                         [ack("c", True), ack("d", True)])
        (refusal,) = second.send(submit("e", key="one"))
        self.assertEqual(refusal["error"], "queue_full")
        self.assertEqual(sorted(len(job.unique.attached) for job in self.scheduler.jobs()), [2, 2])
        self.assertEqual(self.totals()["coalesced"], 2)


class UniqueValidationTests(UniqueTestCase):
    def test_unique_with_detach_is_refused(self):
        master = self.daemon.master()
        (refusal,) = master.send(submit("d", detach=True))
        self.assertEqual((refusal["error"], refusal["id"]), ("invalid_message", "d"))
        self.assertIn("unique", refusal["reason"])
        self.assertEqual(len(self.scheduler), 0)
        self.assertEqual(self.daemon.detached.live, {})
        # detach: false is an attached job, which may be unique
        self.assertEqual(master.send(submit("d", detach=False)), [ack("d")])

    def test_bad_keys_are_refused_and_leave_nothing(self):
        master = self.daemon.master()
        master.send(submit("taken", key="ok"))
        bad = [5, 1.5, True, None, [], ["k"], {"k": 1}, "", "x" * 1025, "\xe9" * 513,
               "\U0001f600" * 257, "\ud800"]
        for key in bad:
            (refusal,) = master.send(submit("bad", key=key))
            self.assertEqual((refusal.get("error"), refusal.get("id")), ("invalid_message", "bad"),
                             f"unique={key!r:.40}: {refusal!r}")
        self.assertEqual(len(self.scheduler), 1)
        self.assertEqual(list(self.scheduler._unique), [("t", "ok")])
        self.assertEqual(list(master.protocol._unfinished), ["taken"])
        self.assertEqual(self.totals()["submitted"], 1)

    def test_keys_up_to_1024_bytes_are_taken(self):
        master = self.daemon.master()
        for n, key in enumerate(["x" * 1024, "\xe9" * 512, "\U0001f600" * 256, " ", "\x00"]):
            self.assertEqual(master.send(submit(f"j{n}", key=key)), [ack(f"j{n}")])
            self.assertEqual(self.status(master, f"j{n}")["unique"], key)


class FootprintTests(UniqueTestCase):
    def test_nothing_is_left_however_the_job_ends(self):
        masters = self.masters(2)
        slave = self.daemon.slave("t")
        for how in ({"action": "respond", "body": 1}, {"action": "fail", "reason": "no"},
                    {"action": "release", "id": "m0"}):
            self.attach_all(masters)
            slave.send(how)
            if how["action"] == "release":  # handed back: queued again, and given out again
                self.assertEqual(len(self.scheduler), 1)
                slave.send({"action": "respond", "body": 2})
            for master in masters:
                self.assertEqual(len([m for m in master.received() if "progress" not in m]), 1)
            self.assertNothingLeft()
        slave.disconnect()

    def test_attachments_are_small_and_dropped_as_they_go(self):
        masters = self.masters(5)
        self.attach_all(masters)
        (job,) = self.scheduler.jobs()
        attached = job.unique.attached
        self.assertEqual(len(attached), 5)
        for attachment in attached:
            self.assertIsInstance(attachment, Attachment)
            self.assertFalse(hasattr(attachment, "__dict__"))
            self.assertIs(attachment.job, job)
        self.assertFalse(hasattr(job, "__dict__"))
        for n, master in enumerate(masters[:4]):
            master.send({"action": "cancel", "id": f"m{n}"})
            self.assertEqual(len(attached), 4 - n)

    def test_each_attach_costs_a_bounded_amount_of_memory(self):
        if platform.python_implementation() != "CPython":
            raise SkipTest("tracemalloc counts CPython's allocations")
        import tracemalloc

        class Owner:
            def job_answered(self, job, body):
                pass

            job_failed = job_progress = job_answered

        scheduler = Scheduler()
        owner = Owner()
        first = scheduler.submit(owner, "first", "t", b"frame", unique="k")
        for count in (1000, 4000):
            ids = [f"id-{n}" for n in range(count)]
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                attachments = [scheduler.submit(owner, job_id, "t", b"frame", unique="k")
                               for job_id in ids]
                each = (tracemalloc.get_traced_memory()[0] - before) / count
            finally:
                tracemalloc.stop()
            # An Attachment (4 slots), its entry in the job's dict, its place
            # in the list above: some 110 bytes on CPython 3.11.
            self.assertLess(each, 300, count)
            self.assertEqual(len(first.job.unique.attached), count + 1)
            self.assertEqual(len(scheduler), 1)
            for attachment in attachments:
                scheduler.cancel(attachment)
            self.assertEqual(len(first.job.unique.attached), 1)


class ManyMastersTests(UniqueTestCase):
    def test_a_thousand_masters_one_run_a_thousand_answers(self):
        masters = self.masters(1000)
        for n, master in enumerate(masters):
            self.assertEqual(master.send(submit(f"job-{n}", key="the-report", body=n)),
                             [ack(f"job-{n}", n > 0)])
        slave = self.daemon.slave("t")
        self.assertEqual(slave.received(), [{"action": "job", "id": "job-0", "type": "t", "body": 0}])
        slave.send({"action": "progress", "done": 1, "total": 1})
        self.assertEqual(slave.send({"action": "respond", "body": "report"}), [{"ok": True}])
        for n, master in enumerate(masters):
            self.assertEqual(master.received(), [{"id": f"job-{n}", "progress": {"done": 1, "total": 1}},
                                                 {"id": f"job-{n}", "body": "report"}])
        self.assertEqual(slave.received(), [])  # the slave got exactly one job
        totals = self.totals()
        self.assertEqual((totals["submitted"], totals["coalesced"], totals["completed"]),
                         (1, 999, 1))
        self.assertNothingLeft()


class ManySubmittersProgressTests(UniqueTestCase):
    """A job with more than `Submitters.FAN_OUT_AT_ONCE` submitters passes
    on at most one progress report per reactor turn, the latest; one with
    fewer passes on every report at once."""

    def running(self, count):
        masters = self.masters(count)
        self.attach_all(masters)
        slave = self.daemon.slave("t")
        self.assertEqual(slave.received()[0]["id"], "m0")
        return masters, slave

    def test_few_submitters_get_every_report_at_once(self):
        masters, slave = self.running(Submitters.FAN_OUT_AT_ONCE)
        slave.send(*({"action": "progress", "done": done} for done in range(3)))
        for n, master in enumerate(masters):
            self.assertEqual(master.received(),
                             [{"id": f"m{n}", "progress": {"done": done}} for done in range(3)])

    def test_many_submitters_get_the_latest_report_of_each_turn(self):
        masters, slave = self.running(Submitters.FAN_OUT_AT_ONCE + 1)
        self.assertEqual(slave.send(*({"action": "progress", "done": done} for done in range(3))),
                         [{"ok": True}] * 3)
        self.assertEqual(masters[0].received(), [])
        self.daemon.clock.advance(0)
        for n, master in enumerate(masters):
            self.assertEqual(master.received(), [{"id": f"m{n}", "progress": {"done": 2}}])
        slave.send({"action": "progress", "done": 3})
        self.daemon.clock.advance(0)
        self.assertEqual(masters[-1].received(), [{"id": f"m{len(masters) - 1}", "progress": {"done": 3}}])

    def test_a_report_still_waiting_goes_before_the_answer(self):
        masters, slave = self.running(Submitters.FAN_OUT_AT_ONCE + 1)
        slave.send({"action": "progress", "done": 1}, {"action": "respond", "body": "r"})
        for n, master in enumerate(masters):
            self.assertEqual(master.received(), [{"id": f"m{n}", "progress": {"done": 1}},
                                                 {"id": f"m{n}", "body": "r"}])
        self.daemon.clock.advance(0)
        self.assertEqual(masters[0].received(), [])
        self.assertNothingLeft()


class UniqueOverTCPTests(SynchronousTestCase):
    """Two masters, one key, one run, over real TCP to ``twistd -n gloom``
    (the installed package: ``pip install --no-deps .`` first)."""

    def test_two_masters_one_run(self):
        daemon = TwistdDaemon(self, "-n", "gloom", *ANY_PORT)
        master_port, slave_port = daemon.ports()
        slave = BlockingClient(slave_port)
        first, second = BlockingClient(master_port), BlockingClient(master_port)
        for client in (slave, first, second):
            self.addCleanup(client.close)
        first.send(submit("a", key="nightly", body="build"))
        self.assertEqual(first.receive(), ack("a"))
        second.send(submit("b", key="nightly", body="ignored"))
        self.assertEqual(second.receive(), ack("b", True))
        slave.send({"action": "join", "type": "t"})
        self.assertEqual(slave.receive(), {"ok": True})
        self.assertEqual(slave.receive(), {"action": "job", "id": "a", "type": "t", "body": "build"})
        slave.send({"action": "progress", "done": 1, "total": 2})
        self.assertEqual(slave.receive(), {"ok": True})
        slave.send({"action": "respond", "body": "built"})
        self.assertEqual(slave.receive(), {"ok": True})
        self.assertEqual(first.receive(), {"id": "a", "progress": {"done": 1, "total": 2}})
        self.assertEqual(first.receive(), {"id": "a", "body": "built"})
        self.assertEqual(second.receive(), {"id": "b", "progress": {"done": 1, "total": 2}})
        self.assertEqual(second.receive(), {"id": "b", "body": "built"})
        # No second run: the next frame the slave gets answers its leave.
        slave.send({"action": "leave"})
        self.assertEqual(slave.receive(), {"ok": True})
        first.send({"action": "stats"})
        totals = first.receive()["stats"]["totals"]
        self.assertEqual((totals["submitted"], totals["coalesced"], totals["completed"]), (1, 1, 1))
        daemon.kill()
