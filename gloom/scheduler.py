"""Matching jobs to idle slaves.

The scheduler knows jobs, types, priorities and retries; it knows nothing
about sockets or JSON (a job's body is an opaque value it carries).  A
submitted job is a Deferred that fires with the answer body, or fails with
`JobFailed` or `ShuttingDown`.  An idle slave is a Deferred waiting for a
`Job`.  Cancelling either Deferred is how its owner goes away.

Every operation is O(log n) in queued jobs and O(1) in idle slaves: each
type has its own heap, cancelled queued jobs are deleted lazily (the heap is
compacted once they are the majority), and idle slaves wait in an
insertion-ordered dict per type.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

QUEUED = "queued"
RUNNING = "running"
ENDED = "ended"

# Compact a heap only when dead entries outnumber live ones and are this many.
_COMPACT_MINIMUM = 64


class DuplicateJobId(Exception):
    """A job with this id is already queued or running."""


class ShuttingDown(Exception):
    """The scheduler is stopping; the job will not run or be answered."""


class JobFailed(Exception):
    """The job ended without an answer: the slave failed it or retries ran out."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Job:
    """One submitted job and where it is in its life."""

    __slots__ = (
        "id",
        "type",
        "body",
        "priority",
        "sequence",
        "retries",
        "state",
        "deferred",
    )

    def __init__(self, job_id: str, job_type: str, body: Any, priority: int, sequence: int):
        self.id = job_id
        self.type = job_type
        self.body = body
        self.priority = priority
        self.sequence = sequence
        self.retries = 0
        self.state = QUEUED
        self.deferred: Optional[Deferred] = None

    def __repr__(self) -> str:
        return f"<Job {self.id!r} type={self.type!r} priority={self.priority} {self.state}>"


class _JobQueue:
    """A max-priority, oldest-first heap of one type's queued jobs."""

    __slots__ = ("heap", "dead")

    def __init__(self) -> None:
        self.heap: List[Tuple[int, int, Job]] = []
        self.dead = 0

    def __len__(self) -> int:
        return len(self.heap) - self.dead

    def push(self, job: Job) -> None:
        heapq.heappush(self.heap, (-job.priority, job.sequence, job))

    def pop(self) -> Optional[Job]:
        heap = self.heap
        while heap:
            job = heapq.heappop(heap)[2]
            if job.state is QUEUED:
                return job
            self.dead -= 1
        return None

    def discard(self) -> None:
        """Note that one queued job left; compact once most entries are dead."""
        self.dead += 1
        if self.dead >= _COMPACT_MINIMUM and self.dead * 2 > len(self.heap):
            self.heap = [entry for entry in self.heap if entry[2].state is QUEUED]
            heapq.heapify(self.heap)
            self.dead = 0


class Scheduler(Service):
    """Queues jobs per type by priority and hands them to idle slaves."""

    name = "scheduler"
    log = Logger()

    def __init__(self, max_retries: int = 3):
        self.max_retries = max_retries
        self._jobs: Dict[str, Job] = {}
        self._queues: Dict[str, _JobQueue] = {}
        self._idle: Dict[str, OrderedDict] = {}
        self._sequence = itertools.count()
        self._stopping = False

    # --- masters ----------------------------------------------------------

    def submit(self, job_id: str, job_type: str, body: Any, priority: int = 0) -> Deferred:
        """Queue a job; the Deferred fires with its answer body.

        Raises `DuplicateJobId` when the id is queued or running, and
        `ShuttingDown` once the scheduler is stopping.  Cancelling the
        Deferred withdraws a queued job; a running job then finishes and its
        answer is dropped.
        """
        if self._stopping:
            raise ShuttingDown("the daemon is shutting down")
        if job_id in self._jobs:
            raise DuplicateJobId(job_id)
        job = Job(job_id, job_type, body, priority, next(self._sequence))
        job.deferred = Deferred(lambda d: self._withdraw(job))
        self._jobs[job_id] = job
        self._dispatch(job)
        return job.deferred

    def _dispatch(self, job: Job) -> None:
        waiters = self._idle.get(job.type)
        if waiters:
            slave, _ = waiters.popitem(last=False)
            if not waiters:
                del self._idle[job.type]
            job.state = RUNNING
            slave.callback(job)
            return
        job.state = QUEUED
        queue = self._queues.get(job.type)
        if queue is None:
            queue = self._queues[job.type] = _JobQueue()
        queue.push(job)

    def _withdraw(self, job: Job) -> None:
        """The master went away: drop a queued job, let a running one finish."""
        if job.state is QUEUED:
            self._end(job)
            queue = self._queues[job.type]
            queue.discard()
            if not queue:
                del self._queues[job.type]

    # --- slaves -----------------------------------------------------------

    def next_job(self, job_type: str) -> Deferred:
        """A Deferred that fires with the next job of this type for a slave.

        Idle slaves are served first come, first served.  Cancelling the
        Deferred takes the slave out of the idle set.
        """
        queue = self._queues.get(job_type)
        if queue:
            job = queue.pop()
            if not queue:
                del self._queues[job_type]
            job.state = RUNNING
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

    def complete(self, job: Job, body: Any) -> None:
        """The slave answered: deliver the body to the master, if still there."""
        self._end(job)
        if not job.deferred.called:
            job.deferred.callback(body)

    def fail(self, job: Job, reason: str) -> None:
        """The slave ran the job and it failed: tell the master, no retry."""
        self._end(job)
        self.log.warn("Job {id!r} ({type}) failed: {reason}", id=job.id, type=job.type, reason=reason)
        if not job.deferred.called:
            job.deferred.errback(JobFailed(reason))

    def release(self, job: Job) -> None:
        """The slave holding this job went away: queue it again or give up."""
        job.retries += 1
        if job.deferred.called or self._stopping:
            self._end(job)
            return
        if job.retries > self.max_retries:
            attempts = job.retries
            self.fail(job, f"slave disconnected during the job; gave up after {attempts} attempts")
            return
        self._dispatch(job)

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

    def stopService(self):
        """Fail every unfinished job with `ShuttingDown` and refuse new ones."""
        self._stopping = True
        jobs = list(self._jobs.values())
        self._jobs.clear()
        self._queues.clear()
        for job in jobs:
            job.state = ENDED
            if not job.deferred.called:
                job.deferred.errback(ShuttingDown("the daemon is shutting down"))
        idle = [slave for waiters in self._idle.values() for slave in waiters]
        self._idle.clear()
        for slave in idle:
            slave.cancel()
        return Service.stopService(self)
