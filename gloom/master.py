"""The master port: masters submit jobs and receive their answers."""

from __future__ import annotations

from typing import Dict

from twisted.internet.defer import CancelledError, Deferred

from gloom import wire
from gloom.protocol import GloomFactory, GloomProtocol
from gloom.scheduler import DuplicateJobId, JobFailed, ShuttingDown


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

    def do_submit(self, message: dict) -> None:
        job_id = wire.required_string(message, "id")
        job_type = wire.required_string(message, "type", job_id)
        priority = wire.optional_priority(message, job_id)
        body = wire.required_body(message, job_id)
        try:
            answer = self.factory.scheduler.submit(job_id, job_type, body, priority)
        except DuplicateJobId:
            raise wire.MessageError(
                wire.ID_EXISTS, f"a job with id {job_id!r} is already queued or running", job_id
            ) from None
        except ShuttingDown as e:
            raise wire.MessageError(wire.SHUTDOWN, str(e), job_id) from None
        self._unfinished[job_id] = answer
        self.sendString(wire.ack(job_id))
        answer.addCallbacks(self._answered, self._failed, (job_id,), None, (job_id,))

    def _answered(self, body: bytes, job_id: str) -> None:
        del self._unfinished[job_id]
        self.sendString(wire.answer(job_id, body))

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
    protocol = MasterProtocol
