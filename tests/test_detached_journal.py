"""Detached jobs with a journal, in memory with a `Clock` and a real SQLite
file: acks wait for the group commit, a restart takes the jobs back, a full
disk refuses detached submits and nothing else."""

import os
import shutil
import tempfile

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from gloom.journal import Journal
from tests.support import Daemon


def submit(job_id, **fields):
    return {"action": "submit", "id": job_id, "type": fields.pop("type", "t"),
            "body": fields.pop("body", None), **fields}


class JournalledDaemonTests(SynchronousTestCase):
    def setUp(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        self.path = os.path.join(directory, "journal.db")
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.daemon = self.start()
        self.master = self.daemon.master()

    def start(self, **options):
        """A daemon on the journal, its jobs loaded, as at start-up."""
        journal = Journal(self.path, "normal", clock=self.clock, max_pages=options.pop("max_pages", None))
        daemon = Daemon(journal=journal, clock=self.clock, **options)
        daemon.detached.load(journal.load())
        self.addCleanup(journal.close)
        return daemon

    def status(self, job_id, daemon=None):
        master = self.master if daemon is None else daemon.master()
        replies = master.send({"action": "status", "id": job_id})
        self.assertEqual(len(replies), 1, replies)
        return replies[0]

    def test_the_ack_waits_for_the_commit_of_its_turn(self):
        journal = self.daemon.detached.journal
        self.assertEqual(self.master.send(submit("a", detach=True), submit("b", detach=True),
                                          submit("attached")),
                         [{"ok": True, "id": "attached"}])
        self.assertEqual(journal.commits, 0)
        self.clock.advance(0)
        self.assertEqual(self.master.received(), [{"ok": True, "id": "a"}, {"ok": True, "id": "b"}])
        self.assertEqual(journal.commits, 1)  # both submits, one transaction
        self.assertEqual(sorted(r.id for r in Journal(self.path, clock=self.clock).load()), ["a", "b"])

    def test_a_duplicate_while_the_first_is_being_written(self):
        (refusal,) = self.master.send(submit("a", detach=True), submit("a", detach=True))
        self.assertEqual((refusal["error"], refusal["id"]), ("id_exists", "a"))
        self.assertEqual(self.status("a")["state"], "queued")

    def test_attached_jobs_never_touch_the_disk(self):
        slave = self.daemon.slave("t")
        self.master.send(submit("a"), submit("b", delay=5), submit("c", backoff=True))
        slave.send({"action": "respond", "body": 1})
        self.clock.advance(10)
        self.assertEqual(self.daemon.detached.journal.commits, 0)
        self.assertEqual(list(Journal(self.path, clock=self.clock).load()), [])

    def test_a_restart_takes_every_state_back(self):
        daemon, master = self.daemon, self.master
        slave = daemon.slave("t")
        master.send(submit("done", detach=True), submit("running", detach=True, priority=-1),
                    submit("queued", detach=True, priority=-2),
                    submit("later", detach=True, delay=100), submit("dead", detach=True, retries=0,
                                                                   type="u"))
        self.clock.advance(0)
        self.assertEqual(len(master.received()), 5)
        slave.received()
        slave.send({"action": "respond", "body": {"n": 1}})  # done; running starts
        dead_slave = daemon.slave("u")
        dead_slave.send({"action": "fail", "reason": "bad input"})
        self.clock.advance(0)
        self.assertEqual(self.status("running")["state"], "running")
        # The daemon is killed: nothing more is written, nothing closed.
        again = self.start()
        self.assertEqual(self.status("done", again)["result"], {"n": 1})
        self.assertEqual(self.status("dead", again)["state"], "dead")
        self.assertEqual(self.status("dead", again)["reason"],
                         "its slave failed it: bad input; gave up after 1 attempt")
        later = self.status("later", again)
        self.assertEqual((later["state"], later["run_at"]), ("delayed", 1_700_000_100))
        running = self.status("running", again)
        self.assertEqual((running["state"], running["attempts"]), ("queued", 1))
        self.assertEqual(again.scheduler.jobs()[0].retries, 1)  # its lost attempt was a retry
        self.assertEqual(self.status("queued", again)["state"], "queued")
        slave = again.slave("t")
        self.assertEqual([m["id"] for m in slave.received()], ["running"])  # priority order kept
        self.assertEqual(slave.send({"action": "respond", "body": None})[1]["id"], "queued")

    def test_a_job_lost_on_its_last_attempt_is_dead_after_the_restart(self):
        slave = self.daemon.slave("t")
        self.master.send(submit("x", detach=True, retries=0))
        self.clock.advance(0)
        self.assertEqual([m["id"] for m in slave.received()], ["x"])
        self.clock.advance(0)
        again = self.start()
        reply = self.status("x", again)
        self.assertEqual(reply["state"], "dead")
        self.assertIn("the daemon stopped during its last attempt", reply["reason"])

    def test_dead_retry_and_discard_are_recorded(self):
        slave = self.daemon.slave("t")
        self.master.send(submit("a", detach=True, retries=0), submit("b", detach=True, retries=0))
        self.clock.advance(0)
        slave.send({"action": "fail", "reason": "no"})
        slave.send({"action": "fail", "reason": "no"})
        slave.send({"action": "leave"})
        self.master.send({"action": "dead_retry", "id": "a"}, {"action": "dead_discard", "id": "b"})
        self.clock.advance(0)
        again = self.start()
        self.assertEqual((self.status("a", again)["state"], self.status("b", again)["state"]),
                         ("queued", "unknown"))

    def test_expired_results_leave_the_file(self):
        slave = self.daemon.slave("t")
        self.master.send(submit("a", detach=True))
        self.clock.advance(0)
        slave.send({"action": "respond", "body": 1})
        self.clock.advance(600)
        self.clock.advance(0)
        self.assertEqual(list(Journal(self.path, clock=self.clock).load()), [])

    def test_a_full_disk_refuses_detached_submits_only(self):
        daemon = self.start(max_pages=20)
        master = daemon.master()
        master.send(submit("kept", detach=True))
        self.clock.advance(0)
        self.assertEqual(master.received(), [{"ok": True, "id": "kept"}])
        big = "x" * 200_000
        master.send(submit("big", detach=True, body=big, ref=1))
        self.clock.advance(0)
        (refusal,) = master.received()
        self.assertEqual((refusal["error"], refusal["id"], refusal["ref"]), ("journal_error", "big", 1))
        self.assertIn("not accepted", refusal["reason"])
        self.assertEqual(self.status("big", daemon)["state"], "unknown")
        self.assertEqual(master.send(submit("attached", body=big)), [{"ok": True, "id": "attached"}])
        self.assertEqual(daemon.detached.journal.errors, 1)
        master.send(submit("small", detach=True))
        self.clock.advance(0)
        self.assertEqual(master.received(), [{"ok": True, "id": "small"}])
        self.assertEqual(sorted(r.id for r in Journal(self.path, clock=self.clock).load()),
                         ["kept", "small"])

    def test_a_master_gone_before_the_commit_still_has_its_job_taken(self):
        self.master.send(submit("a", detach=True))
        self.master.disconnect()
        self.clock.advance(0)
        self.assertEqual(self.status("a", self.daemon)["state"], "queued")

    def test_stats_and_metrics_show_the_journal_and_detached_jobs(self):
        from prometheus_client import CollectorRegistry, generate_latest

        from gloom.http import StatsCollector
        from gloom.tap import GloomService

        daemon = self.daemon
        service = GloomService(daemon.scheduler, (daemon.masters, daemon.slaves), self.clock)
        daemon.masters.stats = service.stats
        self.master.send(submit("a", detach=True), submit("b", detach=True, delay=30),
                         submit("c", detach=True, retries=0, type="u"))
        self.clock.advance(0)
        slave = daemon.slave("u")
        slave.send({"action": "fail", "reason": "no"})
        self.clock.advance(0)
        stats = service.stats()
        self.assertEqual(stats["detached"], {"live": 2, "results": 0, "results_bytes": 0, "dead": 1})
        journal = stats["journal"]
        self.assertEqual((journal["path"], journal["sync"], journal["errors"], journal["pending"]),
                         (self.path, "normal", 0, 0))
        self.assertGreater(journal["bytes"], 0)
        self.assertGreaterEqual(journal["commits"], 2)
        registry = CollectorRegistry()
        registry.register(StatsCollector(lambda: service.stats(types_limit=None)))
        lines = set(generate_latest(registry).decode().splitlines())
        for expected in ("gloom_jobs_detached_total 3.0", "gloom_jobs_dead_total 1.0",
                         "gloom_jobs_delayed_total 1.0", 'gloom_jobs_delayed{type="t"} 1.0',
                         "gloom_detached_live 2.0", "gloom_detached_dead 1.0",
                         "gloom_journal_errors_total 0.0"):
            self.assertIn(expected, lines)
        self.assertTrue(any(line.startswith("gloom_journal_commits_total ") for line in lines))
        self.assertTrue(any(line.startswith("gloom_journal_bytes ") for line in lines))

    def test_a_job_on_disk_as_the_daemon_stops_is_acked_and_runs_after_the_restart(self):
        self.master.send(submit("late", detach=True))
        self.daemon.scheduler.stopService()
        self.clock.advance(0)
        self.assertEqual(self.master.received(), [{"ok": True, "id": "late"}])
        self.assertEqual(self.status("late", self.start())["state"], "queued")

    def test_a_resubmitted_id_keeps_its_row_when_its_old_end_is_dropped(self):
        daemon = self.start(keep_results_max=1)
        master, slave = daemon.master(), daemon.slave("t")
        master.send(submit("A", detach=True))
        self.clock.advance(0)
        slave.send({"action": "respond", "body": "old"})
        slave.send({"action": "leave"})
        master.send(submit("B", detach=True, delay=3600))
        self.clock.advance(0)
        master.received()
        # The new A replaces A's kept end; B's end then pushes the oldest
        # kept end out, which must not take the new A's row with it.
        master.send(submit("A", detach=True, body="again", delay=3600), {"action": "cancel", "id": "B"})
        status = self.status("A", daemon)  # on its way to disk: the new job, not the old end
        self.assertEqual((status["state"], status["attempts"], status["run_at"]),
                         ("delayed", 0, 1_700_003_600))
        self.clock.advance(0)
        self.assertIn({"ok": True, "id": "A"}, master.received())
        again = self.start()
        self.assertEqual(self.status("A", again)["state"], "delayed")
        self.assertEqual(self.status("B", again)["reason"], "cancelled by a master")

    def test_a_job_on_its_way_to_disk_can_be_cancelled(self):
        (ack,) = self.master.send(submit("c", detach=True, type="u", priority=3),
                                  {"action": "cancel", "id": "c"})
        self.assertEqual(ack, {"ok": True, "id": "c"})
        self.assertEqual(self.status("c"), {"ok": True, "id": "c", "state": "failed", "detached": True,
                                            "type": "u", "priority": 3, "attempts": 0,
                                            "reason": "cancelled by a master"})
        self.clock.advance(0)
        self.assertEqual(self.master.received(), [{"ok": True, "id": "c"}])
        slave = self.daemon.slave("u")
        self.assertEqual(slave.received(), [])
        self.assertEqual(self.status("c", self.start())["state"], "failed")

    def test_settle_writes_and_acks_what_is_pending(self):
        self.master.send(submit("s", detach=True))
        self.assertEqual(self.master.received(), [])
        self.daemon.detached.journal.settle()
        self.assertEqual(self.master.received(), [{"ok": True, "id": "s"}])
        self.assertEqual([r.id for r in Journal(self.path, clock=self.clock).load()], ["s"])


class JournalLockTests(SynchronousTestCase):
    def test_a_second_daemon_cannot_lock_the_journal(self):
        from gloom.journal import JournalOpenError

        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "journal.db")
        first = Journal(path, clock=Clock())
        first.lock()
        second = Journal(path, clock=Clock())
        error = self.assertRaises(JournalOpenError, second.lock)
        self.assertIn("another Gloom daemon", str(error))
        second.close()
        first.close()
        third = Journal(path, clock=Clock())
        third.lock()
        third.close()
