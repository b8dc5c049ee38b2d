"""The master port: masters submit jobs and receive their answers."""

from __future__ import annotations

import sys
from typing import Callable, Dict

from twisted.internet.defer import CancelledError, Deferred

from gloom import wire
from gloom.protocol import GloomFactory, GloomProtocol
from gloom.scheduler import DuplicateJobId, JobFailed, ShuttingDown

DEFAULT_MAX_QUEUED = 100_000


class MasterProtocol(GloomProtocol):
    """One master's connection: each submit becomes a scheduler Deferred
    whose result is written back as an answer or an error frame."""

    role = "master"
    other_role = "slave"
    actions = wire.MASTER_ACTIONS
    other_actions = wire.SLAVE_ACTIONS

    def __init__(self) -> None:
        super().__init__()
        self._unfinished: Dict[str, Deferred] = {}
        # One bound method each, shared by every job's callbacks.
        self._on_answer = self._answered
        self._on_failure = self._failed

    def do_submit(self, message: wire.Message) -> None:
        """Queue a job.  The frame its slave will get is built here, once,
        and carried by the scheduler as the job's opaque payload."""
        job_id = wire.required_string(message, "id")
        job_type = sys.intern(wire.required_string(message, "type", job_id))
        priority = wire.optional_priority(message, job_id)
        timeout = wire.optional_timeout(message, job_id)
        body = wire.required_body(message, job_id)
        if len(self._unfinished) >= self.factory.max_queued:
            raise wire.MessageError(
                wire.QUEUE_FULL,
                f"this master already has {self.factory.max_queued} unfinished jobs",
                job_id,
            )
        id_json = wire.encode_id(job_id)
        job_frame = wire.job(id_json, wire.encode_id(job_type), body)
        try:
            answer = self.factory.scheduler.submit(job_id, job_type, job_frame, priority, timeout)
        except DuplicateJobId:
            raise wire.MessageError(
                wire.ID_EXISTS, f"a job with id {job_id!r} is already queued or running", job_id
            ) from None
        except ShuttingDown as e:
            raise wire.MessageError(wire.SHUTDOWN, str(e), job_id) from None
        self._unfinished[job_id] = answer
        self.sendString(wire.ack(id_json))
        arguments = (job_id,)
        answer.addCallbacks(self._on_answer, self._on_failure, arguments, None, arguments)

    def do_cancel(self, message: wire.Message) -> None:
        """Withdraw one of this master's jobs: queued, it leaves the queue;
        running, its answer will be dropped."""
        job_id = wire.required_string(message, "id")
        answer = self._unfinished.get(job_id)
        if answer is None:
            raise wire.MessageError(
                wire.UNKNOWN_JOB, f"this master has no unfinished job {job_id!r}", job_id
            )
        answer.cancel()
        self.sendString(wire.ack(wire.encode_id(job_id)))

    def do_stats(self, message: wire.Message) -> None:
        self.sendString(wire.stats(self.factory.stats()))

    def _answered(self, body: bytes, job_id: str) -> None:
        del self._unfinished[job_id]
        self.sendString(wire.answer(wire.encode_id(job_id), body))

    def _failed(self, failure, job_id: str) -> None:
        del self._unfinished[job_id]
        if failure.check(CancelledError):
            return None
        if failure.check(JobFailed):
            code = wire.JOB_FAILED
        elif failure.check(ShuttingDown):
            code = wire.SHUTDOWN
        else:
            self.log.failure("Job {id!r} ended unexpectedly", failure, id=job_id)
            code = wire.JOB_FAILED
        self.sendString(wire.error(code, str(failure.value), job_id))
        return None

    def connectionLost(self, reason) -> None:
        for answer in list(self._unfinished.values()):
            answer.cancel()
        super().connectionLost(reason)


class MasterFactory(GloomFactory):
    """Masters' connections.  ``stats`` supplies the figures for the stats
    action; ``max_queued`` caps each master's unfinished jobs."""

    protocol = MasterProtocol

    def __init__(self, *args, max_queued: int = DEFAULT_MAX_QUEUED,
                 stats: Callable[[], dict] = dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_queued = max_queued
        self.stats = stats
