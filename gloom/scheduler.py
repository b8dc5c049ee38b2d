"""Matching jobs to idle slaves.

The scheduler knows jobs, types, priorities, retries and timeouts; it knows
nothing about sockets or JSON (a job's body is an opaque value it carries).
An idle slave is a Deferred waiting for a `Job`; cancelling it takes the
slave out of the idle set.  A submitted job reports its end to its owner (a
`JobOwner`: the master's connection) with one method call, and the owner
withdraws it with `Scheduler.cancel`.  A queued job costs a few hundred
bytes, which is why it carries no Deferred and callback chain of its own.

No operation grows with the number of queued jobs beyond O(log p), p being
the number of distinct priorities queued for the type: each type keeps a
first-in, first-out queue per priority and a heap of those priorities;
cancelled queued jobs are deleted lazily (the queues are compacted once they
are the majority); idle slaves wait in an insertion-ordered dict per type;
and every count the stats report is kept up to date rather than counted on
demand.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter, OrderedDict, deque
from typing import Any, Callable, Dict, List, Optional, Protocol, Set, Union

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from gloom.quoting import quoted

QUEUED = "queued"
RUNNING = "running"
ENDED = "ended"

# Compact a heap only when dead entries outnumber live ones and are this many.
_COMPACT_MINIMUM = 64

TOTALS = ("submitted", "completed", "failed", "cancelled", "retried", "timed_out")


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
    was given up is recognised as late.  ``owner`` is told how the job
    ended; it is None once the job ended or was withdrawn.
    """

    __slots__ = (
        "owner",
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
    )

    def __init__(self, owner: Optional["JobOwner"], job_id: str, job_type: str, body: Any,
                 priority: int, sequence: int, timeout: Optional[float], submitted_at: float):
        self.owner = owner
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

    def __repr__(self) -> str:
        return f"<Job {self.id!r} type={self.type!r} priority={self.priority} {self.state}>"


class JobOwner(Protocol):
    """Who submitted a job and hears how it ended: exactly one of these is
    called, once, unless the owner withdrew the job first.  They must not
    raise: they run inside the slave's report or the scheduler's timer."""

    def job_answered(self, job: Job, body: Any) -> None:
        """A slave answered the job with ``body``."""

    def job_failed(self, job: Job, error: Exception) -> None:
        """The job ended without an answer: `JobFailed` or `ShuttingDown`."""


class _JobQueue:
    """One type's queued jobs: higher priority first, then oldest first.

    Each priority in use has its own queue in submission order (a lone job
    is kept as itself, a deque once there are more), and a heap holds the
    negated priorities in use.  A job costs one deque slot in the common
    case of few priorities, and taking one is O(1) until its priority's
    queue runs dry.  Withdrawn jobs stay as dead entries until taken, or
    until they are the majority and the queue is compacted.
    """

    __slots__ = ("levels", "keys", "entries", "dead")

    def __init__(self) -> None:
        self.levels: Dict[int, Union[Job, deque]] = {}
        self.keys: List[int] = []
        self.entries = 0
        self.dead = 0

    def __len__(self) -> int:
        return self.entries - self.dead

    def push(self, job: Job) -> None:
        """Queue a job behind the older jobs of its priority.  A job coming
        back after a lost attempt is older than most and goes ahead of
        the jobs submitted after it."""
        self.entries += 1
        key = -job.priority
        level = self.levels.get(key)
        if level is None:
            self.levels[key] = job
            heapq.heappush(self.keys, key)
        elif type(level) is deque:
            if level[-1].sequence < job.sequence:
                level.append(job)
            else:
                level.insert(_position(level, job.sequence), job)
        else:
            self.levels[key] = deque((level, job) if level.sequence < job.sequence else (job, level))

    def pop(self) -> Optional[Job]:
        levels, keys = self.levels, self.keys
        while keys:
            key = keys[0]
            level = levels[key]
            if type(level) is deque:
                job = level.popleft()
                if not level:
                    del levels[key]
                    heapq.heappop(keys)
            else:
                job = level
                del levels[key]
                heapq.heappop(keys)
            self.entries -= 1
            if job.state is QUEUED:
                return job
            self.dead -= 1
        return None

    def discard(self) -> None:
        """Note that one queued job left; compact once most entries are dead."""
        self.dead += 1
        if self.dead >= _COMPACT_MINIMUM and self.dead * 2 > self.entries:
            self._compact()

    def _compact(self) -> None:
        levels: Dict[int, Union[Job, deque]] = {}
        for key, level in self.levels.items():
            live = [job for job in (level if type(level) is deque else (level,))
                    if job.state is QUEUED]
            if live:
                levels[key] = live[0] if len(live) == 1 else deque(live)
        self.levels = levels
        self.keys = list(levels)
        heapq.heapify(self.keys)
        self.entries -= self.dead
        self.dead = 0


def _position(level: deque, sequence: int) -> int:
    """Where a job of this sequence number goes in an age-ordered deque;
    counted from the front, where the old jobs that come back land."""
    position = 0
    for job in level:
        if job.sequence > sequence:
            break
        position += 1
    return position


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
    from its submission to its answer; ``on_type_unused``, with a type that
    no longer has queued or running jobs nor joined slaves.

    Job ids mean nothing here: a job is its `Job` object, and each owner
    keeps its own ids (two masters may use the same id at once).  Every
    operation either completes or, if a step fails, leaves the scheduler as
    it was; what an owner or a hook raises is logged and contained.
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
        self.on_type_unused: Optional[Callable[[str], None]] = None
        self.totals = dict.fromkeys(TOTALS, 0)
        self._jobs: Set[Job] = set()
        self._joined: Counter = Counter()
        self._queues: Dict[str, _JobQueue] = {}
        self._idle: Dict[str, OrderedDict] = {}
        self._running: Counter = Counter()
        self._busy: Counter = Counter()
        self._sequence = itertools.count()
        self._stopping = False

    # --- masters ----------------------------------------------------------

    def submit(self, owner: JobOwner, job_id: str, job_type: str, body: Any, priority: int = 0,
               timeout: Optional[float] = None) -> Job:
        """Queue a job, or hand it to an idle slave at once; ``owner`` will
        hear how it ends.  Raises `ShuttingDown` once the scheduler is
        stopping; if handing the job out fails, nothing has changed.
        """
        if self._stopping:
            raise ShuttingDown("the daemon is shutting down")
        if timeout is None:
            timeout = self.default_timeout
        job = Job(owner, job_id, job_type, body, priority, next(self._sequence), timeout,
                  self.clock.seconds())
        self._jobs.add(job)
        self.totals["submitted"] += 1
        try:
            self._dispatch(job)
        except BaseException:
            self._jobs.discard(job)
            self.totals["submitted"] -= 1
            job.state = ENDED
            raise
        return job

    def cancel(self, job: Job) -> None:
        """The owner withdraws the job (or went away): a queued job leaves
        the queue at once; a running one finishes or times out, and how it
        ended is dropped.  The owner hears nothing more about it."""
        job.owner = None
        if job.state is QUEUED:
            self._end(job)
            self.totals["cancelled"] += 1
            queue = self._queues[job.type]
            queue.discard()
            if not queue:
                del self._queues[job.type]
                self._maybe_unused(job.type)

    def _dispatch(self, job: Job) -> None:
        """Hand the job to the longest-idle slave of its type, or queue it.
        If starting the attempt fails, the slave stays idle."""
        waiters = self._idle.get(job.type)
        if waiters:
            self._start(job)
            slave, _ = waiters.popitem(last=False)
            if not waiters:
                del self._idle[job.type]
            slave.callback(job)
            return
        job.state = QUEUED
        queue = self._queues.get(job.type)
        if queue is None:
            queue = self._queues[job.type] = _JobQueue()
        queue.push(job)

    def _start(self, job: Job) -> None:
        """Hand a job to a slave: a new attempt, timed if the job has a
        timeout.  The timer is made first, so a clock that refuses it
        leaves everything as it was."""
        if job.timeout is not None:
            job.timer = self.clock.callLater(job.timeout, self._timed_out, job)
        job.state = RUNNING
        job.attempt += 1
        self._running[job.type] += 1
        self._busy[job.type] += 1

    # --- slaves -----------------------------------------------------------

    def take(self, job_type: str) -> Optional[Job]:
        """The next queued job of this type for a slave, or None if none waits."""
        queue = self._queues.get(job_type)
        if not queue:
            return None
        job = queue.pop()
        try:
            self._start(job)
        except BaseException:
            queue.push(job)
            raise
        if not queue:
            del self._queues[job_type]
        return job

    def join(self, job_type: str) -> None:
        """A slave now serves this type (counted until it calls `leave`)."""
        self._joined[job_type] += 1

    def leave(self, job_type: str) -> None:
        """A slave no longer serves this type."""
        _decrement(self._joined, job_type)
        self._maybe_unused(job_type)

    def _maybe_unused(self, job_type: str) -> None:
        """Tell ``on_type_unused`` once a type has no jobs and no slaves left."""
        if (self.on_type_unused is not None and job_type not in self._joined
                and job_type not in self._queues and job_type not in self._running
                and job_type not in self._busy and job_type not in self._idle):
            self._contain(self.on_type_unused, job_type)

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
        try:
            if not self._slave_done(job, attempt):
                return
            self._end_attempt(job)
            owner = self._end(job)
            if owner is None:
                self.totals["cancelled"] += 1
                return
            self.totals["completed"] += 1
            if self.on_answer is not None:
                self._contain(self.on_answer, job.type, self.clock.seconds() - job.submitted_at)
            try:
                owner.job_answered(job, body)
            except Exception:
                self._contained(owner.job_answered)
        finally:
            if job.type not in self._joined:
                self._maybe_unused(job.type)

    def fail(self, job: Job, attempt: int, reason: str) -> None:
        """The slave ran the job and it failed: tell the master, no retry.

        Raises `AttemptGivenUp` like `complete`.
        """
        try:
            if self._slave_done(job, attempt):
                self._end_attempt(job)
                self._give_up(job, reason)
        finally:
            if job.type not in self._joined:
                self._maybe_unused(job.type)

    def release(self, job: Job, attempt: int) -> None:
        """The slave holding this job went away: queue it again or give up."""
        try:
            current = self._slave_done(job, attempt)
        except AttemptGivenUp:
            current = False
        if current:
            self._end_attempt(job)
            self._retry(job, "slave disconnected during the job")
        if job.type not in self._joined:
            self._maybe_unused(job.type)

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
        if job.owner is None:
            self._end(job)
            self.totals["cancelled"] += 1
            return
        if job.retries >= self.max_retries:
            self._give_up(job, f"{why}; gave up after {job.retries + 1} attempts")
            return
        try:
            self._dispatch(job)
        except Exception:
            self.log.failure("Job {id} ({type}) could not be queued again",
                             id=quoted(job.id), type=quoted(job.type))
            self._give_up(job, f"{why}; it could not be queued again")
            return
        job.retries += 1
        self.totals["retried"] += 1

    def _give_up(self, job: Job, reason: str) -> None:
        owner = self._end(job)
        if owner is None:
            self.totals["cancelled"] += 1
            return
        self.totals["failed"] += 1
        self.log.warn("Job {id} ({type}) failed: {reason}", id=quoted(job.id),
                      type=quoted(job.type), reason=quoted(reason))
        self._contain(owner.job_failed, job, JobFailed(reason))

    def _end(self, job: Job) -> Optional[JobOwner]:
        """The job is over: forget it, and return the owner still to be told."""
        job.state = ENDED
        owner, job.owner = job.owner, None
        self._jobs.discard(job)
        return owner

    def _contain(self, call: Callable, *args) -> None:
        """Call an owner or a hook; log what it raises instead of letting
        it undo the scheduler's own bookkeeping half way."""
        try:
            call(*args)
        except Exception:
            self._contained(call)

    def _contained(self, call: Callable) -> None:
        """Log the exception ``call`` just raised."""
        self.log.failure("Error while reporting to {call!r}", call=call)

    # --- inspection and lifecycle -------------------------------------------

    def queued(self, job_type: str) -> int:
        """How many jobs of this type wait for a slave."""
        queue = self._queues.get(job_type)
        return len(queue) if queue else 0

    def idle_slaves(self, job_type: str) -> int:
        """How many slaves of this type wait for a job."""
        return len(self._idle.get(job_type, ()))

    def jobs(self) -> List[Job]:
        """The queued and running jobs, oldest first."""
        return sorted(self._jobs, key=lambda job: job.sequence)

    def __len__(self) -> int:
        """How many jobs are queued or running."""
        return len(self._jobs)

    def type_names(self) -> Set[str]:
        """The types with queued or running jobs, or idle or busy slaves."""
        return set(self._queues) | set(self._idle) | set(self._running) | set(self._busy)

    def types(self, limit: Optional[int] = None,
              names: Optional[Set[str]] = None) -> Dict[str, Dict[str, int]]:
        """Per type with any jobs or slaves: queued and running jobs, idle
        and busy slaves; only the ``limit`` busiest (most jobs queued and
        running) when a limit is given.  ``names``: `type_names`, if the
        caller has it already."""
        if names is None:
            names = self.type_names()
        if limit is not None and len(names) > limit:
            names = heapq.nlargest(limit, names, key=self._jobs_of_type)
        return {
            name: {
                "queued": self.queued(name),
                "running": self._running.get(name, 0),
                "idle_slaves": self.idle_slaves(name),
                "busy_slaves": self._busy.get(name, 0),
            }
            for name in sorted(names)
        }

    def _jobs_of_type(self, job_type: str) -> int:
        return self.queued(job_type) + self._running.get(job_type, 0)

    def stopService(self):
        """Fail every unfinished job with `ShuttingDown` and refuse new ones."""
        self._stopping = True
        jobs = self.jobs()
        self._queues.clear()
        for job in jobs:
            self._end_attempt(job)
            owner = self._end(job)
            self.totals["cancelled"] += 1
            if owner is not None:
                self._contain(owner.job_failed, job, ShuttingDown("the daemon is shutting down"))
        idle = [slave for waiters in self._idle.values() for slave in waiters]
        self._idle.clear()
        for slave in idle:
            self._contain(slave.cancel)
        return Service.stopService(self)
