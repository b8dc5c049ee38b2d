"""Blocking clients for Gloom, for scripts and ordinary programs.

The API of the 2009 reference client is kept (``Master.submit``,
``receive``, ``do_many``, ``disconnect``; ``Slave.join``, ``job``,
``respond``), so old code ports by changing an import.  New: context
managers, `Master.run`, `Master.map`, `Slave.serve`, ``cancel``, ``stats``
and TLS::

    from gloom.client import Master, Slave

    with Master() as master:
        print(master.run("upper", "hello"))          # -> "HELLO"

    with Slave() as slave:
        slave.serve(lambda job: job.body.upper(), type="upper")
"""

from __future__ import annotations

import json
import socket
import ssl
import struct
import time
import uuid
from collections import deque
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Tuple, Union

try:
    from msgspec import MsgspecError
    from msgspec.json import decode as _fast_loads
except ImportError:  # PyPy
    _fast_loads = None


def loads(data: bytes) -> Any:
    """Decode JSON, with msgspec where it is installed (it refuses a few
    numbers the standard library reads, such as 1e400; those fall back)."""
    if _fast_loads is not None:
        try:
            return _fast_loads(data)
        except MsgspecError:
            pass
    return json.loads(data)


Address = Tuple[str, int]
TLS = Union[None, bool, ssl.SSLContext]

_HEADER = struct.Struct("!I")


class GloomError(Exception):
    """Anything that went wrong talking to Gloom."""


class TransportError(GloomError):
    """The connection could not be made, or was lost."""


class Timeout(GloomError, TimeoutError):
    """Nothing arrived within the time given."""


class ProtocolError(GloomError):
    """The daemon sent something this client does not understand."""


class ServerError(GloomError):
    """The daemon answered with an error frame (``error``, ``reason``, ``id``).

    :param error: the frame's error code, such as ``"unknown_job"``.
    :param reason: the frame's reason, for people to read.
    :param id: the id of the job it concerns, if any.
    """

    def __init__(self, error: str, reason: str = "", id: Optional[str] = None):
        super().__init__(f"{error}: {reason}" if reason else error)
        self.error = error
        self.reason = reason
        self.id = id

    @classmethod
    def from_frame(cls, frame: dict) -> "ServerError":
        """The error a decoded error frame (or failed answer) reports."""
        return cls(frame.get("error", "unknown"), frame.get("reason", ""), frame.get("id"))


class Job(dict):
    """A job or an answer: a dict with ``id``, ``type`` and ``body`` properties.

    An answer that is a failure carries ``error`` and ``reason`` instead of
    a body.
    """

    id = property(lambda self: self.get("id"))
    type = property(lambda self: self.get("type"))
    body = property(lambda self: self.get("body"))
    error = property(lambda self: self.get("error"))
    reason = property(lambda self: self.get("reason"))

    def result(self) -> Any:
        """The answer body, or `ServerError` if the job failed."""
        if self.error is not None:
            raise ServerError.from_frame(self)
        return self.body


def client_context(cafile: Optional[str] = None, certfile: Optional[str] = None,
                   keyfile: Optional[str] = None) -> ssl.SSLContext:
    """A TLS context that checks the server's certificate and name against
    ``cafile`` (or the system's CAs) and presents a client certificate if given.

    :param cafile: a PEM file of the CA certificates to trust; by default,
        the system's.
    :param certfile: a PEM file with the client certificate to present
        (and any intermediates); by default, none.
    :param keyfile: the PEM file with the client certificate's private key,
        if it is not in ``certfile``.
    """
    context = ssl.create_default_context(cafile=cafile)
    if certfile is not None:
        context.load_cert_chain(certfile, keyfile)
    return context


class _Connection:
    """One framed connection: whole JSON frames, however the bytes arrive."""

    def __init__(self, addr: Address, tls: TLS, server_hostname: Optional[str],
                 connect_timeout: Optional[float]):
        host, port = addr
        self.name = f"{host}:{port}"
        try:
            sock = socket.create_connection((host, port), timeout=connect_timeout)
        except OSError as e:
            raise TransportError(f"cannot connect to {self.name}: {e.strerror or e}") from None
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls:
            context = tls if isinstance(tls, ssl.SSLContext) else client_context()
            try:
                sock = context.wrap_socket(sock, server_hostname=server_hostname or host)
            except (ssl.SSLError, ssl.CertificateError, OSError) as e:
                sock.close()
                raise TransportError(f"TLS with {self.name} failed: {e}") from None
        self.sock = sock
        self.buffer = bytearray()

    def send(self, message: dict) -> None:
        data = json.dumps(message, separators=(",", ":"), allow_nan=False).encode()
        try:
            self.sock.sendall(_HEADER.pack(len(data)) + data)
        except OSError as e:
            raise TransportError(f"connection to {self.name} lost: {e}") from None

    def read(self, deadline: Optional[float]) -> dict:
        """The next frame; `Timeout` at ``deadline`` (a time.monotonic() value)."""
        while True:
            if len(self.buffer) >= 4:
                (length,) = _HEADER.unpack_from(self.buffer)
                if len(self.buffer) >= 4 + length:
                    data = bytes(self.buffer[4:4 + length])
                    del self.buffer[:4 + length]
                    try:
                        frame = loads(data)
                    except ValueError as e:
                        raise ProtocolError(f"{self.name} sent invalid JSON: {e}") from None
                    if not isinstance(frame, dict):
                        raise ProtocolError(f"{self.name} sent a frame that is not an object")
                    return frame
            if deadline is None:
                self.sock.settimeout(None)
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise Timeout("nothing arrived in time")
                self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                raise Timeout("nothing arrived in time") from None
            except OSError as e:
                raise TransportError(f"connection to {self.name} lost: {e}") from None
            if not chunk:
                raise TransportError(f"{self.name} closed the connection")
            self.buffer += chunk

    def close(self) -> None:
        """Close, waking any thread blocked reading this connection."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def _deadline(timeout: Optional[float]) -> Optional[float]:
    return None if timeout is None else time.monotonic() + timeout


class _Client:
    def __init__(self, addr: Address, *, tls: TLS = None, server_hostname: Optional[str] = None,
                 connect_timeout: Optional[float] = 10.0):
        self._connection = _Connection(addr, tls, server_hostname, connect_timeout)

    def disconnect(self) -> None:
        """Close the connection."""
        self._connection.close()

    close = disconnect

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.disconnect()


class Master(_Client):
    """Submits jobs and collects their answers over one connection.

    :param addr: the daemon's master port, ``(host, port)``.
    :keyword tls: None for plain TCP, True for TLS checked against the
        system's CAs, or an ``ssl.SSLContext`` (see `client_context`).
    :keyword server_hostname: the name the server's certificate must carry;
        by default, the host of ``addr``.
    :keyword connect_timeout: seconds to wait for the connection, 10 by
        default (None waits as long as the system does).
    :raises TransportError: if the connection (or TLS) cannot be made.
    """

    def __init__(self, addr: Address = ("127.0.0.1", 9998), **kwargs):
        super().__init__(addr, **kwargs)
        self._answers: deque = deque()
        # Requests waiting for their reply, by job id (None: stats or an
        # error without an id), with the reply once it came.
        self._awaited_replies: Dict[Optional[str], Optional[dict]] = {}

    # --- frames --------------------------------------------------------------

    def _read_one(self, deadline: Optional[float]) -> None:
        """Read one frame and file it: a reply awaited by id, or an answer."""
        frame = self._connection.read(deadline)
        job_id = frame.get("id")
        if "stats" in frame or ("error" in frame and job_id is None):
            self._awaited_replies[None] = frame
        elif job_id in self._awaited_replies and self._awaited_replies[job_id] is None and (
                frame.get("ok") or "error" in frame):
            self._awaited_replies[job_id] = frame
        elif "body" in frame or "error" in frame:
            self._answers.append(Job(frame))
        elif not frame.get("ok"):
            raise ProtocolError(f"unexpected frame {frame!r}")

    def _request(self, message: dict, key: Optional[str], timeout: Optional[float] = None) -> dict:
        """Send a request and wait for its direct reply (raising its error)."""
        self._awaited_replies[key] = None
        self._connection.send(message)
        deadline = _deadline(timeout)
        try:
            while self._awaited_replies[key] is None:
                self._read_one(deadline)
        finally:
            reply = self._awaited_replies.pop(key)
        if "error" in reply:
            raise ServerError.from_frame(reply)
        return reply

    @staticmethod
    def _submission(id, type, body, priority, timeout) -> dict:
        if not type:
            raise ValueError("a job needs a type")
        message = {"action": "submit", "id": id or uuid.uuid4().hex, "type": type, "body": body}
        if priority is not None:
            message["priority"] = priority
        if timeout is not None:
            message["timeout"] = timeout
        return message

    # --- the 2009 API ---------------------------------------------------------

    def submit(self, id: Optional[str] = None, type: Optional[str] = None, body: Any = None,
               priority: Optional[int] = None, timeout: Optional[float] = None) -> str:
        """Submit a job and wait for its ack.

        :param id: the job's id, unique among this master's unfinished
            jobs; by default a fresh uuid4 hex.
        :param type: the job's type (required).
        :param body: the job's body: any value ``json.dumps`` takes.
        :param priority: higher runs first; the daemon's default is 0.
        :param timeout: the job's own time limit on a slave, in seconds.
        :returns: the job's id.
        :raises ServerError: if the daemon refuses the job.
        """
        message = self._submission(id, type, body, priority, timeout)
        self._request(message, message["id"])
        return message["id"]

    def receive(self, timeout: Optional[float] = None) -> Job:
        """The next answer to any of this master's jobs, as a `Job`; a failed
        job comes back with ``error`` and ``reason``.

        :param timeout: seconds to wait; by default, for ever.
        :raises Timeout: if no answer came in time.
        """
        deadline = _deadline(timeout)
        while not self._answers:
            self._read_one(deadline)
        return self._answers.popleft()

    def do_many(self, jobs: Iterable, timeout: Optional[float] = None) -> Iterator[Job]:
        """Submit every job, then yield their answers (as `Job`) as they
        arrive.

        :param jobs: dicts with ``type``, ``body`` and optionally ``id``,
            ``priority`` and ``timeout`` (as `submit` takes them), or
            ``(type, body)`` pairs.
        :param timeout: seconds each wait for an answer may take.
        """
        count = 0
        for job in jobs:
            if not isinstance(job, dict):
                job_type, body = job
                job = {"type": job_type, "body": body}
            self.submit(job.get("id"), job["type"], job.get("body"), job.get("priority"),
                        job.get("timeout"))
            count += 1
        for _ in range(count):
            yield self.receive(timeout)

    # --- new ------------------------------------------------------------------

    def run(self, type: str, body: Any = None, priority: Optional[int] = None,
            timeout: Optional[float] = None, wait: Optional[float] = None) -> Any:
        """Submit one job and wait for its answer body.  Answers to other
        jobs that arrive meanwhile stay for `receive`.

        :param type: the job's type.
        :param body: the job's body.
        :param priority: as `submit` takes it.
        :param timeout: the job's own time limit on a slave, in seconds.
        :param wait: seconds to wait for the answer; by default, for ever.
        :raises ServerError: if the job was refused or failed.
        :raises Timeout: if the answer did not come within ``wait``.
        """
        job_id = self.submit(None, type, body, priority, timeout)
        deadline = _deadline(wait)
        seen = 0
        while True:
            for index in range(seen, len(self._answers)):
                if self._answers[index].id == job_id:
                    answer = self._answers[index]
                    del self._answers[index]
                    return answer.result()
            seen = len(self._answers)
            self._read_one(deadline)

    def map(self, type: str, bodies: Iterable, window: int = 64, priority: Optional[int] = None,
            timeout: Optional[float] = None, wait: Optional[float] = None) -> Iterator[Any]:
        """Run one job per body with up to ``window`` in flight; yield the
        answer bodies in the order of ``bodies``.  A failed job raises
        `ServerError` when its turn comes.

        :param type: the type of every job.
        :param bodies: the jobs' bodies; read only as jobs are submitted.
        :param window: the most jobs submitted and not yet answered.
        :param priority: as `submit` takes it, for every job.
        :param timeout: each job's own time limit on a slave, in seconds.
        :param wait: seconds each wait for a frame may take.
        """
        if window < 1:
            raise ValueError("window must be at least 1")
        order: deque = deque()
        results: Dict[str, Job] = {}
        bodies = iter(bodies)
        exhausted = False
        while True:
            while not exhausted and len(order) < window:
                try:
                    body = next(bodies)
                except StopIteration:
                    exhausted = True
                    break
                message = self._submission(None, type, body, priority, timeout)
                self._awaited_replies[message["id"]] = None
                self._connection.send(message)
                order.append(message["id"])
            if not order:
                return
            head = order[0]
            while head not in results:
                self._take_map_frames(order, results, _deadline(wait))
            order.popleft()
            yield results.pop(head).result()

    def _take_map_frames(self, order, results, deadline) -> None:
        self._read_one(deadline)
        for job_id in list(order):
            reply = self._awaited_replies.get(job_id)
            if reply is not None:
                del self._awaited_replies[job_id]
                if "error" in reply:
                    results[job_id] = Job(reply)
        while self._answers:
            answer = self._answers.popleft()
            if answer.id in self._awaited_replies:
                self._awaited_replies.pop(answer.id)
            results[answer.id] = answer

    def cancel(self, id: str) -> None:
        """Withdraw one of this master's unfinished jobs.

        :param id: the job's id.
        :raises ServerError: ``unknown_job`` if this master has no
            unfinished job by that id.
        """
        self._request({"action": "cancel", "id": id}, id)

    def stats(self) -> dict:
        """The daemon's figures (see the README's stats action)."""
        return self._request({"action": "stats"}, None)["stats"]


class Slave(_Client):
    """Takes jobs of one type, one at a time, and answers them.

    :param addr: the daemon's slave port, ``(host, port)``.  The keywords
        (``tls``, ``server_hostname``, ``connect_timeout``) are those of
        `Master`.
    :raises TransportError: if the connection (or TLS) cannot be made.
    """

    def __init__(self, addr: Address = ("127.0.0.1", 9999), **kwargs):
        super().__init__(addr, **kwargs)
        self._jobs: deque = deque()
        self.current: Optional[Job] = None

    def _reply(self, message: dict) -> dict:
        """Send a request and read its reply; jobs arriving first are kept."""
        self._connection.send(message)
        while True:
            frame = self._connection.read(None)
            if frame.get("action") == "job":
                self._jobs.append(Job(frame))
            elif "error" in frame:
                raise ServerError.from_frame(frame)
            elif frame.get("ok"):
                return frame
            else:
                raise ProtocolError(f"unexpected frame {frame!r}")

    def join(self, type: str) -> None:
        """Serve jobs of this type (switching type if already joined).

        :param type: the job type to take.
        """
        self._reply({"action": "join", "type": type})

    def job(self, timeout: Optional[float] = None) -> Job:
        """Wait for the next job; it becomes the current job, which
        `respond` or `fail` answers.

        :param timeout: seconds to wait; by default, for ever.
        :raises Timeout: if no job came in time.
        """
        deadline = _deadline(timeout)
        while not self._jobs:
            frame = self._connection.read(deadline)
            if frame.get("action") != "job":
                raise ProtocolError(f"expected a job, got {frame!r}")
            self._jobs.append(Job(frame))
        self.current = self._jobs.popleft()
        return self.current

    def respond(self, body: Any = None) -> None:
        """Answer the current job.

        :param body: the answer: any value ``json.dumps`` takes.
        :raises ServerError: ``timed_out`` if the job had run past its
            timeout and the answer was discarded.
        """
        self._reply(self._answer({"action": "respond", "body": body}))

    def fail(self, reason: str) -> None:
        """Report that the current job failed (the master is told; no retry).

        :param reason: why, for the master; made a string.
        """
        self._reply(self._answer({"action": "fail", "reason": str(reason)}))

    def _answer(self, request: dict) -> dict:
        """Name the job an answer is for, so the daemon can refuse a stray one."""
        job, self.current = self.current, None
        if job is not None:
            request["id"] = job.id
        return request

    def serve(self, handler: Callable[[Job], Any], type: Optional[str] = None) -> None:
        """Join ``type`` (if given) and answer jobs for ever.  Returns when
        the daemon closes the connection.

        :param handler: called with each `Job`; what it returns is the
            answer, and an exception it raises fails the job with the
            exception's text.
        :param type: the job type to join first; by default, the one
            already joined.
        """
        if type is not None:
            self.join(type)
        while True:
            try:
                job = self.job()
            except TransportError:
                return
            try:
                result = handler(job)
            except Exception as e:
                outcome = ("fail", str(e) or e.__class__.__name__)
            else:
                outcome = ("respond", result)
            try:
                if outcome[0] == "fail":
                    self.fail(outcome[1])
                else:
                    self.respond(outcome[1])
            except ServerError as e:
                if e.error != "timed_out":
                    raise
            except TransportError:
                return
