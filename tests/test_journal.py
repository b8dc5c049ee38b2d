"""The journal of detached jobs: its SQLite file, group commit, and the
errors it reports.  A fake clock runs the commits, in the test's thread;
`ThreadedTests` runs them in the journal's writer thread, with the reactor."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.logger import Logger
from twisted.python.threadable import isInIOThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from gloom import journal
from gloom.journal import (
    APPLICATION_ID,
    RETRY_DELAY,
    SCHEMA_VERSION,
    Journal,
    JournalError,
    JournalOpenError,
    Record,
)

FIELDS = Record.__slots__
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def record(n, **fields):
    """A queued job numbered ``n``, with ``fields`` changed."""
    values = dict(id=f"job-{n}", type="resize", priority=n % 3,
                  frame=b'{"id":"job-%d","type":"resize","body":[1,2]}' % n,
                  timeout=30.0, retries=3, attempts=0, retried=0, state="queued",
                  run_at=None, submitted_at=1.7e9 + n, sequence=n)
    values.update(fields)
    return Record(**values)


def fields(rec):
    """All of a record's fields, to compare records."""
    return tuple(getattr(rec, name) for name in FIELDS)


class JournalTestCase(SynchronousTestCase):
    """A temporary directory, a fake clock, and journals closed at the end."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="gloom-journal-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, "journal.db")
        self.clock = Clock()

    def journal(self, path=None, **options):
        """A journal on ``path`` (the test's file by default), closed at the end."""
        j = Journal(self.path if path is None else path, clock=options.pop("clock", self.clock),
                    **options)
        self.addCleanup(j.close)
        return j

    def raw(self, path=None):
        """A second, plain SQLite connection to the file."""
        db = sqlite3.connect(self.path if path is None else path)
        self.addCleanup(db.close)
        return db

    def ids_on_disk(self, path=None):
        """The ids committed in the file, read by another connection."""
        return {row[0] for row in self.raw(path).execute("SELECT id FROM jobs")}

    def committed(self, j, *records):
        """Write ``records`` with put_new in one turn; assert they committed."""
        waiters = [j.put_new(r) for r in records]
        self.clock.advance(0)
        for d in waiters:
            self.assertIsNone(self.successResultOf(d))


class OpenTests(JournalTestCase):
    """Creating, reopening and the file's settings."""

    def test_new_file(self):
        """A new file gets the current schema, Gloom's application id and WAL
        mode, and holds no rows."""
        j = self.journal()
        self.assertEqual(list(j.load()), [])
        db = self.raw()
        self.assertEqual(db.execute("PRAGMA user_version").fetchone()[0], SCHEMA_VERSION)
        self.assertEqual(db.execute("PRAGMA application_id").fetchone()[0], APPLICATION_ID)
        self.assertEqual(db.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        self.assertEqual(SCHEMA_VERSION, 1)

    def test_empty_existing_file(self):
        """A file of zero bytes (made by touch) is a new journal."""
        open(self.path, "wb").close()
        j = self.journal()
        self.committed(j, record(1))
        self.assertEqual(self.ids_on_disk(), {"job-1"})

    def test_sync_modes(self):
        """sync "full" and "normal" set PRAGMA synchronous FULL (2) and NORMAL (1)."""
        full = self.journal(os.path.join(self.dir, "full.db"), sync="full")
        normal = self.journal(os.path.join(self.dir, "normal.db"))
        self.assertEqual(full._db.execute("PRAGMA synchronous").fetchone()[0], 2)
        self.assertEqual(normal._db.execute("PRAGMA synchronous").fetchone()[0], 1)
        self.assertEqual(normal.stats()["sync"], "normal")
        self.assertEqual(full.stats()["sync"], "full")

    def test_bad_sync(self):
        """Another sync mode is a ValueError, and no file is made."""
        self.assertRaises(ValueError, Journal, self.path, sync="off", clock=self.clock)
        self.assertFalse(os.path.exists(self.path))

    def test_rows_survive_close_and_reopen(self):
        """Every field comes back with its type after close and reopen."""
        j = self.journal()
        full = record(1, state="completed", attempts=2, retried=1, run_at=1.7e9 + 60,
                      ended_at=1.7e9 + 90, result=b'{"answer":[1,"\\u00e9"]}',
                      reason=None, timeout=None, priority=-5, sequence=7)
        dead = record(2, state="dead", reason="retries exhausted: slave disconnected",
                      frame=bytes(range(256)), sequence=8)
        self.committed(j, full, dead)
        j.close()
        loaded = list(self.journal().load())
        self.assertEqual([fields(r) for r in loaded], [fields(full), fields(dead)])
        self.assertIsInstance(loaded[0].frame, bytes)
        self.assertIsInstance(loaded[0].result, bytes)
        self.assertIsInstance(loaded[1].submitted_at, float)
        self.assertIsInstance(loaded[1].timeout, float)

    def test_integer_times_read_back_as_floats(self):
        """Times given as integers come back as floats."""
        j = self.journal()
        self.committed(j, record(1, submitted_at=1700000000, timeout=5, run_at=1700000100))
        (back,) = j.load()
        self.assertEqual((back.submitted_at, back.timeout, back.run_at),
                         (1700000000.0, 5.0, 1700000100.0))
        self.assertIsInstance(back.timeout, float)

    def test_reopen_after_crash_in_process(self):
        """A journal dropped without close (as if the process died) leaves its
        committed rows readable by a new journal on the file; what was only
        pending is not there."""
        j = self.journal()
        self.committed(j, record(1), record(2))
        j.put(record(3))
        self.addCleanup(j._db.close)
        j._closed = True  # as if dead: the cleanup's close writes nothing
        again = Journal(self.path, clock=Clock())
        self.addCleanup(again.close)
        self.assertEqual([r.id for r in again.load()], ["job-1", "job-2"])

    def test_reopen_after_process_exit(self):
        """Rows committed by a process that exits without closing the journal
        (its WAL not checkpointed) are loaded by the next one."""
        script = (
            "import os, sys\n"
            "from twisted.internet.task import Clock\n"
            "from gloom.journal import Journal, Record\n"
            "clock = Clock()\n"
            "j = Journal(sys.argv[1], sync='normal', clock=clock)\n"
            "for n in range(100):\n"
            "    j.put_new(Record('job-%d' % n, 't', 0, b'frame', None, 3, 0, 0, 'queued',"
            " None, 1.0, sequence=n))\n"
            "clock.advance(0)\n"
            "j.put(Record('lost', 't', 0, b'frame', None, 3, 0, 0, 'queued', None, 1.0))\n"
            "os._exit(0)\n")
        env = dict(os.environ, PYTHONPATH=REPO)
        subprocess.run([sys.executable, "-c", script, self.path], check=True, env=env,
                       timeout=60)
        self.assertTrue(os.path.getsize(self.path + "-wal") > 0)
        loaded = list(self.journal().load())
        self.assertEqual([r.id for r in loaded], [f"job-{n}" for n in range(100)])


class OpenErrorTests(JournalTestCase):
    """What cannot be used is refused at start, with one line saying why."""

    def refused(self, path=None, **options):
        """The one-line message of the JournalOpenError opening ``path`` raises."""
        path = self.path if path is None else path
        error = self.assertRaises(JournalOpenError, Journal, path, clock=self.clock, **options)
        message = str(error)
        self.assertNotIn("\n", message)
        self.assertTrue(message.startswith("gloom: cannot "), message)
        self.assertIn(path, message)
        return message

    def make_journal(self, count=2000):
        """A closed journal of ``count`` rows with 200-byte frames, on the test's file."""
        j = Journal(self.path, clock=self.clock)
        for n in range(count):
            j.put_new(record(n, frame=b"f" * 200))
        j.close()
        return os.path.getsize(self.path)

    def test_not_a_database(self):
        """A file of other bytes is "not a database", and is left as it was."""
        garbage = b"this is not SQLite\0" * 300
        with open(self.path, "wb") as f:
            f.write(garbage)
        message = self.refused()
        self.assertIn("file is not a database (corrupt?)", message)
        self.assertIn("move it aside", message)
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), garbage)

    def test_pages_overwritten(self):
        """A journal with pages in its middle overwritten is refused as
        corrupt by the check at start."""
        size = self.make_journal()
        with open(self.path, "r+b") as f:
            f.seek(size // 2 // 4096 * 4096)
            f.write(b"\xff" * 4096 * 3)
        message = self.refused()
        self.assertIn("the file is corrupt", message)
        self.assertIn("move it aside", message)

    def test_truncated(self):
        """A journal cut to half its size is refused as corrupt."""
        size = self.make_journal()
        with open(self.path, "r+b") as f:
            f.truncate(size // 2)
        self.assertIn("corrupt", self.refused())

    def test_newer_schema(self):
        """A journal of a newer schema is refused, and left as it was."""
        self.make_journal(3)
        db = sqlite3.connect(self.path)
        db.execute("PRAGMA user_version = 7")
        db.commit()
        db.close()
        message = self.refused()
        self.assertIn("it was written by a newer Gloom (schema 7, this Gloom reads up to 1);"
                      " upgrade Gloom or use another file", message)
        db = self.raw()
        self.assertEqual(db.execute("PRAGMA user_version").fetchone()[0], 7)
        self.assertEqual(db.execute("SELECT count(*) FROM jobs").fetchone()[0], 3)

    def test_another_programs_database(self):
        """An SQLite file of another program is refused and not changed."""
        db = sqlite3.connect(self.path)
        db.execute("CREATE TABLE accounts (name TEXT)")
        db.commit()
        db.close()
        self.assertIn("not a Gloom journal", self.refused())
        self.assertEqual(self.raw().execute("PRAGMA journal_mode").fetchone()[0], "delete")

    def test_locked_by_another_process(self):
        """A file another connection keeps locked is refused (after SQLite's
        one-second wait), naming the likely cause."""
        Journal(self.path, clock=self.clock).close()
        self.patch(journal, "SCHEMA_VERSION", 2)  # so opening must write
        self.patch(journal, "MIGRATIONS", {**journal.MIGRATIONS, 1: lambda db: None})
        other = self.raw()
        other.isolation_level = None
        other.execute("BEGIN IMMEDIATE")
        message = self.refused()
        self.assertIn("another process holds it locked", message)
        other.execute("ROLLBACK")
        self.journal()

    def test_missing_directory(self):
        """A path in a missing directory says so, and creates nothing."""
        path = os.path.join(self.dir, "absent", "journal.db")
        message = self.refused(path)
        self.assertIn("cannot open journal", message)
        self.assertIn("directory " + os.path.join(self.dir, "absent") + " does not exist",
                      message)
        self.assertFalse(os.path.exists(os.path.dirname(path)))

    def test_directory(self):
        """A path that is a directory is refused."""
        self.assertIn("it is a directory", self.refused(self.dir))

    def test_permission_denied(self):
        """A file the daemon may not read or write is "permission denied"."""
        if os.geteuid() == 0:
            raise self.skipTest("root reads and writes any file")
        self.make_journal(3)
        os.chmod(self.path, 0)
        self.addCleanup(os.chmod, self.path, 0o600)
        self.assertIn("permission denied", self.refused())

    def test_directory_not_writable(self):
        """A directory where SQLite cannot make the -wal and -shm files is
        "permission denied"."""
        if os.geteuid() == 0:
            raise self.skipTest("root writes in any directory")
        os.chmod(self.dir, 0o500)
        self.addCleanup(os.chmod, self.dir, 0o700)
        self.assertIn("permission denied", self.refused())


class MigrationTests(JournalTestCase):
    """Older schemas are upgraded by the steps in MIGRATIONS."""

    def v2(self, step):
        """Make this Gloom's schema 2, reached from 1 by ``step``."""
        self.patch(journal, "SCHEMA_VERSION", 2)
        self.patch(journal, "MIGRATIONS", {**journal.MIGRATIONS, 1: step})

    def write_v1(self):
        """A closed schema-1 journal of two rows; the rows."""
        rows = [record(1), record(2, state="dead", reason="no luck")]
        j = Journal(self.path, clock=self.clock)
        self.committed(j, *rows)
        j.close()
        return rows

    def test_upgrade_keeps_rows(self):
        """A schema-1 file is upgraded once, its rows kept, and then written
        as usual."""
        rows = self.write_v1()
        calls = []

        def add_column(db):
            calls.append(db.execute("PRAGMA user_version").fetchone()[0])
            db.execute("ALTER TABLE jobs ADD COLUMN owner TEXT DEFAULT 'nobody'")

        self.v2(add_column)
        j = self.journal()
        self.assertEqual(calls, [1])
        self.assertEqual([fields(r) for r in j.load()], [fields(r) for r in rows])
        db = self.raw()
        self.assertEqual(db.execute("PRAGMA user_version").fetchone()[0], 2)
        self.assertEqual(db.execute("SELECT owner FROM jobs WHERE id = 'job-1'").fetchone(),
                         ("nobody",))
        self.committed(j, record(3))
        j.close()
        self.assertEqual([r.id for r in self.journal().load()], ["job-1", "job-2", "job-3"])
        self.assertEqual(calls, [1])

    def test_new_file_takes_every_step(self):
        """An empty file goes through schema 1 to the latest."""
        self.v2(lambda db: db.execute("CREATE TABLE extra (x)"))
        self.journal()
        db = self.raw()
        self.assertEqual(db.execute("PRAGMA user_version").fetchone()[0], 2)
        self.assertEqual(db.execute("SELECT count(*) FROM extra").fetchone()[0], 0)

    def test_failed_step_changes_nothing(self):
        """A step that fails is refused in one line, and the file stays at
        schema 1 with its rows, without the step's first changes."""
        self.write_v1()

        def bad(db):
            db.execute("CREATE TABLE half_done (x)")
            db.execute("ALTER TABLE no_such_table ADD COLUMN y")

        self.v2(bad)
        error = self.assertRaises(JournalOpenError, Journal, self.path, clock=self.clock)
        self.assertIn("upgrading it from schema 1 to 2 failed", str(error))
        self.assertIn("the file is unchanged", str(error))
        self.assertNotIn("\n", str(error))
        db = self.raw()
        self.assertEqual(db.execute("PRAGMA user_version").fetchone()[0], 1)
        self.assertEqual(db.execute("SELECT count(*) FROM jobs").fetchone()[0], 2)
        self.assertIsNone(db.execute(
            "SELECT name FROM sqlite_master WHERE name = 'half_done'").fetchone())

    def test_missing_step(self):
        """A schema with no step from it is refused."""
        self.write_v1()
        self.patch(journal, "SCHEMA_VERSION", 2)
        error = self.assertRaises(JournalOpenError, Journal, self.path, clock=self.clock)
        self.assertIn("cannot upgrade schema 1", str(error))


class WriteTests(JournalTestCase):
    """Group commit and which change to an id wins."""

    def test_put_new_fires_once_committed(self):
        """put_new's Deferred fires, with None, only when the commit ran; the
        row is then in the file."""
        j = self.journal()
        d = j.put_new(record(1))
        self.assertNoResult(d)
        self.assertEqual(self.ids_on_disk(), set())
        self.assertEqual(j.stats()["pending"], 1)
        self.clock.advance(0)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.ids_on_disk(), {"job-1"})
        self.assertEqual(j.stats()["pending"], 0)

    def test_group_commit(self):
        """Everything one turn changes is one transaction, scheduled once."""
        j = self.journal()
        self.committed(j, record(0), record(1))
        self.assertEqual(j.stats()["commits"], 1)
        statements = []
        j._db.set_trace_callback(statements.append)
        waiters = [j.put_new(record(n)) for n in range(2, 202)]
        j.put(record(0, state="running", attempts=1))
        j.delete("job-1")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.assertEqual(self.clock.getDelayedCalls()[0].getTime(), 0)
        self.clock.advance(0)
        self.assertEqual([s for s in statements if s in ("BEGIN IMMEDIATE", "COMMIT")],
                         ["BEGIN IMMEDIATE", "COMMIT"])
        self.assertEqual(j.stats()["commits"], 2)
        for d in waiters:
            self.assertIsNone(self.successResultOf(d))
        self.assertEqual(len(self.ids_on_disk()), 201)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        j.put(record(5, state="running"))
        self.clock.advance(0)
        self.assertEqual(j.stats()["commits"], 3)

    def test_nothing_pending_no_transaction(self):
        """A commit with nothing to write is no transaction."""
        j = self.journal()
        j.commit()
        self.assertEqual(j.stats()["commits"], 0)

    def test_commit_now(self):
        """Calling commit writes at once and cancels the scheduled call."""
        j = self.journal()
        d = j.put_new(record(1))
        j.commit()
        self.successResultOf(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.ids_on_disk(), {"job-1"})

    def test_put_replaces_row(self):
        """put writes a job's latest state over its row."""
        j = self.journal()
        self.committed(j, record(1))
        j.put(record(1, state="completed", attempts=1, ended_at=1.7e9 + 5, result=b"42"))
        self.clock.advance(0)
        (row,) = j.load()
        self.assertEqual((row.state, row.attempts, row.result), ("completed", 1, b"42"))

    def test_last_put_wins(self):
        """Of two puts of an id in one turn, the later is written."""
        j = self.journal()
        j.put(record(1, state="queued"))
        j.put(record(1, state="running", attempts=1))
        self.assertEqual(j.stats()["pending"], 1)
        self.clock.advance(0)
        self.assertEqual([(r.state, r.attempts) for r in j.load()], [("running", 1)])

    def test_delete_after_put_drops_it(self):
        """A delete after a put of the same turn deletes the row, even one
        committed before."""
        j = self.journal()
        self.committed(j, record(1))
        j.put(record(1, state="running"))
        j.put(record(2))
        j.delete("job-1")
        j.delete("job-2")
        self.clock.advance(0)
        self.assertEqual(self.ids_on_disk(), set())

    def test_put_after_delete_recreates(self):
        """A put after a delete of the same turn leaves the put's row."""
        j = self.journal()
        self.committed(j, record(1))
        j.delete("job-1")
        j.put(record(1, state="delayed", run_at=1.7e9 + 100))
        self.clock.advance(0)
        self.assertEqual([(r.id, r.state) for r in j.load()], [("job-1", "delayed")])

    def test_delete_after_put_new(self):
        """put_new then delete in one turn: nothing is written and the
        Deferred still fires when the commit is done."""
        j = self.journal()
        d = j.put_new(record(1))
        j.delete("job-1")
        self.clock.advance(0)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.ids_on_disk(), set())

    def test_delete_unknown(self):
        """Deleting an id with no row is harmless."""
        j = self.journal()
        j.delete("never")
        self.clock.advance(0)
        self.assertEqual(j.stats()["errors"], 0)
        self.assertEqual(j.stats()["commits"], 1)

    def test_load_order(self):
        """load yields by sequence, whatever the order of writing or of ids;
        rows of equal sequence come in the order written."""
        j = self.journal()
        self.committed(j, record(5, id="a"), record(1, id="z"), record(3, id="m"))
        self.committed(j, record(2, id="b"))
        self.committed(j, record(4, id="tie-first", sequence=9))
        self.committed(j, record(4, id="tie-second", sequence=9))
        j.put(record(1, id="z", sequence=0, state="running"))
        self.clock.advance(0)
        self.assertEqual([r.id for r in j.load()],
                         ["z", "b", "m", "a", "tie-first", "tie-second"])

    def test_load_gives_records(self):
        """load gives Record objects, slots only, and many of them."""
        j = self.journal()
        for n in range(2500):
            j.put_new(record(n))
        self.clock.advance(0)
        loaded = list(j.load())
        self.assertEqual([r.sequence for r in loaded], list(range(2500)))
        self.assertIsInstance(loaded[0], Record)
        self.assertFalse(hasattr(loaded[0], "__dict__"))
        self.assertIn("job-0", repr(loaded[0]))

    def test_stats(self):
        """stats reports the file, its size (database and WAL), commits and
        their times, errors and pending changes."""
        j = self.journal(sync="full")
        stats = j.stats()
        self.assertEqual(set(stats), {"path", "sync", "bytes", "commits", "errors",
                                      "last_commit_ms", "max_commit_ms", "pending"})
        self.assertEqual((stats["path"], stats["sync"], stats["commits"], stats["errors"],
                          stats["pending"]), (self.path, "full", 0, 0, 0))
        self.committed(j, record(1), record(2))
        j.put(record(3))
        stats = j.stats()
        self.assertEqual((stats["commits"], stats["errors"], stats["pending"]), (1, 0, 1))
        self.assertEqual(stats["bytes"], os.path.getsize(self.path)
                         + os.path.getsize(self.path + "-wal"))
        self.assertTrue(0 < stats["last_commit_ms"] <= stats["max_commit_ms"])

    def test_close(self):
        """close commits what is pending; afterwards put_new fails, put and
        delete are ignored, and closing again is harmless."""
        j = self.journal()
        d = j.put_new(record(1))
        j.put(record(2))
        j.close()
        self.successResultOf(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.ids_on_disk(), {"job-1", "job-2"})
        self.failureResultOf(j.put_new(record(3)), JournalError)
        j.put(record(4))
        j.delete("job-1")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        j.close()
        self.assertEqual(self.ids_on_disk(), {"job-1", "job-2"})


class DiskFullTests(JournalTestCase):
    """Commits that fail (max_pages stands in for a full disk)."""

    def fill(self, j, size=1000):
        """put_new records, one per turn, until one fails; the ids committed
        and the id refused."""
        done = []
        for n in range(1000):
            d = j.put_new(record(n, frame=b"x" * size))
            self.clock.advance(0)
            result = []
            d.addErrback(result.append)
            if result:
                result[0].trap(JournalError)
                self.assertIn("database or disk is full", result[0].getErrorMessage())
                return done, f"job-{n}"
            done.append(f"job-{n}")
        self.fail("the journal never filled")

    def test_put_new_refused_when_full(self):
        """A put_new that does not fit fails and is not written; deletes and
        puts that fit then succeed, and what was committed survives reopening."""
        j = self.journal(max_pages=16)
        done, refused = self.fill(j)
        self.assertTrue(len(done) > 5)
        stats = j.stats()
        self.assertEqual((stats["errors"], stats["pending"]), (1, 0))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.ids_on_disk(), set(done))
        commits = stats["commits"]

        for job_id in done[:6]:  # enough to free a page
            j.delete(job_id)
        self.clock.advance(0)
        j.put(record(6, frame=b"x" * 1000, state="running", attempts=1))
        self.clock.advance(0)
        self.committed(j, record(5000, frame=b"x" * 1000))
        stats = j.stats()
        self.assertEqual((stats["commits"], stats["errors"]), (commits + 3, 1))
        j.close()

        again = self.journal()
        loaded = {r.id: r for r in again.load()}
        self.assertEqual(set(loaded), set(done[6:]) | {"job-5000"})
        self.assertNotIn(refused, loaded)
        self.assertEqual(loaded["job-6"].state, "running")

    def test_puts_kept_and_retried(self):
        """A put or delete whose commit failed stays pending and is tried again
        after RETRY_DELAY; a later change commits it at once with its own."""
        j = self.journal(max_pages=16)
        done, _ = self.fill(j)
        j.put(record(9000, frame=b"y" * 1000))
        self.clock.advance(0)
        self.assertEqual((j.stats()["errors"], j.stats()["pending"]), (2, 1))
        (retry,) = self.clock.getDelayedCalls()
        self.assertEqual(retry.getTime(), self.clock.seconds() + RETRY_DELAY)
        self.clock.advance(RETRY_DELAY)
        self.assertEqual((j.stats()["errors"], j.stats()["pending"]), (3, 1))
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

        for job_id in done[:6]:  # enough to free a page
            j.delete(job_id)
        (now,) = self.clock.getDelayedCalls()
        self.assertEqual(now.getTime(), self.clock.seconds())
        self.clock.advance(0)
        self.assertEqual((j.stats()["errors"], j.stats()["pending"]), (3, 0))
        self.assertEqual(self.ids_on_disk(), set(done[6:]) | {"job-9000"})
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_mixed_failure(self):
        """In a failed commit the put_new waiters fail and their ids' changes
        are dropped, a put of the same id included; other puts are kept."""
        j = self.journal(max_pages=16)
        done, _ = self.fill(j)
        new = j.put_new(record(7000, frame=b"z" * 3000))
        j.put(record(7000, frame=b"z" * 3000, state="running"))
        j.put(record(7001, frame=b"z" * 3000))
        self.clock.advance(0)
        self.failureResultOf(new, JournalError)
        self.assertEqual(j.stats()["pending"], 1)
        for job_id in done:
            j.delete(job_id)
        self.clock.advance(0)
        self.assertEqual(self.ids_on_disk(), {"job-7001"})

    def test_failures_logged_sparingly(self):
        """Each failure is counted; while commits keep failing one line is
        logged per ten seconds, and one when they succeed again."""
        events = []
        self.patch(Journal, "log", Logger(observer=events.append))
        j = self.journal(max_pages=16)
        done, _ = self.fill(j)
        self.assertEqual(len(events), 1)
        self.assertIn("commit failed", events[0]["log_format"])
        self.assertEqual(events[0]["reason"], "database or disk is full")
        j.put(record(9000, frame=b"y" * 3000))
        self.clock.advance(0)
        self.clock.advance(RETRY_DELAY)
        self.assertEqual(len(events), 1)
        self.clock.advance(10)  # the retry due at 2 s runs at 11 s: logged
        self.assertEqual(len(events), 2)
        self.assertIn("2 more failures", events[1]["more"])
        self.assertEqual(j.stats()["errors"], 4)
        for job_id in done:
            j.delete(job_id)
        self.clock.advance(0)
        self.assertEqual(len(events), 3)
        self.assertIn("succeed again", events[2]["log_format"])

    def test_close_while_full(self):
        """close tries once; a put it cannot write is lost, with a log line,
        and nothing stays scheduled."""
        events = []
        self.patch(Journal, "log", Logger(observer=events.append))
        j = self.journal(max_pages=16)
        done, _ = self.fill(j)
        j.put(record(9000, frame=b"y" * 3000))
        d = j.put_new(record(9001, frame=b"y" * 3000))
        j.close()
        self.failureResultOf(d, JournalError)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertIn("not written", events[-1]["log_format"])
        self.assertEqual(self.ids_on_disk(), set(done))


class BadRecordTests(JournalTestCase):
    """A record SQLite cannot store is dropped alone; the journal goes on."""

    def test_bad_records_dropped_alone(self):
        """Of one turn's changes, those SQLite cannot store fail and are
        dropped, each logged; the others commit, and nothing is retried."""
        events = []
        self.patch(Journal, "log", Logger(observer=events.append))
        j = self.journal()
        self.committed(j, record(1))
        good = j.put_new(record(2))
        too_big = j.put_new(record(3, priority=2 ** 70))
        no_frame = j.put_new(record(4, frame=None))
        j.put(record(5, result={"not": "bytes"}))
        j.put(record(1, state="running"))
        j.delete("job-9")
        self.clock.advance(0)
        self.assertIsNone(self.successResultOf(good))
        for d in (too_big, no_frame):
            self.assertIn("cannot store the job", self.failureResultOf(d, JournalError)
                          .getErrorMessage())
        stats = j.stats()
        self.assertEqual((stats["errors"], stats["pending"]), (3, 0))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual([(r.id, r.state) for r in j.load()],
                         [("job-1", "running"), ("job-2", "queued")])
        self.assertEqual(sorted(e["id"] for e in events), ["'job-3'", "'job-4'", "'job-5'"])
        self.committed(j, record(6))
        self.assertEqual(len(self.ids_on_disk()), 3)


class ThreadedTests(TestCase):
    """With ``threads``, transactions run in the journal's writer thread, one
    at a time, and their results come back to the reactor thread.  The
    global reactor runs; a trace callback on the connection can hold the
    writer thread in a transaction, so that a commit stays in flight."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="gloom-journal-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, "journal.db")

    def journal(self, **options):
        """A journal writing in its own thread, closed (its thread stopped)
        at the end; its statements are traced into ``self.statements`` as
        (thread ident, SQL)."""
        j = Journal(self.path, clock=reactor, threads=reactor, **options)
        self.addCleanup(self.assertNoWriterThread, j)
        self.addCleanup(j.close)
        self.statements = []
        self.gate = None
        j._db.set_trace_callback(self.trace)
        return j

    def assertNoWriterThread(self, j):
        """The journal's thread is gone once it is closed."""
        self.assertFalse(j._pool.started)
        self.assertFalse([t for t in j._pool.threads if t.is_alive()])
        self.assertFalse([t for t in threading.enumerate() if t.name.startswith("gloom-journal")])

    def trace(self, statement):
        """Note each statement; with a gate, hold the writer thread at its
        next BEGIN until the gate opens."""
        self.statements.append((threading.get_ident(), statement))
        gate = self.gate
        if gate is not None and statement == "BEGIN IMMEDIATE":
            self.gate = None
            gate[0].set()
            gate[1].wait(30)

    def hold(self):
        """Make the next transaction wait in the writer thread: returns
        (entered, release) events; ``release`` is set at cleanup at the latest."""
        entered, release = threading.Event(), threading.Event()
        self.addCleanup(release.set)
        self.gate = (entered, release)
        return entered, release

    def ids_on_disk(self):
        """The ids committed in the file, read by another connection."""
        db = sqlite3.connect(self.path)
        try:
            return {row[0] for row in db.execute("SELECT id FROM jobs")}
        finally:
            db.close()

    @inlineCallbacks
    def wait_until(self, predicate, timeout=30.0):
        """Let the reactor run until ``predicate()`` holds."""
        for _ in range(int(timeout * 100)):
            if predicate():
                return
            yield deferLater(reactor, 0.01, lambda: None)
        self.fail("timed out")

    def scheduled(self, j):
        """The journal's calls waiting in the reactor."""
        return [call for call in reactor.getDelayedCalls() if call.func == j.commit]

    def transactions(self):
        """How many transactions the writer began."""
        return sum(1 for _, s in self.statements if s == "BEGIN IMMEDIATE")

    @inlineCallbacks
    def test_put_new_fires_once_on_disk(self):
        """put_new's Deferred fires in the reactor thread once its row is on
        disk, as another connection sees; the SQL ran in another thread."""
        j = self.journal()
        d = j.put_new(record(1))
        fired = []
        d.addCallback(lambda result: fired.append((result, isInIOThread(), self.ids_on_disk())))
        self.assertNoResult(d)
        yield d
        self.assertEqual(fired, [(None, True, {"job-1"})])
        threads = {ident for ident, s in self.statements if s in ("BEGIN IMMEDIATE", "COMMIT")}
        self.assertEqual(len(threads), 1)
        self.assertNotIn(threading.get_ident(), threads)
        self.assertEqual((j.stats()["commits"], j.stats()["pending"]), (1, 0))
        self.assertTrue(0 < j.stats()["last_commit_ms"] <= j.stats()["max_commit_ms"])

    @inlineCallbacks
    def test_changes_in_flight_go_in_the_next_commit(self):
        """What is noted while a commit is in flight is written by the next
        one, started once it is done, all in one transaction; stats counts
        both without touching the connection."""
        j = self.journal()
        yield j.put_new(record(0))
        entered, release = self.hold()
        first = j.put_new(record(1))
        j.put(record(0, state="running"))
        j.commit()
        self.assertTrue(entered.wait(10))
        second = j.put_new(record(2))
        j.put(record(0, state="completed"))
        j.put(record(3))
        j.delete("job-1")
        self.assertEqual(j.stats()["pending"], 4)  # job-0, 1, 2 and 3
        self.assertEqual(self.scheduled(j), [])  # nothing scheduled: it waits
        j.commit()  # harmless while in flight
        yield deferLater(reactor, 0.05, lambda: None)
        self.assertNoResult(first)
        self.assertNoResult(second)
        self.assertEqual(self.transactions(), 2)

        seen = []
        first.addCallback(lambda _: seen.append(("first", self.ids_on_disk())))
        second.addCallback(lambda _: seen.append(("second", self.ids_on_disk())))
        release.set()
        yield second
        self.assertEqual(seen, [("first", {"job-0", "job-1"}),
                                ("second", {"job-0", "job-2", "job-3"})])
        self.assertEqual(self.transactions(), 3)
        self.assertEqual(j.stats()["commits"], 3)
        self.assertEqual([(r.id, r.state) for r in j.load()],
                         [("job-0", "completed"), ("job-2", "queued"), ("job-3", "queued")])

    @inlineCallbacks
    def fill(self, j):
        """put_new records until one fails; the ids committed."""
        done = []
        for n in range(1000):
            try:
                yield j.put_new(record(n, frame=b"x" * 1000))
            except JournalError as e:
                self.assertIn("database or disk is full", str(e))
                return done
            done.append(f"job-{n}")
        self.fail("the journal never filled")

    @inlineCallbacks
    def test_failed_commit(self):
        """A commit that fails in the writer thread fails its put_new
        waiters; its puts are kept under newer changes of the same id, and
        written once there is room."""
        events = []
        self.patch(Journal, "log", Logger(observer=events.append))
        j = self.journal(max_pages=16)
        done = yield self.fill(j)
        self.assertEqual(j.stats()["errors"], 1)
        entered, release = self.hold()
        new = j.put_new(record(7000, frame=b"z" * 3000))
        j.put(record(7001, frame=b"z" * 3000))
        j.put(record(7002, frame=b"z" * 3000))
        j.commit()
        self.assertTrue(entered.wait(10))
        j.put(record(7001, frame=b"z" * 3000, state="running"))  # newer than the snapshot's
        failed = []
        new.addErrback(lambda f: failed.append((f.trap(JournalError), isInIOThread(),
                                                f.getErrorMessage())))
        release.set()
        yield self.wait_until(lambda: j.stats()["errors"] == 3)
        self.assertEqual(len(failed), 1)
        self.assertEqual(failed[0][:2], (JournalError, True))
        self.assertIn("database or disk is full", failed[0][2])
        # The in-flight commit failed, then the next one (with the change
        # noted meanwhile) too; a retry is due.
        self.assertEqual((j.stats()["errors"], j.stats()["pending"]), (3, 2))
        self.assertEqual(j._pending["job-7001"].record.state, "running")
        self.assertTrue(j._retrying)
        self.assertEqual(self.ids_on_disk(), set(done))

        for job_id in done:
            j.delete(job_id)
        yield j.put_new(record(8000))
        self.assertEqual([(r.id, r.state) for r in j.load()],
                         [("job-7001", "running"), ("job-7002", "queued"), ("job-8000", "queued")])
        self.assertEqual((j.stats()["errors"], j.stats()["pending"]), (3, 0))
        self.assertIn("succeed again", events[-1]["log_format"])

    @inlineCallbacks
    def test_close_waits_for_the_commit_in_flight(self):
        """close waits for the commit in flight and fires its waiters, then
        writes what was noted meanwhile in its own thread, and stops the
        writer thread; the late word from the thread changes nothing."""
        j = self.journal()
        entered, release = self.hold()
        first = j.put_new(record(1))
        j.commit()
        self.assertTrue(entered.wait(10))
        second = j.put_new(record(2))
        j.put(record(1, state="running"))
        opener = threading.Timer(0.2, release.set)
        opener.start()
        self.addCleanup(opener.join)
        j.close()
        self.assertTrue(release.is_set())
        self.assertIsNone(self.successResultOf(first))
        self.assertIsNone(self.successResultOf(second))
        self.assertEqual(j.stats()["commits"], 2)
        self.assertEqual(j.stats()["pending"], 0)
        self.assertEqual(self.statements[-1], (threading.get_ident(), "COMMIT"))
        self.assertNoWriterThread(j)
        yield deferLater(reactor, 0.05, lambda: None)  # the thread's callFromThread ran
        self.assertEqual(j.stats()["commits"], 2)
        db = sqlite3.connect(self.path)
        self.addCleanup(db.close)
        self.assertEqual(sorted(db.execute("SELECT id, state FROM jobs")),
                         [("job-1", "running"), ("job-2", "queued")])
        self.failureResultOf(j.put_new(record(3)), JournalError)
        self.assertEqual(self.scheduled(j), [])

    def test_close_before_any_commit(self):
        """A journal closed before its first commit never started a thread."""
        j = self.journal()
        j.put(record(1))
        j.close()
        self.assertEqual(self.ids_on_disk(), {"job-1"})
        self.assertEqual(self.transactions(), 1)
        self.assertEqual(self.scheduled(j), [])
