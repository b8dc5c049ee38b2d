"""The master port: masters submit jobs and receive their answers."""

from __future__ import annotations

import sys
from typing import Any, Callable, Dict, Optional

from zope.interface import implementer

from gloom import wire
from gloom.protocol import GloomFactory, GloomProtocol
from gloom.scheduler import IJobOwner, ScheduledJob, ShuttingDown

DEFAULT_MAX_QUEUED = 100_000

MAX_NAME = wire.MAX_NAME_BYTES
_MISSING = wire.MISSING


@implementer(IJobOwner)
class MasterProtocol(GloomProtocol):
    """One master's connection: it owns the jobs it submits (an
    `IJobOwner`), and writes each one's end back as an answer or an error
    frame.  Its job ids are its own: another master may use the same ids."""

    role = "master"
    other_role = "slave"
    actions = wire.MASTER_ACTIONS
    other_actions = wire.SLAVE_ACTIONS

    def __init__(self) -> None:
        super().__init__()
        self._unfinished: Dict[str, ScheduledJob] = {}

    def do_submit(self, message: wire.Message) -> None:
        """Queue a job.  The frame its slave will get is built here, once,
        and carried by the scheduler as the job's opaque payload."""
        job_id, job_type = message.id, message.type
        if not (type(job_id) is str and 0 < len(job_id) <= MAX_NAME and job_id.isascii()):
            job_id = wire.required_name(message, "id")
        if not (type(job_type) is str and 0 < len(job_type) <= MAX_NAME and job_type.isascii()):
            job_type = wire.required_name(message, "type", job_id)
        job_type = sys.intern(job_type)
        priority = wire.optional_priority(message, job_id)
        timeout = wire.optional_timeout(message, job_id)
        body = wire.required_body(message, job_id)
        unfinished = self._unfinished
        if job_id in unfinished:
            raise wire.MessageError(
                wire.ID_EXISTS,
                f"this master already has an unfinished job with id {wire.quoted(job_id)}",
                job_id,
            )
        if len(unfinished) >= self.factory.max_queued:
            raise wire.MessageError(
                wire.QUEUE_FULL,
                f"this master already has {self.factory.max_queued} unfinished jobs",
                job_id,
            )
        id_json = wire.encode_id(job_id)
        job_frame = wire.job(id_json, wire.encode_id(job_type), body)
        try:
            job = self.factory.scheduler.submit(self, job_id, job_type, job_frame, priority, timeout)
        except ShuttingDown as e:
            raise wire.MessageError(wire.SHUTDOWN, str(e), job_id) from None
        unfinished[job_id] = job
        ref = message.ref
        if ref is _MISSING:
            self.sendString(wire.ack(id_json))
        else:
            self.sendString(wire.with_ref(wire.ack(id_json), ref))

    def do_cancel(self, message: wire.Message) -> None:
        """Withdraw one of this master's jobs: queued, it leaves the queue;
        running, its answer will be dropped."""
        job_id = wire.required_name(message, "id")
        job = self._unfinished.pop(job_id, None)
        if job is None:
            raise wire.MessageError(
                wire.UNKNOWN_JOB, f"this master has no unfinished job {wire.quoted(job_id)}",
                job_id,
            )
        self.factory.scheduler.cancel(job)
        self.reply(wire.ack(wire.encode_id(job_id)), message.ref)

    def do_stats(self, message: wire.Message) -> None:
        """Send the daemon's figures (built at most once per reactor turn;
        a ref is added to the frame already built)."""
        self.reply(self.factory.stats_frame(), message.ref)

    def job_answered(self, job: ScheduledJob, body: Any) -> None:
        self._unfinished.pop(job.id, None)
        self.sendString(wire.answer(wire.encode_id(job.id), body))

    def job_failed(self, job: ScheduledJob, error: Exception) -> None:
        self._unfinished.pop(job.id, None)
        code = wire.SHUTDOWN if isinstance(error, ShuttingDown) else wire.JOB_FAILED
        self.sendString(wire.error(code, str(error), job.id))

    def connectionLost(self, reason) -> None:
        """Withdraw every unfinished job of this master."""
        jobs, self._unfinished = self._unfinished, {}
        cancel = self.factory.scheduler.cancel
        for job in jobs.values():
            try:
                cancel(job)
            except Exception:
                self.log.failure("Cancelling job {id} of master {peer}", id=wire.quoted(job.id),
                                 peer=self.peer)
        super().connectionLost(reason)


class MasterFactory(GloomFactory):
    """Masters' connections."""

    protocol = MasterProtocol

    def __init__(self, *args, max_queued: int = DEFAULT_MAX_QUEUED,
                 stats: Callable[[], dict] = dict, **kwargs):
        """Takes `GloomFactory`'s arguments, and:

        :param max_queued: how many unfinished jobs one master may have.
        :param stats: returns the figures of the stats reply.
        """
        super().__init__(*args, **kwargs)
        self.max_queued = max_queued
        self.stats = stats
        self._stats_frame: Optional[bytes] = None

    def stats_frame(self) -> bytes:
        """The stats reply, built at most once per reactor turn: however
        many stats requests one read holds, the figures are gathered once."""
        if self._stats_frame is None:
            self._stats_frame = wire.stats(self.stats())
            self.clock.callLater(0, self._forget_stats)
        return self._stats_frame

    def _forget_stats(self) -> None:
        self._stats_frame = None
