"""The slave port: slaves join a type, take one job at a time and answer it."""

from __future__ import annotations

import sys
from typing import Optional

from twisted.internet.defer import CancelledError, Deferred

from gloom import wire
from gloom.protocol import GloomFactory, GloomProtocol
from gloom.scheduler import AttemptGivenUp, Job


class SlaveProtocol(GloomProtocol):
    """One slave's connection: idle, it waits on a scheduler Deferred for a
    job of its type; busy, it holds exactly one job until it answers."""

    role = "slave"
    other_role = "master"
    actions = wire.SLAVE_ACTIONS
    other_actions = wire.MASTER_ACTIONS

    def __init__(self) -> None:
        super().__init__()
        self.job_type: Optional[str] = None
        self.job: Optional[Job] = None
        self.attempt = 0
        self._waiting: Optional[Deferred] = None
        self._closing = False

    def do_join(self, message: wire.Message) -> None:
        """Serve a type.  While a job is held the switch waits for its answer."""
        job_type = sys.intern(wire.required_name(message, "type"))
        if self._waiting is not None and job_type == self.job_type:
            self.sendString(wire.OK)
            return
        if self._waiting is not None:
            self._waiting.cancel()
        scheduler = self.factory.scheduler
        if job_type != self.job_type:
            scheduler.join(job_type)
            old_type, self.job_type = self.job_type, job_type
            if old_type is not None:
                scheduler.leave(old_type)
        self.sendString(wire.OK)
        if self.job is None:
            self._ask()

    def do_respond(self, message: wire.Message) -> None:
        job = self.job
        if job is None or message.id is not wire.MISSING:
            job = self._held_job(message, "respond")
        body = wire.required_body(message, job.id)
        self._finish(self.factory.scheduler.complete, body)

    def do_fail(self, message: wire.Message) -> None:
        job = self.job
        if job is None or message.id is not wire.MISSING:
            job = self._held_job(message, "fail")
        reason = wire.required_string(message, "reason", job.id, allow_empty=True)
        self._finish(self.factory.scheduler.fail, reason)

    def _finish(self, report, outcome) -> None:
        """Hand the held job's outcome to the scheduler, then take new work.
        An attempt that already timed out is refused with ``timed_out``."""
        job, self.job = self.job, None
        try:
            report(job, self.attempt, outcome)
        except AttemptGivenUp:
            self.sendString(wire.error(
                wire.TIMED_OUT,
                f"job {wire.quoted(job.id)} ran past its timeout of {job.timeout:g} s and was given up; "
                "this answer was discarded",
                job.id,
            ))
        else:
            self.sendString(wire.OK)
        self._ask()

    def _held_job(self, message: wire.Message, action: str) -> Job:
        """The job a respond or fail is for.  With an ``"id"``, it must be
        the held job's: a stray answer must not answer the next job."""
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
        """Take a queued job at once, or wait for one on a Deferred."""
        if self._closing:
            return
        scheduler = self.factory.scheduler
        job = scheduler.take(self.job_type)
        if job is not None:
            self._assigned(job)
            return
        self._waiting = waiting = scheduler.next_job(self.job_type)
        waiting.addCallbacks(self._assigned, self._stopped_waiting)

    def _assigned(self, job: Job) -> None:
        self._waiting = None
        self.job = job
        self.attempt = job.attempt
        self.sendString(job.body)

    def _stopped_waiting(self, failure) -> None:
        failure.trap(CancelledError)
        self._waiting = None

    def closing(self) -> None:
        """A slave being closed gets no more jobs: it leaves the idle set."""
        self._closing = True
        if self._waiting is not None:
            self._waiting.cancel()

    def connectionLost(self, reason) -> None:
        """Leave the idle set, give the held job back, stop serving the type."""
        scheduler = self.factory.scheduler
        try:
            if self._waiting is not None:
                self._waiting.cancel()
            if self.job is not None:
                job, self.job = self.job, None
                scheduler.release(job, self.attempt)
            if self.job_type is not None:
                scheduler.leave(self.job_type)
        except Exception:
            self.log.failure("Releasing slave {peer}", peer=self.peer)
        super().connectionLost(reason)


class SlaveFactory(GloomFactory):
    protocol = SlaveProtocol
