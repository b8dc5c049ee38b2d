"""The master port: masters submit jobs and receive their answers."""

from __future__ import annotations

import sys
from typing import Any, Callable, Dict, Optional, Union

from zope.interface import implementer

from gloom import wire
from gloom.detached import DetachedJobs, IdTaken, describe
from gloom.protocol import GloomFactory, GloomProtocol
from gloom.scheduler import (
    Attachment,
    Cleared,
    IJobOwner,
    RetryPolicy,
    ScheduledJob,
    ShuttingDown,
)

DEFAULT_MAX_QUEUED = 100_000

DEFAULT_MAX_DETACHED = 1_000_000
"""Most live detached jobs the daemon holds (they belong to no master, so
no master's limit bounds them)."""

DRAINING = "the daemon is draining: it finishes the jobs it has and takes no new ones"

MAX_NAME = wire.MAX_NAME_BYTES
_MISSING = wire.MISSING

_TYPE_PARTS: Dict[str, tuple] = {}
"""For the types submitted lately: the interned type, and the part of a
job frame from the type to the body (``,"type":"T","body":``), so that a
plain submit encodes its type once per type, not once per job."""

_TYPE_PARTS_MOST = 10_000


def _type_part(job_type: str) -> bytes:
    """The job-frame part naming ``job_type`` (interned), from
    `wire.job_type_part`, remembered for the next submit of the type; all
    are forgotten at once past `_TYPE_PARTS_MOST` types, so that hostile
    type names cannot grow the table."""
    part = wire.job_type_part(wire.encode_id(job_type))
    if len(_TYPE_PARTS) >= _TYPE_PARTS_MOST:
        _TYPE_PARTS.clear()
    _TYPE_PARTS[job_type] = (job_type, part)
    return part


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
        self._unfinished: Dict[str, Union[ScheduledJob, Attachment]] = {}
        self._held_progress: Optional[Dict[str, bytes]] = None

    def do_submit(self, message: wire.Message) -> None:
        """Queue a job.  The frame its slave will get is built here, once,
        and carried by the scheduler as the job's opaque payload."""
        job_id, job_type = message.id, message.type
        if not (type(job_id) is str and 0 < len(job_id) <= MAX_NAME and job_id.isascii()):
            job_id = wire.required_name(message, "id")
        if not (type(job_type) is str and 0 < len(job_type) <= MAX_NAME and job_type.isascii()):
            job_type = wire.required_name(message, "type", job_id)
        known = _TYPE_PARTS.get(job_type)
        if known is None:
            job_type = sys.intern(job_type)
            type_part = _type_part(job_type)
        else:
            job_type, type_part = known
        priority = message.priority
        if type(priority) is not int:
            priority = wire.optional_priority(message, job_id)
        timeout = message.timeout
        if timeout is not _MISSING:
            timeout = wire.optional_timeout(message, job_id)
        else:
            timeout = None
        body = message.body
        if body is _MISSING:
            body = wire.required_body(message, job_id)
        if (message.detach is not _MISSING or message.delay is not _MISSING
                or message.at is not _MISSING or message.retries is not _MISSING
                or message.backoff is not _MISSING or message.unique is not _MISSING):
            return self._submit_with_options(message, job_id, job_type, type_part, body,
                                             priority, timeout)
        factory = self.factory
        scheduler = factory.scheduler
        if scheduler.draining:
            raise wire.MessageError(wire.SHUTDOWN, DRAINING, job_id)
        unfinished = self._unfinished
        if job_id in unfinished or len(unfinished) >= factory.max_queued:
            self._check_room(job_id)
        id_json = wire.encode_id(job_id)
        job_frame = wire.job_from_parts(id_json, type_part, body)
        try:
            job = scheduler.submit(self, job_id, job_type, job_frame, priority, timeout)
        except ShuttingDown as e:
            raise wire.MessageError(wire.SHUTDOWN, str(e), job_id) from None
        unfinished[job_id] = job
        ref = message.ref
        if ref is _MISSING:
            self.sendString(wire.ack(id_json))
        else:
            self.sendString(wire.with_ref(wire.ack(id_json), ref))

    def _submit_with_options(self, message: wire.Message, job_id: str, job_type: str,
                             type_part: bytes, body, priority: int,
                             timeout: Optional[float]) -> None:
        """A submit that is detached, delayed, or names how it is retried."""
        factory = self.factory
        detach = wire.optional_flag(message, "detach", job_id)
        backoff = wire.optional_flag(message, "backoff", job_id)
        retries = wire.optional_count(message, "retries", None, 0, wire.MAX_RETRIES, job_id)
        run_at = wire.optional_run_at(message, factory.clock.seconds(), job_id)
        unique = wire.optional_unique(message, job_id)
        if unique is not None and detach:
            raise wire.MessageError(
                wire.INVALID_MESSAGE, "'unique' does not go with 'detach': a detached job's id "
                "is unique in the whole daemon already, so use the key as its id", job_id)
        if factory.scheduler.draining:
            raise wire.MessageError(wire.SHUTDOWN, DRAINING, job_id)
        id_json = wire.encode_id(job_id)
        job_frame = wire.job_from_parts(id_json, type_part, body)
        ref = message.ref
        if not detach:
            self._check_room(job_id)
            policy = RetryPolicy.of(retries, backoff)
            try:
                job = factory.scheduler.submit(self, job_id, job_type, job_frame, priority,
                                               timeout, run_at, policy, unique=unique)
            except ShuttingDown as e:
                raise wire.MessageError(wire.SHUTDOWN, str(e), job_id) from None
            self._unfinished[job_id] = job
            if type(job) is Attachment and job.coalesced:
                self.reply(wire.coalesced_ack(id_json), ref)
            else:
                self.reply(wire.ack(id_json), ref)
            return
        detached = factory.detached
        factory.check_detached_room(job_id)
        try:
            taken = detached.submit(job_id, job_type, job_frame, priority, timeout, run_at,
                                    retries)
        except IdTaken:
            raise wire.MessageError(
                wire.ID_EXISTS, f"a detached job with id {wire.quoted(job_id)} is "
                f"{self._detached_state(job_id)} already", job_id) from None
        except ShuttingDown as e:
            raise wire.MessageError(wire.SHUTDOWN, str(e), job_id) from None
        taken.addCallbacks(self._detached_taken, self._detached_refused,
                           callbackArgs=(id_json, ref), errbackArgs=(job_id, ref))

    def _detached_state(self, job_id: str) -> str:
        """What the detached job with this id is doing, for messages."""
        status = self.factory.detached.status(job_id)
        return status["state"] if status else "taken"

    def _detached_taken(self, _, id_json: bytes, ref) -> None:
        if not self.closed.called:
            self.reply(wire.ack(id_json), ref)

    def _detached_refused(self, failure, job_id: str, ref) -> None:
        if failure.check(ShuttingDown):
            code = wire.SHUTDOWN
        else:
            code = wire.JOURNAL_ERROR
        reason = (f"the journal could not record the job, so it was not accepted: "
                  f"{failure.getErrorMessage()}" if code == wire.JOURNAL_ERROR
                  else failure.getErrorMessage())
        if not self.closed.called:
            self.sendString(wire.error(code, reason, job_id, ref if ref is not _MISSING else None))

    def _check_room(self, job_id: str) -> None:
        if job_id in self._unfinished:
            raise wire.MessageError(
                wire.ID_EXISTS,
                f"this master already has an unfinished job with id {wire.quoted(job_id)}",
                job_id,
            )
        if len(self._unfinished) >= self.factory.max_queued:
            raise wire.MessageError(
                wire.QUEUE_FULL,
                f"this master already has {self.factory.max_queued} unfinished jobs",
                job_id,
            )

    def do_cancel(self, message: wire.Message) -> None:
        """Withdraw one of this master's jobs, or else a detached job:
        queued or delayed, it leaves the queue; running, its answer will be
        dropped."""
        job_id = wire.required_name(message, "id")
        job = self._unfinished.pop(job_id, None)
        if job is not None:
            if self._held_progress:
                self._held_progress.pop(job_id, None)
            self.factory.scheduler.cancel(job)
        elif not self.factory.detached.cancel(job_id):
            raise wire.MessageError(
                wire.UNKNOWN_JOB,
                f"this master has no unfinished job {wire.quoted(job_id)}, "
                "and no detached job has that id",
                job_id,
            )
        self.reply(wire.ack(wire.encode_id(job_id)), message.ref)

    def do_status(self, message: wire.Message) -> None:
        """Say where a job is: one of this master's own, or a detached one
        (never another master's)."""
        job_id = wire.required_name(message, "id")
        job = self._unfinished.get(job_id)
        if job is not None:
            status = describe(job, detached=False)
        else:
            status = self.factory.detached.status(job_id) or {"state": "unknown"}
        self.reply(wire.status(job_id, status), message.ref)

    def do_dead_list(self, message: wire.Message) -> None:
        """A page of the dead list, oldest first."""
        offset = wire.optional_count(message, "offset", 0, 0, 2**31, None)
        limit = wire.optional_count(message, "limit", 100, 1, wire.MAX_PAGE, None)
        total, page = self.factory.detached.dead_page(offset, limit)
        self.reply(wire.encode_value({"ok": True, "total": total, "offset": offset,
                                      "dead": page}), message.ref)

    def do_dead_retry(self, message: wire.Message) -> None:
        """Queue a dead job again, with fresh retries."""
        job_id = wire.required_name(message, "id")
        self._dead_reply(self.factory.retry_dead(job_id), job_id, message.ref)

    def do_dead_discard(self, message: wire.Message) -> None:
        """Forget a dead job."""
        job_id = wire.required_name(message, "id")
        self._dead_reply(self.factory.detached.discard_dead(job_id), job_id, message.ref)

    def _dead_reply(self, found: bool, job_id: str, ref) -> None:
        if not found:
            raise wire.MessageError(
                wire.UNKNOWN_JOB, f"no dead job has id {wire.quoted(job_id)}", job_id)
        self.reply(wire.ack(wire.encode_id(job_id)), ref)

    def do_stats(self, message: wire.Message) -> None:
        """Send the daemon's figures (built at most once per reactor turn;
        a ref is added to the frame already built)."""
        self.reply(self.factory.stats_frame(), message.ref)

    # --- administration -----------------------------------------------------

    def _check_admin(self) -> None:
        if not self.factory.admin:
            raise wire.MessageError(
                wire.FORBIDDEN, "administrative actions are off on this endpoint; start the "
                "daemon with --admin to allow them here, or use its --admin-endpoint if it has one")

    def do_pause(self, message: wire.Message) -> None:
        """Hand out no job of a type until it is resumed."""
        self._check_admin()
        job_type = wire.required_name(message, "type")
        self.factory.scheduler.pause(sys.intern(job_type))
        self.log.info("Master {peer} paused type {type}", peer=self.peer,
                      type=wire.quoted(job_type))
        self.reply(wire.OK, message.ref)

    def do_resume(self, message: wire.Message) -> None:
        """Hand out jobs of a paused type again."""
        self._check_admin()
        job_type = wire.required_name(message, "type")
        self.factory.scheduler.resume(job_type)
        self.log.info("Master {peer} resumed type {type}", peer=self.peer,
                      type=wire.quoted(job_type))
        self.reply(wire.OK, message.ref)

    def do_clear(self, message: wire.Message) -> None:
        """End every queued and delayed job of a type."""
        self._check_admin()
        job_type = wire.required_name(message, "type")
        cleared = self.factory.scheduler.clear(job_type)
        self.log.info("Master {peer} cleared type {type}: {count} jobs", peer=self.peer,
                      type=wire.quoted(job_type), count=cleared)
        self.reply(wire.encode_value({"ok": True, "cleared": cleared}), message.ref)

    def do_drain(self, message: wire.Message) -> None:
        """Take no new jobs, finish those there are, then stop."""
        self._check_admin()
        self.log.info("Master {peer} asked the daemon to drain", peer=self.peer)
        self.reply(wire.OK, message.ref)
        self.factory.drain()

    # --- what the scheduler says ---------------------------------------------

    def job_answered(self, job: ScheduledJob, body: Any) -> None:
        job_id = job.id
        self._unfinished.pop(job_id, None)
        if self._held_progress:
            self._send_held_progress(job_id)
        self.sendString(wire.answer(wire.encode_id(job_id), body))

    def job_failed(self, job: ScheduledJob, error: Exception) -> None:
        job_id = job.id
        self._unfinished.pop(job_id, None)
        if self._held_progress:
            self._send_held_progress(job_id)
        if isinstance(error, ShuttingDown):
            code = wire.SHUTDOWN
        elif isinstance(error, Cleared):
            code = wire.CLEARED
        else:
            code = wire.JOB_FAILED
        self.sendString(wire.error(code, str(error), job_id))

    def job_progress(self, job: ScheduledJob, report: bytes) -> None:
        """Pass a slave's progress on; while this master does not read
        (its connection is paused), keep only the latest of each job."""
        if self.paused:
            held = self._held_progress
            if held is None:
                held = self._held_progress = {}
            elif job.id in held:
                self.factory.progress_replaced += 1
            held[job.id] = report
            return
        self.sendString(wire.progress(wire.encode_id(job.id), report))

    def _send_held_progress(self, job_id: str) -> None:
        report = self._held_progress.pop(job_id, None)
        if report is not None:
            self.sendString(wire.progress(wire.encode_id(job_id), report))

    def resumeProducing(self) -> None:
        """The master reads again: first send the progress held for it (as
        much as it takes before its connection is full again)."""
        held = self._held_progress
        if held:
            self.paused = False  # for sendString's writes; the transport may pause it again
            unfinished = self._unfinished
            while held and not self.paused:
                job_id = next(iter(held))
                report = held.pop(job_id)
                if job_id in unfinished:
                    self.sendString(wire.progress(wire.encode_id(job_id), report))
            if not held:
                self._held_progress = None
            if self.paused:
                return  # paused again: the rest waits for the next resume
        super().resumeProducing()

    def connectionLost(self, reason) -> None:
        """Withdraw every unfinished job of this master."""
        jobs, self._unfinished = self._unfinished, {}
        self._held_progress = None
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
                 stats: Callable[[], dict] = dict, detached: Optional[DetachedJobs] = None,
                 max_detached: int = DEFAULT_MAX_DETACHED, admin: bool = False, **kwargs):
        """Takes `GloomFactory`'s arguments, and:

        :param max_queued: how many unfinished jobs one master may have.
        :param stats: returns the figures of the stats reply.
        :param detached: the daemon's detached jobs; new ones, kept in
            memory only, if None.
        :param max_detached: how many live detached jobs the daemon holds.
        :param admin: whether masters may pause, resume and clear types
            and drain the daemon.
        """
        super().__init__(*args, **kwargs)
        if detached is None:
            detached = DetachedJobs(self.scheduler, self.clock)
        self.detached = detached
        self.max_detached = max_detached
        self.max_queued = max_queued
        self.stats = stats
        self.admin = admin
        self.drain: Callable[[], Any] = self.scheduler.drain
        """Starts draining the daemon (the ``drain`` action)."""
        self.progress_replaced = 0
        """How many progress reports were replaced by a later one, unsent,
        because their master was not reading."""
        self._stats_frame: Optional[bytes] = None

    def check_detached_room(self, job_id: str) -> None:
        """Refuse one more live detached job once the daemon holds
        ``max_detached``.

        :param job_id: the job's id, named in the refusal.
        :raises wire.MessageError: ``queue_full``.
        """
        detached = self.detached
        if len(detached.live) + len(detached.pending) >= self.max_detached:
            raise wire.MessageError(
                wire.QUEUE_FULL, f"the daemon already holds {self.max_detached} detached jobs",
                job_id)

    def retry_dead(self, job_id: str) -> bool:
        """Queue a dead job again, with fresh retries (the ``dead_retry``
        action, and the HTTP API's).

        :param job_id: the dead job's id.
        :returns: whether there was such a dead job.
        :raises wire.MessageError: ``shutdown`` while the daemon drains or
            stops, ``queue_full`` when it holds ``max_detached`` live
            detached jobs.
        """
        if job_id in self.detached.dead:
            if self.scheduler.draining:
                raise wire.MessageError(wire.SHUTDOWN, DRAINING, job_id)
            self.check_detached_room(job_id)
        try:
            return self.detached.retry_dead(job_id)
        except ShuttingDown as e:
            raise wire.MessageError(wire.SHUTDOWN, str(e), job_id) from None

    def stats_frame(self) -> bytes:
        """The stats reply, built at most once per reactor turn: however
        many stats requests one read holds, the figures are gathered once."""
        if self._stats_frame is None:
            self._stats_frame = wire.stats(self.stats())
            self.clock.callLater(0, self._forget_stats)
        return self._stats_frame

    def _forget_stats(self) -> None:
        self._stats_frame = None
