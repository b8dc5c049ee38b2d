"""Detached jobs: jobs that belong to the daemon rather than to a master.

A detached job is submitted like any other, but once acked it no longer
depends on its master: it survives the master's disconnect, no answer is
pushed to anyone, and its id lives in one namespace for the whole daemon.
How it ended is kept for a while (`Ended`), for masters to ask with
the ``status`` action; a job whose retries ran out goes to the dead list
(`Dead`), from which a master may queue it again or discard it.

`DetachedJobs` is the owner (`IJobOwner`) of every detached job and the
observer of their attempts.  It knows nothing of sockets or JSON: answers
are kept as the bytes the slave sent.  With a `gloom.journal.Journal`, it
records every change of a detached job there, and a new job is handed to
the scheduler only once it is on disk.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, Iterable, List, Optional, Tuple

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from gloom.quoting import quoted
from gloom.scheduler import (
    DELAYED,
    QUEUED,
    RUNNING,
    Attachment,
    IJobOwner,
    JobFailed,
    RetryPolicy,
    ScheduledJob,
    Scheduler,
    ShuttingDown,
)

COMPLETED = "completed"
FAILED = "failed"
DEAD = "dead"

DEFAULT_KEEP_RESULTS = 600.0
"""Seconds the end of a detached job is kept for ``status``."""

DEFAULT_KEEP_RESULTS_MAX = 100_000
"""Most ended detached jobs kept at once."""

DEFAULT_KEEP_RESULTS_BYTES = 64 * 1024 * 1024
"""Most bytes of answers kept at once."""

DEFAULT_DEAD_MAX = 10_000
"""Most jobs on the dead list."""

CANCELLED_REASON = "cancelled by a master"

MAX_REASON = 1000
"""Longest reason kept for a dead or failed job, in characters (a slave's
reason may be as long as a frame)."""

# A kept result's bookkeeping, beyond its answer, in bytes (for the bound).
_RESULT_OVERHEAD = 200


class IdTaken(Exception):
    """A live or dead detached job already has this id."""


class Ended:
    """How a detached job ended, kept for ``status``: an answer (completed)
    or a reason (failed), with what else status reports."""

    __slots__ = ("id", "type", "priority", "state", "attempts", "result", "reason", "ended_at",
                 "size")

    def __init__(self, job: ScheduledJob, state: str, result: Optional[bytes],
                 reason: Optional[str], ended_at: float):
        """
        :param job: the job that ended.
        :param state: `COMPLETED` or `FAILED`.
        :param result: the answer's JSON text, if it completed.
        :param reason: why it failed, if it did.
        :param ended_at: the clock's time when it ended.
        """
        self.id = job.id
        self.type = job.type
        self.priority = job.priority
        self.state = state
        self.attempts = job.attempt
        self.result = result
        self.reason = reason
        self.ended_at = ended_at
        self.size = _RESULT_OVERHEAD + (len(result) if result is not None else 0)


class Dead:
    """A detached job whose retries ran out, with why and when."""

    __slots__ = ("job", "reason", "ended_at")

    def __init__(self, job: ScheduledJob, reason: str, ended_at: float):
        """
        :param job: the job (its frame is kept to queue it again).
        :param reason: why its last attempt failed.
        :param ended_at: the clock's time when it died.
        """
        self.job = job
        self.reason = reason
        self.ended_at = ended_at

    def describe(self) -> dict:
        """What ``dead_list`` says of it."""
        job = self.job
        return {"id": job.id, "type": job.type, "priority": job.priority,
                "attempts": job.attempt, "reason": self.reason, "ended_at": self.ended_at}


@implementer(IJobOwner)
class DetachedJobs:
    """Every detached job of the daemon: live ones (in the scheduler), kept
    ends and dead letters; and, with a journal, their record on disk.

    Bounds: at most ``keep_results_max`` ends and ``keep_results_bytes`` of
    answers are kept, each for ``keep_results`` seconds, and at most
    ``dead_max`` dead jobs; the oldest go first, and are counted.
    """

    log = Logger()

    def __init__(self, scheduler: Scheduler, clock: IReactorTime, journal: Any = None,
                 keep_results: float = DEFAULT_KEEP_RESULTS,
                 keep_results_max: int = DEFAULT_KEEP_RESULTS_MAX,
                 keep_results_bytes: int = DEFAULT_KEEP_RESULTS_BYTES,
                 dead_max: int = DEFAULT_DEAD_MAX):
        """
        :param scheduler: runs the live jobs.
        :param clock: for the time of ends and the expiry of kept results.
        :param journal: a `gloom.journal.Journal`, or None to keep nothing on disk.
        :param keep_results: seconds an end is kept.
        :param keep_results_max: most ends kept.
        :param keep_results_bytes: most bytes of kept answers.
        :param dead_max: most dead jobs kept (0: none; jobs end failed instead).
        """
        self.scheduler = scheduler
        self.clock = clock
        self.journal = journal
        self.keep_results = keep_results
        self.keep_results_max = keep_results_max
        self.keep_results_bytes = keep_results_bytes
        self.dead_max = dead_max
        self.live: Dict[str, ScheduledJob] = {}
        self.pending: Dict[str, Tuple[str, int, Optional[float]]] = {}
        """Detached jobs submitted and waiting for the journal: id to type,
        priority and the time it is delayed to (or None)."""
        self._cancelled_pending: set = set()
        self.results: "OrderedDict[str, Ended]" = OrderedDict()
        self.results_bytes = 0
        self.dead: "OrderedDict[str, Dead]" = OrderedDict()
        self.totals = {"dead": 0, "dead_dropped": 0, "results_dropped": 0, "detached": 0}
        self._expiry_call = None

    # --- masters ----------------------------------------------------------

    def policy(self, retries: Optional[int]) -> RetryPolicy:
        """The retry policy of a detached job: it backs off, a slave's
        failure is retried, and the journal (if any) hears of it."""
        return RetryPolicy.of(retries, backoff=True, retry_failures=True,
                              observer=self if self.journal is not None else None)

    def submit(self, job_id: str, job_type: str, frame: bytes, priority: int = 0,
               timeout: Optional[float] = None, run_at: Optional[float] = None,
               retries: Optional[int] = None) -> Deferred:
        """Take a detached job.

        :param job_id: its id, in the daemon-wide namespace.
        :param job_type: the type of slave that runs it.
        :param frame: the frame its slave will be sent (opaque here).
        :param priority: higher runs first.
        :param timeout: seconds an attempt may run, or None.
        :param run_at: the clock's time from which it may run, or None.
        :param retries: its retry limit; the scheduler's default if None.
        :returns: a Deferred that fires (with None) once the job is taken,
            at once without a journal, once it is on disk with one; or
            fails with the journal's error, and then the job is not taken.
        :raises IdTaken: if a live or dead detached job has this id.
        :raises ShuttingDown: once the scheduler is stopping.
        """
        if job_id in self.live or job_id in self.dead or job_id in self.pending:
            raise IdTaken(job_id)
        if retries is None:
            retries = self.scheduler.max_retries
        policy = self.policy(retries)
        if self.journal is None:
            self._take(job_id, job_type, frame, priority, timeout, run_at, policy)
            return succeed(None)
        if self.scheduler.stopping:
            raise ShuttingDown("the daemon is shutting down")
        from gloom.journal import Record

        now = self.clock.seconds()
        waiting = run_at is not None and run_at > now
        sequence = self.scheduler.next_sequence()
        record = Record(job_id, job_type, priority, bytes(frame), timeout, retries, 0, 0,
                        DELAYED if waiting else QUEUED, run_at if waiting else None, now,
                        sequence=sequence)
        written = self.journal.put_new(record)
        self.pending[job_id] = (job_type, priority, run_at if waiting else None)

        def on_disk(_):
            del self.pending[job_id]
            if job_id in self._cancelled_pending:
                self._cancelled_pending.discard(job_id)
                job = ScheduledJob(None, job_id, job_type, b"", priority, sequence, timeout, now)
                self._keep(job, FAILED, None, CANCELLED_REASON)
            elif not self.scheduler.stopping:  # else it runs after the restart
                self._take(job_id, job_type, frame, priority, timeout, run_at, policy, sequence)

        def not_on_disk(failure):
            del self.pending[job_id]
            self._cancelled_pending.discard(job_id)
            return failure

        return written.addCallbacks(on_disk, not_on_disk)

    def _take(self, job_id, job_type, frame, priority, timeout, run_at, policy,
              sequence=None) -> ScheduledJob:
        """Hand a new detached job to the scheduler; it replaces a kept end."""
        self._forget_result(job_id)
        job = self.scheduler.submit(self, job_id, job_type, frame, priority, timeout, run_at,
                                    policy, sequence)
        self.live[job_id] = job
        self.totals["detached"] += 1
        return job

    def status(self, job_id: str) -> Optional[dict]:
        """What ``status`` says of the detached job ``job_id``, or None if
        no live, dead or kept detached job has that id.  A completed job's
        answer is under ``result`` as its JSON text (bytes)."""
        job = self.live.get(job_id)
        if job is not None:
            return describe(job, detached=True)
        waiting = self.pending.get(job_id)
        if waiting is not None:  # on its way to disk; it replaces any kept end
            job_type, priority, run_at = waiting
            if job_id in self._cancelled_pending:
                state = FAILED
            else:
                state = QUEUED if run_at is None else DELAYED
            status = {"state": state, "detached": True, "type": job_type, "priority": priority,
                      "attempts": 0}
            if state == FAILED:
                status["reason"] = CANCELLED_REASON
            elif state == DELAYED:
                status["run_at"] = run_at
            return status
        dead = self.dead.get(job_id)
        if dead is not None:
            status = describe(dead.job, detached=True)
            status.update(state=DEAD, reason=dead.reason, ended_at=dead.ended_at)
            return status
        ended = self.results.get(job_id)
        if ended is not None:
            if ended.ended_at + self.keep_results <= self.clock.seconds():
                self._expire()
                return None
            status = {"state": ended.state, "detached": True, "type": ended.type,
                      "priority": ended.priority, "attempts": ended.attempts,
                      "ended_at": ended.ended_at}
            if ended.result is not None:
                status["result"] = ended.result
            if ended.reason is not None:
                status["reason"] = ended.reason
            return status
        return None

    def cancel(self, job_id: str) -> bool:
        """Withdraw a live detached job: it ends failed, ``cancelled by a
        master`` (a running one's answer will be dropped).

        :returns: whether there was such a job.
        """
        job = self.live.pop(job_id, None)
        if job is None:
            if job_id in self.pending and job_id not in self._cancelled_pending:
                self._cancelled_pending.add(job_id)  # it ends as it reaches the disk
                return True
            return False
        self.scheduler.cancel(job)
        self._keep(job, FAILED, None, CANCELLED_REASON)
        return True

    def dead_page(self, offset: int, limit: int) -> Tuple[int, List[dict]]:
        """The dead jobs from ``offset``, at most ``limit`` of them, oldest
        first; and how many there are in all."""
        page = []
        for index, dead in enumerate(self.dead.values()):
            if index >= offset + limit:
                break
            if index >= offset:
                page.append(dead.describe())
        return len(self.dead), page

    def retry_dead(self, job_id: str) -> bool:
        """Queue a dead job again, with fresh retries.

        :returns: whether there was such a dead job.
        """
        if job_id in self.dead and self.scheduler.stopping:
            raise ShuttingDown("the daemon is shutting down")
        dead = self.dead.pop(job_id, None)
        if dead is None:
            return False
        old = dead.job
        job = self._take(old.id, old.type, old.body, old.priority, old.timeout, None,
                         self.policy(old.policy.retries if old.policy else None))
        if self.journal is not None:
            self.journal.put(record_of(job, self.scheduler.max_retries))
        return True

    def discard_dead(self, job_id: str) -> bool:
        """Forget a dead job.

        :returns: whether there was such a dead job.
        """
        if self.dead.pop(job_id, None) is None:
            return False
        if self.journal is not None:
            self.journal.delete(job_id)
        return True

    # --- the scheduler's reports ------------------------------------------

    def job_answered(self, job: ScheduledJob, body: Any) -> None:
        """A slave answered: keep the answer for ``status``."""
        self.live.pop(job.id, None)
        self._keep(job, COMPLETED, bytes(body), None)

    def job_failed(self, job: ScheduledJob, error: Exception) -> None:
        """The job's retries ran out: it goes to the dead list.  A job the
        daemon stopped before it ended stays as it is in the journal, to
        run after the restart."""
        if isinstance(error, ShuttingDown):
            return
        self.live.pop(job.id, None)
        reason = error.reason if isinstance(error, JobFailed) else str(error)
        if len(reason) > MAX_REASON:
            reason = f"{reason[:MAX_REASON]}... ({len(reason)} characters in all)"
        if self.dead_max <= 0:
            self._keep(job, FAILED, None, reason)
            return
        now = self.clock.seconds()
        job.progress = None  # not needed to retry it, and as big as a frame
        self.dead[job.id] = Dead(job, reason, now)
        self.totals["dead"] += 1
        self.log.warn("Detached job {id} ({type}) is dead: {reason}", id=quoted(job.id),
                      type=quoted(job.type), reason=quoted(reason))
        if self.journal is not None:
            self.journal.put(record_of(job, self.scheduler.max_retries, DEAD, reason=reason,
                                       ended_at=now))
        while len(self.dead) > self.dead_max:
            _, dropped = self.dead.popitem(last=False)
            self.totals["dead_dropped"] += 1
            self.log.warn("Dead list full ({most} jobs): dropped the oldest, {id} ({type})",
                          most=self.dead_max, id=quoted(dropped.job.id),
                          type=quoted(dropped.job.type))
            if self.journal is not None:
                self.journal.delete(dropped.job.id)

    def job_progress(self, job: ScheduledJob, report: Any) -> None:
        """A slave reported progress: the job keeps the latest, for
        ``status``; there is no master to pass it to."""

    def job_started(self, job: ScheduledJob) -> None:
        """An attempt started: recorded, so a restart counts it."""
        self.journal.put(record_of(job, self.scheduler.max_retries))

    def job_waiting(self, job: ScheduledJob) -> None:
        """The job is queued or delayed again after a lost attempt."""
        self.journal.put(record_of(job, self.scheduler.max_retries))

    # --- kept ends --------------------------------------------------------

    def _keep(self, job: ScheduledJob, state: str, result: Optional[bytes],
              reason: Optional[str]) -> None:
        """Keep how a job ended, within the bounds, and record it."""
        now = self.clock.seconds()
        ended = Ended(job, state, result, reason, now)
        self._forget_result(job.id)
        if self.keep_results_max > 0 and ended.size <= self.keep_results_bytes:
            self.results[job.id] = ended
            self.results_bytes += ended.size
            while (len(self.results) > self.keep_results_max
                   or self.results_bytes > self.keep_results_bytes):
                self._drop_oldest_result(counted=True)
            if self._expiry_call is None:
                self._expiry_call = self.clock.callLater(self.keep_results, self._expire)
            if self.journal is not None:
                self.journal.put(record_of(job, self.scheduler.max_retries, state, result,
                                           reason, now))
        else:
            self.totals["results_dropped"] += 1
            self._delete_row(job.id)

    def _forget_result(self, job_id: str) -> None:
        ended = self.results.pop(job_id, None)
        if ended is not None:
            self.results_bytes -= ended.size

    def _drop_oldest_result(self, counted: bool) -> None:
        job_id, ended = self.results.popitem(last=False)
        self.results_bytes -= ended.size
        if counted:
            self.totals["results_dropped"] += 1
        self._delete_row(job_id)

    def _delete_row(self, job_id: str) -> None:
        """Delete a kept end's row, unless a newer job of that id owns it."""
        if (self.journal is not None and job_id not in self.live and job_id not in self.pending
                and job_id not in self.dead):
            self.journal.delete(job_id)

    def _expire(self) -> None:
        """Drop the ends kept longer than ``keep_results``; come back for
        the next one."""
        call, self._expiry_call = self._expiry_call, None
        if call is not None and call.active():
            call.cancel()
        now = self.clock.seconds()
        results = self.results
        while results:
            oldest = next(iter(results.values()))
            if oldest.ended_at + self.keep_results > now:
                self._expiry_call = self.clock.callLater(
                    oldest.ended_at + self.keep_results - now, self._expire)
                break
            self._drop_oldest_result(counted=False)

    # --- start and stop ---------------------------------------------------

    def load(self, records: Iterable[Any]) -> Dict[str, int]:
        """Take back the jobs of a journal (`gloom.journal.Record` objects,
        in submission order) at start-up: queued and running ones queue
        again (a running one's attempt counts as lost: at least once),
        delayed ones keep their time, dead ones stay dead, kept ends are
        kept for what is left of their time.

        :returns: how many of each state were loaded.
        """
        counts: Dict[str, int] = {}
        now = self.clock.seconds()
        max_retries = self.scheduler.max_retries
        last_sequence = -1
        for record in records:
            state = record.state
            counts[state] = counts.get(state, 0) + 1
            last_sequence = max(last_sequence, record.sequence)
            policy = self.policy(record.retries)
            if state == RUNNING and record.retried >= record.retries:
                # Its last attempt was lost with the daemon.
                job = ScheduledJob(self, record.id, record.type, record.frame, record.priority,
                                   record.sequence, record.timeout, record.submitted_at)
                job.attempt, job.retries, job.policy = record.attempts, record.retried, policy
                self.job_failed(job, JobFailed(
                    f"the daemon stopped during its last attempt; gave up after "
                    f"{job.attempt} attempt{'' if job.attempt == 1 else 's'}"))
            elif state in (QUEUED, RUNNING, DELAYED):
                job = self.scheduler.submit(self, record.id, record.type, record.frame,
                                            record.priority, record.timeout,
                                            record.run_at if state == DELAYED else None, policy,
                                            record.sequence)
                job.attempt, job.retries = record.attempts, record.retried
                job.submitted_at = record.submitted_at
                self.live[record.id] = job
                if state == RUNNING:  # the attempt was lost with the daemon: a retry
                    job.retries += 1
                    self.journal.put(record_of(job, max_retries))
            elif state == DEAD:
                job = ScheduledJob(None, record.id, record.type, record.frame, record.priority,
                                   record.sequence, record.timeout, record.submitted_at)
                job.attempt, job.retries, job.policy = record.attempts, record.retried, policy
                job.state = DEAD
                self.dead[record.id] = Dead(job, record.reason or "", record.ended_at or now)
            elif record.ended_at is not None and record.ended_at + self.keep_results > now:
                job = ScheduledJob(None, record.id, record.type, b"", record.priority, 0,
                                   None, record.submitted_at)
                job.attempt = record.attempts
                ended = Ended(job, state, record.result, record.reason, record.ended_at)
                self.results[record.id] = ended
                self.results_bytes += ended.size
            else:
                self.journal.delete(record.id)
        self.scheduler.sequence_from(last_sequence + 1)
        self._expire()
        return counts

    def stop(self) -> None:
        """Stop expiring kept ends."""
        if self._expiry_call is not None and self._expiry_call.active():
            self._expiry_call.cancel()
        self._expiry_call = None

    def stats(self) -> dict:
        """The figures ``stats`` reports of detached jobs."""
        return {"live": len(self.live), "results": len(self.results),
                "results_bytes": self.results_bytes, "dead": len(self.dead)}


def describe(job: ScheduledJob, detached: bool) -> dict:
    """What ``status`` says of a live job (queued, delayed or running), or
    of a submitter's `Attachment` to one.  A ``progress`` among them is
    the slave's last progress as JSON text (bytes)."""
    if type(job) is Attachment:
        job = job.job
    status = {"state": job.state if job.state in (QUEUED, DELAYED, RUNNING) else "unknown",
              "detached": detached, "type": job.type, "priority": job.priority,
              "attempts": job.attempt}
    if job.state is DELAYED:
        status["run_at"] = job.run_at
    if job.unique is not None:
        status["unique"] = job.unique.key
    if job.progress is not None:
        status["progress"] = job.progress
    return status


def record_of(job: ScheduledJob, default_retries: int, state: Optional[str] = None,
              result: Optional[bytes] = None, reason: Optional[str] = None,
              ended_at: Optional[float] = None):
    """The journal's record of a detached job as it is now."""
    from gloom.journal import Record

    policy = job.policy
    retries = default_retries if policy is None or policy.retries is None else policy.retries
    state = state or job.state
    return Record(job.id, job.type, job.priority, bytes(job.body) if state not in (
        COMPLETED, FAILED) else b"", job.timeout, retries, job.attempt, job.retries, state,
        job.run_at if state == DELAYED else None, job.submitted_at, ended_at,
        result, reason, job.sequence)
