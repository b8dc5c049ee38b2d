"""Administrative actions on the master port (issue 13): pause, resume and
clear a type, and drain the daemon; refused with ``forbidden`` unless the
daemon runs with ``--admin``.  On the daemon's protocols in memory with a
`Clock`, and with ``twistd`` in a subprocess (the installed package:
``pip install --no-deps .`` first)."""

import http.client
import re
import signal
import time

from twisted.internet.error import ReactorNotRunning
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from gloom.tap import GloomService
from tests.support import (
    ANY_PORT,
    BlockingClient,
    Daemon,
    TwistdDaemon,
    reserved_port,
)

ADMIN_ACTIONS = ("pause", "resume", "clear", "drain")


def submit(job_id, **fields):
    return {"action": "submit", "id": job_id, "type": fields.pop("type", "t"),
            "body": fields.pop("body", None), **fields}


def ack(job_id):
    return {"ok": True, "id": job_id}


def admin(action, job_type="t", **fields):
    frame = {"action": action, **fields}
    if action != "drain":
        frame["type"] = job_type
    return frame


class AdminTestCase(SynchronousTestCase):
    admin = True

    def setUp(self):
        self.daemon = Daemon(admin=self.admin)
        self.clock = self.daemon.clock
        self.scheduler = self.daemon.scheduler
        self.service = GloomService(self.scheduler, (self.daemon.masters, self.daemon.slaves),
                                    self.clock)
        self.daemon.masters.stats = self.service.stats
        self.master = self.daemon.master()

    def stats(self):
        self.clock.advance(0)  # the stats frame is built once per reactor turn
        (reply,) = self.daemon.master().send({"action": "stats"})
        return reply["stats"]

    def status(self, job_id, master=None):
        """The status reply (frames written before it are dropped)."""
        master = master or self.master
        master.received()
        (reply,) = master.send({"action": "status", "id": job_id})
        return reply

    def assertTotalsAddUp(self):
        stats = self.stats()
        totals = stats["totals"]
        live = sum(counts["queued"] + counts["delayed"] + counts["running"]
                   for counts in stats["types"].values())
        self.assertEqual(totals["submitted"], totals["completed"] + totals["failed"]
                         + totals["cancelled"] + totals["cleared"] + live, stats)


class PauseTests(AdminTestCase):
    def test_a_paused_type_hands_out_nothing_and_still_takes_submits(self):
        first, second = self.daemon.slave("t"), self.daemon.slave("t")
        other = self.daemon.slave("u")
        self.assertEqual(self.master.send(admin("pause")), [{"ok": True}])
        self.assertEqual(self.master.send(submit("a"), submit("b", priority=3), submit("c", type="u")),
                         [ack("a"), ack("b"), ack("c")])
        self.assertEqual((first.received(), second.received()), ([], []))
        self.assertEqual([job["id"] for job in other.received()], ["c"])
        self.assertEqual(self.status("a")["state"], "queued")
        stats = self.stats()
        self.assertEqual(stats["paused"], ["t"])
        self.assertEqual(stats["types"]["t"], {"queued": 2, "delayed": 0, "running": 0,
                                               "idle_slaves": 2, "busy_slaves": 0, "paused": True})
        self.assertFalse(stats["types"]["u"]["paused"])
        self.assertFalse(stats["draining"])

    def test_resume_hands_the_queued_jobs_to_the_idle_slaves_in_priority_order(self):
        slaves = [self.daemon.slave("t") for _ in range(3)]
        self.master.send(admin("pause"))
        self.master.send(submit("low", priority=1), submit("high", priority=5),
                         submit("middle", priority=3), submit("high-2", priority=5))
        self.assertEqual(self.master.send(admin("resume")), [{"ok": True}])
        self.assertEqual([[job["id"] for job in slave.received()] for slave in slaves],
                         [["high"], ["high-2"], ["middle"]])
        self.assertEqual(self.scheduler.queued("t"), 1)
        stats = self.stats()
        self.assertEqual(stats["paused"], [])
        self.assertFalse(stats["types"]["t"]["paused"])
        # The next free slave takes the job left.
        self.assertEqual(slaves[2].send({"action": "respond", "body": 1}),
                         [{"ok": True}, {"action": "job", "id": "low", "type": "t", "body": None}])

    def test_pause_ahead_of_any_job_or_slave(self):
        self.master.send(admin("pause", "later"))
        stats = self.stats()
        self.assertEqual(stats["paused"], ["later"])
        self.assertEqual(stats["types"]["later"], {"queued": 0, "delayed": 0, "running": 0,
                                                   "idle_slaves": 0, "busy_slaves": 0,
                                                   "paused": True})
        slave = self.daemon.slave("later")
        self.master.send(submit("a", type="later"))
        self.assertEqual(slave.received(), [])
        self.master.send(admin("resume", "later"))
        self.assertEqual([job["id"] for job in slave.received()], ["a"])
        slave.send({"action": "respond", "body": None})
        slave.disconnect()
        self.assertNotIn("later", self.stats()["types"])  # a resumed, unused type is forgotten

    def test_running_jobs_go_on_while_paused(self):
        slave = self.daemon.slave("t")
        self.master.send(submit("running"))
        self.master.send(admin("pause"), submit("next"))
        self.assertEqual(slave.send({"action": "respond", "body": "done"}),
                         [{"action": "job", "id": "running", "type": "t", "body": None},
                          {"ok": True}])
        self.assertIn({"id": "running", "body": "done"}, self.master.received())
        self.assertEqual(slave.received(), [])
        self.assertEqual(self.status("next")["state"], "queued")

    def test_jobs_queued_again_wait_while_paused(self):
        """A job whose slave went away, one handed back, and a delayed one
        whose time came are queued, not handed to the idle slaves."""
        holder, released, idle = (self.daemon.slave("t") for _ in range(3))
        self.master.send(submit("lost"), submit("released"), submit("later", delay=5))
        self.assertEqual([job["id"] for job in holder.received()], ["lost"])
        self.assertEqual([job["id"] for job in released.received()], ["released"])
        self.master.send(admin("pause"))
        holder.disconnect()
        self.assertEqual(released.send({"action": "release", "id": "released"}), [{"ok": True}])
        self.clock.advance(5)
        self.assertEqual((released.received(), idle.received()), ([], []))
        self.assertEqual(self.scheduler.queued("t"), 3)
        self.master.send(admin("resume"))
        self.assertEqual(sorted(job["id"] for slave in (released, idle) for job in slave.received()),
                         ["lost", "released"])

    def test_pause_and_resume_are_idempotent(self):
        slave = self.daemon.slave("t")
        self.assertEqual(self.master.send(admin("resume")), [{"ok": True}])  # not paused: nothing
        self.assertEqual(self.master.send(admin("pause"), admin("pause")), [{"ok": True}] * 2)
        self.master.send(submit("a"))
        self.assertEqual(self.master.send(admin("resume")), [{"ok": True}])
        self.assertEqual([job["id"] for job in slave.received()], ["a"])
        self.assertEqual(self.stats()["paused"], [])

    def test_refs_are_echoed(self):
        self.assertEqual(self.master.send(admin("pause", ref=1), admin("resume", ref="r"),
                                          admin("clear", ref=3)),
                         [{"ok": True, "ref": 1}, {"ok": True, "ref": "r"},
                          {"ok": True, "cleared": 0, "ref": 3}])

    def test_an_invalid_type_is_refused(self):
        self.master.send(submit("a"))
        for action in ("pause", "resume", "clear"):
            for job_type in (None, 5, "", ["t"], "x" * 1025, "\xe9" * 513):
                (refusal,) = self.master.send(admin(action, job_type))
                self.assertEqual(refusal["error"], "invalid_message", (action, job_type))
            (refusal,) = self.master.send({"action": action})
            self.assertEqual(refusal["error"], "invalid_message", action)
        self.assertEqual(self.scheduler.paused, set())
        self.assertEqual(self.scheduler.queued("t"), 1)
        self.assertEqual(self.master.received(), [])


class ClearTests(AdminTestCase):
    def test_clear_ends_the_queued_and_delayed_jobs_of_that_type_only(self):
        other = self.daemon.master()
        slave = self.daemon.slave("t")
        self.master.send(submit("running"), submit("q1"), submit("later", delay=10),
                         submit("q2", priority=4), submit("elsewhere", type="u"))
        self.assertEqual([job["id"] for job in slave.received()], ["running"])
        other.send(submit("q1"))
        reason = "an administrator cleared the queue of its type"
        self.assertEqual(self.master.send(admin("clear")), [
            {"error": "cleared", "reason": reason, "id": "q1"},
            {"error": "cleared", "reason": reason, "id": "later"},
            {"error": "cleared", "reason": reason, "id": "q2"},
            {"ok": True, "cleared": 4}])
        self.assertEqual(other.received(), [{"error": "cleared", "reason": reason, "id": "q1"}])
        self.assertEqual((self.scheduler.queued("t"), self.scheduler.delayed("t")), (0, 0))
        self.assertEqual(self.scheduler.queued("u"), 1)
        self.assertEqual(self.status("running")["state"], "running")
        self.clock.advance(10)  # the delayed job's time: nothing comes of it
        self.assertEqual(slave.send({"action": "respond", "body": "still"}), [{"ok": True}])
        self.assertEqual(self.master.received(), [{"id": "running", "body": "still"}])
        self.assertEqual(slave.received(), [])
        totals = self.stats()["totals"]
        self.assertEqual((totals["cleared"], totals["failed"], totals["completed"]), (4, 0, 1))
        self.assertTotalsAddUp()

    def test_the_ids_the_master_used_are_free_again(self):
        self.master.send(submit("a"))
        self.master.send(admin("clear"))
        self.assertEqual(self.master.send(submit("a")), [ack("a")])

    def test_clear_with_nothing_to_clear(self):
        self.assertEqual(self.master.send(admin("clear", "nobody")), [{"ok": True, "cleared": 0}])
        self.assertEqual(self.stats()["types"], {})

    def test_detached_jobs_go_to_the_dead_list_and_dead_retry_brings_them_back(self):
        self.master.send(submit("d1", detach=True), submit("d2", detach=True, delay=30))
        self.assertEqual(self.master.send(admin("clear")), [{"ok": True, "cleared": 2}])
        (listing,) = self.master.send({"action": "dead_list"})
        self.assertEqual([(dead["id"], dead["reason"]) for dead in listing["dead"]],
                         [("d1", "an administrator cleared the queue of its type"),
                          ("d2", "an administrator cleared the queue of its type")])
        self.assertEqual(self.status("d1")["state"], "dead")
        self.assertEqual(self.master.send({"action": "dead_retry", "id": "d1"}), [ack("d1")])
        self.assertEqual(self.status("d1")["state"], "queued")
        slave = self.daemon.slave("t")
        self.assertEqual([job["id"] for job in slave.received()], ["d1"])
        slave.send({"action": "respond", "body": "at last"})
        self.assertEqual(self.status("d1")["state"], "completed")
        self.assertEqual(self.stats()["totals"]["cleared"], 2)

    def test_a_unique_job_is_cleared_once_and_every_submitter_hears_it(self):
        other = self.daemon.master()
        self.master.send(submit("mine", unique="k"))
        self.assertEqual(other.send(submit("theirs", unique="k")),
                         [{"ok": True, "id": "theirs", "coalesced": True}])
        (reply, ) = [m for m in self.master.send(admin("clear")) if "ok" in m]
        self.assertEqual(reply, {"ok": True, "cleared": 1})
        (frame,) = other.received()
        self.assertEqual((frame["error"], frame["id"]), ("cleared", "theirs"))
        self.assertEqual(self.scheduler._unique, {})
        self.assertEqual(other.send(submit("again", unique="k")), [ack("again")])

    def test_a_retry_waiting_out_its_backoff_is_cleared(self):
        slave = self.daemon.slave("t")
        self.master.send(submit("r", backoff=True, retries=3))
        slave.disconnect()
        self.assertEqual(self.status("r")["state"], "delayed")
        self.assertEqual(self.master.send(admin("clear"))[-1], {"ok": True, "cleared": 1})
        self.clock.advance(60)
        self.assertEqual(len(self.scheduler), 0)

    def test_clear_while_paused_leaves_the_type_paused(self):
        slave = self.daemon.slave("t")
        self.master.send(admin("pause"), submit("a"), submit("b"))
        self.assertEqual(self.master.send(admin("clear"))[-1], {"ok": True, "cleared": 2})
        self.assertEqual(self.stats()["paused"], ["t"])
        self.master.send(submit("c"))
        self.assertEqual(slave.received(), [])
        self.master.send(admin("resume"))
        self.assertEqual([job["id"] for job in slave.received()], ["c"])


class ForbiddenTests(AdminTestCase):
    admin = False

    def test_every_admin_action_is_forbidden_and_changes_nothing(self):
        slave = self.daemon.slave("t")
        self.master.send(submit("running"), submit("queued"), submit("later", delay=5))
        for action in ADMIN_ACTIONS:
            for frame in (admin(action), admin(action, ref=9), admin(action, "\xe9")):
                (refusal,) = self.master.send(frame)
                self.assertEqual(set(refusal) - {"ref"}, {"error", "reason"}, refusal)
                self.assertEqual(refusal["error"], "forbidden")
                self.assertIn("--admin", refusal["reason"])
                self.assertEqual(refusal.get("ref"), frame.get("ref"))
        stats = self.stats()
        self.assertEqual((stats["paused"], stats["draining"]), ([], False))
        self.assertEqual(stats["types"]["t"]["queued"], 1)
        self.assertEqual(stats["types"]["t"]["delayed"], 1)
        self.assertEqual(stats["totals"]["cleared"], 0)
        # The connection keeps working, and so does the daemon.
        self.assertEqual(self.master.send(submit("after")), [ack("after")])
        self.assertEqual([job["id"] for job in slave.received()], ["running"])
        for expected in ("queued", "after"):
            frames = slave.send({"action": "respond", "body": expected})
            self.assertEqual(frames[-1]["id"], expected)
        self.assertEqual([m for m in self.master.received() if "body" in m],
                         [{"id": "running", "body": "queued"}, {"id": "queued", "body": "after"}])

    def test_forbidden_on_the_slave_port_is_wrong_port(self):
        slave = self.daemon.slave()
        for action in ADMIN_ACTIONS:
            (refusal,) = slave.send(admin(action))
            self.assertEqual(refusal["error"], "wrong_port")


class DrainTests(AdminTestCase):
    def drained(self):
        """Whether the scheduler's drain has fired (after this turn)."""
        self.clock.advance(0)
        fired = []
        self.scheduler.drain().addCallback(fired.append)
        return bool(fired)

    def test_new_work_is_refused_and_what_there_is_is_finished(self):
        slave = self.daemon.slave("t")
        self.master.send(submit("running"), submit("queued", priority=-1), submit("det", detach=True),
                         submit("shared", unique="k"), submit("dead", type="d", detach=True, retries=0))
        dead_slave = self.daemon.slave("d")
        dead_slave.send({"action": "fail", "reason": "no"})
        self.assertEqual(self.status("dead")["state"], "dead")
        self.assertEqual(slave.received()[0]["id"], "running")
        self.assertEqual(self.master.send(admin("drain")), [{"ok": True}])
        self.assertTrue(self.stats()["draining"])
        other = self.daemon.master()
        for frame in (submit("new"), submit("new-detached", detach=True),
                      submit("new-unique", unique="fresh"), submit("attach", unique="k"),
                      submit("new-delayed", delay=1), submit("new-at", at=5, detach=True),
                      {"action": "dead_retry", "id": "dead"}):
            (refusal,) = other.send(frame)
            self.assertEqual((refusal["error"], refusal["id"]), ("shutdown", frame["id"]), frame)
            self.assertIn("draining", refusal["reason"])
        # dead_retry of no dead job is still unknown_job; other actions still work
        (unknown,) = other.send({"action": "dead_retry", "id": "nothing"})
        self.assertEqual(unknown["error"], "unknown_job")
        self.assertEqual(other.send({"action": "status", "id": "det"})[0]["state"], "queued")
        self.assertEqual(len(self.scheduler), 4)
        for expected_next in ("det", "shared", "queued", None):
            self.assertFalse(self.drained())
            frames = slave.send({"action": "respond", "body": "done"})
            self.assertEqual(frames[-1].get("id"), expected_next, frames)
        self.assertTrue(self.drained())
        answers = [m for m in self.master.received() if "body" in m]
        self.assertEqual([m["id"] for m in answers], ["running", "shared", "queued"])
        self.assertEqual(other.received(), [])

    def test_the_drain_waits_for_a_retry_waiting_out_its_backoff(self):
        lost = self.daemon.slave("t")
        self.master.send(submit("r", backoff=True, retries=2), submit("d", detach=True, type="u"))
        failing = self.daemon.slave("u")
        failing.send({"action": "fail", "reason": "try again"})  # a detached job backs off
        lost.disconnect()
        self.assertEqual(self.scheduler.delayed(), 2)
        self.master.send(admin("drain"))
        self.assertFalse(self.drained())
        self.clock.advance(0.5)  # both come back (the test daemon's backoff: exactly 0.5 s)
        self.assertFalse(self.drained())
        (job,) = failing.received()
        self.assertEqual(job["id"], "d")
        failing.send({"action": "respond", "body": 1})
        self.assertFalse(self.drained())
        slave = self.daemon.slave("t")
        self.assertFalse(self.drained())
        slave.send({"action": "respond", "body": 2})
        self.assertTrue(self.drained())
        self.assertIn({"id": "r", "body": 2}, self.master.received())

    def test_with_nothing_to_do_the_drain_fires_at_once(self):
        self.master.send(admin("drain"))
        self.assertTrue(self.drained())

    def test_a_job_delayed_to_later_is_not_waited_for(self):
        self.master.send(submit("later", delay=60))
        self.master.send(admin("drain"))
        self.assertTrue(self.drained())

    def test_the_queued_jobs_of_a_paused_type_are_not_waited_for(self):
        slave = self.daemon.slave("t")
        self.master.send(admin("pause", "u"), submit("running"), submit("held", type="u"))
        self.master.send(admin("drain"))
        self.assertFalse(self.drained())
        slave.send({"action": "respond", "body": None})
        self.assertTrue(self.drained())
        self.assertEqual(self.status("held")["state"], "queued")

    def test_pausing_a_type_ends_the_wait_for_its_queued_jobs(self):
        self.master.send(submit("queued"))
        self.master.send(admin("drain"))
        self.assertFalse(self.drained())
        self.master.send(admin("pause"))
        self.assertTrue(self.drained())

    def test_a_cancelled_job_ends_the_wait(self):
        self.master.send(submit("queued"))
        self.master.send(admin("drain"))
        self.assertFalse(self.drained())
        self.master.send({"action": "cancel", "id": "queued"})
        self.assertTrue(self.drained())


class DrainPausedTests(AdminTestCase):
    """A drain does not wait for the queued jobs of a paused type, however
    a job comes to be one: a running job of a paused type that goes back to
    its queue (handed back, its slave lost, or timed out) ends the wait."""

    def drained(self):
        self.clock.advance(0)
        fired = []
        self.scheduler.drain().addCallback(fired.append)
        return bool(fired)

    def running_then_paused(self, **fields):
        slave = self.daemon.slave("t")
        self.master.send(submit("a", **fields))
        self.assertEqual(slave.received()[0]["id"], "a")
        self.assertEqual(self.master.send(admin("pause"), admin("drain")), [{"ok": True}] * 2)
        self.assertFalse(self.drained())
        return slave

    def test_released(self):
        slave = self.running_then_paused()
        self.assertEqual(slave.send({"action": "leave"}, {"action": "release", "id": "a"}),
                         [{"ok": True}, {"ok": True}])
        self.assertTrue(self.drained())

    def test_slave_lost(self):
        self.running_then_paused().disconnect()
        self.assertTrue(self.drained())

    def test_timed_out(self):
        self.running_then_paused(timeout=2)
        self.clock.advance(2)
        self.assertTrue(self.drained())

    def test_a_retry_waiting_its_backoff(self):
        slave = self.running_then_paused(backoff=True)
        slave.disconnect()  # the retry waits out its backoff, in a paused type
        self.assertTrue(self.drained())


class DrainServiceTests(SynchronousTestCase):
    """`GloomService.drain` (the drain action, SIGUSR1) stops the reactor
    once the last job ends."""

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.daemon = Daemon(admin=True, clock=self.reactor)
        self.service = GloomService(self.daemon.scheduler, (self.daemon.masters, self.daemon.slaves),
                                    self.reactor)
        self.daemon.masters.stats = self.service.stats
        self.stops = []
        self.service.stop_reactor = self.stop_reactor
        self.service.startService()
        self.addCleanup(self.service.stopService)

    def stop_reactor(self):
        """As a real reactor's stop: a second call raises."""
        if self.stops:
            raise ReactorNotRunning("Can't stop reactor that isn't running.")
        self.stops.append(self.reactor.seconds())

    def test_the_reactor_stops_once_the_last_job_is_answered(self):
        master, slave = self.daemon.master(), self.daemon.slave("t")
        self.assertEqual(master.send(submit("a"), admin("drain")), [ack("a"), {"ok": True}])
        self.reactor.advance(0)
        self.assertEqual(self.stops, [])
        slave.send({"action": "respond", "body": "a"})
        self.assertEqual(master.received(), [{"id": "a", "body": "a"}])
        self.reactor.advance(0)
        self.assertEqual(self.stops, [0])

    def test_draining_twice_stops_the_reactor_once(self):
        """The drain action twice, or SIGUSR1 and the action: each drain's
        Deferred fires, and the reactor is stopped only once (a real
        reactor's second stop raises ReactorNotRunning)."""
        master, slave = self.daemon.master(), self.daemon.slave("t")
        self.assertEqual(master.send(submit("a")), [ack("a")])
        first, second = [], []
        self.service.drain().addBoth(first.append)
        self.assertEqual(master.send(admin("drain"), admin("drain")), [{"ok": True}] * 2)
        self.service.drain().addBoth(second.append)
        slave.send({"action": "respond", "body": "a"})
        self.reactor.advance(0)
        self.assertEqual((first, second), ([None], [None]))
        self.assertEqual(self.stops, [0])
        self.assertEqual(self.flushLoggedErrors(ReactorNotRunning), [])

    def test_sigusr1_while_stopping_is_ignored(self):
        """A SIGUSR1 that comes once the daemon is stopping does nothing
        (the default action would kill it in the middle of its shutdown)."""
        self.service.stopService()
        self.service._usr1_in_reactor()
        self.assertFalse(self.daemon.scheduler.draining)
        self.assertEqual(self.stops, [])


# --- twistd in a subprocess ---------------------------------------------------


def wait_for(test, condition, what, timeout=15):
    """Poll ``condition`` (bounded) until it holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            test.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


class TwistdAdminTests(SynchronousTestCase):
    def start(self, *options):
        daemon = TwistdDaemon(self, "-n", "gloom", *options, *ANY_PORT)
        master_port, slave_port = daemon.ports()
        clients = [BlockingClient(master_port), BlockingClient(slave_port), BlockingClient(master_port)]
        for client in clients:
            self.addCleanup(client.close)
        return (daemon, *clients)

    def running_job(self, master, slave):
        slave.send({"action": "join", "type": "t"})
        self.assertEqual(slave.receive(), {"ok": True})
        master.send(submit("long", body="work"))
        self.assertEqual(master.receive(), ack("long"))
        self.assertEqual(slave.receive(), {"action": "job", "id": "long", "type": "t", "body": "work"})

    def finish_after_drain(self, daemon, master, slave, operator):
        operator.send(submit("refused"))
        refusal = operator.receive()
        self.assertEqual((refusal["error"], refusal["id"]), ("shutdown", "refused"))
        self.assertIsNone(daemon.process.poll())  # still running: a job is not finished
        slave.send({"action": "respond", "body": "finished"})
        self.assertEqual(slave.receive(), {"ok": True})
        self.assertEqual(master.receive(), {"id": "long", "body": "finished"})
        status, output = daemon.finish()
        self.assertEqual(status, 0, output)
        self.assertIn("Drained: every job is finished; stopping", output)
        self.assertIn("Main loop terminated", output)
        self.assertNotIn("Traceback", output)
        self.assertNotIn("Unhandled", output)

    def test_the_drain_action_finishes_the_running_job_then_exits_0(self):
        daemon, master, slave, operator = self.start("--admin")
        self.running_job(master, slave)
        operator.send({"action": "drain", "ref": 1})
        self.assertEqual(operator.receive(), {"ok": True, "ref": 1})
        self.finish_after_drain(daemon, master, slave, operator)

    def test_sigusr1_drains(self):
        daemon, master, slave, operator = self.start()
        self.running_job(master, slave)  # a round trip: the daemon has started, handler and all
        daemon.process.send_signal(signal.SIGUSR1)

        def draining():
            operator.send({"action": "stats"})
            return operator.receive()["stats"]["draining"]

        wait_for(self, draining, "the daemon to drain on SIGUSR1")
        self.finish_after_drain(daemon, master, slave, operator)

    def test_without_admin_the_drain_action_is_forbidden_and_the_daemon_runs_on(self):
        daemon, master, slave, operator = self.start()
        operator.send({"action": "drain"})
        refusal = operator.receive()
        self.assertEqual(refusal["error"], "forbidden")
        self.assertIn("--admin", refusal["reason"])
        self.running_job(master, slave)
        slave.send({"action": "respond", "body": "done"})
        self.assertEqual(slave.receive(), {"ok": True})
        self.assertEqual(master.receive(), {"id": "long", "body": "done"})
        operator.send({"action": "stats"})
        self.assertFalse(operator.receive()["stats"]["draining"])
        self.assertIsNone(daemon.process.poll())
        daemon.process.send_signal(signal.SIGTERM)
        status, output = daemon.finish()
        self.assertEqual(status, -signal.SIGTERM, output)

    def test_metrics_show_paused_types_draining_and_the_new_totals(self):
        port = reserved_port(self)
        daemon, master, slave, operator = self.start(
            "--admin", "--http", f"tcp:{port}:interface=127.0.0.1")
        daemon.read_until(lambda text: "Listening for HTTP on" in text)

        def metrics():
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                connection.request("GET", "/metrics")
                response = connection.getresponse()
                self.assertEqual(response.status, 200)
                text = response.read().decode()
            finally:
                connection.close()
            return dict(re.findall(r"^(gloom_\S+) (\S+)$", text, re.M))

        operator.send(admin("pause", "held"))
        self.assertEqual(operator.receive(), {"ok": True})
        operator.send(submit("cleared", type="cleared"))
        self.assertEqual(operator.receive(), ack("cleared"))
        operator.send(admin("clear", "cleared"))
        self.assertEqual(operator.receive()["error"], "cleared")
        self.assertEqual(operator.receive(), {"ok": True, "cleared": 1})
        slave.send({"action": "join", "type": "t"})
        self.assertEqual(slave.receive(), {"ok": True})
        master.send(submit("long", unique="k"))
        self.assertEqual(master.receive(), ack("long"))
        self.assertEqual(slave.receive()["id"], "long")
        operator.send(submit("also", unique="k"))
        self.assertEqual(operator.receive(), {"ok": True, "id": "also", "coalesced": True})
        slave.send({"action": "progress", "done": 1})
        self.assertEqual(slave.receive(), {"ok": True})
        slave.send({"action": "touch"})
        self.assertEqual(slave.receive(), {"ok": True})
        self.assertEqual(master.receive(), {"id": "long", "progress": {"done": 1}})
        self.assertEqual(operator.receive(), {"id": "also", "progress": {"done": 1}})
        figures = metrics()
        self.assertEqual(figures['gloom_type_paused{type="held"}'], "1.0")
        self.assertEqual(figures['gloom_type_paused{type="t"}'], "0.0")
        self.assertEqual(figures["gloom_draining"], "0.0")
        for name, value in (("coalesced", "1.0"), ("progress", "1.0"), ("touched", "1.0"),
                            ("cleared", "1.0"), ("progress_replaced", "0.0")):
            self.assertEqual(figures[f"gloom_jobs_{name}_total"], value, name)
        operator.send(admin("drain"))
        self.assertEqual(operator.receive(), {"ok": True})
        self.assertEqual(metrics()["gloom_draining"], "1.0")
        slave.send({"action": "respond", "body": "done"})
        self.assertEqual(slave.receive(), {"ok": True})
        self.assertEqual(master.receive(), {"id": "long", "body": "done"})
        self.assertEqual(operator.receive(), {"id": "also", "body": "done"})
        status, output = daemon.finish()
        self.assertEqual(status, 0, output)
