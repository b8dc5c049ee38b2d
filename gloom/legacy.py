"""The 2009 reference client's API, for code written against it.

Code written for the Python client of the original Erlang Gloom
(``clients/python/gloom.py``) ports by changing its import::

    import gloom.legacy as gloom

    master = gloom.Master("127.0.0.1", 9998)      # or Master(("127.0.0.1", 9998)), Master(sock)
    job_id = master.submit(type="upper", body="hello", timeout=5)   # waits up to 5 s for the ack
    answer = master.receive(timeout=10)            # a Job; a failed job raises ServerError

    slave = gloom.Slave(ip="127.0.0.1", port=9999)
    slave.join("upper")                            # True
    job = slave.job()
    slave.respond(job.body.upper())                # True

The client's three published versions are all served: constructors taking
``(ip, port)`` or an address tuple, a socket or another connection; ``send``
and ``write`` whichever way round a version spelled them.  Where the Erlang
daemon's replies differ from today's, they are mapped onto what 2009 code
expects; each method's docstring says how.  Only the standard library is
used (and `gloom.client`, whose exceptions these extend).
"""

from __future__ import annotations

import json
import socket
import struct
import time
import uuid
from collections import deque
from typing import Any, Optional

from gloom import client as _client

__all__ = [
    "Connection", "GloomError", "Job", "Master", "Protocol", "ProtocolError", "ServerError",
    "Slave", "Timeout", "TransportError",
]

_HEADER = struct.Struct("!I")

# Error codes whose "reason" the Erlang daemon set to the job's id.
_ID_AS_REASON = frozenset(["id_exists", "job_failed"])


class GloomError(_client.GloomError):
    """Anything the 2009 client raised of its own (not a timeout: see
    `Timeout`).  Also a ``gloom.client.GloomError``."""


class TransportError(GloomError, _client.TransportError, OSError):
    """The connection could not be made, was lost, or ended part way
    through a frame.  Also an ``OSError`` (``socket.error``), which is what
    the 2009 client let through for a refused or reset connection; ``errno``
    is kept when the system gave one."""

    def __init__(self, *args):
        OSError.__init__(self, *args)  # (errno, strerror) or (message,), as socket.error
        self.daemon = None
        self.id = None


class ProtocolError(GloomError, _client.ProtocolError):
    """The daemon sent something the client did not expect."""


class ServerError(GloomError, _client.ServerError):
    """The daemon sent an error frame.  Built, as in 2009, from the frame's
    dict: ``error`` is its code and ``reason`` its reason, except that for
    ``id_exists`` and ``job_failed`` the ``reason`` is the job's id, as the
    Erlang daemon sent it.  New: ``id`` (the job's id, or None) and
    ``detail`` (today's reason text, always).

    :param data: the decoded error frame.
    """

    def __init__(self, data: dict):
        Exception.__init__(self, data)  # args == (data,), as in 2009
        self.error = data.get("error", "unknown error")
        self.id = data.get("id")
        self.detail = data.get("reason", "unknown cause")
        if self.error in _ID_AS_REASON and self.id is not None:
            self.reason = self.id
        else:
            self.reason = self.detail

    def __str__(self) -> str:
        text = "%s -> %s" % (self.error, self.reason)
        if self.reason != self.detail:
            text += " (%s)" % self.detail
        return text


class Timeout(_client.Timeout, socket.timeout):
    """Nothing came within the ``timeout`` given.  A ``socket.timeout``, as
    the 2009 client's timeouts were, and a ``gloom.client.Timeout``; not a
    `GloomError`, so an ``except GloomError`` written for 2009 does not
    catch it.  What came late is read in its turn later."""


class Job(dict):
    """A job (``action``, ``id``, ``type``, ``body``) or an answer (``id``,
    ``body``): the frame's dict, with properties."""

    @property
    def id(self) -> Any:
        """Job id."""
        return self.get("id")

    @property
    def type(self) -> Any:
        """Job type."""
        return self.get("type")

    @property
    def body(self) -> Any:
        """Job body."""
        return self.get("body")


def _deadline(timeout: Optional[float]) -> Optional[float]:
    return None if timeout is None else time.monotonic() + timeout


def _transport_error(error: OSError, text: str) -> TransportError:
    text = "%s: %s" % (text, error.strerror or error)
    return TransportError(text) if error.errno is None else TransportError(error.errno, text)


def _encode(data: Any) -> bytes:
    """A frame's payload: text and bytes as they are, anything else as JSON."""
    if isinstance(data, str):
        return data.encode("utf-8")
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    return json.dumps(data, separators=(",", ":")).encode("utf-8")


class Protocol(object):
    """Frames (a 4-byte big-endian length, then the payload) over a socket,
    read whole however the bytes arrive (the 2009 client assumed one
    ``recv`` per frame).

    :param sock: a connected socket (an ``ssl`` socket works too).
    """

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._buffer = bytearray()  # bytes read past the last whole frame

    def disconnect(self) -> None:
        """Close the connection."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def send(self, data: Any, timeout: Optional[float] = None, check_error: bool = True) -> None:
        """Send one frame.  A ``str`` or ``bytes`` is sent as the payload as
        it is (2009's ``send``, later ``write``); anything else as JSON
        (2009's ``write``, later ``send``).

        :param data: the payload, or a value to send as JSON.
        :param timeout: seconds the send may take.  One that runs out may
            have sent part of the frame, so the connection is closed.  A
            bool here is the first version's ``check_error``, given by
            position.
        :param check_error: accepted for the first version's code, which
            took it and never used it; an error frame is raised by the
            read that meets it.
        """
        if isinstance(timeout, bool):
            timeout = None
        self._send_payload(_encode(data), _deadline(timeout))

    def recv(self, timeout: Optional[float] = None) -> bytes:
        """The payload of the next frame, as bytes.

        :param timeout: seconds to wait; by default, for ever.
        :raises Timeout: if no whole frame came in time.
        """
        return self._next_payload(_deadline(timeout))

    # --- the socket --------------------------------------------------------

    def _settimeout(self, deadline: Optional[float]) -> None:
        if deadline is None:
            self.sock.settimeout(None)
        else:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Timeout("timed out")
            self.sock.settimeout(remaining)

    def _send_payload(self, payload: bytes, deadline: Optional[float]) -> None:
        self._settimeout(deadline)
        try:
            self.sock.sendall(_HEADER.pack(len(payload)) + payload)
        except socket.timeout:
            self.disconnect()
            raise Timeout("timed out sending; the connection was closed") from None
        except OSError as e:
            raise _transport_error(e, "connection lost") from None

    def _next_payload(self, deadline: Optional[float]) -> bytes:
        buffer = self._buffer
        while True:
            if len(buffer) >= 4:
                (length,) = _HEADER.unpack_from(buffer)
                end = 4 + length
                if len(buffer) >= end:
                    payload = bytes(buffer[4:end])
                    del buffer[:end]
                    return payload
            self._settimeout(deadline)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                raise Timeout("timed out") from None
            except OSError as e:
                raise _transport_error(e, "connection lost") from None
            if not chunk:
                where = " part way through a frame" if buffer else ""
                raise TransportError("the daemon closed the connection" + where)
            buffer += chunk

    def _next_frame(self, deadline: Optional[float]) -> dict:
        payload = self._next_payload(deadline)
        try:
            frame = json.loads(payload)
        except ValueError as e:
            raise ProtocolError("invalid JSON from the daemon: %s" % e) from None
        if not isinstance(frame, dict):
            raise ProtocolError("unexpected frame from the daemon: %r" % (frame,))
        return frame


class Connection(Protocol):
    """A connection to one of the daemon's ports, speaking JSON.

    :param addr: where to connect: a ``(host, port)`` tuple, a host name
        (with ``port``), a connected socket, or another `Protocol` (whose
        socket, and unread bytes, this one takes over).
    :param port: the port, when ``addr`` or ``ip`` is a host name.
    :param ip: the host, as the 2009 ``Connection(ip, port)`` named it.
    :raises TransportError: if the connection cannot be made.
    :raises TypeError: for an ``addr`` of another kind.
    """

    default_port: Optional[int] = None
    """The port used when only a host is given."""

    def __init__(self, addr: Any = None, port: Optional[int] = None, ip: Optional[str] = None):
        if ip is not None:
            if addr is not None:
                raise TypeError("give addr or ip, not both")
            addr = ip
        if isinstance(addr, (Protocol, socket.socket, tuple)) and port is not None:
            raise TypeError("port goes with a host name, not with %s" % type(addr).__name__)
        if isinstance(addr, Protocol):
            super().__init__(addr.sock)
            self._buffer = addr._buffer
        elif isinstance(addr, socket.socket):
            super().__init__(addr)
        else:
            super().__init__(self._connect(addr, port))
        self._stash: deque = deque()  # frames read before they were asked for
        self._awaiting: deque = deque()  # one entry per request whose reply is unread

    def _connect(self, addr: Any, port: Optional[int]) -> socket.socket:
        if addr is None:
            addr = "127.0.0.1"
        if isinstance(addr, str):
            if port is None:
                port = self.default_port
            if port is None:
                raise TypeError("no port given")
            addr = (addr, port)
        elif not isinstance(addr, tuple):
            mesg = "'%s' is not a tuple, socket, or gloom.Protocol object."
            raise TypeError(mesg % addr.__class__.__name__)
        try:
            sock = socket.create_connection(addr)
        except OSError as e:
            raise _transport_error(e, "cannot connect to %s:%s" % addr[:2]) from None
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def write(self, data: Any, timeout: Optional[float] = None) -> None:
        """Send one frame, as `Protocol.send` does (JSON, or a ``str`` or
        ``bytes`` payload as it is).

        :param data: a value to send as JSON, or the payload.
        :param timeout: seconds the send may take.
        """
        self._send_payload(_encode(data), _deadline(timeout))

    def read(self, timeout: Optional[float] = None) -> dict:
        """The next frame that nothing else has taken, decoded: a low-level
        call, outside the bookkeeping of requests and their replies.

        :param timeout: seconds to wait; by default, for ever.
        :raises ServerError: if it is an error frame.
        :raises Timeout: if no frame came in time.
        """
        frame = self._stash.popleft() if self._stash else self._next_frame(_deadline(timeout))
        if "error" in frame:
            raise ServerError(frame)
        return frame

    def recv(self, timeout: Optional[float] = None) -> bytes:
        """The payload of the next frame that nothing else has taken, as
        bytes: a frame set aside while a request waited for its reply
        comes first, encoded again as compact JSON.

        :param timeout: seconds to wait; by default, for ever.
        :raises Timeout: if no whole frame came in time.
        """
        if self._stash:
            return json.dumps(self._stash.popleft(), separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        return self._next_payload(_deadline(timeout))

    # --- requests and replies ----------------------------------------------
    #
    # The daemon replies to each request, in order, with "ok" or an error
    # frame; jobs and answers may come between.  A request whose wait for
    # its reply timed out keeps its place in _awaiting, so its late reply is
    # recognised when it comes and handled by _late_reply.

    def _is_reply(self, frame: dict) -> bool:
        return "ok" in frame or "error" in frame

    def _late_reply(self, frame: dict) -> None:
        """A reply to a request whose wait timed out: an error is kept, to be
        raised in its turn; an "ok" needs nothing."""
        if "error" in frame:
            self._stash.append(frame)

    def _read_one(self, deadline: Optional[float]):
        """Read one frame.  A reply is returned with its request's entry; any
        other frame is kept in the stash (and None, None returned)."""
        frame = self._next_frame(deadline)
        if "progress" in frame and "body" not in frame and "ok" not in frame \
                and "error" not in frame:
            return None, None  # a job's progress: the 2009 protocol has none to give
        if not self._is_reply(frame):
            self._stash.append(frame)
            return None, None
        if not self._awaiting:
            if "error" in frame:
                self._stash.append(frame)
                return None, None
            raise ProtocolError("Unexpected response: %r" % (frame,))
        return self._awaiting.popleft(), frame

    def _request(self, message: dict, timeout: Optional[float], job_id: Any = None) -> dict:
        """Send a request and wait for its reply (an "ok" frame).

        :raises ServerError: if the reply is an error frame.
        """
        deadline = _deadline(timeout)
        payload = _encode(message)
        entry = [job_id]  # a new object: the request's place in _awaiting
        self._awaiting.append(entry)
        try:
            self._send_payload(payload, deadline)
        except BaseException:
            self._awaiting.remove(entry)
            raise
        while True:
            replied, frame = self._read_one(deadline)
            if replied is entry:
                break
            if replied is not None:
                self._late_reply(frame)
        if "error" in frame:
            raise ServerError(frame)
        if frame.get("ok") is not True:
            raise ProtocolError("Unexpected response: %r" % (frame,))
        return frame

    def _take(self, deadline: Optional[float], wanted: Optional[set] = None) -> dict:
        """The oldest unrequested frame (with an id in ``wanted``, if given),
        from the stash or else read for it."""
        stash = self._stash
        for index, frame in enumerate(stash):
            if wanted is None or frame.get("id") in wanted:
                del stash[index]
                return frame
        while True:
            before = len(stash)
            replied, frame = self._read_one(deadline)
            if replied is not None:
                self._late_reply(frame)
            if len(stash) > before:
                frame = stash[-1]
                if wanted is None or frame.get("id") in wanted:
                    stash.pop()
                    return frame


class Master(Connection):
    """Submits jobs and receives their answers, as the 2009 client did.

    Takes `Connection`'s arguments: ``Master()``, ``Master("host", 9998)``,
    ``Master(ip="host", port=9998)``, ``Master(("host", 9998))`` or
    ``Master(sock)``; the port is 9998 when not given.
    """

    default_port = 9998

    def new_job_id(self) -> str:
        """A fresh job id: a uuid4 in upper-case hex, as in 2009."""
        return uuid.uuid4().hex.upper()

    def submit(self, id: Any = None, type: Any = None, body: Any = None,
               timeout: Optional[float] = None) -> Any:
        """Submit a job and wait for the daemon to accept it.

        Answers and failures of other jobs that arrive meanwhile are kept
        for `receive`.  A refusal is raised here (the Erlang daemon sent an
        ``id_exists`` after the ack, to be raised by a later read).

        :param id: the job's id; by default `new_job_id`.
        :param type: the job's type (without one the daemon refuses the job).
        :param body: the job's body: any value ``json.dumps`` takes.
        :param timeout: seconds to wait for the ack (not the job's time limit,
            as in ``gloom.client``).  If it runs out, the job may still be
            accepted: its late ack is skipped, and a late refusal is raised
            by `receive` in its turn.
        :returns: the job's id.
        :raises ServerError: if the daemon refused the job.
        :raises Timeout: if the ack did not come in time.
        """
        if id is None:
            id = self.new_job_id()
        self._request({"action": "submit", "id": id, "type": type, "body": body}, timeout, id)
        return id

    def receive(self, timeout: Optional[float] = None) -> Job:
        """The next answer to any of this master's jobs, as a `Job` with
        ``id`` and ``body``.  A failed job is raised, as in 2009.

        :param timeout: seconds to wait; by default, for ever.
        :raises ServerError: for a failed job (``job_failed``, with the id as
            ``reason``; or ``shutdown``), or a late refusal of a submit.
        :raises Timeout: if nothing came in time.
        """
        return self._answer(self._take(_deadline(timeout)))

    def do_many(self, jobs, timeout: Optional[float] = None):
        """Submit every job, then yield the answers (as `Job`) as they
        arrive: a generator, as in 2009.

        Answers to jobs submitted before are left for `receive` (the 2009
        client stopped with a ``KeyError`` on one).  A failed job is raised,
        which ends the generator.

        :param jobs: dicts of `submit`'s keyword arguments.
        :param timeout: seconds each wait for an answer may take.
        """
        ids = set([self.submit(**j) for j in jobs])
        while ids:
            job = self._answer(self._take(_deadline(timeout), ids))
            ids.remove(job.id)
            yield job

    @staticmethod
    def _answer(frame: dict) -> Job:
        if "error" in frame:
            raise ServerError(frame)
        for k in ["id", "body"]:
            if k not in frame:
                raise ProtocolError("Expected '%s' in job response." % k)
        return Job(frame)

    # job_failed and shutdown frames end jobs; every other error frame, and
    # "ok", is a reply.  A shutdown naming the job being submitted is the
    # submit's refusal (while the daemon stops).
    def _is_reply(self, frame: dict) -> bool:
        if "ok" in frame:
            return True
        error = frame.get("error")
        if error is None or error == "job_failed":
            return False
        if error == "shutdown" and "id" in frame:
            return bool(self._awaiting) and self._awaiting[0][0] == frame["id"]
        return True


class Slave(Connection):
    """Joins a job type and answers its jobs one at a time, as the 2009
    client did.

    Takes `Connection`'s arguments: ``Slave()``, ``Slave("host", 9999)``,
    ``Slave(ip="host", port=9999)``, ``Slave(("host", 9999))`` or
    ``Slave(sock)``; the port is 9999 when not given.  Iterating over a
    slave yields its jobs (`job` in a loop; in 2009 it yielded generators).
    """

    default_port = 9999

    def __init__(self, addr: Any = None, port: Optional[int] = None, ip: Optional[str] = None):
        super().__init__(addr, port, ip)
        self._held: Any = None  # the id of the last job taken, if any

    def __iter__(self):
        return self

    def __next__(self) -> Job:
        return self.job()

    next = __next__

    def join(self, type: Any, timeout: Optional[float] = None) -> bool:
        """Serve jobs of this type (switching type if already joined).

        :param type: the job type.
        :param timeout: seconds to wait for the reply.
        :returns: True.
        :raises ServerError: if the daemon refused (an empty type, say).
        """
        self._request({"action": "join", "type": type}, timeout)
        return True

    def job(self, timeout: Optional[float] = None) -> Job:
        """Wait for the next job: a `Job` with ``action``, ``id``, ``type``
        and ``body``, which `respond` answers.

        :param timeout: seconds to wait; by default, for ever.
        :raises Timeout: if no job came in time.
        """
        frame = self._take(_deadline(timeout))
        if "error" in frame:
            raise ServerError(frame)
        for k in ["action", "id", "type", "body"]:
            if k not in frame:
                raise ProtocolError("Expected '%s' in job description." % k)
        self._held = frame["id"]
        return Job(frame)

    def respond(self, body: Any = None, timeout: Optional[float] = None) -> bool:
        """Answer the job `job` returned last.

        The answer names that job's id (the 2009 client sent none), so the
        daemon refuses a second answer (``wrong_job`` or ``not_processing``)
        instead of taking it for the next job's.  If the job had run past a time limit its master set,
        the daemon discards the answer and this returns False instead of
        raising: the slave is free for its next job either way.

        :param body: the answer: any value ``json.dumps`` takes.
        :param timeout: seconds to wait for the reply.
        :returns: True, or False if the answer came too late to count.
        :raises ServerError: if the daemon refused the answer
            (``not_processing`` when no job is held).
        """
        message = {"action": "respond", "body": body}
        if self._held is not None:
            message["id"] = self._held
        try:
            self._request(message, timeout)
        except ServerError as error:
            if error.error == "timed_out":
                return False
            raise
        return True

    def _late_reply(self, frame: dict) -> None:
        if frame.get("error") != "timed_out":
            super()._late_reply(frame)
