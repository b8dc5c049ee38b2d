"""The journal when things go wrong, with ``twistd -n gloom --journal`` in a
subprocess, driven over plain sockets:

- the daemon is killed with SIGKILL while a master submits detached jobs
  and workers run them; restarted on the same file, it loses no acked job
  and runs again only the jobs whose end it had not committed;
- a file that is not a journal (or a damaged one) stops start-up with one
  clear line;
- a journal that cannot grow (``RLIMIT_FSIZE``) refuses detached submits
  with ``journal_error``, attached jobs still run, and every acked job is
  still there after a restart without the limit.

The size of the crash test comes from ``GLOOM_CRASH_JOBS`` (default 50,000).
"""

import json
import os
import resource
import select
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import tempfile
import time
from collections import Counter

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from gloom.journal import Journal, Record
from tests.support import (
    ANY_PORT,
    BlockingClient,
    TwistdDaemon,
    frame,
    twistd_command,
    without_warm_up,
)

JOBS = int(os.environ.get("GLOOM_CRASH_JOBS", "50000"))
"""Detached jobs the master of the crash test submits."""

WORKERS = 4
"""Worker (slave) connections in the crash test."""

WINDOW = 1000
"""Most jobs the crash test's master has submitted that no worker has
answered yet: the workers keep up, so the kill finds jobs in every state."""

RERUN_HORIZON = 1.0
"""Seconds before the kill within which every job run again after the
restart had been answered (see the crash test): the daemon commits in a few
milliseconds; the rest is margin for a loaded machine."""

JOB_TYPE = "crash"


def submit(job_id, body=None, job_type=JOB_TYPE, **fields):
    """A submit frame's message (detached unless ``detach=False``)."""
    fields.setdefault("detach", True)
    return {"action": "submit", "id": job_id, "type": job_type, "body": body, **fields}


class Stream:
    """A plain-socket connection read in a select loop: `read` returns the
    whole frames that arrived, and notes the end of the connection."""

    def __init__(self, port):
        """Connect to 127.0.0.1:``port``."""
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""
        self.closed = False

    def fileno(self):
        """For select."""
        return self.sock.fileno()

    def send(self, *messages):
        """Send the messages in one write."""
        self.sock.sendall(b"".join(frame(m) for m in messages))

    def read(self):
        """The frames that arrived (call once select says readable); at the
        end of the connection, none and ``closed`` is set."""
        try:
            chunk = self.sock.recv(1 << 20)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.closed = True
            self.sock.close()
            return []
        buffer = self.buffer + chunk
        messages, offset = [], 0
        while len(buffer) - offset >= 4:
            (length,) = struct.unpack_from("!I", buffer, offset)
            if len(buffer) - offset - 4 < length:
                break
            messages.append(json.loads(buffer[offset + 4:offset + 4 + length]))
            offset += 4 + length
        self.buffer = buffer[offset:]
        return messages

    def close(self):
        """Close the socket (once)."""
        if not self.closed:
            self.closed = True
            self.sock.close()


def readable(streams, timeout):
    """The open streams with something to read within ``timeout`` seconds."""
    open_streams = [s for s in streams if not s.closed]
    if not open_streams:
        return []
    ready, _, _ = select.select(open_streams, [], [], timeout)
    return ready


def committed_states(path, scratch):
    """``{id: state}`` of the journal at ``path`` as committed, read from a
    copy of the file and its WAL in ``scratch`` (the file itself is left
    untouched for the daemon to recover)."""
    copy = os.path.join(scratch, "snapshot.db")
    for name in (copy, copy + "-wal", copy + "-shm"):  # a stale WAL would be replayed
        if os.path.exists(name):
            os.remove(name)
    shutil.copyfile(path, copy)
    if os.path.exists(path + "-wal"):
        shutil.copyfile(path + "-wal", copy + "-wal")
    db = sqlite3.connect(copy)
    try:
        return dict(db.execute("SELECT id, state FROM jobs"))
    finally:
        db.close()


def _ignore_sigxfsz_and_limit(size):
    """A preexec_fn: cap the size of files the child writes at ``size``
    bytes, with SIGXFSZ ignored, so a write past it fails with EFBIG
    instead of killing the process."""
    def preexec():
        """Runs in the child, between fork and exec."""
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    return preexec


class LimitedDaemon(TwistdDaemon):
    """`TwistdDaemon` whose files may not grow beyond ``file_size`` bytes."""

    def __init__(self, test, file_size, *arguments):
        """Start twistd with RLIMIT_FSIZE at ``file_size`` and SIGXFSZ ignored."""
        self.cwd = tempfile.mkdtemp()
        test.addCleanup(shutil.rmtree, self.cwd, True)
        self.process = subprocess.Popen(
            twistd_command() + ["--pidfile=", *without_warm_up(arguments)],
            cwd=self.cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            preexec_fn=_ignore_sigxfsz_and_limit(file_size),
        )
        test.addCleanup(self.kill)
        self.output = b""


def signals_ignored(pid):
    """The set of signal numbers process ``pid`` ignores (Linux /proc)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("SigIgn:"):
                mask = int(line.split()[1], 16)
                return {n for n in range(1, 65) if mask & (1 << (n - 1))}
    raise AssertionError("no SigIgn line")


class CrashTests(SynchronousTestCase):
    """SIGKILL in the middle of the flow, then a restart on the same journal."""

    def setUp(self):
        """A scratch directory for the journal."""
        self.directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.path = os.path.join(self.directory, "journal.db")

    def start(self):
        """A daemon on the journal; its (master, slave) ports."""
        self.daemon = TwistdDaemon(self, "-n", "gloom", *ANY_PORT, "--journal", self.path)
        return self.daemon.ports()

    def first_life(self, master_port, slave_port):
        """Submit JOBS detached jobs, pipelined, at most WINDOW ahead of the
        WORKERS workers that run them; SIGKILL the daemon once a third are
        acked, then read what it had sent until every connection ends.

        :returns: (acked ids, Counter of ids the workers answered, ids a
            worker was handed before the kill and did not answer, error
            frames, the answers as (worker number, id, monotonic time sent)
            in the order sent, the monotonic time of the kill).
        """
        master = Stream(master_port)
        workers = [Stream(slave_port) for _ in range(WORKERS)]
        for worker in workers:
            worker.send({"action": "join", "type": JOB_TYPE})
        streams = [master] + workers
        acked, finished, unanswered, errors, answers = set(), Counter(), set(), [], []
        sent = answered = 0
        window = min(WINDOW, max(2, JOBS // 10))  # a few acks at a time for small JOBS
        killed = False
        while not all(s.closed for s in streams):
            ahead = sent - answered
            if not killed and sent < JOBS and ahead <= window // 2:
                count = min(window - ahead, JOBS - sent)
                master.send(*(submit(f"j{i}", i) for i in range(sent, sent + count)))
                sent += count
            ready = readable(streams, 10)
            if not ready:
                self.fail(f"no frame for 10 s (sent {sent}, acked {len(acked)}, "
                          f"answered {answered}, killed {killed})")
            for stream in ready:
                for message in stream.read():
                    if stream is master:
                        if message.get("ok"):
                            acked.add(message["id"])
                        else:
                            errors.append(message)
                    elif message.get("action") == "job":
                        if killed:
                            unanswered.add(message["id"])
                        else:
                            # Counted before it is sent: once sent, the
                            # daemon may have taken it before it died.
                            finished[message["id"]] += 1
                            answered += 1
                            answers.append((streams.index(stream), message["id"],
                                            time.monotonic()))
                            stream.send({"action": "respond", "body": message["body"]})
                    elif message != {"ok": True}:
                        errors.append(message)
            if not killed and len(acked) >= JOBS // 3:
                killed_at = time.monotonic()
                self.daemon.process.send_signal(signal.SIGKILL)
                self.daemon.process.wait()
                killed = True
        self.assertEqual(self.daemon.process.returncode, -signal.SIGKILL)
        return acked, finished, unanswered, errors, answers, killed_at

    def second_life(self, master_port, slave_port):
        """Workers reconnect and run what the restarted daemon hands them
        until its stats say no detached job is live.

        :returns: (Counter of ids answered, the last stats).
        """
        master = Stream(master_port)
        workers = [Stream(slave_port) for _ in range(WORKERS)]
        for worker in workers:
            worker.send({"action": "join", "type": JOB_TYPE})
        finished = Counter()
        asked = 0.0
        deadline = time.monotonic() + 120
        while True:
            if time.monotonic() - asked > 0.2:
                master.send({"action": "stats"})
                asked = time.monotonic()
            for stream in readable([master] + workers, 1):
                messages = stream.read()
                self.assertFalse(stream.closed, "the restarted daemon closed a connection")
                for message in messages:
                    if stream is master:
                        stats = message["stats"]
                        if stats["detached"]["live"] == 0:
                            for s in [master] + workers:
                                s.close()
                            return finished, stats
                    elif message.get("action") == "job":
                        finished[message["id"]] += 1
                        stream.send({"action": "respond", "body": message["body"]})
                    else:
                        self.assertEqual(message, {"ok": True})
            if time.monotonic() > deadline:
                self.fail(f"not drained after 120 s ({sum(finished.values())} answered)")

    def test_sigkill_loses_no_acked_job_and_reruns_only_uncommitted_ends(self):
        """Every acked job runs, in one life or the other; after the restart
        exactly the jobs whose end was not committed run again."""
        started = time.monotonic()
        acked, finished_1, unanswered, errors, answers, killed_at = self.first_life(*self.start())
        self.assertEqual(errors, [])
        self.assertGreaterEqual(len(acked), JOBS // 3)
        self.assertLess(len(acked), JOBS, "the kill came after the last ack: no flow to cut")
        self.assertTrue(finished_1, "no worker ran a job before the kill")

        # What the kill left on disk.  An ack means committed: every acked
        # id is there; a job whose end is committed was answered in life 1.
        states = committed_states(self.path, self.directory)
        self.assertEqual(acked - set(states), set(), "acked jobs missing from the journal")
        self.assertLessEqual(set(states), {f"j{i}" for i in range(JOBS)})
        self.assertLessEqual(set(states.values()), {"queued", "running", "completed"})
        completed = {i for i, s in states.items() if s == "completed"}
        self.assertLessEqual(completed, set(finished_1))
        live = {i for i, s in states.items() if s in ("queued", "running")}

        finished_2, stats = self.second_life(*self.start())
        drained_at = time.monotonic()

        # Every acked job ran; nothing ran twice in one life; the restart
        # ran exactly the jobs whose end was not committed.
        self.assertEqual(acked - set(finished_1) - set(finished_2), set(), "acked jobs lost")
        self.assertEqual([i for i, n in finished_1.items() if n > 1], [])
        self.assertEqual([i for i, n in finished_2.items() if n > 1], [])
        self.assertEqual(set(finished_2), live)
        reruns = set(finished_1) & set(finished_2)
        self.assertEqual(reruns, set(finished_1) - completed)
        # The daemon notes a job's end when it reads the answer, and each
        # commit writes everything noted before it started, in the writer
        # thread while the reactor goes on; the next starts once it is done.
        # So the ends not on disk at the kill are those read since the start
        # of the last commit that was done: read while it and the one in
        # flight ran (two commits, milliseconds each), plus the answers sent
        # and not yet read.  Each worker's re-runs are thus its last answers,
        # all sent within moments of the kill; how many depends on how many
        # jobs the workers get through in two commits, no longer a constant.
        for worker in range(1, WORKERS + 1):
            ids = [job_id for number, job_id, _ in answers if number == worker]
            again = [job_id for job_id in ids if job_id in reruns]
            self.assertEqual(again, ids[len(ids) - len(again):],
                             f"worker {worker}: re-runs are not its last answers")
        sent_at = {job_id: at for _, job_id, at in answers}
        oldest = max((killed_at - sent_at[job_id] for job_id in reruns), default=0.0)
        self.assertLess(oldest, RERUN_HORIZON, sorted(reruns))
        self.assertEqual(stats["journal"]["errors"], 0)

        # Once stopped, the file says every job the daemon took completed.
        self.daemon.process.send_signal(signal.SIGTERM)
        status, output = self.daemon.finish()
        self.assertEqual(status, -signal.SIGTERM, output)
        self.assertNotIn("Traceback", output)
        final = committed_states(self.path, self.directory)
        self.assertEqual(set(final), set(states))
        self.assertEqual(set(final.values()), {"completed"})
        print(f"\ncrash: {JOBS} jobs, {len(acked)} acked at the kill "
              f"({len(states)} in the journal: {len(completed)} completed, {len(live)} live), "
              f"{len(finished_1)} answered in life 1, {len(unanswered)} in a worker's hands at the kill, "
              f"{len(finished_2)} run after the restart, {len(reruns)} run twice "
              f"(answered at most {oldest * 1000:.1f} ms before the kill); "
              f"{killed_at - started:.1f} s to the kill, {drained_at - killed_at:.1f} s to drain")


class CorruptJournalTests(SynchronousTestCase):
    """A file that is no usable journal stops ``twistd gloom`` at once."""

    def setUp(self):
        """A scratch directory for the file."""
        self.directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.path = os.path.join(self.directory, "journal.db")

    def assertRefused(self, expected):
        """twistd exits non-zero, saying ``expected`` on one line with the
        file's name and what to do, without a traceback; the file is left
        as it was."""
        with open(self.path, "rb") as f:
            before = f.read()
        cwd = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, cwd, True)
        result = subprocess.run(
            twistd_command() + ["--pidfile=", "-n", "gloom", "--warm-up", "0", *ANY_PORT,
                                "--journal", self.path],
            cwd=cwd, capture_output=True, text=True, timeout=60)
        self.assertNotEqual(result.returncode, 0, result.stdout + result.stderr)
        output = result.stdout + result.stderr
        self.assertNotIn("Traceback", output)
        self.assertNotIn("Listening for", output)
        lines = [line for line in output.splitlines() if self.path in line]
        self.assertEqual(len(lines), 1, output)
        self.assertEqual(lines[0], result.stderr.strip())  # the line is all stderr says
        self.assertTrue(lines[0].startswith(f"gloom: cannot use journal {self.path}: "), lines[0])
        self.assertIn(expected, lines[0])
        self.assertIn("move it aside to start with an empty journal, or restore a backup", lines[0])
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), before)

    def test_garbage(self):
        """A file that is not SQLite at all."""
        with open(self.path, "wb") as f:
            f.write(b"these are not the bytes of a journal\n" * 1000)
        self.assertRefused("file is not a database")

    def test_damaged_pages(self):
        """A real journal whose b-tree pages were overwritten."""
        clock = Clock()
        journal = Journal(self.path, clock=clock)
        for i in range(2000):
            journal.put_new(Record(f"job-{i}", "t", 0, b"x" * 100, None, 3, 0, 0, "queued",
                                   None, 0.0, sequence=i))
        journal.commit()
        journal.close()
        size = os.path.getsize(self.path)
        self.assertGreater(size, 40 * 4096)
        with open(self.path, "r+b") as f:  # pages 3 to 10: b-tree pages of the jobs
            f.seek(2 * 4096)
            f.write(b"\xa5" * (8 * 4096))
        self.assertRefused("the file is corrupt")


class FullDiskTests(SynchronousTestCase):
    """The journal cannot grow past a file-size limit (``RLIMIT_FSIZE``,
    SIGXFSZ ignored): SQLite's writes fail as on a full disk."""

    def test_a_journal_that_cannot_grow_refuses_detached_jobs_only(self):
        """Detached submits past the limit get journal_error; attached jobs
        run; every acked job is in the journal after a restart."""
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "journal.db")
        daemon = LimitedDaemon(self, 1024 * 1024, "-n", "gloom", *ANY_PORT, "--journal", path)
        master_port, slave_port = daemon.ports()
        self.assertIn(signal.SIGXFSZ, signals_ignored(daemon.process.pid))
        master = BlockingClient(master_port)
        self.addCleanup(master.close)

        body = "b" * 2000
        acked, refusal = [], None
        for i in range(2000):
            master.send(submit(f"d{i}", body, ref=i))
            reply = master.receive()
            if reply.get("ok"):
                self.assertEqual(reply, {"ok": True, "id": f"d{i}", "ref": i})
                acked.append(f"d{i}")
            else:
                refusal = reply
                break
        self.assertIsNotNone(refusal, "2000 submits of 2 kB fit in a 1 MiB journal")
        self.assertEqual((refusal["error"], refusal["id"]), ("journal_error", f"d{len(acked)}"))
        self.assertIn("not accepted", refusal["reason"])
        self.assertGreater(len(acked), 20)
        refused = [f"d{len(acked)}"]

        # More detached submits are refused too; the refused ids are unknown.
        for i in range(len(acked) + 1, len(acked) + 6):
            master.send(submit(f"d{i}", body))
            reply = master.receive()
            self.assertEqual((reply.get("error"), reply.get("id")), ("journal_error", f"d{i}"))
            refused.append(f"d{i}")
        for job_id in refused:
            master.send({"action": "status", "id": job_id})
            self.assertEqual(master.receive(), {"ok": True, "id": job_id, "state": "unknown"})

        # Attached jobs still run.
        worker = BlockingClient(slave_port)
        self.addCleanup(worker.close)
        worker.send({"action": "join", "type": "attached"})
        self.assertEqual(worker.receive(), {"ok": True})
        for i in range(3):
            master.send(submit(f"a{i}", body, "attached", detach=False))
            self.assertEqual(master.receive(), {"ok": True, "id": f"a{i}"})
            job = worker.receive()
            self.assertEqual((job["action"], job["id"]), ("job", f"a{i}"))
            worker.send({"action": "respond", "body": i})
            self.assertEqual(worker.receive(), {"ok": True})
            self.assertEqual(master.receive(), {"id": f"a{i}", "body": i})
        master.send({"action": "stats"})
        journal = master.receive()["stats"]["journal"]
        self.assertEqual(journal["errors"], len(refused))

        # After a restart without the limit, every acked job is there.
        daemon.process.send_signal(signal.SIGKILL)
        _, output = daemon.finish()
        self.assertNotIn("Traceback", output)
        self.assertIn("commit failed", output)
        daemon = TwistdDaemon(self, "-n", "gloom", *ANY_PORT, "--journal", path)
        master_port, _ = daemon.ports()
        again = BlockingClient(master_port)
        self.addCleanup(again.close)
        for job_id in acked:
            again.send({"action": "status", "id": job_id})
            status = again.receive()
            self.assertEqual((status["id"], status["state"], status["type"]),
                             (job_id, "queued", JOB_TYPE))
        for job_id in refused:
            again.send({"action": "status", "id": job_id})
            self.assertEqual(again.receive()["state"], "unknown")
        again.send(submit("after", body))
        self.assertEqual(again.receive(), {"ok": True, "id": "after"})
        self.assertIn(f"loaded {len(acked)} jobs ({len(acked)} queued)", daemon.output.decode())
