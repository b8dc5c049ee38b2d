"""Matching jobs to idle slaves.

The scheduler knows jobs, types, priorities, retries and timeouts; it knows
nothing about sockets or JSON (a job's body is an opaque value it carries).
A submitted job is a Deferred that fires with the answer body, or fails with
`JobFailed` or `ShuttingDown`.  An idle slave is a Deferred waiting for a
`Job`.  Cancelling either Deferred is how its owner goes away.

Every operation is O(log n) in queued jobs and O(1) in idle slaves: each
type has its own heap, cancelled queued jobs are deleted lazily (the heap is
compacted once they are the majority), idle slaves wait in an
insertion-ordered dict per type, and every count the stats report is kept
up to date rather than counted on demand.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter, OrderedDict
from typing import Any, Callable, Dict, List, Optional, Tuple

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

QUEUED = "queued"
RUNNING = "running"
ENDED = "ended"

# Compact a heap only when dead entries outnumber live ones and are this many.
_COMPACT_MINIMUM = 64

TOTALS = ("submitted", "completed", "failed", "cancelled", "retried", "timed_out")


class DuplicateJobId(Exception):
    """A job with this id is already queued or running."""


class ShuttingDown(Exception):
    """The scheduler is stopping; the job will not run or be answered."""


class JobFailed(Exception):
    """The job ended without an answer: the slave failed it or retries ran out."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class AttemptGivenUp(Exception):
    """A slave answered an attempt that had already run past its timeout."""


class Job:
    """One submitted job and where it is in its life.

    ``attempt`` counts the times the job was handed to a slave; a slave
    answers for the attempt it was given, so an answer to an attempt that
    was given up is recognised as late.  The job is its own Deferred's
    canceller (cancelling the Deferred withdraws the job), which spares a
    closure per queued job.
    """

    __slots__ = (
        "scheduler",
        "id",
        "type",
        "body",
        "priority",
        "sequence",
        "timeout",
        "submitted_at",
        "retries",
        "attempt",
        "state",
        "timer",
        "deferred",
    )

    def __init__(self, scheduler: "Scheduler", job_id: str, job_type: str, body: Any, priority: int,
                 sequence: int, timeout: Optional[float], submitted_at: float):
        self.scheduler = scheduler
        self.id = job_id
        self.type = job_type
        self.body = body
        self.priority = priority
        self.sequence = sequence
        self.timeout = timeout
        self.submitted_at = submitted_at
        self.retries = 0
        self.attempt = 0
        self.state = QUEUED
        self.timer = None
        self.deferred: Optional[Deferred] = None

    def __repr__(self) -> str:
        return f"<Job {self.id!r} type={self.type!r} priority={self.priority} {self.state}>"

    def __call__(self, deferred: Deferred) -> None:
        """Cancel: the master went away or withdrew the job."""
        self.scheduler._withdraw(self)


# Sequence numbers stay below this, so one integer orders by priority, then age.
_SEQUENCE_SPAN = 2**64


class _JobQueue:
    """A max-priority, oldest-first heap of one type's queued jobs, keyed by
    one integer (higher priority first, then lower sequence): smaller
    entries and cheaper comparisons than (priority, sequence) tuples."""

    __slots__ = ("heap", "dead")

    def __init__(self) -> None:
        self.heap: List[Tuple[int, Job]] = []
        self.dead = 0

    def __len__(self) -> int:
        return len(self.heap) - self.dead

    def push(self, job: Job) -> None:
        heapq.heappush(self.heap, (job.sequence - job.priority * _SEQUENCE_SPAN, job))

    def pop(self) -> Optional[Job]:
        heap = self.heap
        while heap:
            job = heapq.heappop(heap)[1]
            if job.state is QUEUED:
                return job
            self.dead -= 1
        return None

    def discard(self) -> None:
        """Note that one queued job left; compact once most entries are dead."""
        self.dead += 1
        if self.dead >= _COMPACT_MINIMUM and self.dead * 2 > len(self.heap):
            self.heap = [entry for entry in self.heap if entry[1].state is QUEUED]
            heapq.heapify(self.heap)
            self.dead = 0


def _decrement(counter: Counter, key: str) -> None:
    """Count one down, forgetting the key at zero so old types do not pile up."""
    counter[key] -= 1
    if not counter[key]:
        del counter[key]


class Scheduler(Service):
    """Queues jobs per type by priority and hands them to idle slaves.

    ``clock`` times attempts and answers; ``default_timeout`` (seconds, or
    None) applies to jobs submitted without a timeout of their own.
    ``on_answer``, when set, is called with a job's type and the seconds
    from its submission to its answer.
    """

    name = "scheduler"
    log = Logger()

    def __init__(self, max_retries: int = 3, clock: Optional[IReactorTime] = None,
                 default_timeout: Optional[float] = None):
        if clock is None:
            from twisted.internet import reactor as clock
        self.max_retries = max_retries
        self.clock = clock
        self.default_timeout = default_timeout
        self.on_answer: Optional[Callable[[str, float], None]] = None
        self.totals = dict.fromkeys(TOTALS, 0)
        self._jobs: Dict[str, Job] = {}
        self._queues: Dict[str, _JobQueue] = {}
        self._idle: Dict[str, OrderedDict] = {}
        self._running: Counter = Counter()
        self._busy: Counter = Counter()
        self._sequence = itertools.count()
        self._stopping = False

    # --- masters ----------------------------------------------------------

    def submit(self, job_id: str, job_type: str, body: Any, priority: int = 0,
               timeout: Optional[float] = None) -> Deferred:
        """Queue a job; the Deferred fires with its answer body.

        Raises `DuplicateJobId` when the id is queued or running, and
        `ShuttingDown` once the scheduler is stopping.  Cancelling the
        Deferred withdraws a queued job; a running job then finishes (or
        times out) and its answer is dropped.
        """
        if self._stopping:
            raise ShuttingDown("the daemon is shutting down")
        if job_id in self._jobs:
            raise DuplicateJobId(job_id)
        if timeout is None:
            timeout = self.default_timeout
        job = Job(self, job_id, job_type, body, priority, next(self._sequence), timeout,
                  self.clock.seconds())
        job.deferred = Deferred(job)
        self._jobs[job_id] = job
        self.totals["submitted"] += 1
        self._dispatch(job)
        return job.deferred

    def _dispatch(self, job: Job) -> None:
        waiters = self._idle.get(job.type)
        if waiters:
            slave, _ = waiters.popitem(last=False)
            if not waiters:
                del self._idle[job.type]
            self._start(job)
            slave.callback(job)
            return
        job.state = QUEUED
        queue = self._queues.get(job.type)
        if queue is None:
            queue = self._queues[job.type] = _JobQueue()
        queue.push(job)

    def _start(self, job: Job) -> None:
        """Hand a job to a slave: a new attempt, timed if the job has a timeout."""
        job.state = RUNNING
        job.attempt += 1
        self._running[job.type] += 1
        self._busy[job.type] += 1
        if job.timeout is not None:
            job.timer = self.clock.callLater(job.timeout, self._timed_out, job)

    def _withdraw(self, job: Job) -> None:
        """The master went away: drop a queued job, let a running one finish."""
        if job.state is QUEUED:
            self._end(job)
            self.totals["cancelled"] += 1
            queue = self._queues[job.type]
            queue.discard()
            if not queue:
                del self._queues[job.type]

    # --- slaves -----------------------------------------------------------

    def take(self, job_type: str) -> Optional[Job]:
        """The next queued job of this type for a slave, or None if none waits."""
        queue = self._queues.get(job_type)
        if not queue:
            return None
        job = queue.pop()
        if not queue:
            del self._queues[job_type]
        self._start(job)
        return job

    def next_job(self, job_type: str) -> Deferred:
        """A Deferred that fires with the next job of this type for a slave.

        Idle slaves are served first come, first served.  Cancelling the
        Deferred takes the slave out of the idle set.  The slave holds the
        job until it calls `complete`, `fail` or `release`.
        """
        job = self.take(job_type)
        if job is not None:
            slave = Deferred()
            slave.callback(job)
            return slave
        slave = Deferred(lambda d: self._forget_slave(job_type, d))
        if not self._stopping:
            self._idle.setdefault(job_type, OrderedDict())[slave] = None
        return slave

    def _forget_slave(self, job_type: str, slave: Deferred) -> None:
        waiters = self._idle.get(job_type)
        if waiters is not None:
            waiters.pop(slave, None)
            if not waiters:
                del self._idle[job_type]

    def complete(self, job: Job, attempt: int, body: Any) -> None:
        """The slave answered: deliver the body to the master, if still there.

        Raises `AttemptGivenUp` when that attempt already timed out; the
        answer is then dropped and the slave is free all the same.
        """
        if not self._slave_done(job, attempt):
            return
        self._end_attempt(job)
        self._end(job)
        if job.deferred.called:
            self.totals["cancelled"] += 1
            return
        self.totals["completed"] += 1
        if self.on_answer is not None:
            self.on_answer(job.type, self.clock.seconds() - job.submitted_at)
        job.deferred.callback(body)

    def fail(self, job: Job, attempt: int, reason: str) -> None:
        """The slave ran the job and it failed: tell the master, no retry.

        Raises `AttemptGivenUp` like `complete`.
        """
        if not self._slave_done(job, attempt):
            return
        self._end_attempt(job)
        self._give_up(job, reason)

    def release(self, job: Job, attempt: int) -> None:
        """The slave holding this job went away: queue it again or give up."""
        try:
            current = self._slave_done(job, attempt)
        except AttemptGivenUp:
            return
        if current:
            self._end_attempt(job)
            self._retry(job, "slave disconnected during the job")

    def _slave_done(self, job: Job, attempt: int) -> bool:
        """A slave stopped holding a job.  Raises `AttemptGivenUp` if its
        attempt timed out; False if the job ended with the scheduler."""
        _decrement(self._busy, job.type)
        if attempt != job.attempt:
            raise AttemptGivenUp(job.id)
        return job.state is RUNNING

    def _end_attempt(self, job: Job) -> None:
        if job.state is not RUNNING:
            return
        _decrement(self._running, job.type)
        if job.timer is not None:
            if job.timer.active():
                job.timer.cancel()
            job.timer = None

    def _timed_out(self, job: Job) -> None:
        """An attempt ran too long: give it up (its slave stays busy until it
        answers) and retry the job elsewhere."""
        job.timer = None
        self._end_attempt(job)
        job.attempt += 1
        self.totals["timed_out"] += 1
        self._retry(job, f"timeout: no answer within {job.timeout:g} s")

    def _retry(self, job: Job, why: str) -> None:
        """An attempt was lost: queue the job again, or fail it for good."""
        if job.deferred.called:
            self._end(job)
            self.totals["cancelled"] += 1
            return
        if job.retries >= self.max_retries:
            self._give_up(job, f"{why}; gave up after {job.retries + 1} attempts")
            return
        job.retries += 1
        self.totals["retried"] += 1
        self._dispatch(job)

    def _give_up(self, job: Job, reason: str) -> None:
        self._end(job)
        if job.deferred.called:
            self.totals["cancelled"] += 1
            return
        self.totals["failed"] += 1
        self.log.warn("Job {id!r} ({type}) failed: {reason}", id=job.id, type=job.type, reason=reason)
        job.deferred.errback(JobFailed(reason))

    def _end(self, job: Job) -> None:
        job.state = ENDED
        if self._jobs.get(job.id) is job:
            del self._jobs[job.id]

    # --- inspection and lifecycle -------------------------------------------

    def queued(self, job_type: str) -> int:
        """How many jobs of this type wait for a slave."""
        queue = self._queues.get(job_type)
        return len(queue) if queue else 0

    def idle_slaves(self, job_type: str) -> int:
        """How many slaves of this type wait for a job."""
        return len(self._idle.get(job_type, ()))

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._jobs

    def __len__(self) -> int:
        """How many jobs are queued or running."""
        return len(self._jobs)

    def types(self) -> Dict[str, Dict[str, int]]:
        """Per type with any jobs or slaves: queued and running jobs, idle and busy slaves."""
        names = set(self._queues) | set(self._idle) | set(self._running) | set(self._busy)
        return {
            name: {
                "queued": self.queued(name),
                "running": self._running.get(name, 0),
                "idle_slaves": self.idle_slaves(name),
                "busy_slaves": self._busy.get(name, 0),
            }
            for name in sorted(names)
        }

    def stopService(self):
        """Fail every unfinished job with `ShuttingDown` and refuse new ones."""
        self._stopping = True
        jobs = list(self._jobs.values())
        self._jobs.clear()
        self._queues.clear()
        for job in jobs:
            self._end_attempt(job)
            job.state = ENDED
            if not job.deferred.called:
                job.deferred.errback(ShuttingDown("the daemon is shutting down"))
        idle = [slave for waiters in self._idle.values() for slave in waiters]
        self._idle.clear()
        for slave in idle:
            slave.cancel()
        return Service.stopService(self)
