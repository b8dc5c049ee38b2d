"""The client side of the Gloom protocol, with no I/O: what every client
shares, whatever moves its bytes.

Nothing here opens a socket, runs a reactor or an event loop, or reads a
clock.  The blocking client (`gloom.client`), the Twisted client
(`gloom.txclient`), the asyncio client (`gloom.aio`), the ``gloom``
command and its benchmark are thin shells: they move bytes between sockets
and the state machines here, and turn finished `Request` objects into
return values, Deferreds or futures.

- Framing: `frame` encodes a message, `FrameBuffer` splits a byte stream
  into frames, `decode` reads one.
- `MasterCore`: requests to one or more daemons (submit, cancel, stats,
  status and the dead-letter actions), each matched to its reply by a
  ``ref``; jobs routed over the daemons by a rendezvous hash of their id,
  and requests about a job by id asked of the daemons in that order; the
  in-flight table; what a lost daemon means for its jobs.
- `job_options`: the checked fields of a detached, delayed or retried job.
- `InOrder`: a window of requests whose results come out in input order.
- `WorkerCore`: a worker's slave connections to one or more daemons, never
  holding more jobs than its concurrency (``join``, ``leave`` and
  ``release``).
- `Job`, `DeadList`, the errors, default addresses and `sum_stats`.
"""

from __future__ import annotations

import hashlib
import json
import os
import math
import struct
import uuid
from collections import OrderedDict
from datetime import datetime, timedelta
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

try:
    from msgspec import MsgspecError
    from msgspec.json import decode as _fast_loads
except ImportError:  # PyPy: the standard library does the work
    _fast_loads = None

DEFAULT_MASTER = "127.0.0.1:9998"
"""The daemon's master port on this machine, where masters connect by default."""

DEFAULT_SLAVE = "127.0.0.1:9999"
"""The daemon's slave port on this machine, where workers connect by default."""

MASTERS_ENV = ("GLOOM_MASTERS", "GLOOM_MASTER")
"""Environment variables read, in order, for the master addresses."""

SLAVES_ENV = ("GLOOM_SLAVES", "GLOOM_SLAVE")
"""Environment variables read, in order, for the slave addresses."""

MAX_FRAME = 64 * 1024 * 1024
"""The largest frame a client sends (and the daemon's default limit)."""

READ_LIMIT = MAX_FRAME + 64 * 1024
"""The largest frame a client reads: a frame the daemon passes a body or a
progress report on in is longer than the one that brought it by the id and
type around it (each at most 1,024 bytes, escaped up to six times)."""

MAX_TIMEOUT = 2_592_000
"""The longest ``timeout`` a submit may ask for, in seconds (30 days)."""

MAX_DELAY = 31_536_000
"""The longest ``delay`` a submit may ask for, in seconds (365 days)."""

MAX_RETRIES = 1000
"""The most ``retries`` a submit may ask for."""

MAX_PAGE = 1000
"""The most dead jobs one ``dead_list`` request may ask a daemon for."""

_HEADER = struct.Struct("!I")

_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
"""The encoder every request goes through (``json.dumps`` with these
settings would build one per call)."""

_JOB_ENDINGS = frozenset({"job_failed", "shutdown", "cleared"})
"""The error codes of frames that end a job, rather than refuse a request."""


# --- errors and jobs -------------------------------------------------------------------


class GloomError(Exception):
    """Anything that went wrong talking to Gloom."""


class TransportError(GloomError):
    """The connection could not be made, or was lost.

    :param message: what happened, for people to read.
    :param daemon: the address of the daemon concerned, if one is.
    :param id: the id of the job it ended, if it ended one.
    """

    def __init__(self, message: str, daemon: Optional[str] = None, id: Optional[str] = None):
        super().__init__(message)
        self.daemon = daemon
        self.id = id


class Timeout(GloomError, TimeoutError):
    """Nothing arrived within the time given."""


class ProtocolError(GloomError):
    """The daemon sent something this client does not understand."""


class EncodeError(GloomError, ValueError):
    """A request cannot be sent: its body is not JSON (NaN, infinity, a
    set...) or it is larger than a frame may be."""


class ServerError(GloomError):
    """The daemon answered with an error frame (``error``, ``reason``, ``id``).

    :param error: the frame's error code, such as ``"unknown_job"``.
    :param reason: the frame's reason, for people to read.
    :param id: the id of the job it concerns, if any.
    :param daemon: the address of the daemon that said it, if known.
    """

    def __init__(self, error: str, reason: str = "", id: Optional[str] = None,
                 daemon: Optional[str] = None):
        super().__init__(f"{error}: {reason}" if reason else error)
        self.error = error
        self.reason = reason
        self.id = id
        self.daemon = daemon

    @classmethod
    def from_frame(cls, frame: dict, daemon: Optional[str] = None) -> "ServerError":
        """The error a decoded error frame (or failed answer) reports."""
        return cls(str(frame.get("error", "unknown")), str(frame.get("reason", "")), frame.get("id"),
                   daemon)


class WorkerError(GloomError):
    """A worker stopped on an error that retrying cannot fix, such as a
    refused join or a TLS configuration the daemon rejects."""


class Cancelled(GloomError):
    """The request was cancelled by its caller before it ended."""


class Job(dict):
    """A job or an answer: a dict with ``id``, ``type`` and ``body`` properties.

    An answer that is a failure carries ``error`` and ``reason`` instead of
    a body.

    A job a worker holds can also report how far it got (`progress`) and
    ask for more time (`touch`): `WorkerCore` binds both, for each job it
    hands its shell, to the slave connection that holds the job (see
    `bind`).  Once the daemon has answered ``cancelled`` to either,
    ``cancelled`` is True: every master that submitted the job withdrew
    it, and the work may stop (the job must still be answered, failed or
    released as usual; the daemon drops that answer).  Once it has
    answered ``timed_out``, ``timed_out`` is True: the attempt ran past
    its timeout and was given up (the job is queued again or failed), so
    its answer will be discarded too.  `on_dropped` calls a function at
    the first of either.
    """

    id = property(lambda self: self.get("id"))
    type = property(lambda self: self.get("type"))
    body = property(lambda self: self.get("body"))
    error = property(lambda self: self.get("error"))
    reason = property(lambda self: self.get("reason"))

    cancelled = False
    """Whether the daemon answered ``cancelled`` to a `progress` or
    `touch` of this job: nobody waits for its answer any more."""

    timed_out = False
    """Whether the daemon answered ``timed_out`` to a `progress` or
    `touch` of this job: the attempt was given up, and its answer will be
    discarded."""

    _progress: Optional[Callable[[Any, Any, Any], Any]] = None
    _touch: Optional[Callable[[], Any]] = None

    def result(self) -> Any:
        """The answer body, or `ServerError` if the job failed."""
        if self.error is not None:
            raise ServerError.from_frame(self)
        return self.body

    def bind(self, progress: Callable[[Any, Any, Any], Any], touch: Callable[[], Any]) -> None:
        """Say how `progress` and `touch` reach the daemon.  `WorkerCore`
        binds every job it runs to its own `WorkerCore.progress` and
        `WorkerCore.touch` for the job's connection; a shell whose
        handlers may call from another thread binds the job again, before
        the handler gets it, to functions that hand the calls to its I/O
        thread.

        :param progress: called as ``progress(done, total, data)``; what
            it returns, `progress` returns.
        :param touch: called with no argument; what it returns, `touch`
            returns.
        """
        self._progress = progress
        self._touch = touch

    def progress(self, done: Optional[float] = None, total: Optional[float] = None,
                 data: Any = None) -> Any:
        """Tell the masters waiting for this job how far it got.  Each
        master gets ``{"done": ..., "total": ..., "data": ...}`` with the
        fields given, before the answer.  It also restarts the job's
        timeout, as `touch` does.

        :param done: how much is done: a number, 0 or more.
        :param total: how much there is to do: a number, 0 or more.
        :param data: anything else to say, as JSON (None: nothing).
        :returns: whether it was sent: False, and nothing sent, once the
            job is no longer held (answered, or its connection lost).
        :raises ValueError: if none of the three is given, or ``done`` or
            ``total`` is not a number from 0 up.
        :raises EncodeError: if ``data`` is not JSON.
        :raises RuntimeError: if no worker holds this job (an answer, say).
        """
        if self._progress is None:
            raise RuntimeError(f"job {self.id!r} is not held by a worker: only a worker's job has progress")
        return self._progress(done, total, data)

    def touch(self) -> Any:
        """Restart the job's timeout: the daemon gives the attempt its
        whole ``timeout`` again from now, so a long job that is alive is
        not given up.

        :returns: as `progress` does.
        :raises RuntimeError: if no worker holds this job.
        """
        if self._touch is None:
            raise RuntimeError(f"job {self.id!r} is not held by a worker: only a worker's job can be touched")
        return self._touch()

    @property
    def dropped(self) -> Optional[str]:
        """Why the daemon will drop this job's answer, once it said so in
        reply to a `progress` or `touch`: ``"cancelled"`` or
        ``"timed_out"``; None until then."""
        return self.__dict__.get("_dropped")

    def on_dropped(self, callback: Callable[[str], Any]) -> None:
        """Have ``callback(code)`` called once the daemon says this job's
        answer will be dropped, in reply to a `progress` or `touch`:
        ``code`` is ``"cancelled"`` (every master that submitted the job
        withdrew it) or ``"timed_out"`` (the attempt ran past its timeout
        and was given up); at once if it has said so already.  Each
        callback is called at most once, by the first of the two, from
        where the shell handles the connection's frames (the reactor
        thread, the event loop, or the blocking client's thread that reads
        the reply): it should only note the news or start stopping the
        work, not block.  The job must still be answered, failed or
        released as usual.

        :param callback: called with the error code.
        """
        if self.dropped is not None:
            callback(self.dropped)
            return
        self.__dict__.setdefault("_on_dropped", []).append(callback)

    def _drop(self, code: str) -> List[BaseException]:
        """The daemon said ``code`` (``cancelled`` or ``timed_out``) to a
        report of this job: set the flags and call the `on_dropped`
        callbacks (the first time).  What the callbacks raised is returned."""
        if code == "cancelled":
            self.cancelled = True
        else:
            self.timed_out = True
        if self.dropped is not None:
            return []
        self.__dict__["_dropped"] = code
        errors = []
        for callback in self.__dict__.pop("_on_dropped", []):
            try:
                callback(code)
            except Exception as e:
                errors.append(e)
        return errors


class DeadList(list):
    """A page of dead jobs, oldest first: a list of the daemons' entries
    (dicts with ``id``, ``type``, ``priority``, ``attempts``, ``reason``
    and ``ended_at``; with several daemons, each also names its
    ``daemon``), which also says where the page starts in the whole list
    and how long that is.

    :param entries: the page's entries.
    :param total: how many dead jobs there are in all (over every daemon
        asked).
    :param offset: the position of the page's first entry in the whole
        list.
    :param unreachable: the daemons whose connection was lost before they
        answered, each with why; their dead jobs are not counted.
    """

    def __init__(self, entries: Iterable[dict] = (), total: int = 0, offset: int = 0,
                 unreachable: Optional[Dict[str, str]] = None):
        super().__init__(entries)
        self.total = total
        self.offset = offset
        self.unreachable: Dict[str, str] = dict(unreachable or {})


# --- job options ---------------------------------------------------------------------------


def _number(value: Any) -> bool:
    """Whether ``value`` is a finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _shown(value: Any) -> str:
    """A value as the user gave it (a float in full, not rounded)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return repr(value)


def job_options(detach: bool = False, delay: Any = None, at: Any = None, retries: Optional[int] = None,
                backoff: bool = False, spell: Callable[[str], str] = lambda name: name) -> Dict[str, Any]:
    """The fields a submit carries for these options: only those given
    (``detach`` and ``backoff`` only when true), checked as the daemon
    checks them, so that a mistake is a ``ValueError`` before anything is
    sent rather than an ``invalid_message`` after.

    :param detach: the job belongs to the daemon: it survives its master's
        connection, no answer comes for it, and `MasterCore.status` tells
        how it went.
    :param delay: seconds to wait before the job is queued (a number, or a
        ``datetime.timedelta``), from 0 to `MAX_DELAY`.
    :param at: when to queue the job: seconds since the epoch, or a
        ``datetime.datetime`` (a naive one is local time); a past time
        means now.  Not with ``delay``.  (The daemon also refuses a time
        more than `MAX_DELAY` ahead of its clock.)
    :param retries: how many times the job is queued again after a lost
        attempt (0 to `MAX_RETRIES`); by default, the daemon's
        ``--retries``.
    :param backoff: retry an attached job's lost attempts after a growing
        delay instead of at once (detached jobs always back off).
    :param spell: how messages name an option (the command line passes
        ``lambda name: "--" + name``).
    :raises ValueError: for a value the daemon would refuse, or both
        ``delay`` and ``at``.
    """
    fields: Dict[str, Any] = {}
    if detach:
        fields["detach"] = True
    if delay is not None and at is not None:
        raise ValueError(f"give {spell('delay')} or {spell('at')}, not both")
    if delay is not None:
        if isinstance(delay, timedelta):
            delay = delay.total_seconds()
        if not _number(delay) or not 0 <= delay <= MAX_DELAY:
            raise ValueError(f"{spell('delay')} must be a number of seconds from 0 to {MAX_DELAY} "
                             f"(365 days), not {_shown(delay)}")
        fields["delay"] = delay
    if at is not None:
        if isinstance(at, datetime):
            at = at.timestamp()
        if not _number(at) or at < 0:
            raise ValueError(f"{spell('at')} must be a time (seconds since the epoch, or a datetime), "
                             f"not {_shown(at)}")
        fields["at"] = at
    if retries is not None:
        if not isinstance(retries, int) or isinstance(retries, bool) or not 0 <= retries <= MAX_RETRIES:
            raise ValueError(f"{spell('retries')} must be a whole number from 0 to {MAX_RETRIES}, "
                             f"not {_shown(retries)}")
        fields["retries"] = retries
    if backoff:
        fields["backoff"] = True
    return fields


MAX_UNIQUE = 1024
"""The longest ``unique`` key a submit may carry, in bytes of UTF-8."""

ADMIN_ACTIONS = ("pause", "resume", "clear", "drain")
"""The master port's admin actions (the daemon takes them only with
``--admin``); all but ``drain`` name a job type."""


def admin_message(action: str, type: Optional[str] = None) -> Dict[str, Any]:
    """The frame of an admin action (without its ``ref``).

    :param action: one of `ADMIN_ACTIONS`.
    :param type: the job type, for all but ``drain``.
    :raises ValueError: for an unknown action, or a type missing (or
        given to ``drain``).
    """
    if action not in ADMIN_ACTIONS:
        raise ValueError(f"unknown admin action {action!r}: one of {', '.join(ADMIN_ACTIONS)}")
    message: Dict[str, Any] = {"action": action}
    if action == "drain":
        if type is not None:
            raise ValueError("drain takes no job type")
    else:
        if not isinstance(type, str) or not type:
            raise ValueError(f"{action} needs a job type (a non-empty string)")
        message["type"] = type
    return message


def unique_key(key: Any, spell: Callable[[str], str] = lambda name: name) -> str:
    """A submit's ``unique`` key, checked as the daemon checks it.

    :param key: a non-empty string of at most `MAX_UNIQUE` bytes of UTF-8.
    :param spell: how messages name the option.
    :raises ValueError: if it is not.
    """
    if not isinstance(key, str) or not key:
        raise ValueError(f"{spell('unique')} must be a non-empty string, not {key!r}")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(f"{spell('unique')} must be text UTF-8 can hold (it has a lone surrogate)") from None
    if size > MAX_UNIQUE:
        raise ValueError(f"{spell('unique')} must be at most {MAX_UNIQUE} bytes of UTF-8, not {size}")
    return key


def progress_from_another_thread(done: Any = None, total: Any = None, data: Any = None) -> tuple:
    """Progress a worker's handler reports from a thread other than its
    client's I/O thread: checked there (a mistake raises in the caller),
    and with ``data`` copied as it is now, whatever the caller changes
    next, to be handed to the I/O thread as ``(done, total, data)``.

    :raises ValueError: as `progress_fields` does.
    :raises EncodeError: if ``data`` is not JSON.
    """
    checked = progress_fields(done, total, data)
    if "data" in checked:
        data = loads(encode(data))
    return done, total, data


def admin_outcome(action: str, names: Sequence[str], replies: Dict[str, Any]) -> Dict[str, Any]:
    """What an admin action sent to every daemon connected comes to.

    :param action: the action, for messages.
    :param names: every daemon given, in order.
    :param replies: each connected daemon's reply (a dict) or the
        exception its request ended with, by name.
    :returns: the replies, by name, if every daemon given took it.
    :raises ServerError: the first refusal (such as ``forbidden``).
    :raises GloomError: else the first other error; else `TransportError`
        naming the daemons that are not connected (the others were asked).
    """
    errors = [reply for reply in replies.values() if isinstance(reply, BaseException)]
    refusal = next((error for error in errors if isinstance(error, ServerError)), None)
    if refusal is not None:
        raise refusal
    if errors:
        raise errors[0]
    missing = [name for name in names if name not in replies]
    if missing:
        raise TransportError(f"{', '.join(missing)} not connected: {action} was not sent there"
                             + (f" (done on {', '.join(replies)})" if replies else ""), missing[0])
    return dict(replies)


def progress_fields(done: Any = None, total: Any = None, data: Any = None) -> Dict[str, Any]:
    """The fields of a progress frame: those given (None is not given),
    checked as the daemon checks them.

    :param done: how much is done: a finite number, 0 or more.
    :param total: how much there is to do: a finite number, 0 or more.
    :param data: anything else, as JSON.
    :raises ValueError: if none is given, or ``done`` or ``total`` is not
        a number from 0 up.
    :raises EncodeError: if ``data`` is not JSON.
    """
    fields: Dict[str, Any] = {}
    for name, value in (("done", done), ("total", total)):
        if value is None:
            continue
        if not _number(value) or value < 0:
            raise ValueError(f"progress {name} must be a number, 0 or more, not {_shown(value)}")
        fields[name] = value
    if data is not None:
        encode(data, "the progress data")  # refuse what cannot be sent, at once
        fields["data"] = data
    if not fields:
        raise ValueError("progress needs done, total or data")
    return fields


# --- addresses -----------------------------------------------------------------------------


def addresses(given: Union[None, str, Sequence[str]], env: Sequence[str], default: str,
              environ: Optional[Dict[str, str]] = None) -> List[str]:
    """The daemon addresses a client uses: those given (a list, or one
    string of comma-separated addresses), else the first of the
    environment variables ``env`` that is set, else ``default``.

    :param given: addresses from the caller (the API or a command-line
        option); None to look further.
    :param env: names of environment variables to read, in order.
    :param default: the address when nothing else gives one.
    :param environ: the environment; by default, ``os.environ``.
    :raises ValueError: if the addresses given are empty.
    """
    if given is None:
        environ = os.environ if environ is None else environ
        for name in env:
            if environ.get(name, "").strip():
                given = environ[name]
                break
        else:
            given = default
    if isinstance(given, str):
        found = [part.strip() for part in _split_addresses(given)]
    else:
        found = [part if not isinstance(part, str) else part.strip() for part in given]
    found = [part for part in found if part != ""]
    if not found:
        raise ValueError("no daemon address given")
    unique = list(OrderedDict.fromkeys(found))
    return unique


def _split_addresses(text: str) -> List[str]:
    """Split ``a:1,b:2``, leaving commas inside ``[...]`` alone."""
    parts, depth, start = [], 0, 0
    for index, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth = max(0, depth - 1)
        elif char == "," and depth == 0:
            parts.append(text[start:index])
            start = index + 1
    parts.append(text[start:])
    return parts


def host_port(address: str, default_host: str = "127.0.0.1") -> Tuple[str, int]:
    """``(host, port)`` from ``host:port``, ``[v6addr]:port`` or ``:port``.

    :raises ValueError: if ``address`` is not of that form.
    """
    host, _, port = address.rpartition(":")
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port.isdigit() or not 0 < int(port) < 65536 or (":" in host and "[" not in address):
        raise ValueError(f"{address!r} is not host:port")
    return host or default_host, int(port)


def display_name(address: Any) -> str:
    """The name an address goes by in messages: the text given, without
    any key or certificate paths an endpoint string carries."""
    if not isinstance(address, str):
        return repr(address)
    if "=" not in address:
        return address
    head = [part for part in address.split(":") if "=" not in part]
    return ":".join(head)


# --- framing ---------------------------------------------------------------------------------


def encode(message: Any, what: str = "the body") -> bytes:
    """A message's JSON, as the daemon takes it (UTF-8, no NaN).

    :param message: the message (or any value to be sent as JSON).
    :param what: what it is, for the error's text.
    :raises EncodeError: if the message is not JSON.
    """
    try:
        return _ENCODER.encode(message).encode()
    except (TypeError, ValueError) as e:
        raise EncodeError(f"{what} cannot be sent as JSON: {e}") from None
    except RecursionError:
        raise EncodeError(f"{what} cannot be sent as JSON: it nests too deeply") from None


def frame(message: dict, limit: int = MAX_FRAME) -> bytes:
    """A message as one frame: a 4-byte big-endian length, then its JSON.

    :param limit: the largest frame allowed, in bytes without the prefix.
    :raises EncodeError: if the message is not JSON or is over ``limit``.
    """
    data = encode(message)
    if len(data) > limit:
        raise EncodeError(f"the request is {len(data)} bytes of JSON; a frame may be at most {limit}")
    return _HEADER.pack(len(data)) + data


def loads(data: bytes) -> Any:
    """Decode JSON, with msgspec where it is installed (it refuses a few
    numbers the standard library reads, such as 1e400; those fall back)."""
    if _fast_loads is not None:
        try:
            return _fast_loads(data)
        except MsgspecError:
            pass
    return json.loads(data)


def decode(data: bytes, daemon: Optional[str] = None) -> dict:
    """One frame's JSON object.

    :raises ProtocolError: if it is not a JSON object.
    """
    try:
        message = loads(data)
    except ValueError as e:
        raise ProtocolError(f"{daemon or 'the daemon'} sent a frame that is not JSON: {e}") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"{daemon or 'the daemon'} sent a frame that is not a JSON object")
    return message


class FrameBuffer:
    """Splits a byte stream into frames, however the bytes arrive.

    :param limit: the largest frame accepted.
    """

    def __init__(self, limit: int = READ_LIMIT):
        self.limit = limit
        self._buffer = bytearray()

    def feed(self, data: bytes) -> List[bytes]:
        """Add bytes; return the frames (without prefix) they complete.

        :raises ProtocolError: if a frame is announced over the limit.
        """
        buffer = self._buffer
        buffer += data
        frames = []
        offset = 0
        while len(buffer) - offset >= 4:
            (length,) = _HEADER.unpack_from(buffer, offset)
            if length > self.limit:
                tls = buffer[offset] in (0x15, 0x16) and buffer[offset + 1] == 0x03  # a TLS record
                raise ProtocolError(f"a frame of {length} bytes is over the limit of {self.limit}" + (
                    " (these bytes are TLS: that port expects a tls: address)" if tls else ""))
            end = offset + 4 + length
            if len(buffer) < end:
                break
            frames.append(bytes(buffer[offset + 4:end]))
            offset = end
        if offset:
            del buffer[:offset]
        return frames


# --- requests ---------------------------------------------------------------------------------


def rendezvous(key: str, daemons: Iterable[str]) -> List[str]:
    """``daemons`` in the order a job with id ``key`` tries them: highest
    random weight first (rendezvous hashing), so each daemon's share moves
    to the others when it is down and comes back when it returns."""
    def weight(daemon: str) -> bytes:
        return hashlib.blake2b(f"{daemon}\0{key}".encode(), digest_size=8).digest()
    return sorted(daemons, key=weight, reverse=True)


def _id_of(job_id: Any) -> str:
    if job_id is None:
        return uuid.uuid4().hex
    if not isinstance(job_id, str) or not job_id:
        raise ValueError(f"a job id must be a non-empty string, not {job_id!r}")
    return job_id


class Request:
    """One request to a daemon and, once it ended, its outcome.

    ``kind`` is ``"submit"``, ``"cancel"``, ``"stats"``, ``"status"``,
    ``"dead_list"``, ``"dead_retry"``, ``"dead_discard"`` or ``"admin"``.
    A submit ends with its answer, a detached one (``detached``) with its
    id once the daemon acked it; the others end with their reply.  A
    submit's ``progress`` is the latest progress the daemon sent for it
    (a dict of ``done``, ``total`` and ``data``, as the slave gave them;
    None before any), and ``coalesced`` says whether its ack said it
    joined a job already there with the same ``unique`` key.  ``done`` says
    whether it ended; then `result` returns the outcome or raises it.
    ``acked`` says whether the daemon accepted a submit.  ``tried`` lists
    the daemons it was sent to, in order (a request about a job by id may
    ask several).  Shells attach what they wait with (a Deferred, a
    future) as ``waiter``.
    """

    __slots__ = ("kind", "id", "ref", "message", "daemon", "acked", "done", "value", "error",
                 "waiter", "tried", "sent", "target", "encoded", "detached", "gather", "progress",
                 "coalesced")

    def __init__(self, kind: str, message: dict, job_id: Optional[str] = None):
        self.kind = kind
        self.id = job_id
        self.ref: Optional[int] = None
        self.message = message
        self.daemon: Optional[str] = None
        self.acked = False
        self.done = False
        self.value: Any = None
        self.error: Optional[BaseException] = None
        self.waiter: Any = None
        self.tried: List[str] = []
        self.sent = False
        self.target: Optional[Request] = None
        self.encoded: Optional[bytes] = None
        self.detached = False
        self.gather: Optional[_Gather] = None
        self.progress: Optional[dict] = None
        self.coalesced = False

    def result(self) -> Any:
        """The answer body or reply; raises the error the request ended with."""
        if not self.done:
            raise RuntimeError("the request has not ended")
        if self.error is not None:
            raise self.error
        return self.value

    def __repr__(self) -> str:
        state = "done" if self.done else ("acked" if self.acked else "pending")
        return f"<Request {self.kind} {self.id!r} ref={self.ref} {state} on {self.daemon}>"


class _Gather:
    """A ``dead_list`` over several daemons: the pages each daemon has
    sent so far, until each has sent the first ``offset + limit`` of its
    dead jobs (or all of them)."""

    __slots__ = ("offset", "limit", "order", "pending", "entries", "totals", "unreachable")

    def __init__(self, offset: int, limit: int):
        self.offset = offset
        self.limit = limit
        self.order: List[str] = []
        self.pending: set = set()
        self.entries: Dict[str, List[dict]] = {}
        self.totals: Dict[str, int] = {}
        self.unreachable: Dict[str, str] = {}


_PROBES = frozenset({"status", "cancel", "dead_retry", "dead_discard"})
"""The requests about a job by id that ask the daemons in turn, in the
id's rendezvous order, until one knows the job."""


class _Daemon:
    """What a `MasterCore` knows of one daemon connection."""

    __slots__ = ("name", "up", "tried", "by_ref", "jobs", "next_ref", "last_error")

    def __init__(self, name: str):
        self.name = name
        self.up = False
        self.tried = False
        """Whether the shell has tried it since it started: it connected,
        or an attempt failed."""
        self.by_ref: "OrderedDict[int, Request]" = OrderedDict()
        self.jobs: Dict[str, Request] = {}
        self.next_ref = 1
        self.last_error: Optional[str] = None


class MasterCore:
    """A master's requests over one or more daemon connections.

    The shell calls `connected`, `received` and `lost` as its connections
    come and go and frames arrive; the core calls ``send(daemon, data)``
    with each frame to write and ``ended(request)`` with each request that
    ends.  Every request carries a ``ref`` the daemon echoes, so each
    reply is matched to its request without guessing; a daemon that echoes
    no ref (the 2009 daemon) is matched by id and, failing that, in order.

    A submit goes to the first daemon in its id's `rendezvous` order that
    is up.  A submit with a ``unique`` key goes by its key's order
    instead, so the submits that share a key meet on one daemon; with
    several daemons it waits in the backlog until every daemon has been
    tried once (`connected`, or `attempt_failed`), so that it is not sent
    to whichever daemon happened to connect first while the key's own
    daemon is still connecting.  A request about a job by id that is not this client's in
    flight (`status`, `cancel`, `dead_retry`, `dead_discard`) asks the
    daemons up in that same order, one after the other, until one knows
    the job: so it finds a detached job where its submit put it, even if
    the daemon first in line was down then.  `dead_list` gathers every
    daemon's dead list.  While no daemon is up, requests wait in a backlog
    until one comes up or the shell gives up (`unreachable`); a request
    that asks several daemons asks those up when it leaves the backlog.

    :param daemons: the daemons' names (their addresses), as the shell
        names them in its calls.
    :param send: writes a frame to a daemon's connection.
    :param ended: called with each request once it has ended.
    :param resubmit: when a daemon's connection drops, submit its
        unanswered jobs again to the others instead of failing them
        (never a detached job's submit: the daemon may have taken it).
    :param limit: the largest frame to send.
    :param progressed: called as ``progressed(request, progress)`` with
        each progress frame for a submit in flight, in the order they
        come, all before the submit ends: ``progress`` is the frame's
        dict (``done``, ``total``, ``data``, those the slave sent), also
        kept as the request's ``progress``.
    :param acked: called with each submit the daemon accepted, as its ack
        comes (its ``coalesced`` says whether it joined a unique job
        already there).
    """

    def __init__(self, daemons: Sequence[str], send: Callable[[str, bytes], None],
                 ended: Callable[[Request], None] = lambda request: None, resubmit: bool = False,
                 limit: int = MAX_FRAME,
                 progressed: Callable[[Request, dict], None] = lambda request, progress: None,
                 acked: Callable[[Request], None] = lambda request: None):
        if not daemons:
            raise ValueError("no daemon address given")
        self.daemons: Dict[str, _Daemon] = OrderedDict((name, _Daemon(name)) for name in daemons)
        self.send = send
        self.ended = ended
        self.progressed = progressed
        self.acked = acked
        self.resubmit = resubmit
        self.limit = limit
        self.backlog: List[Request] = []
        self.jobs: Dict[str, Request] = {}
        """Unfinished submits by job id (a detached one until its ack)."""

    # --- what the shell tells the core -------------------------------------------------------

    def connected(self, daemon: str) -> None:
        """A connection to ``daemon`` is up: send it what waits for it."""
        state = self.daemons[daemon]
        state.up = True
        state.tried = True
        state.last_error = None
        self._flush_backlog()

    def attempt_failed(self, daemon: str) -> None:
        """An attempt to connect to ``daemon`` failed: it counts as tried.
        Once every daemon has been tried, the unique submits that waited
        for that go to the daemons up, by their keys.  (Nothing else
        changes: requests still wait for a connection, until the shell
        calls `unreachable`.)"""
        state = self.daemons[daemon]
        if state.tried:
            return
        state.tried = True
        if self.tried:
            self._flush_backlog()

    def restarting(self) -> None:
        """The shell starts connecting again, after it stopped: each daemon
        not up counts as not tried yet."""
        for state in self.daemons.values():
            if not state.up:
                state.tried = False

    @property
    def tried(self) -> bool:
        """Whether every daemon has been tried: each connected, or an
        attempt to connect to it failed, since the shell started."""
        return all(state.tried for state in self.daemons.values())

    def lost(self, daemon: str, why: str) -> None:
        """The connection to ``daemon`` is gone (``why``, for people):
        its unanswered requests fail with `TransportError` naming it, or
        its jobs are submitted elsewhere with ``resubmit``; a request that
        asks the daemons in turn asks the next one up."""
        state = self.daemons[daemon]
        state.up = False
        if state.last_error:
            why = f"{why} (it said {state.last_error})"
        requests = list(state.by_ref.values())
        requests += [request for request in state.jobs.values() if request.ref not in state.by_ref]
        state.by_ref.clear()
        state.jobs.clear()
        state.next_ref = 1
        for request in requests:
            if request.kind == "dead_page":
                self._page_lost(request, daemon, why)
                continue
            if request.done:
                continue
            request.sent = False
            if request.kind == "submit" and request.detached:
                self._end(request, error=TransportError(
                    f"{why}; {daemon} may or may not have taken detached job {request.id!r} "
                    "(its status tells)", daemon, request.id))
            elif request.kind == "submit" and self.resubmit:
                request.acked = False
                self._route(request)
            elif request.kind == "submit":
                self._end(request, error=TransportError(
                    f"{why}; job {request.id!r} was dropped by {daemon}", daemon, request.id))
            elif request.kind in _PROBES and request.target is None and self._ask_next(request):
                continue
            else:
                self._end(request, error=TransportError(why, daemon))

    def _flush_backlog(self) -> None:
        """Route again what waits in the backlog."""
        backlog, self.backlog = self.backlog, []
        for request in backlog:
            if not request.done:
                self._route(request)

    def unreachable(self, why: str) -> None:
        """The shell gave up connecting: every request waiting for a
        connection fails with `TransportError` (``why``)."""
        backlog, self.backlog = self.backlog, []
        for request in backlog:
            if not request.done:
                self._end(request, error=TransportError(why))

    def received(self, daemon: str, message: dict) -> None:
        """A frame from ``daemon``: end the request it answers.

        :raises ProtocolError: if the frame answers nothing this client
            knows of in a way that makes sense.
        """
        state = self.daemons[daemon]
        ref = message.get("ref")
        if ref is not None and ref in state.by_ref:
            request = state.by_ref.pop(ref)
            self._reply(state, request, message)
            return
        job_id = message.get("id")
        if "progress" in message and "ok" not in message and "error" not in message \
                and "body" not in message:
            self._progress(state, job_id, message["progress"])
            return
        if "body" in message and "ok" not in message:
            request = state.jobs.pop(job_id, None) if isinstance(job_id, str) else None
            if request is not None:
                self._forget(state, request)
                self._end(request, value=message["body"])
            return
        error = message.get("error")
        if ref is None and isinstance(error, str) and error in _JOB_ENDINGS:
            # The end of an acked job (a refusal carries the request's ref).
            request = state.jobs.get(job_id) if isinstance(job_id, str) else None
            if request is not None and request.acked:
                del state.jobs[job_id]
                self._forget(state, request)
                self._end(request, error=ServerError.from_frame(message, daemon))
                return
        if "stats" in message or "ok" in message or "error" in message:
            if "error" in message:
                # An error without a ref (a frame the daemon could not read,
                # such as one over its size limit): kept, to explain a close
                # that may follow to the requests that close ends.
                state.last_error = f"{message.get('error')}: {message.get('reason', '')}"
            request = self._unreferenced_reply(state, message)
            if request is not None:
                del state.by_ref[request.ref]
                self._reply(state, request, message)
            return
        raise ProtocolError(f"{daemon} sent an unexpected frame: {json.dumps(message)[:200]}")

    # --- requests -----------------------------------------------------------------------------

    def submit(self, type: str, body: Any = None, priority: Optional[int] = None,
               id: Optional[str] = None, timeout: Optional[float] = None, *, detach: bool = False,
               delay: Any = None, at: Any = None, retries: Optional[int] = None, backoff: bool = False,
               unique: Optional[str] = None, **extra: Any) -> Request:
        """Submit a job: send it now if a daemon is up, else when one is.

        :param type: the job's type.
        :param body: the job's body: any JSON value.
        :param priority: larger runs first; the daemon's default is 0.
        :param id: the job's id, unique among this client's unfinished
            jobs; by default a fresh uuid4 hex.
        :param timeout: the job's time limit on a slave, in seconds.
        :param detach: the job belongs to the daemon: the request ends
            with the job's id once the daemon acked it, and no answer
            comes (see `job_options` for these options).
        :param delay: seconds to wait before the job is queued.
        :param at: when to queue the job (seconds since the epoch, or a
            ``datetime``); not with ``delay``.
        :param retries: how many times a lost attempt is queued again.
        :param backoff: retry lost attempts after a growing delay.
        :param unique: a key (a non-empty string, at most `MAX_UNIQUE`
            bytes of UTF-8): while a job of this type with this key is
            queued, delayed or running on the daemon, the submit joins it
            instead of queueing another (its ack says ``coalesced``, and
            the request gets that job's progress and answer).  It goes
            to the first daemon up in the key's `rendezvous` order; with
            several daemons, only once each has been tried (see the
            class).  Not with ``detach``.
        :param extra: more fields for the submit frame.
        :raises ValueError: if the id is in use, the type is missing, or an
            option is out of range.
        :raises EncodeError: if the body cannot be sent.
        """
        if not isinstance(type, str) or not type:
            raise ValueError("a job needs a type (a non-empty string)")
        if unique is not None:
            unique_key(unique)
            if detach:
                raise ValueError("unique is not for detached jobs: their ids are unique on the daemon "
                                 "already (use the key as the id)")
        job_id = _id_of(id)
        if job_id in self.jobs:
            raise ValueError(f"job {job_id!r} is already in flight")
        message = {"action": "submit", "id": job_id, "type": type, "body": body}
        if priority is not None:
            message["priority"] = priority
        if timeout is not None:
            message["timeout"] = timeout
        if detach or delay is not None or at is not None or retries is not None or backoff:
            message.update(job_options(detach, delay, at, retries, backoff))
        if unique is not None:
            message["unique"] = unique
        message.update(extra)
        request = Request("submit", message, job_id)
        request.detached = message.get("detach") is True
        request.encoded = encode(message)  # refuse what cannot be sent, at once
        self._check_size(len(request.encoded) + 24)
        self.jobs[job_id] = request
        self._route(request)
        return request

    def cancel(self, job_id: str) -> Request:
        """Withdraw an unfinished job.  One still waiting for a connection
        ends at once (with `Cancelled`); one sent to a daemon is cancelled
        there, and ends with `Cancelled` when the daemon acks the cancel.
        If the daemon had ended the job first, its answer ends it as usual
        and the cancel ends with ``unknown_job``.  An id that is not one of
        this client's jobs in flight (a detached job's, say) is asked of
        the daemons up in its rendezvous order until one does not answer
        ``unknown_job``.

        :param job_id: the id of one of this client's jobs, or of a
            detached job.
        :returns: the cancel request, which ends with the daemon's reply.
        """
        message = {"action": "cancel", "id": job_id}
        request = Request("cancel", message, job_id)
        job = self.jobs.get(job_id)
        if job is not None and not job.sent:
            self.backlog = [queued for queued in self.backlog if queued is not job]
            self._end(job, error=Cancelled(f"job {job_id!r} was cancelled"))
            self._end(request, value=None)
            return request
        if job is not None:
            request.target = job
            self._send(request, job.daemon)
            return request
        if not isinstance(job_id, str) or not job_id:
            self._end(request, error=ServerError(
                "unknown_job", f"this client has no unfinished job {job_id!r}", job_id))
            return request
        # Not one of ours in flight: perhaps a detached job, on a daemon.
        self._route(request)
        return request

    def stats(self, daemon: Optional[str] = None) -> Request:
        """Ask a daemon (by default, the first that is up) for its figures."""
        request = Request("stats", {"action": "stats"})
        if daemon is None:
            daemon = next((name for name, state in self.daemons.items() if state.up), None)
        if daemon is None:
            self.backlog.append(request)
        elif not self.daemons[daemon].up:
            self._end(request, error=TransportError(f"{daemon} is not connected", daemon))
        else:
            self._send(request, daemon)
        return request

    def status(self, job_id: str) -> Request:
        """Ask where a job is.  The request ends with the reply's fields
        as a dict (``id``, ``state``, and ``detached``, ``type``,
        ``priority``, ``attempts``, ``run_at``, ``result``, ``reason``,
        ``ended_at`` where they apply).  The daemons up are asked in the
        id's rendezvous order (the daemon that has this client's job of
        that id in flight first) until one answers a state other than
        ``unknown``; with several daemons, the dict then names it as
        ``daemon``.  If none knows the job, its state is ``unknown``.

        :param job_id: the job's id.
        :raises ValueError: if the id is not a non-empty string.
        """
        job_id = _given_id(job_id)
        request = Request("status", {"action": "status", "id": job_id}, job_id)
        self._route(request)
        return request

    def dead_list(self, offset: int = 0, limit: int = 100) -> Request:
        """Ask for a page of the dead list, oldest first.  The request ends
        with a `DeadList`.

        With several daemons, the daemons up each send the first
        ``offset + limit`` of their dead jobs (in pages of at most
        `MAX_PAGE`); these are merged oldest first (by ``ended_at``, then
        in the order the daemons were given), and the page is
        ``limit`` entries from ``offset`` of that merged list; each entry
        names its ``daemon``, and the total is the sum of theirs.  The
        daemons' lists are read one page at a time, not at one instant: a
        job that dies or is retried meanwhile may shift a page by one.

        :param offset: how many of the oldest dead jobs to skip (0 or more).
        :param limit: the most entries to return (1 to `MAX_PAGE`).
        :raises ValueError: if either is out of range.
        """
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise ValueError(f"offset must be a whole number, 0 or more, not {_shown(offset)}")
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_PAGE:
            raise ValueError(f"limit must be a whole number from 1 to {MAX_PAGE}, not {_shown(limit)}")
        request = Request("dead_list", {"action": "dead_list", "offset": offset, "limit": limit})
        if len(self.daemons) > 1:
            request.gather = _Gather(offset, limit)
        self._route(request)
        return request

    def dead_retry(self, job_id: str) -> Request:
        """Queue a dead job again, with fresh retries.  The daemons up are
        asked in the id's rendezvous order until one does not answer
        ``unknown_job``; the request ends with None, or with the last
        daemon's ``unknown_job`` if none has the job.

        :param job_id: the dead job's id.
        :raises ValueError: if the id is not a non-empty string.
        """
        return self._about("dead_retry", job_id)

    def dead_discard(self, job_id: str) -> Request:
        """Forget a dead job: asked of the daemons as `dead_retry` is.

        :param job_id: the dead job's id.
        :raises ValueError: if the id is not a non-empty string.
        """
        return self._about("dead_discard", job_id)

    def admin(self, action: str, type: Optional[str] = None, daemon: Optional[str] = None) -> Request:
        """An admin request (the daemon takes them only when it runs with
        ``--admin``; otherwise it refuses with ``forbidden``).  The
        request ends with the reply's fields but ``ok`` and ``ref``: ``{}``,
        or ``{"cleared": N}`` for ``clear``.

        - ``pause``: hand out no job of ``type`` (submits are still taken).
        - ``resume``: hand them out again.
        - ``clear``: end every queued and delayed job of ``type`` (their
          masters get ``cleared``; detached ones go to the dead list).
        - ``drain``: refuse new submits, finish the jobs queued and
          running, then exit.

        :param action: one of `ADMIN_ACTIONS`.
        :param type: the job type (for all but ``drain``, which takes none).
        :param daemon: the daemon to ask; by default, the first that is up
            (or that comes up).  A shell that means every daemon asks each.
        :raises ValueError: for an unknown action, or a type missing
            (or given to ``drain``).
        """
        request = Request("admin", admin_message(action, type))
        if daemon is None:
            self._route(request)
        elif not self.daemons[daemon].up:
            self._end(request, error=TransportError(f"{daemon} is not connected", daemon))
        else:
            self._send(request, daemon)
        return request

    @property
    def in_flight(self) -> int:
        """How many submits have not ended."""
        return len(self.jobs)

    def daemon_of(self, job_id: str) -> Optional[str]:
        """The daemon an unfinished submit was sent to, or None: not sent
        yet (waiting for a connection), or not in flight."""
        request = self.jobs.get(job_id)
        return request.daemon if request is not None and request.sent else None

    def up(self) -> List[str]:
        """The daemons connected now."""
        return [name for name, state in self.daemons.items() if state.up]

    # --- inside ------------------------------------------------------------------------------

    def _about(self, kind: str, job_id: str) -> Request:
        job_id = _given_id(job_id)
        request = Request(kind, {"action": kind, "id": job_id}, job_id)
        self._route(request)
        return request

    def _route(self, request: Request) -> None:
        kind = request.kind
        if kind != "submit":
            if kind == "stats" or kind == "admin":
                daemon = next((name for name, state in self.daemons.items() if state.up), None)
                if daemon is not None:
                    self._send(request, daemon)
                    return
            elif kind in _PROBES:
                if self._ask_next(request):
                    return
            elif kind == "dead_list" and self.up():
                if request.gather is None:
                    self._send(request, self.up()[0])
                else:
                    self._gather(request)
                return
            self.backlog.append(request)
            return
        daemons = self.daemons
        if len(daemons) == 1:
            (state,) = daemons.values()
            if state.up:
                self._send(request, state.name)
                return
        else:
            # A unique job goes where its key leads, so that every client's
            # submits with that key meet on one daemon, whatever their ids:
            # once it is known which daemons are up.
            unique = request.message.get("unique")
            if unique is not None and not self.tried:
                self.backlog.append(request)
                return
            for daemon in rendezvous(unique or request.id, daemons):
                if daemons[daemon].up:
                    self._send(request, daemon)
                    return
        self.backlog.append(request)

    def _ask_next(self, request: Request) -> bool:
        """Send a request about a job to the next daemon up in the job's
        order that it has not asked yet; False if there is none."""
        order = list(self.daemons) if len(self.daemons) == 1 else rendezvous(request.id, self.daemons)
        job = self.jobs.get(request.id)
        if job is not None and job.sent and job.daemon in order:
            order.remove(job.daemon)
            order.insert(0, job.daemon)  # the daemon that has our job of that id
        for daemon in order:
            if self.daemons[daemon].up and daemon not in request.tried:
                self._send(request, daemon)
                return True
        return False

    def _gather(self, request: Request) -> None:
        """Start a `dead_list` over the daemons up: ask each for its first page."""
        gather = request.gather
        request.sent = True
        gather.order = self.up()
        gather.pending = set(gather.order)
        for daemon in gather.order:
            self._ask_page(request, daemon, 0, min(MAX_PAGE, gather.offset + gather.limit))

    def _ask_page(self, parent: Request, daemon: str, offset: int, limit: int) -> None:
        page = Request("dead_page", {"action": "dead_list", "offset": offset, "limit": limit})
        page.target = parent
        self._send(page, daemon)

    def _page(self, state: _Daemon, page: Request, message: dict) -> None:
        """A daemon's page of a gathered `dead_list`: ask for the next, or
        end the request once every daemon has sent what it needs."""
        parent = page.target
        if parent.done:
            return
        if "error" in message:
            self._end(parent, error=ServerError.from_frame(message, state.name))
            return
        entries, total = message.get("dead"), message.get("total")
        if not isinstance(entries, list) or not isinstance(total, int) \
                or not all(isinstance(entry, dict) for entry in entries):
            self._end(parent, error=ProtocolError(f"{state.name} sent a dead list that cannot be read"))
            return
        gather = parent.gather
        got = gather.entries.setdefault(state.name, [])
        got += [dict(entry, daemon=state.name) for entry in entries]
        gather.totals[state.name] = total
        wanted = min(total, gather.offset + gather.limit)
        if entries and len(got) < wanted:
            self._ask_page(parent, state.name, len(got), min(MAX_PAGE, wanted - len(got)))
            return
        gather.pending.discard(state.name)
        self._gathered(parent)

    def _page_lost(self, page: Request, daemon: str, why: str) -> None:
        parent = page.target
        if parent.done:
            return
        gather = parent.gather
        gather.unreachable[daemon] = why
        gather.pending.discard(daemon)
        gather.entries.pop(daemon, None)
        gather.totals.pop(daemon, None)
        self._gathered(parent)

    def _gathered(self, parent: Request) -> None:
        """End a gathered `dead_list` once no daemon's page is awaited."""
        gather = parent.gather
        if gather.pending:
            return
        if not gather.totals:
            self._end(parent, error=TransportError("; ".join(gather.unreachable.values())
                                                   or "no daemon is connected"))
            return
        rank = {name: index for index, name in enumerate(gather.order)}
        merged = [((_when(entry.get("ended_at")), rank[name], position), entry)
                  for name, entries in gather.entries.items() for position, entry in enumerate(entries)]
        merged.sort(key=lambda pair: pair[0])
        page = [entry for _, entry in merged[gather.offset:gather.offset + gather.limit]]
        self._end(parent, value=DeadList(page, sum(gather.totals.values()), gather.offset,
                                         gather.unreachable))

    def _send(self, request: Request, daemon: str) -> None:
        state = self.daemons[daemon]
        ref = state.next_ref
        state.next_ref = ref + 1
        request.ref = ref
        request.daemon = daemon
        request.sent = True
        request.tried.append(daemon)
        state.by_ref[ref] = request
        if request.kind == "submit":
            state.jobs[request.id] = request
        encoded = request.encoded
        if encoded is None:
            encoded = request.encoded = encode(request.message)
        # The ref goes last, spliced in: the message is encoded only once.
        data = b"%s,\"ref\":%d}" % (encoded[:-1], ref)
        self._check_size(len(data))
        self.send(daemon, _HEADER.pack(len(data)) + data)

    def _check_size(self, size: int) -> None:
        if size > self.limit:
            raise EncodeError(f"the request is {size} bytes of JSON; a frame may be at most {self.limit}")

    def _unreferenced_reply(self, state: _Daemon, message: dict) -> Optional[Request]:
        """The request a reply without a known ref answers: by id, else
        the oldest request of the reply's kind, else the oldest."""
        job_id = message.get("id")
        if "stats" in message:
            return next((r for r in state.by_ref.values() if r.kind == "stats"), None)
        if isinstance(job_id, str):
            for request in state.by_ref.values():
                if request.id == job_id and request.kind != "stats":
                    return request
        if "ok" in message:
            return None
        return next(iter(state.by_ref.values()), None)

    def _reply(self, state: _Daemon, request: Request, message: dict) -> None:
        """End (or ack) the request a reply answers."""
        kind = request.kind
        if kind == "dead_page":
            self._page(state, request, message)
        elif "error" in message:
            error = ServerError.from_frame(message, state.name)
            if kind == "submit":
                state.jobs.pop(request.id, None)
                if self.jobs.get(request.id) is request:
                    del self.jobs[request.id]
            elif kind in _PROBES and request.target is None and error.error == "unknown_job" \
                    and self._ask_next(request):
                return  # not on that daemon: ask the next
            self._end(request, error=error)
        elif kind == "submit":
            request.acked = True  # the answer ends it
            request.coalesced = message.get("coalesced") is True
            self.acked(request)
            if request.detached:  # no answer comes: the ack ends it
                state.jobs.pop(request.id, None)
                self._end(request, value=request.id)
        elif kind == "cancel":
            target = request.target
            if target is not None and not target.done:
                state.jobs.pop(target.id, None)
                state.by_ref.pop(target.ref, None)
                self._end(target, error=Cancelled(f"job {target.id!r} was cancelled"))
            self._end(request, value=None)
        elif kind == "stats":
            if isinstance(message.get("stats"), dict):
                self._end(request, value=message["stats"])
            else:
                self._end(request, error=ProtocolError(f"{state.name} sent stats that are not an object"))
        elif kind == "status":
            found = {key: value for key, value in message.items() if key not in ("ok", "ref")}
            if not isinstance(found.get("state"), str):
                self._end(request, error=ProtocolError(f"{state.name} sent a status without a state"))
            elif found["state"] == "unknown" and self._ask_next(request):
                return  # not on that daemon: ask the next
            else:
                found.setdefault("id", request.id)
                if found["state"] != "unknown" and len(self.daemons) > 1:
                    found["daemon"] = state.name
                self._end(request, value=found)
        elif kind == "dead_list":
            entries, total = message.get("dead"), message.get("total")
            if isinstance(entries, list) and isinstance(total, int):
                offset = message.get("offset")
                self._end(request, value=DeadList(
                    entries, total, offset if isinstance(offset, int) else request.message["offset"]))
            else:
                self._end(request, error=ProtocolError(f"{state.name} sent a dead list that cannot be read"))
        elif kind == "admin":
            self._end(request, value={key: value for key, value in message.items() if key not in ("ok", "ref")})
        else:
            self._end(request, value=None)

    def _progress(self, state: _Daemon, job_id: Any, progress: Any) -> None:
        """A progress frame: keep it on the submit it is for and say so.
        One for a job not in flight here (cancelled, ended, detached) is
        dropped."""
        if not isinstance(progress, dict):
            raise ProtocolError(f"{state.name} sent a progress that is not an object: "
                                f"{json.dumps(progress)[:200]}")
        request = state.jobs.get(job_id) if isinstance(job_id, str) else None
        if request is None or request.done:
            return
        request.progress = progress
        self.progressed(request, progress)

    def _forget(self, state: _Daemon, request: Request) -> None:
        state.by_ref.pop(request.ref, None)
        if self.jobs.get(request.id) is request:
            del self.jobs[request.id]

    def _end(self, request: Request, value: Any = None, error: Optional[BaseException] = None) -> None:
        if request.done:
            return
        request.done = True
        request.value = value
        request.error = error
        if request.kind == "submit" and self.jobs.get(request.id) is request:
            del self.jobs[request.id]
        self.ended(request)


def _given_id(job_id: Any) -> str:
    """A job id given to ask about a job: a non-empty string."""
    if not isinstance(job_id, str) or not job_id:
        raise ValueError(f"a job id must be a non-empty string, not {job_id!r}")
    return job_id


def _when(value: Any) -> float:
    """An ``ended_at`` to sort by (0 if it is not a number)."""
    return float(value) if _number(value) else 0.0


class InOrder:
    """A window of requests whose outcomes come out in the order they
    went in, however they end.

    :param window: the most requests in it at once.
    """

    def __init__(self, window: int):
        if window < 1:
            raise ValueError("window must be at least 1")
        self.window = window
        self._requests: "OrderedDict[int, Request]" = OrderedDict()
        self._next = 0

    @property
    def room(self) -> bool:
        """Whether another request may go in."""
        return len(self._requests) < self.window

    def __len__(self) -> int:
        return len(self._requests)

    def add(self, request: Request) -> None:
        """Put a request in the window, behind those already in it."""
        self._requests[self._next] = request
        self._next += 1

    def ready(self) -> Iterator[Request]:
        """Take out the ended requests at the head, in order."""
        requests = self._requests
        while requests:
            key, request = next(iter(requests.items()))
            if not request.done:
                return
            del requests[key]
            yield request

    def head(self) -> Optional[Request]:
        """The oldest request in the window, if any."""
        return next(iter(self._requests.values()), None)


# --- workers ---------------------------------------------------------------------------------

DOWN, IDLE, WAITING, BUSY = "down", "idle", "waiting", "busy"


class Link:
    """One slave connection of a `WorkerCore`: which daemon, whether the
    daemon thinks it wants a job (it joined and has not left since), and
    the job it holds."""

    __slots__ = ("daemon", "index", "up", "wants", "job", "replies", "handle", "since", "reported")

    def __init__(self, daemon: str, index: int):
        self.daemon = daemon
        self.index = index
        self.up = False
        self.wants = False
        self.job: Optional[Job] = None
        self.replies: List[str] = []
        self.handle: Any = None
        """The shell's connection object."""
        self.since = 0
        """When (in calls of `WorkerCore.rotate`) it last began to ask."""
        self.reported: List[Job] = []
        """The jobs whose ``progress`` or ``touch`` awaits its reply, oldest first."""

    @property
    def state(self) -> str:
        """``down``, ``idle`` (up, not asking), ``waiting`` or ``busy``."""
        if not self.up:
            return DOWN
        if self.job is not None:
            return BUSY
        return WAITING if self.wants else IDLE

    def __repr__(self) -> str:
        return f"<Link {self.daemon}#{self.index} {self.state}>"


class WorkerCore:
    """A worker's slave connections, ``concurrency`` to each daemon, and
    the rule that keeps it from holding more than ``concurrency`` jobs.

    At most ``free`` connections in all ask for work at any moment
    (``join``), where ``free`` is the room left for jobs, and a place
    comes free only once its daemon has confirmed the answer, ``leave`` or
    ``release`` that ended its use: so the daemons together never count
    more jobs on the worker than it may hold, even for a moment.  The asks
    are spread over the daemons (the fewest asks first, then in turn),
    and `rotate`, called by the shell every `ROTATE_INTERVAL` seconds,
    moves an ask that brought nothing for a whole interval to a daemon
    that has none, so with fewer free places than daemons every daemon is
    still served.  An ask taken back (``leave``) may cross a job on its
    way: that job is handed back unrun (``release``), to the head of its
    queue, without counting an attempt.  With one daemon a connection
    keeps asking after each answer, as in the 2009 protocol: nothing is
    sent beyond ``join``, the job's answer and, on stop, ``leave``.

    The shell calls `link_up`, `received`, `link_down`, `finished`,
    `rotate` and `stop`; the core calls ``send(link, data)`` to write,
    ``run(link, job)`` to start a job, ``report(text, fatal)`` with news
    for people (fatal: retrying cannot help, such as a refused join), and
    ``replied(link, kind, error)`` with each reply to a request (``kind``
    is ``join``, ``leave``, ``respond``, ``release``, ``progress`` or
    ``touch``; ``error`` a `ServerError` or None).

    Each job handed to ``run`` is bound (`Job.bind`) to `progress` and
    `touch` on its link, so a handler calls ``job.progress(...)`` and
    ``job.touch()``; those calls must come from the shell's I/O thread,
    or be handed to it (a shell that runs handlers elsewhere binds the
    job again).  A ``cancelled`` reply to either sets the job's
    ``cancelled``, a ``timed_out`` reply its ``timed_out``; the first of
    them calls the job's `Job.on_dropped` callbacks.

    :param job_type: the type of jobs to take; None to take none until
        `join` names one.
    :param concurrency: the most jobs held at once.
    :param daemons: the daemons' slave addresses.
    """

    ROTATE_INTERVAL = 0.2
    """How often, in seconds, the shell calls `rotate` (when it has more
    than one daemon)."""

    DRY_INTERVALS = 10
    """For how many intervals a daemon whose ask brought nothing is asked
    only when no daemon that had work lately can be."""

    def __init__(self, job_type: Optional[str], concurrency: int, daemons: Sequence[str],
                 send: Callable[[Link, bytes], None], run: Callable[[Link, Job], None],
                 report: Callable[[str, bool], None] = lambda text, fatal: None,
                 replied: Callable[[Link, str, Optional[ServerError]], None] = lambda *args: None):
        if job_type is not None and (not isinstance(job_type, str) or not job_type):
            raise ValueError("a worker needs a job type (a non-empty string)")
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if not daemons:
            raise ValueError("no daemon address given")
        self.job_type = job_type
        self.concurrency = concurrency
        self.send = send
        self.run = run
        self.report = report
        self.replied = replied
        self.daemons: List[str] = list(OrderedDict.fromkeys(daemons))
        self.links: List[Link] = [Link(daemon, index) for daemon in self.daemons
                                  for index in range(concurrency)]
        self._by_daemon: Dict[str, List[Link]] = OrderedDict(
            (daemon, [link for link in self.links if link.daemon == daemon]) for daemon in self.daemons)
        self._turn = 0  # where the next ask starts looking, among the daemons
        self._tick = 0  # counts calls of rotate
        # Until when (in ticks) each daemon counts as having had no work.
        self._dry_until: Dict[str, int] = dict.fromkeys(self.daemons, 0)
        self.in_hand = 0
        """How many jobs the worker holds, those whose connection was lost
        while their handler runs on among them."""
        self._orphans: Dict[int, Job] = {}
        self.stopping = False
        self.released = 0
        """How many jobs were handed back unrun because they came when the
        worker was full or stopping."""

    # --- what the shell tells the core --------------------------------------------------------

    def link_up(self, link: Link) -> None:
        """A slave connection is up (and has not joined)."""
        link.up = True
        link.wants = False
        link.job = None
        link.replies = []
        link.reported = []
        self._balance()

    def link_down(self, link: Link) -> Optional[Job]:
        """A slave connection is gone; the daemon takes back its job.

        The job stays counted in `in_hand` while its handler runs on (its
        outcome can no longer be sent, and the daemon may hand the job out
        again), so the worker never runs more than ``concurrency`` at
        once: the shell calls `finished` when the handler ends, or
        `abandon` if it never started it.

        :returns: the job it held, if any.
        """
        job = link.job
        link.up = False
        link.wants = False
        link.job = None
        link.replies = []
        link.reported = []
        if job is not None:
            self._orphans[id(job)] = job
        self._balance()
        return job

    def abandon(self, job: Job) -> None:
        """A job whose connection was lost will not be run (the shell had
        not started it): its place comes free."""
        if self._orphans.pop(id(job), None) is not None:
            self.in_hand -= 1
            self._balance()

    def received(self, link: Link, message: dict) -> None:
        """A frame on a slave connection."""
        if message.get("action") == "job":
            self._job(link, Job(message))
            return
        expected = link.replies.pop(0) if link.replies else None
        error = ServerError.from_frame(message, link.daemon) if "error" in message else None
        if expected in _REPORTS:
            self._reported(link, expected, error)
            return
        if expected is not None:
            self.replied(link, expected, error)
        if error is not None:
            if expected == "join":
                link.wants = False
                self.report(f"{link.daemon} refused to serve {self.job_type!r}: {error}", True)
            elif error.error == "timed_out":
                self.report(f"{link.daemon}: job {error.id!r} ran past its timeout; "
                            "the answer was discarded", False)
            else:
                self.report(f"{link.daemon} refused {expected or 'a request'}: {error}", False)
        elif not message.get("ok"):
            self.report(f"{link.daemon} sent an unexpected frame: {json.dumps(message)[:200]}", True)
        if expected in _SETTLING and not link.replies and not link.wants and link.job is None:
            self._balance()  # its daemon counts no job on it any more: the place is free

    def finished(self, link: Link, job: Job, outcome: Any = None,
                 failure: Optional[str] = None) -> None:
        """The worker ran ``job``: answer it (``failure``: the reason it
        failed), then take new work if there is room."""
        if link.job is not job:
            self.abandon(job)  # the connection was lost meanwhile: only its place comes free
            return
        link.job = None
        self.in_hand -= 1
        if link.up:
            if link.wants and not self._keeps_asking(link):
                # Leave first, so the daemon hands this connection no job
                # after the answer: the next ask goes elsewhere.
                link.wants = False
                self._request(link, "leave", _LEAVE)
            try:
                if failure is None:
                    data = _slave_frame({"action": "respond", "id": job.id, "body": outcome})
                else:
                    data = _slave_frame({"action": "fail", "id": job.id, "reason": str(failure)})
            except EncodeError as e:
                data = _slave_frame({"action": "fail", "id": job.id, "reason": str(e)})
            self._request(link, "respond", data)
            if link.wants:
                link.since = self._tick
        self._balance()

    def progress(self, link: Link, job: Job, done: Optional[float] = None, total: Optional[float] = None,
                 data: Any = None) -> bool:
        """Send a progress for ``job``, held on ``link`` (see `Job.progress`;
        a progress also restarts the job's timeout).  Its reply comes
        through ``replied(link, "progress", error)``.

        :param link: the connection that holds the job.
        :param job: the job.
        :param done: how much is done (a number, 0 or more).
        :param total: how much there is to do (a number, 0 or more).
        :param data: anything else, as JSON.
        :returns: whether it was sent: False, and nothing sent, if ``link``
            no longer holds ``job`` (it was answered, or the connection
            was lost).
        :raises ValueError: if none of the three is given, or ``done`` or
            ``total`` is not a number from 0 up.
        :raises EncodeError: if ``data`` is not JSON.
        """
        fields = progress_fields(done, total, data)
        if not link.up or link.job is not job:
            return False
        message = {"action": "progress", "id": job.id}
        message.update(fields)
        link.reported.append(job)
        self._request(link, "progress", _slave_frame(message))
        return True

    def touch(self, link: Link, job: Job) -> bool:
        """Restart the timeout of ``job``, held on ``link``.  Its reply
        comes through ``replied(link, "touch", error)``.

        :param link: the connection that holds the job.
        :param job: the job.
        :returns: whether it was sent (as `progress` says).
        """
        if not link.up or link.job is not job:
            return False
        link.reported.append(job)
        self._request(link, "touch", _slave_frame({"action": "touch", "id": job.id}))
        return True

    def progress_or_touch(self, link: Link, job: Job, fields: Optional[tuple]) -> bool:
        """`progress` with ``fields`` (done, total, data), or `touch` when
        it is None: the one call a shell hands to its I/O thread.

        :returns: whether it was sent.
        """
        if fields is None:
            return self.touch(link, job)
        return self.progress(link, job, *fields)

    def join(self, job_type: str) -> None:
        """Serve ``job_type`` from now on: connections asking for work ask
        for this type instead (a connection holding a job switches after
        answering it)."""
        if not isinstance(job_type, str) or not job_type:
            raise ValueError("a worker needs a job type (a non-empty string)")
        self.job_type = job_type
        data = _slave_frame({"action": "join", "type": job_type})
        for link in self.links:
            if link.up and link.wants:
                self._request(link, "join", data)
        self._balance()

    def rotate(self) -> None:
        """Move each ask that brought no job for a whole interval to
        another daemon: one that had work lately, else one with fewer asks.
        So while the worker has fewer free places than daemons, its idle
        places visit every daemon in turn, and a daemon with work is found
        within a few intervals."""
        self._tick += 1
        if len(self.daemons) < 2 or self.free <= 0:
            return
        tick = self._tick
        stale = [link for link in self.links if link.up and link.job is None and link.wants
                 and link.since <= tick - 2]
        for link in stale:
            self._dry_until[link.daemon] = tick + self.DRY_INTERVALS
            counts = self._asks()
            target = self._next_daemon(counts, exclude=link.daemon)
            if target is None or (self._dry_until[target] > tick and counts[target] >= counts[link.daemon]):
                link.since = tick  # nowhere better: ask on here
                continue
            link.wants = False
            self._request(link, "leave", _LEAVE)  # the ask moves once the leave is confirmed
            self._turn = self.daemons.index(target)

    def stop(self) -> None:
        """Take no new job: every asking connection leaves; a job that
        crosses a leave is released.  The jobs in hand finish."""
        self.stopping = True
        self._balance()

    @property
    def free(self) -> int:
        """How many more jobs the worker may take now: its concurrency less
        the jobs in hand and the connections whose daemon may still count
        a job on them (an answer, leave or release not yet confirmed)."""
        if self.stopping or self.job_type is None:
            return 0
        free = self.concurrency - self.in_hand
        for link in self.links:
            if link.replies and link.up and link.job is None and not link.wants:
                free -= 1  # settling
        return free

    @property
    def asking(self) -> int:
        """How many connections ask for work now."""
        return sum(1 for link in self.links if link.up and link.job is None and link.wants)

    # --- inside ------------------------------------------------------------------------------

    def _job(self, link: Link, job: Job) -> None:
        if link.job is not None:
            self.report(f"{link.daemon} sent job {job.id!r} to a connection holding job "
                        f"{link.job.id!r}", True)
            return
        if self.free <= 0 or not link.wants:
            # It crossed our leave: hand it back unrun, at the head of its queue.
            if link.wants:
                link.wants = False
                self._request(link, "leave", _LEAVE)
            self.released += 1
            self._request(link, "release", _slave_frame({"action": "release", "id": job.id}))
            return
        link.job = job
        self.in_hand += 1
        self._dry_until[link.daemon] = 0
        job.bind(lambda done=None, total=None, data=None: self.progress(link, job, done, total, data),
                 lambda: self.touch(link, job))
        self._balance()
        self.run(link, job)

    def _reported(self, link: Link, kind: str, error: Optional[ServerError]) -> None:
        """The reply to a ``progress`` or ``touch``: a refusal sets the
        job's ``cancelled`` or ``timed_out`` (calling its `Job.on_dropped`
        callbacks the first time) and is reported, once per job and error
        code."""
        job = link.reported.pop(0) if link.reported else None
        if error is not None and job is not None:
            said = job.__dict__.setdefault("_refusals", set())
            if error.error in ("cancelled", "timed_out"):
                for raised in job._drop(error.error):
                    self.report(f"a function given to on_dropped of job {job.id!r} raised "
                                f"{raised.__class__.__name__}: {raised}", False)
            if error.error not in said:
                said.add(error.error)
                if error.error == "cancelled":
                    self.report(f"{link.daemon}: job {job.id!r} was cancelled by every master that "
                                "submitted it; its answer will be dropped", False)
                elif error.error == "timed_out":
                    self.report(f"{link.daemon}: job {job.id!r} ran past its timeout; its {kind} came "
                                "too late and its answer will be discarded", False)
                else:
                    self.report(f"{link.daemon} refused the {kind} of job {job.id!r}: {error}", False)
        self.replied(link, kind, error)

    def _request(self, link: Link, kind: str, data: bytes) -> None:
        link.replies.append(kind)
        self.send(link, data)

    def _order(self) -> List[str]:
        """The daemons, starting with the one whose turn it is."""
        turn = self._turn % len(self.daemons)
        return self.daemons[turn:] + self.daemons[:turn]

    def _asks(self) -> Dict[str, int]:
        counts = dict.fromkeys(self.daemons, 0)
        for link in self.links:
            if link.up and link.job is None and link.wants:
                counts[link.daemon] += 1
        return counts

    def _idle_link(self, daemon: str) -> Optional[Link]:
        """A connection to ``daemon`` that is up, holds no job and does not ask."""
        for link in self._by_daemon[daemon]:
            if link.up and link.job is None and not link.wants:
                return link
        return None

    def _next_daemon(self, counts: Dict[str, int], exclude: Optional[str] = None,
                     include: Optional[str] = None) -> Optional[str]:
        """The daemon the next ask goes to: of those with an idle connection
        (or ``include``), one that had work lately before one that did not,
        then the one with the fewest asks, then the first in turn."""
        tick = self._tick
        best, best_key = None, None
        for daemon in self._order():
            if daemon == exclude or (daemon != include and self._idle_link(daemon) is None):
                continue
            key = (self._dry_until[daemon] > tick, counts[daemon])
            if best_key is None or key < best_key:
                best, best_key = daemon, key
        return best

    def _keeps_asking(self, link: Link) -> bool:
        """Whether a connection that answered its job should go on asking:
        always with one daemon; with several, if its daemon is where the
        next ask would go anyway (so asks take turns among the daemons
        that have work)."""
        if self.free <= 0:
            return False
        if len(self.daemons) == 1:
            return True
        counts = self._asks()
        counts[link.daemon] -= 1  # not counting its own ask
        best = self._next_daemon(counts, include=link.daemon)
        if best == link.daemon:
            self._turn = (self.daemons.index(best) + 1) % len(self.daemons)
            return True
        return False

    def _ask(self, link: Link) -> None:
        link.wants = True
        link.since = self._tick
        self._request(link, "join", _slave_frame({"action": "join", "type": self.job_type}))

    def _balance(self) -> None:
        """Make the number of asking connections the room for jobs: take
        asks back from the daemons with the most, add asks where fewest."""
        free = self.free
        asking = [link for link in self.links if link.wants and link.up and link.job is None]
        if free == len(asking) and len(self.daemons) < 2:
            return  # as it should be (the usual case, after each job with one daemon)
        excess = len(asking) - max(free, 0)
        if excess > 0:
            counts = self._asks()
            for _ in range(excess):
                daemon = max(reversed(self._order()), key=lambda name: counts[name])
                link = next(link for link in reversed(self._by_daemon[daemon])
                            if link.up and link.job is None and link.wants)
                counts[daemon] -= 1
                link.wants = False
                self._request(link, "leave", _LEAVE)
            return
        counts = self._asks()
        for _ in range(free - len(asking)):
            daemon = self._next_daemon(counts)
            if daemon is None:
                break
            self._ask(self._idle_link(daemon))
            counts[daemon] += 1
            self._turn = (self.daemons.index(daemon) + 1) % len(self.daemons)
        self._spread(counts)

    def _spread(self, counts: Dict[str, int]) -> None:
        """Move asks from a daemon with two more than another that may
        have work (a daemon that just came up, say) until they are even:
        each leaves, and `_balance` asks again once the leave is confirmed."""
        if len(self.daemons) < 2:
            return
        tick = self._tick
        while True:
            crowded = max(self._order(), key=lambda name: counts[name])
            target = self._next_daemon(counts, exclude=crowded)
            if target is None or self._dry_until[target] > tick or counts[target] + 2 > counts[crowded]:
                return
            link = next(link for link in reversed(self._by_daemon[crowded])
                        if link.up and link.job is None and link.wants)
            link.wants = False
            self._request(link, "leave", _LEAVE)  # the ask moves once the leave is confirmed
            counts[crowded] -= 1
            counts[target] += 1


def _slave_frame(message: dict) -> bytes:
    return frame(message)


_LEAVE = _slave_frame({"action": "leave"})

_REPORTS = frozenset({"progress", "touch"})
"""The requests about the job a connection holds, which change nothing of its place."""

_SETTLING = frozenset({"leave", "respond", "release"})
"""The requests after which a daemon may count a job on a connection until it replies."""


# --- stats -----------------------------------------------------------------------------------


def sum_stats(by_daemon: Dict[str, dict]) -> dict:
    """The figures of several daemons added up, in the shape of one
    daemon's stats, with each daemon's own under ``daemons`` (a figure
    that does not add up, such as ``journal``, is only there).  The
    ``paused`` types are those paused on any daemon (a type's ``paused``
    likewise), and ``draining`` says whether any daemon is draining.

    :param by_daemon: each daemon's stats, by its address.
    """
    total: Dict[str, Any] = {"types": {}, "totals": {}, "masters": 0, "slaves": 0,
                             "daemons": dict(by_daemon)}
    versions = set()
    uptimes = []
    for stats in by_daemon.values():
        total["masters"] += stats.get("masters", 0)
        total["slaves"] += stats.get("slaves", 0)
        uptimes.append(stats.get("uptime", 0))
        versions.add(str(stats.get("version", "?")))
        for name, value in stats.get("totals", {}).items():
            if isinstance(value, (int, float)):
                total["totals"][name] = total["totals"].get(name, 0) + value
        for name, figures in stats.get("types", {}).items():
            into = total["types"].setdefault(name, {})
            for key, value in figures.items():
                if isinstance(value, bool):
                    into[key] = into.get(key, False) or value  # such as paused: on any daemon
                elif isinstance(value, (int, float)):
                    if key.startswith("latency") or key.endswith("_ms"):
                        into[key] = max(into.get(key, value), value)
                    else:
                        into[key] = into.get(key, 0) + value
        if stats.get("types_omitted"):
            total["types_omitted"] = total.get("types_omitted", 0) + stats["types_omitted"]
        if _number(stats.get("delayed")):
            total["delayed"] = total.get("delayed", 0) + stats["delayed"]
        if isinstance(stats.get("paused"), list):
            paused = total.setdefault("paused", [])
            paused += [name for name in stats["paused"] if name not in paused]
        if isinstance(stats.get("draining"), bool):
            total["draining"] = total.get("draining", False) or stats["draining"]
        if isinstance(stats.get("detached"), dict):
            into = total.setdefault("detached", {})
            for key, value in stats["detached"].items():
                if _number(value):
                    into[key] = into.get(key, 0) + value
    total["uptime"] = min(uptimes) if uptimes else 0
    total["version"] = ", ".join(sorted(versions))
    return total
