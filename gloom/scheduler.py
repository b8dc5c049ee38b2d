"""Matching jobs to idle slaves.

The scheduler knows jobs, types, priorities, retries and timeouts; it knows
nothing about sockets or JSON (a job's body is an opaque value it carries).
The scheduler tells both sides what happens with one method call each:
jobs come from an `IJobOwner` (a master's connection), which hears how each
one ended and withdraws it with `Scheduler.cancel`; slaves are `ISlave`
providers, which ask for work with `Scheduler.want_job` and are handed each
job through `ISlave.job_assigned`.  A slave that asks while no job is
queued is idle: it waits on a Deferred, which fires with its job when one
is submitted, and which `Scheduler.stop_waiting` cancels.  A queued job
costs a few hundred bytes, which is why it carries no Deferred and callback
chain of its own, and a slave handed a queued job at once needs no Deferred
either.

Submitting, taking and withdrawing a job cost O(log p), p being the number
of distinct priorities queued for the type: each type keeps a first-in,
first-out queue per priority and a heap of those priorities; cancelled
queued jobs are deleted lazily (the queues are compacted, in time
proportional to their length, once they are the majority, which amortises
to O(1) per withdrawal); idle slaves wait in an insertion-ordered dict per
type; and every count the stats report is kept up to date rather than
counted on demand.  A job coming back after a lost attempt goes ahead of
the younger jobs of its priority, found by a scan from the front of that
priority's queue (short in practice: most of the queue is younger); a job
a slave hands back unrun (`Scheduler.hand_back`) goes to the very front of
its priority's queue, in O(1).

A job that may not run yet (submitted with a later start, or waiting out
the backoff of a retry) is delayed: it waits in one heap of delayed jobs,
ordered by when each may run, held as itself (a heap slot, like a queue
slot), with one timer for the whole heap, set for the earliest; delaying,
waking and withdrawing a job cost O(log n).  How a job is retried is its
`RetryPolicy`: most jobs have none and follow the scheduler's defaults.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import Counter, OrderedDict, deque
from typing import Any, Callable, Dict, List, Optional, Set, Union

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import Attribute, Interface

from gloom.quoting import quoted

QUEUED = "queued"
RUNNING = "running"
DELAYED = "delayed"
ENDED = "ended"

# Compact a type's queue only when withdrawn entries outnumber live ones and
# are at least this many.
_COMPACT_MINIMUM = 64

TOTALS = ("submitted", "completed", "failed", "cancelled", "retried", "timed_out", "released",
          "delayed", "coalesced", "progress", "touched", "cleared")

DEFAULT_BACKOFF = 1.0
"""Seconds before the first retry of a job that backs off."""

DEFAULT_BACKOFF_MAX = 300.0
"""Most seconds any retry of a job that backs off waits."""


class ShuttingDown(Exception):
    """The scheduler is stopping; the job will not run or be answered."""


class JobFailed(Exception):
    """The job ended without an answer: the slave failed it or retries ran out."""

    def __init__(self, reason: str):
        """
        :param reason: why, for the job's owner.
        """
        super().__init__(reason)
        self.reason = reason


class Cleared(JobFailed):
    """An administrator cleared the job's type while the job was queued or
    delayed."""


class AttemptGivenUp(Exception):
    """A slave answered an attempt that had already run past its timeout."""


class JobWithdrawn(Exception):
    """A slave reported progress on a job no submitter wants any more (it
    was cancelled, or the daemon ended it while stopping)."""


class ScheduledJob:
    """One submitted job and where it is in its life.

    ``attempt`` counts the times the job was handed to a slave and not
    handed back unrun, and ``holder`` is the slave running the current
    attempt: an attempt given up (it timed out) has no holder, so its
    slave's late answer is recognised.  ``owner`` is told how the job ended; it is None once the
    job ended or was withdrawn.
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
        "holder",
        "run_at",
        "policy",
        "progress",
        "unique",
    )

    def __init__(self, owner: Optional["IJobOwner"], job_id: str, job_type: str, body: Any,
                 priority: int, sequence: int, timeout: Optional[float], submitted_at: float):
        """
        :param owner: who hears how the job ends.
        :param job_id: the owner's name for the job (for logs and errors).
        :param job_type: the type of slave that runs it.
        :param body: what the slave is handed; opaque to the scheduler.
        :param priority: higher runs first.
        :param sequence: the submission order, among jobs of one priority.
        :param timeout: seconds one attempt may run, or None for no limit.
        :param submitted_at: the clock's time at submission.
        """
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
        self.holder = None
        self.run_at = 0.0
        self.policy: Optional[RetryPolicy] = None
        self.progress: Optional[bytes] = None
        self.unique: Optional[Submitters] = None

    def __lt__(self, other: "ScheduledJob") -> bool:
        """Delayed jobs are ordered by when they may run, then by age."""
        return (self.run_at, self.sequence) < (other.run_at, other.sequence)

    def __repr__(self) -> str:
        return f"<ScheduledJob {self.id!r} type={self.type!r} priority={self.priority} {self.state}>"


class Attachment:
    """One submitter of a unique job: who it is, its own id for the job,
    and the job (`ScheduledJob`) every submitter of the type and key shares.
    It is what `Scheduler.submit` returns for a unique job, and what the
    submitter's `IJobOwner` methods are called with (``id`` is then the
    submitter's own)."""

    __slots__ = ("owner", "id", "job", "coalesced")

    def __init__(self, owner: Optional["IJobOwner"], job_id: str, job: "ScheduledJob",
                 coalesced: bool):
        """
        :param owner: the submitter, told how the job ends.
        :param job_id: the submitter's id for the job.
        :param job: the shared job.
        :param coalesced: whether the submit joined a job already there.
        """
        self.owner = owner
        self.id = job_id
        self.job = job
        self.coalesced = coalesced

    @property
    def type(self) -> str:
        """The shared job's type."""
        return self.job.type

    def __repr__(self) -> str:
        return f"<Attachment {self.id!r} to {self.job!r}>"


class Submitters:
    """The submitters of one unique job, in the order they came: the job's
    owner, which tells each of them what the job's owner hears.  Adding and
    removing a submitter costs O(1).

    Telling every submitter of a progress report costs O(submitters).  A
    job with more than `FAN_OUT_AT_ONCE` submitters passes on at most one
    report per turn of the reactor, the latest (and the last one before
    the job's end), so that a slave reporting fast on a job many wait for
    costs O(submitters) per turn, not per report.
    """

    FAN_OUT_AT_ONCE = 64

    __slots__ = ("key", "attached", "contain", "later", "pending")

    def __init__(self, key: str, contain: Callable, later: Callable):
        """
        :param key: the job's unique key.
        :param contain: calls a submitter's method, logging what it raises.
        :param later: ``later(0, f, *args)`` calls ``f(*args)`` at the end
            of the reactor's turn (a clock's ``callLater``).
        """
        self.key = key
        self.attached: Dict[Attachment, None] = {}
        self.contain = contain
        self.later = later
        self.pending: Any = None

    def _ended(self, job: "ScheduledJob") -> List[Attachment]:
        if self.pending is not None:
            self._pass_on(job)  # the last report goes before the end
        attached, self.attached = list(self.attached), {}
        return attached

    def job_answered(self, job: "ScheduledJob", body: Any) -> None:
        """Every submitter gets the answer, under its own id."""
        for attachment in self._ended(job):
            owner, attachment.owner = attachment.owner, None
            self.contain(owner.job_answered, attachment, body)

    def job_failed(self, job: "ScheduledJob", error: Exception) -> None:
        """Every submitter hears how the job failed, under its own id."""
        for attachment in self._ended(job):
            owner, attachment.owner = attachment.owner, None
            self.contain(owner.job_failed, attachment, error)

    def job_progress(self, job: "ScheduledJob", report: Any) -> None:
        """Every submitter gets the progress, under its own id: at once,
        or at the end of the turn when there are many."""
        if len(self.attached) <= self.FAN_OUT_AT_ONCE:
            for attachment in list(self.attached):
                self.contain(attachment.owner.job_progress, attachment, report)
            return
        if self.pending is None:
            self.later(0, self._pass_on, job)
        self.pending = report

    def _pass_on(self, job: "ScheduledJob") -> None:
        report, self.pending = self.pending, None
        if report is None:
            return
        for attachment in list(self.attached):
            self.contain(attachment.owner.job_progress, attachment, report)


class RetryPolicy:
    """How one job is retried, when not as the scheduler's defaults say.

    Policies are shared: `RetryPolicy.of` returns one object per distinct
    policy, so a job pays for a reference, not a policy of its own.
    """

    __slots__ = ("retries", "backoff", "retry_failures", "observer")

    _known: Dict[tuple, "RetryPolicy"] = {}

    def __init__(self, retries: Optional[int], backoff: bool, retry_failures: bool,
                 observer: Any):
        """
        :param retries: times the job may be queued again after a lost
            attempt; the scheduler's ``max_retries`` if None.
        :param backoff: whether a retry waits, longer each time, rather
            than queueing at once.
        :param retry_failures: whether a slave's ``fail`` is retried like a
            lost attempt, rather than ending the job.
        :param observer: told through ``job_started(job)`` and
            ``job_waiting(job)`` when an attempt starts and when the job is
            queued or delayed again (for a journal); or None.
        """
        self.retries = retries
        self.backoff = backoff
        self.retry_failures = retry_failures
        self.observer = observer

    @classmethod
    def of(cls, retries: Optional[int] = None, backoff: bool = False,
           retry_failures: bool = False, observer: Any = None) -> Optional["RetryPolicy"]:
        """The shared policy with these settings; None for the default one."""
        if retries is None and not backoff and not retry_failures and observer is None:
            return None
        key = (retries, backoff, retry_failures, id(observer))
        policy = cls._known.get(key)
        if policy is None or policy.observer is not observer:
            policy = cls._known[key] = cls(retries, backoff, retry_failures, observer)
        return policy


class IJobOwner(Interface):
    """Who submitted a job and hears how it ended: exactly one of these is
    called, once, unless the owner withdrew the job first.  They must not
    raise: they run inside a slave's report or the scheduler's timer."""

    def job_answered(job, body):
        """A slave answered the job.

        :param job: the `ScheduledJob`.
        :param body: the answer, as the slave's connection gave it.
        """

    def job_failed(job, error):
        """The job ended without an answer.

        :param job: the `ScheduledJob`.
        :param error: a `JobFailed` (the slave failed it, or its attempts
            ran out; a `Cleared` if an administrator cleared its type) or
            `ShuttingDown`.
        """

    def job_progress(job, report):
        """The job's slave reported progress; more may follow, then the end.

        :param job: the `ScheduledJob` (or the owner's `Attachment`).
        :param report: the progress, as the slave's connection gave it.
        """


class ISlave(Interface):
    """A slave as the scheduler sees it: it joins one type at a time, asks
    for work with `Scheduler.want_job`, and reports on each job it holds
    with `Scheduler.complete`, `Scheduler.fail`, `Scheduler.hand_back` or
    `Scheduler.release`."""

    peer = Attribute("Where the slave connects from, for log lines.")

    def job_assigned(job):
        """Run this job (the answer to `Scheduler.want_job`).  Must not raise.

        :param job: the `ScheduledJob`; the slave holds it until it reports.
        """


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
        self.levels: Dict[int, Union[ScheduledJob, deque]] = {}
        self.keys: List[int] = []
        self.entries = 0
        self.dead = 0

    def __len__(self) -> int:
        return self.entries - self.dead

    def push(self, job: ScheduledJob) -> None:
        """Queue ``job`` behind the older jobs of its priority.  A job coming
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

    def push_front(self, job: ScheduledJob) -> None:
        """Queue ``job`` ahead of every job of its priority, in O(1) (or
        O(log p) when its priority is new): a job handed back unrun."""
        self.entries += 1
        key = -job.priority
        level = self.levels.get(key)
        if level is None:
            self.levels[key] = job
            heapq.heappush(self.keys, key)
        elif type(level) is deque:
            level.appendleft(job)
        else:
            self.levels[key] = deque((job, level))

    def pop(self) -> Optional[ScheduledJob]:
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
        levels: Dict[int, Union[ScheduledJob, deque]] = {}
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


def _stopped_waiting(failure):
    """An idle slave's wait was cancelled: it gets no job, and is not told."""
    failure.trap(CancelledError)


def _decrement(counter: Counter, key: str) -> None:
    """Count one down, forgetting the key at zero so old types do not pile up."""
    counter[key] -= 1
    if not counter[key]:
        del counter[key]


class Scheduler(Service):
    """Queues jobs per type by priority and hands them to idle slaves.

    Job ids mean nothing here: a job is its `ScheduledJob`, and each owner
    keeps its own ids (two masters may use the same id at once).  Every
    operation either completes or, if a step fails, leaves the scheduler as
    it was; what an owner or a hook raises is logged and contained.
    """

    name = "scheduler"
    log = Logger()

    def __init__(self, max_retries: int = 3, clock: Optional[IReactorTime] = None,
                 default_timeout: Optional[float] = None, backoff: float = DEFAULT_BACKOFF,
                 backoff_max: float = DEFAULT_BACKOFF_MAX,
                 jitter: Callable[[], float] = random.random):
        """
        :param max_retries: how many times a job whose attempt was lost
            (its slave went away or it timed out) is queued again.
        :param clock: times attempts and answers; the global reactor if None.
        :param default_timeout: seconds an attempt may run when the job
            names no timeout of its own, or None for no limit.
        :param backoff: seconds the first retry of a job that backs off waits.
        :param backoff_max: most seconds any retry waits.
        :param jitter: returns a number in [0, 1) that spreads retries out.
        """
        if clock is None:
            from twisted.internet import reactor as clock
        self.max_retries = max_retries
        self.clock = clock
        self.default_timeout = default_timeout
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.jitter = jitter
        self.on_answer: Optional[Callable[[str, float], None]] = None
        """Called, if set, with a job's type and the seconds from its
        submission to its answer."""
        self.on_failure: Optional[Callable[[str], None]] = None
        """Called, if set, with a job's type when the job ends failed."""
        self.on_type_unused: Optional[Callable[[str], None]] = None
        """Called, if set, with a type that no longer has queued or running
        jobs nor joined slaves."""
        self.totals = dict.fromkeys(TOTALS, 0)
        self._jobs: Set[ScheduledJob] = set()
        self._serving: Dict[ISlave, str] = {}
        self._joined: Counter = Counter()
        self._queues: Dict[str, _JobQueue] = {}
        self._idle: Dict[str, OrderedDict] = {}
        self._running: Counter = Counter()
        self._busy: Counter = Counter()
        self._sequence = itertools.count()
        self._stopping = False
        self._delayed: List[ScheduledJob] = []  # a heap, with withdrawn entries
        self._delayed_of_type: Counter = Counter()
        self._delayed_withdrawn = 0
        self._wake_call = None
        self._last_run_at = 0.0
        self._unique: Dict[tuple, ScheduledJob] = {}
        self.paused: Set[str] = set()
        """The paused types: their jobs are queued, and none is handed out."""
        self._drained: Optional[Deferred] = None
        self._drain_check = None
        self.draining = False
        """Whether `drain` was called."""

    # --- masters ----------------------------------------------------------

    def submit(self, owner: IJobOwner, job_id: str, job_type: str, body: Any, priority: int = 0,
               timeout: Optional[float] = None, run_at: Optional[float] = None,
               policy: Optional[RetryPolicy] = None, sequence: Optional[int] = None,
               unique: Optional[str] = None) -> Union[ScheduledJob, Attachment]:
        """Queue a job, or hand it to an idle slave at once, or (with a
        ``run_at`` still to come) delay it until then.  With a ``unique``
        key, while a job of the same type and key is queued, delayed or
        running, the owner attaches to that job instead (its other
        arguments are then unused).

        :param owner: hears how the job ends.
        :param job_id: the owner's name for the job.
        :param job_type: the type of slave that runs it.
        :param body: what the slave is handed.
        :param priority: higher runs first; equal priorities run oldest first.
        :param timeout: seconds one attempt may run; ``default_timeout`` if None.
        :param run_at: the clock's time from which the job may run; now if None.
        :param policy: how the job is retried; the scheduler's defaults if None.
        :param sequence: its place among jobs of its priority, from
            `next_sequence`; the next one if None.
        :param unique: the key under which submits of this type share one job.
        :returns: the job, for `cancel`; for a unique job, the owner's
            `Attachment` to it.
        :raises ShuttingDown: once the scheduler is stopping.  If handing
            the job out fails, nothing has changed.
        """
        if self._stopping:
            raise ShuttingDown("the daemon is shutting down")
        if unique is not None:
            return self._submit_unique(owner, job_id, job_type, body, priority, timeout, run_at,
                                       policy, sequence, unique)
        if timeout is None:
            timeout = self.default_timeout
        if sequence is None:
            sequence = next(self._sequence)
        job = ScheduledJob(owner, job_id, job_type, body, priority, sequence, timeout,
                           self.clock.seconds())
        job.policy = policy
        self._jobs.add(job)
        self.totals["submitted"] += 1
        try:
            if run_at is not None and run_at > job.submitted_at:
                self._delay(job, run_at)
                # Its latency counts from when its time comes, and the one
                # float serves both.
                job.submitted_at = job.run_at
            else:
                self._dispatch(job)
        except BaseException:
            self._jobs.discard(job)
            self.totals["submitted"] -= 1
            job.state = ENDED
            raise
        return job

    def _submit_unique(self, owner, job_id, job_type, body, priority, timeout, run_at, policy,
                       sequence, key) -> Attachment:
        job = self._unique.get((job_type, key))
        if job is not None:
            attachment = Attachment(owner, job_id, job, True)
            job.unique.attached[attachment] = None
            self.totals["coalesced"] += 1
            return attachment
        submitters = Submitters(key, self._contain, self.clock.callLater)
        job = self.submit(submitters, job_id, job_type, body, priority, timeout, run_at, policy,
                          sequence)
        attachment = Attachment(owner, job_id, job, False)
        submitters.attached[attachment] = None
        job.unique = submitters
        self._unique[(job_type, key)] = job
        return attachment

    def _detach(self, attachment: Attachment) -> None:
        """A submitter of a unique job withdraws: the job is cancelled once
        none is left."""
        attachment.owner = None
        job = attachment.job
        submitters = job.unique
        if submitters is None or attachment not in submitters.attached:
            return
        del submitters.attached[attachment]
        if not submitters.attached:
            self._forget_unique(job)
            self.cancel(job)

    def _forget_unique(self, job: ScheduledJob) -> None:
        key = (job.type, job.unique.key)
        if self._unique.get(key) is job:
            del self._unique[key]

    @property
    def stopping(self) -> bool:
        """Whether the scheduler is stopping (and takes no new jobs)."""
        return self._stopping

    def next_sequence(self) -> int:
        """Take the next submission number, for a job submitted later."""
        return next(self._sequence)

    def sequence_from(self, first: int) -> None:
        """Number submissions from ``first`` on (after a journal's jobs)."""
        self._sequence = itertools.count(first)

    def cancel(self, job: ScheduledJob) -> None:
        """The owner withdraws the job (or went away): a queued job leaves
        the queue at once; a running one finishes or times out, and how it
        ended is dropped.  The owner hears nothing more about it.

        :param job: what `submit` returned.
        """
        if type(job) is Attachment:
            self._detach(job)
            return
        job.owner = None
        if job.state is QUEUED:
            self._end(job)
            queue = self._queues[job.type]
            queue.discard()
            if not queue:
                del self._queues[job.type]
                self._maybe_unused(job.type)
        elif job.state is DELAYED:
            self._end(job)
            self._undelay(job)
            self._maybe_unused(job.type)

    # --- delayed jobs -----------------------------------------------------

    def _delay(self, job: ScheduledJob, run_at: float) -> None:
        """Hold the job until ``run_at`` (the clock's time), rounded up to
        the millisecond: jobs delayed to the same millisecond, one after
        the other, share one float, so a delayed job costs no more than a
        queued one."""
        run_at = math.ceil(run_at * 1000) / 1000
        if run_at == self._last_run_at:
            run_at = self._last_run_at
        else:
            self._last_run_at = run_at
        job.state = DELAYED
        job.run_at = run_at
        heapq.heappush(self._delayed, job)
        self._delayed_of_type[job.type] += 1
        self.totals["delayed"] += 1
        call = self._wake_call
        if call is None or run_at < call.getTime():
            self._set_wake()

    def _undelay(self, job: ScheduledJob) -> None:
        """A delayed job left early: its heap entry is now withdrawn,
        removed when it reaches the top, or when most entries are withdrawn."""
        _decrement(self._delayed_of_type, job.type)
        self._delayed_withdrawn += 1
        withdrawn, heap = self._delayed_withdrawn, self._delayed
        if withdrawn >= _COMPACT_MINIMUM and withdrawn * 2 > len(heap):
            self._delayed = [entry for entry in heap if entry.state is DELAYED]
            heapq.heapify(self._delayed)
            self._delayed_withdrawn = 0
            self._set_wake()

    def _set_wake(self) -> None:
        """Set the one timer of the delayed jobs for the earliest of them."""
        heap = self._delayed
        while heap and heap[0].state is not DELAYED:
            heapq.heappop(heap)
            self._delayed_withdrawn -= 1
        call, self._wake_call = self._wake_call, None
        if call is not None and call.active():
            call.cancel()
        if heap and not self._stopping:
            wait = max(0.0, heap[0].run_at - self.clock.seconds())
            self._wake_call = self.clock.callLater(wait, self._wake)

    def _wake(self) -> None:
        """Queue (or hand out) every delayed job whose time has come."""
        self._wake_call = None
        heap, now = self._delayed, self.clock.seconds()
        while heap and heap[0].run_at <= now:
            job = heapq.heappop(heap)
            if job.state is not DELAYED:
                self._delayed_withdrawn -= 1
                continue
            _decrement(self._delayed_of_type, job.type)
            try:
                self._dispatch(job)
            except Exception:
                self.log.failure("Delayed job {id} ({type}) could not be queued",
                                 id=quoted(job.id), type=quoted(job.type))
                self._fail(job, "it could not be queued when its delay ended")
        self._set_wake()
        if self._drained is not None:
            self._drain_changed()

    def delayed(self, job_type: Optional[str] = None) -> int:
        """How many jobs (of ``job_type``, or of every type) are delayed."""
        if job_type is None:
            return len(self._delayed) - self._delayed_withdrawn
        return self._delayed_of_type.get(job_type, 0)

    def backoff_delay(self, retries: int) -> float:
        """Seconds the retry after ``retries`` earlier retries waits: the
        backoff doubled for each (up to ``backoff_max``), of which a random
        half is taken off so that jobs lost together spread out."""
        wait = min(self.backoff_max, self.backoff * 2.0 ** min(retries, 64))
        return wait / 2 + wait / 2 * self.jitter()

    def _observe_waiting(self, job: ScheduledJob) -> None:
        policy = job.policy
        if policy is not None and policy.observer is not None:
            self._contain(policy.observer.job_waiting, job)

    def _dispatch(self, job: ScheduledJob, front: bool = False) -> None:
        """Hand the job to the longest-idle slave of its type, or queue it
        (with ``front``, ahead of every job of its priority).  If starting
        the attempt fails, the slave stays idle."""
        waiters = self._idle.get(job.type)
        if waiters and job.type not in self.paused:
            slave, waiting = next(iter(waiters.items()))
            self._start(job, slave)
            del waiters[slave]
            if not waiters:
                del self._idle[job.type]
            waiting.callback(job)
            return
        job.state = QUEUED
        queue = self._queues.get(job.type)
        if queue is None:
            queue = self._queues[job.type] = _JobQueue()
        if front:
            queue.push_front(job)
        else:
            queue.push(job)

    def _start(self, job: ScheduledJob, slave: ISlave) -> None:
        """Hand a job to a slave: a new attempt, timed if the job has a
        timeout.  The timer is made first, so a clock that refuses it
        leaves everything as it was."""
        if job.timeout is not None:
            job.timer = self.clock.callLater(job.timeout, self._timed_out, job)
        job.state = RUNNING
        job.attempt += 1
        job.holder = slave
        self._running[job.type] += 1
        self._busy[job.type] += 1
        policy = job.policy
        if policy is not None and policy.observer is not None:
            self._contain(policy.observer.job_started, job)

    # --- slaves -----------------------------------------------------------

    def join(self, slave: ISlave, job_type: str) -> None:
        """The slave serves ``job_type`` from now on, and no longer the type
        it served before (if it was waiting for a job of that type, it no
        longer is).  It asks for work with `want_job`.

        :param slave: the slave.
        :param job_type: the type of jobs it runs.
        """
        served = self._serving.get(slave)
        if served == job_type:
            return
        if served is not None:
            self.stop_waiting(slave)
        self._serving[slave] = job_type
        self._joined[job_type] += 1
        if served is not None:
            self._stop_serving(served)

    def leave(self, slave: ISlave) -> None:
        """The slave serves no type any more (it went away): it stops
        waiting for a job.  It must have reported on the job it held first.

        :param slave: a slave that joined a type, or did not.
        """
        self.stop_waiting(slave)
        served = self._serving.pop(slave, None)
        if served is not None:
            self._stop_serving(served)

    def _stop_serving(self, job_type: str) -> None:
        _decrement(self._joined, job_type)
        self._maybe_unused(job_type)

    def want_job(self, slave: ISlave) -> None:
        """The slave wants its next job, of the type it joined: it is handed
        one through ``slave.job_assigned``, at once if one is queued.
        Otherwise it waits, idle (idle slaves are served first come, first
        served), until a job comes or it calls `stop_waiting`.

        :param slave: a slave that joined a type and holds no job.
        """
        job_type = self._serving[slave]
        queue = self._queues.get(job_type)
        if queue is not None and job_type not in self.paused:
            job = queue.pop()
            if job is not None:
                try:
                    self._start(job, slave)
                except BaseException:
                    queue.push_front(job)
                    raise
            if queue.entries == queue.dead:  # empty: no job, or only withdrawn ones
                del self._queues[job_type]
            if job is not None:
                self._hand_over(job, slave)
                return
        if self._stopping:
            return
        waiting = Deferred(lambda _: self._forget_idle(job_type, slave))
        waiting.addCallbacks(self._hand_over, _stopped_waiting, callbackArgs=(slave,))
        self._idle.setdefault(job_type, OrderedDict())[slave] = waiting

    def _hand_over(self, job: ScheduledJob, slave: ISlave) -> None:
        """Tell the slave its job.  If that fails (``job_assigned`` must not
        raise), the slave is taken not to hold it, and the job is retried."""
        try:
            slave.job_assigned(job)
        except Exception:
            self.log.failure("Slave {peer} could not take job {id} ({type})",
                             peer=getattr(slave, "peer", slave), id=quoted(job.id),
                             type=quoted(job.type))
            self.release(slave, job)

    def stop_waiting(self, slave: ISlave) -> None:
        """The slave no longer wants a job: it leaves the idle set, if it
        was in it (its wait is cancelled).

        :param slave: a slave that called `want_job`, or did not.
        """
        waiters = self._idle.get(self._serving.get(slave))
        if waiters is not None:
            waiting = waiters.get(slave)
            if waiting is not None:
                waiting.cancel()

    def _forget_idle(self, job_type: str, slave: ISlave) -> None:
        waiters = self._idle.get(job_type)
        if waiters is not None:
            waiters.pop(slave, None)
            if not waiters:
                del self._idle[job_type]

    def complete(self, slave: ISlave, job: ScheduledJob, body: Any) -> None:
        """The slave answered the job it holds: deliver the body to the
        job's owner, if it is still there.

        :param slave: the slave that was handed the job.
        :param job: the job it answers.
        :param body: the answer, handed to the owner as it is.
        :raises AttemptGivenUp: when the slave's attempt had already timed
            out; the answer is then dropped and the slave is free all the same.
        """
        try:
            if not self._attempt_over(slave, job):
                return
            owner = self._end(job)
            if owner is None:
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

    def fail(self, slave: ISlave, job: ScheduledJob, reason: str) -> None:
        """The slave ran the job and it failed: tell the owner, no retry.

        :param slave: the slave that was handed the job.
        :param job: the job it failed.
        :param reason: why, in the slave's words.
        :raises AttemptGivenUp: like `complete`.
        """
        try:
            if self._attempt_over(slave, job):
                policy = job.policy
                if policy is not None and policy.retry_failures:
                    self._retry(job, f"its slave failed it: {reason}")
                else:
                    self._fail(job, reason)
        finally:
            if job.type not in self._joined:
                self._maybe_unused(job.type)

    def hand_back(self, slave: ISlave, job: ScheduledJob) -> None:
        """The slave hands the job it holds back unrun: it goes to the front
        of its queue (or to an idle slave) with its priority, and neither
        an attempt nor a retry is counted; its timer is cancelled.  A job
        whose owner withdrew it ends instead.

        :param slave: the slave that was handed the job.
        :param job: the job it hands back.
        :raises AttemptGivenUp: like `complete`; the job was already retried.
        """
        try:
            if not self._attempt_over(slave, job):
                return
            job.attempt -= 1
            if job.owner is None:
                self._end(job)
                return
            try:
                self._dispatch(job, front=True)
            except Exception:
                self.log.failure("Job {id} ({type}) could not be queued again",
                                 id=quoted(job.id), type=quoted(job.type))
                self._fail(job, "its slave handed it back and it could not be queued again")
                return
            self.totals["released"] += 1
            if self._drained is not None:
                self._drain_changed()
        finally:
            if job.type not in self._joined:
                self._maybe_unused(job.type)

    def release(self, slave: ISlave, job: ScheduledJob) -> None:
        """The slave went away holding the job: queue it again or give up.

        :param slave: the slave that was handed the job.
        :param job: the job it held.
        """
        try:
            current = self._attempt_over(slave, job)
        except AttemptGivenUp:
            current = False
        if current:
            self._retry(job, "slave disconnected during the job")
        if job.type not in self._joined:
            self._maybe_unused(job.type)

    def progress(self, slave: ISlave, job: ScheduledJob, report: Any) -> None:
        """The slave reports progress on the job it holds: its owner hears
        of it, the job keeps it as its latest (for status), and the
        attempt's timeout starts again, as with `touch`.

        :param slave: the slave that was handed the job.
        :param job: the job it reports on.
        :param report: the progress, handed to the owner as it is.
        :raises AttemptGivenUp: when the attempt had already timed out.
        :raises JobWithdrawn: when no submitter wants the job any more.
        """
        owner = self._held(slave, job)
        job.progress = report
        self.totals["progress"] += 1
        try:
            owner.job_progress(job, report)
        except Exception:
            self._contained(owner.job_progress)

    def touch(self, slave: ISlave, job: ScheduledJob) -> None:
        """The slave says the job it holds is still being worked on: the
        attempt's timeout starts again from now.

        :param slave: the slave that was handed the job.
        :param job: the job it holds.
        :raises AttemptGivenUp: when the attempt had already timed out.
        :raises JobWithdrawn: when no submitter wants the job any more.
        """
        self._held(slave, job)
        self.totals["touched"] += 1

    def _held(self, slave: ISlave, job: ScheduledJob) -> IJobOwner:
        """Check the slave's attempt at the job still stands, and restart
        its timeout; return the job's owner."""
        if job.holder is not slave:
            raise AttemptGivenUp(job.id)
        owner = job.owner
        if owner is None or job.state is not RUNNING:
            raise JobWithdrawn(job.id)
        timer = job.timer
        if timer is not None:
            timer.reset(job.timeout)
        return owner

    def _attempt_over(self, slave: ISlave, job: ScheduledJob) -> bool:
        """The slave no longer holds the job: end its attempt.

        :returns: whether the job is still running, to be ended or retried
            by the caller (False once the scheduler ended it, as on stop).
        :raises AttemptGivenUp: if the attempt was given up before.
        """
        _decrement(self._busy, job.type)
        if job.holder is not slave:
            raise AttemptGivenUp(job.id)
        job.holder = None
        if job.state is not RUNNING:
            return False
        self._end_attempt(job)
        return True

    def _end_attempt(self, job: ScheduledJob) -> None:
        """A running job's attempt is over: it is no longer counted as
        running, and its timer is cancelled."""
        _decrement(self._running, job.type)
        if job.timer is not None:
            if job.timer.active():
                job.timer.cancel()
            job.timer = None

    def _timed_out(self, job: ScheduledJob) -> None:
        """An attempt ran too long: give it up (its slave stays busy until it
        answers) and retry the job elsewhere."""
        job.timer = None
        self._end_attempt(job)
        slave, job.holder = job.holder, None
        self.totals["timed_out"] += 1
        self.log.info("Job {id} ({type}) ran past its timeout of {timeout:g} s on slave {peer}",
                      id=quoted(job.id), type=quoted(job.type), timeout=job.timeout,
                      peer=getattr(slave, "peer", slave))
        self._retry(job, f"timeout: no answer within {job.timeout:g} s")

    def _retry(self, job: ScheduledJob, why: str) -> None:
        """An attempt was lost: queue the job again, or fail it for good."""
        if job.owner is None:
            self._end(job)
            return
        policy = job.policy
        limit = self.max_retries if policy is None or policy.retries is None else policy.retries
        if job.retries >= limit:
            self._fail(job, f"{why}; gave up after {_attempts(job.attempt)}")
            return
        try:
            if policy is not None and policy.backoff:
                self._delay(job, self.clock.seconds() + self.backoff_delay(job.retries))
                self.totals["delayed"] -= 1  # counted as a retry, not as a delayed submit
            else:
                self._dispatch(job)
        except Exception:
            self.log.failure("Job {id} ({type}) could not be queued again",
                             id=quoted(job.id), type=quoted(job.type))
            self._fail(job, f"{why}; it could not be queued again")
            return
        job.retries += 1
        self.totals["retried"] += 1
        self._observe_waiting(job)
        if self._drained is not None:
            self._drain_changed()  # back in a queue, perhaps a paused type's

    def _fail(self, job: ScheduledJob, reason: str) -> None:
        """End the job without an answer, and tell its owner why."""
        if job.owner is not None:
            self.log.warn("Job {id} ({type}) failed: {reason}", id=quoted(job.id),
                          type=quoted(job.type), reason=quoted(reason))
        self._end(job, JobFailed(reason))

    def _end(self, job: ScheduledJob, error: Optional[Exception] = None) -> Optional[IJobOwner]:
        """The job is over: forget it and count how it ended.  With
        ``error``, the owner (if still there) is told of it, and it counts
        as failed (as cancelled if it is `ShuttingDown`).  A job whose owner
        withdrew counts as cancelled.

        :returns: the owner still to be told of an answer, or None.
        """
        job.state = ENDED
        owner, job.owner = job.owner, None
        self._jobs.discard(job)
        if job.unique is not None:
            self._forget_unique(job)
        if self._drained is not None:
            self._drain_changed()
        if error is None:
            if owner is None:
                self.totals["cancelled"] += 1
            return owner
        if owner is None or isinstance(error, ShuttingDown):
            self.totals["cancelled"] += 1
        elif isinstance(error, Cleared):
            self.totals["cleared"] += 1
        else:
            self.totals["failed"] += 1
            if self.on_failure is not None:
                self._contain(self.on_failure, job.type)
        if owner is not None:
            self._contain(owner.job_failed, job, error)
        return None

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

    def _maybe_unused(self, job_type: str) -> None:
        """Tell ``on_type_unused`` once a type has no jobs and no slaves left."""
        if (self.on_type_unused is not None and job_type not in self._joined
                and job_type not in self._queues and job_type not in self._running
                and job_type not in self._busy and job_type not in self._idle
                and job_type not in self._delayed_of_type and job_type not in self.paused):
            self._contain(self.on_type_unused, job_type)

    # --- administration ---------------------------------------------------

    def pause(self, job_type: str) -> None:
        """Hand out no job of ``job_type`` until `resume`: its jobs are
        still taken, and queue; its slaves wait idle.

        :param job_type: a type, known or not yet.
        """
        self.paused.add(job_type)
        self._drain_changed()

    def resume(self, job_type: str) -> None:
        """Hand out jobs of a paused type again: its idle slaves get its
        queued jobs at once.

        :param job_type: a paused type (any other is left as it is).
        """
        if job_type not in self.paused:
            return
        self.paused.discard(job_type)
        queue, waiters = self._queues.get(job_type), self._idle.get(job_type)
        while queue and waiters:
            job = queue.pop()
            if job is None:
                break
            slave, waiting = next(iter(waiters.items()))
            try:
                self._start(job, slave)
            except BaseException:
                queue.push(job)
                raise
            del waiters[slave]
            waiting.callback(job)
        if queue is not None and not queue:
            self._queues.pop(job_type, None)
        if waiters is not None and not waiters:
            self._idle.pop(job_type, None)
        self._maybe_unused(job_type)

    def clear(self, job_type: str) -> int:
        """End every queued and delayed job of ``job_type``: each owner is
        told `Cleared`.  Running jobs go on.

        :param job_type: the type.
        :returns: how many jobs were cleared.
        """
        waiting = [job for job in self._jobs
                   if job.type == job_type and (job.state is QUEUED or job.state is DELAYED)]
        waiting.sort(key=lambda job: job.sequence)
        error = Cleared("an administrator cleared the queue of its type")
        for job in waiting:
            state = job.state
            self._end(job, error)
            if state is DELAYED:
                self._undelay(job)
        self._queues.pop(job_type, None)
        if waiting:
            self.log.warn("Cleared {count} queued and delayed jobs of type {type}",
                          count=len(waiting), type=quoted(job_type))
        self._maybe_unused(job_type)
        return len(waiting)

    def drain(self) -> Deferred:
        """Run what there is to run, then say so.  The scheduler itself
        still takes jobs: the caller stops submitting.

        :returns: a Deferred that fires once no job is queued or running,
            and no job waits out the backoff of a retry.  Jobs submitted to
            start later and not yet due are not waited for, nor are the
            jobs of paused types.
        """
        if self._drained is None:
            self.draining = True
            self._drained = Deferred()
            self._drain_check = self.clock.callLater(0, self._check_drained)
        drained = Deferred()
        self._drained.addBoth(lambda result: (drained.callback(None), result)[1])
        return drained

    def waited_for(self) -> int:
        """How many jobs a drain waits for now: queued (in a type that is
        not paused) or running."""
        paused = self.paused
        held = sum(len(self._queues[name]) for name in paused if name in self._queues)
        return len(self._jobs) - self.delayed() - held

    def _check_drained(self) -> None:
        self._drain_check = None
        if self._drained.called:
            return
        paused = self.paused
        if self.waited_for() > 0:
            return  # some job is queued (and may run) or running
        if any(job.state is DELAYED and job.attempt and job.type not in paused
               for job in self._delayed):
            return  # a retry waits out its backoff
        self._drained.callback(None)

    def _drain_changed(self) -> None:
        """What a drain waits for may have changed: check it again soon."""
        if self._drained is not None and self._drain_check is None:
            self._drain_check = self.clock.callLater(0, self._check_drained)

    # --- inspection and lifecycle -------------------------------------------

    def queued(self, job_type: str) -> int:
        """How many jobs of type ``job_type`` wait for a slave."""
        queue = self._queues.get(job_type)
        return len(queue) if queue else 0

    def queued_total(self) -> int:
        """How many jobs of every type wait for a slave (O(types))."""
        return sum(len(queue) for queue in self._queues.values())

    def idle_slaves(self, job_type: str) -> int:
        """How many slaves of type ``job_type`` wait for a job."""
        return len(self._idle.get(job_type, ()))

    def jobs(self) -> List[ScheduledJob]:
        """The queued and running jobs, oldest first."""
        return sorted(self._jobs, key=lambda job: job.sequence)

    def __len__(self) -> int:
        """How many jobs are queued or running."""
        return len(self._jobs)

    def type_names(self) -> Set[str]:
        """The types with queued or running jobs, or idle or busy slaves."""
        return (set(self._queues) | set(self._idle) | set(self._running) | set(self._busy)
                | set(self._delayed_of_type) | self.paused)

    def types(self, limit: Optional[int] = None,
              names: Optional[Set[str]] = None) -> Dict[str, Dict[str, int]]:
        """Per type with any jobs or slaves: queued, delayed and running
        jobs, idle and busy slaves.

        :param limit: report only this many types, those with the most jobs
            queued and running; all if None.
        :param names: `type_names`, if the caller has it already.
        """
        if names is None:
            names = self.type_names()
        if limit is not None and len(names) > limit:
            names = heapq.nlargest(limit, names, key=self._jobs_of_type)
        return {
            name: {
                "queued": self.queued(name),
                "delayed": self._delayed_of_type.get(name, 0),
                "running": self._running.get(name, 0),
                "idle_slaves": self.idle_slaves(name),
                "busy_slaves": self._busy.get(name, 0),
                "paused": name in self.paused,
            }
            for name in sorted(names)
        }

    def _jobs_of_type(self, job_type: str) -> int:
        return (self.queued(job_type) + self._running.get(job_type, 0)
                + self._delayed_of_type.get(job_type, 0))

    def stopService(self):
        """Fail every unfinished job with `ShuttingDown`, refuse new ones,
        and cancel the idle slaves' waits."""
        self._stopping = True
        if self._drain_check is not None and self._drain_check.active():
            self._drain_check.cancel()
        self._drain_check = None
        jobs = self.jobs()
        self._queues.clear()
        self._delayed.clear()
        self._delayed_of_type.clear()
        self._delayed_withdrawn = 0
        if self._wake_call is not None and self._wake_call.active():
            self._wake_call.cancel()
        self._wake_call = None
        for job in jobs:
            if job.state is RUNNING:
                self._end_attempt(job)
            self._end(job, ShuttingDown("the daemon is shutting down"))
        idle = [waiting for waiters in self._idle.values() for waiting in waiters.values()]
        self._idle.clear()
        for waiting in idle:
            self._contain(waiting.cancel)
        return Service.stopService(self)


def _attempts(count: int) -> str:
    """``1 attempt``, ``2 attempts``."""
    return f"{count} attempt" if count == 1 else f"{count} attempts"
