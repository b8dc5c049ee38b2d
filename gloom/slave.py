"""The slave port: slaves join a type, take one job at a time and answer it."""

from __future__ import annotations

import enum
import sys
from typing import Optional

from zope.interface import implementer

from gloom import wire
from gloom.protocol import GloomFactory, GloomProtocol
from gloom.scheduler import AttemptGivenUp, ISlave, JobWithdrawn, ScheduledJob


class SlaveState(enum.Enum):
    """Where a slave's connection is in its life."""

    NEW = "new"
    """Connected; has not joined a type yet."""
    JOINED = "joined"
    """Serves a type, holds no job and has not asked for one: for a moment
    between jobs or while it switches types, after it sent ``leave`` (until
    it joins again), or until it joins again if asking failed (the daemon
    answered ``internal_error``)."""
    WAITING = "waiting"
    """Has asked the scheduler for its next job and not been handed one:
    an idle slave (or, once the scheduler stopped, one that never will be)."""
    BUSY = "busy"
    """Holds one job and owes its answer (or its release)."""
    CLOSING = "closing"
    """Being closed by the daemon: takes no new job, but may still answer
    the one it holds."""


# The states as module constants: reading a global is much cheaper than an
# Enum member on CPython 3.11, and each job passes through several.
NEW, JOINED, WAITING, BUSY, CLOSING = SlaveState
_MISSING = wire.MISSING


@implementer(ISlave)
class SlaveProtocol(GloomProtocol):
    """One slave's connection: joined to a type, it asks the scheduler for
    a job of that type; busy, it holds exactly one job until it answers or
    releases it.  ``state`` says which (a `SlaveState`); ``wants_work``
    says whether its last join still stands (``leave`` takes it back), and
    so whether it asks for another job once it holds none."""

    role = "slave"
    other_role = "master"
    actions = wire.SLAVE_ACTIONS
    other_actions = wire.MASTER_ACTIONS

    def __init__(self) -> None:
        super().__init__()
        self.state = NEW
        self.job_type: Optional[str] = None
        self.job: Optional[ScheduledJob] = None
        self.held_since: Optional[float] = None
        """The clock's time when the job held now (or last) was handed over
        (for the HTTP API's ``held_s``)."""
        self.wants_work = False

    def do_join(self, message: wire.Message) -> None:
        """Serve a type.  An idle slave joining its own type again keeps
        its place; while a job is held, the switch waits for its answer.
        A join after ``leave`` asks for work again."""
        job_type = sys.intern(wire.required_name(message, "type"))
        switching = job_type != self.job_type
        if switching:
            self.factory.scheduler.join(self, job_type)  # ends a wait for the old type
            self.job_type = job_type
        self.wants_work = True
        self.reply(wire.OK, message.ref)
        state = self.state
        if state is NEW or state is JOINED or (switching and state is WAITING):
            self._ask()

    def do_leave(self, message: wire.Message) -> None:
        """Take back the last join: ask for no more jobs, keeping the type
        and any job held (which must still be answered or released).  An
        idle slave stops waiting at once; one that never joined has
        nothing to take back, and is answered ok all the same."""
        if self.state is WAITING:
            self.factory.scheduler.stop_waiting(self)
            self.state = JOINED
        self.wants_work = False
        self.reply(wire.OK, message.ref)

    def do_respond(self, message: wire.Message) -> None:
        job = self.job
        if job is None or message.id is not _MISSING:
            job = self._held_job(message, "respond")
        body = wire.required_body(message, job.id)
        self._report(self.factory.scheduler.complete, job, body, message.ref)

    def do_fail(self, message: wire.Message) -> None:
        job = self.job
        if job is None or message.id is not _MISSING:
            job = self._held_job(message, "fail")
        reason = wire.required_string(message, "reason", job.id, allow_empty=True)
        self._report(self.factory.scheduler.fail, job, reason, message.ref)

    def do_release(self, message: wire.Message) -> None:
        """Hand the held job back unrun: it goes back to the front of its
        queue, and counts as neither an attempt nor a retry.  The id is
        required, and must be the held job's."""
        wire.required_name(message, "id")
        job = self._held_job(message, "release")
        self._report(self._hand_back, job, None, message.ref, "release")

    def do_progress(self, message: wire.Message) -> None:
        """Pass progress on the held job to its master; it also restarts
        the attempt's timeout."""
        job = self.job
        if job is None or message.id is not _MISSING:
            job = self._held_job(message, "progress")
        report = wire.progress_report(message, job.id)
        self._while_held(self.factory.scheduler.progress, job, message.ref, "progress", report)

    def do_touch(self, message: wire.Message) -> None:
        """Restart the held job's timeout: the slave is still at it."""
        job = self.job
        if job is None or message.id is not _MISSING:
            job = self._held_job(message, "touch")
        self._while_held(self.factory.scheduler.touch, job, message.ref, "touch")

    def _while_held(self, report, job: ScheduledJob, ref, what: str, *args) -> None:
        """Report on a job the slave goes on holding (progress, touch).
        Refused with ``timed_out`` once the attempt was given up, and with
        ``cancelled`` once no master wants the job."""
        try:
            report(self, job, *args)
        except AttemptGivenUp:
            raise wire.MessageError(
                wire.TIMED_OUT,
                f"job {wire.quoted(job.id)} ran past its timeout of {job.timeout:g} s and was "
                f"given up; this {what} was refused", job.id) from None
        except JobWithdrawn:
            raise wire.MessageError(
                wire.CANCELLED,
                f"job {wire.quoted(job.id)} was cancelled: nobody waits for it now; stop work "
                "on it and answer, fail or release it", job.id) from None
        self.reply(wire.OK, ref)

    def _hand_back(self, slave: "SlaveProtocol", job: ScheduledJob, outcome: None) -> None:
        self.factory.scheduler.hand_back(slave, job)

    def _report(self, report, job: ScheduledJob, outcome, ref, what: str = "answer") -> None:
        """Hand the held job's outcome to the scheduler, then take new work
        unless the slave left.  An attempt that already timed out is
        refused with ``timed_out``."""
        self.job = None
        if self.state is BUSY:
            self.state = JOINED
        try:
            report(self, job, outcome)
        except AttemptGivenUp:
            self.reply(wire.error(
                wire.TIMED_OUT,
                f"job {wire.quoted(job.id)} ran past its timeout of {job.timeout:g} s and was given up; "
                f"this {what} was discarded",
                job.id,
            ), ref)
        else:
            if ref is _MISSING:
                self.sendString(wire.OK)
            else:
                self.sendString(wire.with_ref(wire.OK, ref))
        if self.state is JOINED and self.wants_work:
            self._ask()

    def _held_job(self, message: wire.Message, action: str) -> ScheduledJob:
        """The job a respond, fail or release is for.  With an ``"id"``, it
        must be the held job's: a stray answer must not answer the next job."""
        job_id = wire.optional_name(message, "id")
        job = self.job
        if job is None:
            raise wire.MessageError(
                wire.NOT_PROCESSING, f"{action} without a job: this slave holds none", job_id
            )
        if job_id is not None and job_id != job.id:
            raise wire.MessageError(
                wire.WRONG_JOB,
                f"{action} for job {wire.quoted(job_id)}, but this slave holds job "
                f"{wire.quoted(job.id)}",
                job_id,
            )
        return job

    def _ask(self) -> None:
        """Ask for the next job of the joined type (it may come at once).
        If asking fails, the slave has not asked: joining again asks anew."""
        self.state = WAITING
        try:
            self.factory.scheduler.want_job(self)
        except BaseException:
            if self.state is WAITING:
                self.state = JOINED
            raise

    def job_assigned(self, job: ScheduledJob) -> None:
        """The scheduler hands this slave its job: send it."""
        self.state = BUSY
        self.job = job
        self.held_since = self.factory.clock.seconds()
        self.sendString(job.body)

    def closing(self) -> None:
        """A slave being closed gets no more jobs: it leaves the idle set."""
        if self.state is WAITING:
            self.factory.scheduler.stop_waiting(self)
        self.state = CLOSING

    def connectionLost(self, reason) -> None:
        """Leave the idle set, give the held job back, stop serving the type."""
        scheduler = self.factory.scheduler
        try:
            self.closing()
            if self.job is not None:
                job, self.job = self.job, None
                scheduler.release(self, job)
            scheduler.leave(self)
        except Exception:
            self.log.failure("Releasing slave {peer}", peer=self.peer)
        super().connectionLost(reason)


class SlaveFactory(GloomFactory):
    """Slaves' connections."""

    protocol = SlaveProtocol
