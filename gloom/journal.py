"""The journal: detached jobs kept on disk, in one SQLite file.

Detached jobs belong to the daemon, not to a master's connection, and with
``--journal`` they must survive a restart of the daemon.  The journal is a
pure store of their rows (one per job id, its latest state): it knows
nothing of the scheduler, sockets or JSON, and the daemon decides what to
write and when to drop it.

Writes are grouped: `Journal.put_new`, `Journal.put` and `Journal.delete`
only note the change, and the first of them in a reactor turn schedules
`Journal.commit` with ``callLater(0)``, so everything one turn changed is
written in one transaction (group commit).  `Journal.put_new` returns a
Deferred that fires once its record is on disk, which is when the daemon
acknowledges a detached submit.

Given a reactor's threads (the ``threads`` argument, as the daemon does),
the transactions run in one writer thread of the journal's own, so the
reactor never waits on a disk sync: a commit takes what is pending (the
snapshot) and hands it to the thread; what is noted while it is in flight
waits for the next commit, which starts as soon as that one is done and
takes everything then pending, in one transaction again.  At most one
commit is in flight, and the results (put_new Deferreds, retries, stats,
log lines) are dealt with in the reactor thread.  Without ``threads`` (the
tests, with a fake clock) a commit runs in the caller's thread.

SQLite checkpoints the WAL into the database file by itself, in the commit
that takes the WAL past 1000 pages (``wal_autocheckpoint``, unchanged),
and then cuts the WAL back to 8 MiB (``journal_size_limit``).  Such a
commit copies pages into the database file and syncs it, and takes far
longer than the others (12 ms with sync normal, 27 ms with full, measured in
a daemon whose other commits took 0.1 to 0.8 ms).  In the writer thread it
delays the next commit (and the acks waiting for it), never the reactor, so
Gloom runs no checkpoint of its own.

The file is in WAL mode, with ``PRAGMA synchronous`` FULL or NORMAL.  Its
schema version is SQLite's ``user_version``: an empty file gets the current
schema, an older one is upgraded by the steps in `MIGRATIONS`, and a newer
one is refused, as is a file that is corrupt or cannot be opened, each with
one clear line (`JournalOpenError`).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IReactorThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from gloom.quoting import quoted

SCHEMA_VERSION = 1
"""The schema this Gloom writes, kept in ``PRAGMA user_version``."""

APPLICATION_ID = 0x476C6F6D
"""``PRAGMA application_id`` of a Gloom journal ("Glom"): tells a journal
from another program's SQLite file."""

RETRY_DELAY = 1.0
"""Seconds before a failed commit's puts and deletes are tried again."""

_FAILURE_LOG_INTERVAL = 10.0
# While commits keep failing, at most one failure is logged per this many
# seconds of the clock (each failure is still counted in the stats).

_COLUMNS = ("id", "type", "priority", "frame", "timeout", "retries", "attempts", "retried",
            "state", "run_at", "submitted_at", "ended_at", "result", "reason", "sequence")

_SELECT = "SELECT " + ", ".join(_COLUMNS) + " FROM jobs ORDER BY sequence, rowid"
_UPSERT = ("INSERT OR REPLACE INTO jobs (" + ", ".join(_COLUMNS) + ") VALUES ("
           + ", ".join("?" * len(_COLUMNS)) + ")")
_DELETE = "DELETE FROM jobs WHERE id = ?"

_LOAD_BATCH = 1000

_WAL_SIZE_LIMIT = 8 << 20
# Bytes the WAL file is cut back to after a checkpoint (SQLite checkpoints
# once it holds 1000 pages; without a limit it keeps its largest size).

_SYNC = {"full": "FULL", "normal": "NORMAL"}

_PERMISSION = ("permission denied; let the daemon's user read and write the file and"
               " the -wal and -shm files beside it, and create files in its directory, or"
               " choose another path")

_MOVE_ASIDE = "move it aside to start with an empty journal, or restore a backup"


def _bad_data(error: Exception) -> bool:
    """Whether ``error`` says a record cannot be stored (as opposed to the
    disk or the file failing), so retrying it cannot help."""
    if isinstance(error, sqlite3.Error):
        return isinstance(error, (sqlite3.IntegrityError, sqlite3.InterfaceError,
                                  sqlite3.ProgrammingError, sqlite3.DataError))
    return isinstance(error, (OverflowError, TypeError, ValueError, AttributeError))


class JournalOpenError(Exception):
    """The journal cannot be used.

    ``str(e)`` is one line that says which file, what is wrong with it and
    what to do, for the daemon to print before it exits.
    """


class JournalError(Exception):
    """A write to the journal failed (disk full, I/O error); ``str(e)`` says why."""


class Record:
    """One detached job's row: what the daemon needs to take the job up again
    after a restart.

    Plain attributes, as named by the parameters of ``__init__``.
    """

    __slots__ = _COLUMNS

    def __init__(self, id: str, type: str, priority: int, frame: bytes,
                 timeout: Optional[float], retries: int, attempts: int, retried: int,
                 state: str, run_at: Optional[float], submitted_at: float,
                 ended_at: Optional[float] = None, result: Optional[bytes] = None,
                 reason: Optional[str] = None, sequence: int = 0):
        """
        :param id: the job's id, unique among detached jobs (the row's key).
        :param type: the type of slave that runs it.
        :param priority: higher runs first.
        :param frame: the job frame sent to slaves, opaque bytes.
        :param timeout: seconds one attempt may run, or None for no limit.
        :param retries: the job's retry limit.
        :param attempts: attempts started.
        :param retried: retries used so far (the backoff grows with it).
        :param state: queued, delayed, running, completed, failed or dead.
        :param run_at: unix time a delayed job queues, else None.
        :param submitted_at: unix time of the submit.
        :param ended_at: unix time the job ended (completed, failed, dead).
        :param result: the slave's answer body, raw JSON (completed).
        :param reason: why the job failed or is dead.
        :param sequence: submission order; `Journal.load` yields by it.
        """
        self.id = id
        self.type = type
        self.priority = priority
        self.frame = frame
        self.timeout = timeout
        self.retries = retries
        self.attempts = attempts
        self.retried = retried
        self.state = state
        self.run_at = run_at
        self.submitted_at = submitted_at
        self.ended_at = ended_at
        self.result = result
        self.reason = reason
        self.sequence = sequence

    def __repr__(self) -> str:
        """Show every field, for tests and debugging."""
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in _COLUMNS)
        return f"Record({fields})"


def _row(record: Record) -> tuple:
    """The record's fields as a tuple in `_COLUMNS` order, for executemany."""
    return (record.id, record.type, record.priority, record.frame, record.timeout,
            record.retries, record.attempts, record.retried, record.state, record.run_at,
            record.submitted_at, record.ended_at, record.result, record.reason,
            record.sequence)


def _create_v1(db: sqlite3.Connection) -> None:
    """Schema 1 in an empty file: one row per detached job, keyed by id, with
    an index on the submission order that `Journal.load` reads by."""
    db.execute(
        "CREATE TABLE jobs ("
        " id TEXT PRIMARY KEY NOT NULL,"
        " type TEXT NOT NULL,"
        " priority INTEGER NOT NULL,"
        " frame BLOB NOT NULL,"
        " timeout REAL,"
        " retries INTEGER NOT NULL,"
        " attempts INTEGER NOT NULL,"
        " retried INTEGER NOT NULL,"
        " state TEXT NOT NULL,"
        " run_at REAL,"
        " submitted_at REAL NOT NULL,"
        " ended_at REAL,"
        " result BLOB,"
        " reason TEXT,"
        " sequence INTEGER NOT NULL)")
    db.execute("CREATE INDEX jobs_by_sequence ON jobs (sequence)")


MIGRATIONS: Dict[int, Callable[[sqlite3.Connection], None]] = {0: _create_v1}
"""The upgrade steps: ``MIGRATIONS[n]`` turns schema ``n`` into ``n + 1``
inside the opening transaction (0 is an empty file).  A new schema adds its
step here and raises `SCHEMA_VERSION`."""


class _Pending:
    """What the next commit writes for one job id: its record, or None to
    delete the row, and the Deferreds of the put_new calls waiting for it."""

    __slots__ = ("record", "waiters")

    def __init__(self, record: Optional[Record]):
        self.record = record
        self.waiters: List[Deferred] = []


_DONE, _FAILED, _REFUSED = "done", "failed", "refused"
# What came of writing part of a commit's snapshot (see Journal._execute).

_Outcome = Tuple[str, Dict[str, _Pending], Any]
# (_DONE, the changes, milliseconds), or (_FAILED or _REFUSED, the changes,
# the exception).


class _Commit:
    """A commit handed to the writer thread: the changes it writes, and what
    came of them, filled in by the thread."""

    __slots__ = ("pending", "outcomes", "done", "finished")

    def __init__(self, pending: Dict[str, _Pending]):
        """
        :param pending: the snapshot: the changes pending when it started,
            which the reactor thread no longer changes.
        """
        self.pending = pending
        self.outcomes: List[_Outcome] = []
        self.done = threading.Event()
        """Set by the writer thread once ``outcomes`` is complete."""
        self.finished = False
        """Whether the reactor thread has dealt with the outcomes."""


def _shown(path: str) -> str:
    """The path as given when it prints on one line, else its repr."""
    return path if path.isprintable() else repr(path)


def _one_line(text: str) -> str:
    """Text with its line breaks turned into spaces."""
    return " ".join(str(text).split())


class Journal:
    """The SQLite file of detached jobs, written by group commit.

    Changes are noted per job id and the latest one wins: a `put` after a
    `delete` of the same id writes the row again, and a `delete` after a
    `put` drops the put.  `load` reads what is committed.

    A record handed to `put_new` or `put` must not be changed afterwards
    (the writer thread may be reading it): give a fresh one for each change.
    """

    log = Logger()

    def __init__(self, path: str, sync: str = "normal", clock: Optional[IReactorTime] = None,
                 max_pages: Optional[int] = None, threads: Optional[IReactorThreads] = None):
        """Open the file, or create it.

        :param path: the file; its directory must exist (SQLite keeps
            ``PATH-wal`` and ``PATH-shm`` beside it).
        :param sync: ``"full"`` (``PRAGMA synchronous=FULL``: the WAL is
            synced at every commit, so a commit survives power loss) or
            ``"normal"`` (NORMAL: synced only at checkpoints; a commit
            survives the process crashing, but power loss or an operating
            system crash may undo the last ones, leaving the file sound).
        :param clock: schedules commits and retries; the global reactor if
            None.
        :param max_pages: caps the file at this many pages
            (``PRAGMA max_page_count``; pages are 4 KiB unless the file says
            otherwise; never below the file's present size), after which
            commits fail as on a full disk; for tests and to bound the file
            (the WAL beside it is not counted).  None for no cap.
        :param threads: the reactor, to write in a thread of the journal's
            own and hear back in the reactor thread; its thread starts with
            the first commit (so after twistd has forked) and stops in
            `close`.  None to write in the thread that calls `commit`.
        :raises JournalOpenError: the file cannot be used: its directory is
            missing, permission is denied, it is not a database, it is
            corrupt (``PRAGMA quick_check``), it belongs to another program,
            or it has a newer schema than `SCHEMA_VERSION`.
        :raises ValueError: ``sync`` is neither ``"full"`` nor ``"normal"``.
        """
        if sync not in _SYNC:
            raise ValueError(f"journal sync must be 'full' or 'normal', not {sync!r}")
        if clock is None:
            from twisted.internet import reactor as clock
        self.path = path
        self.sync = sync
        self.clock = clock
        self.commits = 0
        """Transactions committed."""
        self.errors = 0
        """Commits that failed."""
        self.last_commit_ms = 0.0
        """Wall-clock milliseconds the last successful commit took."""
        self.max_commit_ms = 0.0
        """The longest successful commit, in milliseconds."""
        self._pending: Dict[str, _Pending] = {}
        self._call: Optional[IDelayedCall] = None
        self._retrying = False
        self._failing_since_log: Optional[float] = None
        self._unlogged_failures = 0
        self._closed = False
        self._closing = False
        self._threads = threads
        self._pool: Optional[ThreadPool] = None
        self._in_flight: Optional[_Commit] = None
        self._lock_descriptor: Optional[int] = None
        self._db = self._open(max_pages)
        if threads is not None:
            self._pool = ThreadPool(1, 1, "gloom-journal")

    # --- opening ----------------------------------------------------------

    def _refuse(self, problem: str, cannot: str = "use") -> JournalOpenError:
        """The error for a journal that cannot be used, as one line.

        :param problem: what is wrong and what to do.
        :param cannot: "use" (the file's content) or "open" (the file).
        """
        return JournalOpenError(f"gloom: cannot {cannot} journal {_shown(self.path)}: "
                                + _one_line(problem))

    def _open(self, max_pages: Optional[int]) -> sqlite3.Connection:
        """Connect, check the file, set the pragmas and bring the schema up
        to date; see ``__init__`` for what is refused."""
        path = self.path
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise self._refuse(f"directory {_shown(directory)} does not exist; create it, or"
                               " choose another path", "open")
        if os.path.isdir(path):
            raise self._refuse("it is a directory; name a file in it instead", "open")
        if self._access_denied():
            raise self._refuse(_PERMISSION, "open")
        try:
            # Opened and loaded in this thread, then used by the writer
            # thread only (one thread at a time: see commit and close).
            db = sqlite3.connect(path, timeout=1.0, isolation_level=None,
                                 check_same_thread=False)
        except sqlite3.Error as e:
            raise self._open_failed(e) from None
        try:
            self._prepare(db, max_pages)
        except BaseException:
            db.close()
            raise
        return db

    def _prepare(self, db: sqlite3.Connection, max_pages: Optional[int]) -> None:
        """Check and set up the connected file (see `_open`)."""
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            application = db.execute("PRAGMA application_id").fetchone()[0]
            if application != APPLICATION_ID and (
                    version or db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]):
                raise self._refuse("it is an SQLite database of another program, not a Gloom"
                                   " journal; choose another path")
            if version > SCHEMA_VERSION:
                raise self._refuse(
                    f"it was written by a newer Gloom (schema {version}, this Gloom reads up"
                    f" to {SCHEMA_VERSION}); upgrade Gloom or use another file")
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise self._refuse(f"SQLite could not put it in WAL mode (it stays in {mode}"
                                   " mode); put the journal on a local file system")
            db.execute(f"PRAGMA synchronous={_SYNC[self.sync]}")
            db.execute(f"PRAGMA journal_size_limit={_WAL_SIZE_LIMIT}")
            if max_pages is not None:
                db.execute(f"PRAGMA max_page_count={int(max_pages)}")
            problems = [line.strip() for row in db.execute("PRAGMA quick_check(3)")
                        for line in row[0].replace("*** in database main ***", "").splitlines()
                        if line.strip()]
            if problems != ["ok"]:
                raise self._refuse(f"the file is corrupt (SQLite's check says: "
                                   f"{'; '.join(problems)}); {_MOVE_ASIDE}")
            if version < SCHEMA_VERSION:
                self._migrate(db)
        except sqlite3.Error as e:
            raise self._open_failed(e) from None

    def _migrate(self, db: sqlite3.Connection) -> None:
        """Bring the schema up to `SCHEMA_VERSION` by the steps in
        `MIGRATIONS`, in one transaction: on failure the file is left as it
        was."""
        db.execute("BEGIN IMMEDIATE")
        try:
            # Read again under the write lock: another process may have
            # upgraded the file since.
            version = start = db.execute("PRAGMA user_version").fetchone()[0]
            while version < SCHEMA_VERSION:
                step = MIGRATIONS.get(version)
                if step is None:
                    raise self._refuse(f"this Gloom cannot upgrade schema {version}; use the"
                                       " Gloom that wrote it, or another file")
                try:
                    step(db)
                except sqlite3.Error as e:
                    raise self._refuse(
                        f"upgrading it from schema {version} to {version + 1} failed"
                        f" ({e}); the file is unchanged; free disk space if it is full,"
                        f" else {_MOVE_ASIDE}") from None
                version += 1
                db.execute(f"PRAGMA user_version={version}")
            db.execute(f"PRAGMA application_id={APPLICATION_ID}")
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        if start and start != version:
            self.log.info("Journal {path}: upgraded from schema {old} to {new}",
                          path=self.path, old=start, new=version)

    def _open_failed(self, error: sqlite3.Error) -> JournalOpenError:
        """The `JournalOpenError` for what SQLite raised while opening.

        :param error: SQLite's exception.
        """
        message = str(error)
        lowered = message.lower()
        if "not a database" in lowered:
            return self._refuse(f"file is not a database (corrupt?); {_MOVE_ASIDE}")
        if "malformed" in lowered or "corrupt" in lowered:
            return self._refuse(f"the file is corrupt ({message}); {_MOVE_ASIDE}")
        if "locked" in lowered or "busy" in lowered:
            return self._refuse("another process holds it locked (another Gloom?); stop that"
                                " process, or choose another path")
        if "full" in lowered:
            return self._refuse(f"{message}; free disk space, or choose another path")
        if "readonly" in lowered or self._access_denied():
            return self._refuse(_PERMISSION, "open")
        return self._refuse(f"{message}; check the file and its directory, or choose another"
                            " path", "open")

    def _access_denied(self) -> bool:
        """Whether this process may not read and write the file (or the
        ``-wal`` and ``-shm`` files beside it), or create files in its
        directory, as WAL mode needs."""
        path = self.path
        if not os.access(os.path.dirname(os.path.abspath(path)), os.W_OK | os.X_OK):
            return True
        return any(os.path.exists(name) and not os.access(name, os.R_OK | os.W_OK)
                   for name in (path, path + "-wal", path + "-shm"))

    # --- reading ----------------------------------------------------------

    def load(self) -> Iterator[Record]:
        """Every committed row, by ``sequence`` (then by the order written).

        Changes still pending are not seen; the daemon loads once, at start,
        before it writes, and must read the iterator to its end before the
        reactor runs a commit (which may use the connection in the writer
        thread).

        :returns: an iterator of fresh `Record` objects.
        """
        cursor = self._db.cursor()
        cursor.arraysize = _LOAD_BATCH
        cursor.execute(_SELECT)
        try:
            while True:
                rows = cursor.fetchmany()
                if not rows:
                    return
                for row in rows:
                    yield Record(*row)
        finally:
            cursor.close()

    # --- writing ----------------------------------------------------------

    def put_new(self, record: Record) -> Deferred:
        """Write a new detached job at the next commit.

        :param record: the job's first state.
        :returns: a Deferred that fires with None once the commit that wrote
            the record is done, or fails with `JournalError` if that commit
            failed, in which case the record is not written and no longer
            pending (later changes to its id are kept as usual).
        """
        if self._closed:
            return fail(JournalError("the journal is closed"))
        waiter: Deferred = Deferred()
        self._note(record.id, record).waiters.append(waiter)
        return waiter

    def put(self, record: Record) -> None:
        """Write a job's latest state at the next commit, replacing its row
        (or a change still pending for its id).  Ignored once closed.

        :param record: the job's state.
        """
        if not self._closed:
            self._note(record.id, record)

    def delete(self, job_id: str) -> None:
        """Delete a job's row at the next commit (a put still pending for the
        id is dropped).  Ignored once closed.

        :param job_id: the job's id.
        """
        if not self._closed:
            self._note(job_id, None)

    def _note(self, job_id: str, record: Optional[Record]) -> _Pending:
        """Make ``record`` (None: deletion) the change pending for ``job_id``,
        and schedule a commit in the next turn unless one is, or one is in
        flight (its end starts the next)."""
        entry = self._pending.get(job_id)
        if entry is None:
            entry = self._pending[job_id] = _Pending(record)
        else:
            entry.record = record
        if self._in_flight is None and (self._call is None or self._retrying):
            if self._call is not None:
                self._call.cancel()
            self._retrying = False
            self._call = self.clock.callLater(0, self.commit)
        return entry

    def commit(self) -> None:
        """Write everything pending now, in one transaction.

        Called by the clock in the turn after the first change (group
        commit); calling it sooner is harmless.  With a writer thread the
        transaction runs there and this returns at once; while a commit is
        in flight this does nothing, as the end of that one commits what is
        pending then.

        On failure the transaction is rolled back, the failure counted and
        logged, the `put_new` Deferreds fail with `JournalError` (their ids'
        pending changes are dropped), and the other puts and deletes stay
        pending (under any newer change of the same id, which wins), to be
        tried again after `RETRY_DELAY` seconds or with the next change.

        A record SQLite cannot store (a field of the wrong type, an integer
        over 64 bits) would fail every retry: when the failure comes from
        the data rather than the disk, the changes are written one per
        transaction instead, and those that fail alone are dropped (logged,
        their put_new Deferreds failed), so one bad record cannot stop the
        journal.
        """
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None
        self._retrying = False
        if not self._pending or self._closed or self._in_flight is not None:
            return
        pending, self._pending = self._pending, {}
        if self._pool is None or self._closing:
            outcomes: List[_Outcome] = []
            self._execute(pending, outcomes)
            self._apply(outcomes)
            return
        commit = self._in_flight = _Commit(pending)
        if not self._pool.started:
            self._pool.start()
        written = deferToThreadPool(self._threads, self._pool, self._run, commit)
        written.addErrback(self._lost, commit)
        written.addCallback(self._finish)

    def _run(self, commit: _Commit) -> _Commit:
        """Write ``commit`` (in the writer thread) and say it is done."""
        try:
            self._execute(commit.pending, commit.outcomes)
        finally:
            commit.done.set()
        return commit

    def _lost(self, failure: Failure, commit: _Commit) -> _Commit:
        """Log what went wrong in the writer thread beyond a failed commit
        (a bug); the outcomes it did record are dealt with as usual."""
        self.log.failure("Journal {path}: the writer thread failed", failure, path=self.path)
        return commit

    def _finish(self, commit: _Commit) -> None:
        """In the reactor thread, once ``commit`` is written: deal with its
        outcomes, then commit at once what was noted meanwhile.  Does
        nothing the second time (`close` may have dealt with it)."""
        if commit.finished:
            return
        commit.finished = True
        self._in_flight = None
        noted_meanwhile = bool(self._pending)
        self._apply(commit.outcomes)
        if noted_meanwhile or (self._call is not None and not self._retrying):
            self.commit()

    def _execute(self, pending: Dict[str, _Pending], outcomes: List[_Outcome]) -> None:
        """Commit ``pending`` in one transaction and add what came of it to
        ``outcomes``: the SQL of `commit` and nothing else, for the writer
        thread, which touches no other state of the journal."""
        upserts: List[tuple] = []
        deletes: List[Tuple[str]] = []
        db = self._db
        started = time.perf_counter()
        try:
            for job_id, entry in pending.items():
                if entry.record is None:
                    deletes.append((job_id,))
                else:
                    upserts.append(_row(entry.record))
            db.execute("BEGIN IMMEDIATE")
            if deletes:
                db.executemany(_DELETE, deletes)
            if upserts:
                db.executemany(_UPSERT, upserts)
            db.execute("COMMIT")
        except Exception as e:
            self._rollback()
            if not _bad_data(e):
                outcomes.append((_FAILED, pending, e))
            elif len(pending) > 1:
                for job_id, entry in pending.items():
                    self._execute({job_id: entry}, outcomes)
            else:
                outcomes.append((_REFUSED, pending, e))
            return
        outcomes.append((_DONE, pending, (time.perf_counter() - started) * 1000.0))

    def _apply(self, outcomes: List[_Outcome]) -> None:
        """Deal with what came of a commit, in order: count and tell the
        waiters of what was written, keep what failed to retry, drop what
        cannot be stored."""
        for outcome, pending, value in outcomes:
            if outcome == _DONE:
                self._committed(pending, value)
            elif outcome == _FAILED:
                self._failed(pending, value)
            else:
                self._refused(pending, value)

    def _committed(self, pending: Dict[str, _Pending], elapsed: float) -> None:
        """Count the transaction that wrote ``pending`` in ``elapsed``
        milliseconds, and fire its put_new waiters."""
        self.commits += 1
        self.last_commit_ms = elapsed
        if elapsed > self.max_commit_ms:
            self.max_commit_ms = elapsed
        if self._failing_since_log is not None:
            self.log.info("Journal {path}: commits succeed again", path=self.path)
            self._failing_since_log = None
            self._unlogged_failures = 0
        for entry in pending.values():
            for waiter in entry.waiters:
                waiter.callback(None)

    def _rollback(self) -> None:
        """End the failed transaction, if SQLite has not already."""
        try:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    def _refused(self, pending: Dict[str, _Pending], error: Exception) -> None:
        """Drop the one change in ``pending``, which SQLite cannot store
        because of ``error``: count and log it, and fail its waiters."""
        ((job_id, entry),) = pending.items()
        self.errors += 1
        reason = _one_line(error) or type(error).__name__
        self.log.error("Journal {path}: cannot store job {id}: {reason}; change dropped",
                       path=self.path, id=quoted(job_id), reason=reason)
        failure = JournalError(f"journal {_shown(self.path)}: cannot store the job: {reason}")
        for waiter in entry.waiters:
            waiter.errback(failure)

    def _failed(self, pending: Dict[str, _Pending], error: Exception) -> None:
        """Count and log a commit of ``pending`` that failed with ``error``,
        keep its puts and deletes to retry, and fail its put_new waiters
        (see `commit`)."""
        self.errors += 1
        reason = _one_line(error) or type(error).__name__
        waiters: List[Deferred] = []
        kept = 0
        for job_id, entry in pending.items():
            if entry.waiters:
                waiters.extend(entry.waiters)
            elif job_id not in self._pending:  # else a newer change supersedes it
                self._pending[job_id] = entry
                kept += 1
        now = self.clock.seconds()
        if self._failing_since_log is None or now - self._failing_since_log >= _FAILURE_LOG_INTERVAL:
            more = (f" ({self._unlogged_failures} more failures since the last report)"
                    if self._unlogged_failures else "")
            self.log.warn("Journal {path}: commit failed: {reason}; {dropped} new jobs refused,"
                          " {kept} changes kept to retry{more}", path=self.path, reason=reason,
                          dropped=sum(1 for entry in pending.values() if entry.waiters),
                          kept=kept, more=more)
            self._failing_since_log = now
            self._unlogged_failures = 0
        else:
            self._unlogged_failures += 1
        if self._pending and not self._closed and self._call is None:
            self._retrying = True
            self._call = self.clock.callLater(RETRY_DELAY, self.commit)
        failure = JournalError(f"journal {_shown(self.path)}: {reason}")
        for waiter in waiters:
            waiter.errback(failure)

    # --- the rest ---------------------------------------------------------

    def stats(self) -> dict:
        """What the daemon's stats report of the journal (without touching
        the connection, which may be busy in the writer thread).

        :returns: a dict of ``path``, ``sync``, ``bytes`` (the database file
            and its WAL), ``commits``, ``errors`` (failed commits),
            ``last_commit_ms``, ``max_commit_ms`` (the time of the
            transaction, in whichever thread ran it) and ``pending`` (job
            ids with a change not yet committed, in flight included).
        """
        size = 0
        for name in (self.path, self.path + "-wal"):
            try:
                size += os.path.getsize(name)
            except OSError:
                pass
        return {"path": self.path, "sync": self.sync, "bytes": size, "commits": self.commits,
                "errors": self.errors, "last_commit_ms": self.last_commit_ms,
                "max_commit_ms": self.max_commit_ms, "pending": self._pending_count()}

    def _pending_count(self) -> int:
        """Job ids with a change pending or in flight."""
        commit = self._in_flight
        if commit is None:
            return len(self._pending)
        if not self._pending:
            return len(commit.pending)
        return len(commit.pending.keys() | self._pending.keys())

    def settle(self) -> None:
        """Write everything noted so far before returning, in this thread
        from here on: the daemon calls it as it stops, so the submits on
        disk are acked before their connections close.  (Waits for the
        commit in flight, then commits what is pending; `close` follows.)"""
        if self._closed:
            return
        self._closing = True  # from here on, commits run in this thread
        commit = self._in_flight
        if commit is not None:
            commit.done.wait()
            self._finish(commit)
        self.commit()

    def lock(self) -> None:
        """Hold the file for this process alone until it exits or closes
        the journal: two daemons writing one journal would each run the
        other's jobs.  (SQLite in WAL mode locks nothing between
        transactions, so the daemon takes an advisory ``flock`` of its own.)

        :raises JournalOpenError: another process holds it.
        """
        import fcntl

        descriptor = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(descriptor)
            raise self._refuse("another process holds it (is another Gloom daemon using it?); "
                               "stop that daemon, or give this one another file") from None
        self._lock_descriptor = descriptor

    def close(self) -> None:
        """Wait for the commit in flight, if any, and deal with it; commit
        what is pending, in this thread (one try: what fails is lost and
        logged); then close the file and stop the writer thread.  Closing
        twice is harmless."""
        if self._closed:
            return
        self.settle()
        if self._call is not None:
            self._call.cancel()
            self._call = None
        if self._pending:
            self.log.warn("Journal {path}: closed with {count} changes not written",
                          path=self.path, count=len(self._pending))
            self._pending = {}
        self._closed = True
        if self._pool is not None and self._pool.started:
            self._pool.stop()
        self._db.close()
        descriptor, self._lock_descriptor = self._lock_descriptor, None
        if descriptor is not None:
            os.close(descriptor)
