"""Helpers shared by the tests: frame codecs, in-memory and TCP clients."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time

from twisted.internet import defer, endpoints, protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from gloom.master import MasterFactory
from gloom.scheduler import Scheduler
from gloom.slave import SlaveFactory


def live_ids(scheduler) -> set:
    """The ids of the scheduler's queued and running jobs."""
    return {job.id for job in scheduler.jobs()}


def record_answers(test) -> list:
    """Patch the daemon's slave protocol to record the (action, id) of each
    respond and fail it gets (``MISSING`` for an answer without an id)."""
    from gloom.slave import SlaveProtocol

    seen = []
    held_job = SlaveProtocol._held_job

    def recording(protocol, message, action):
        seen.append((action, message.id))
        return held_job(protocol, message, action)

    test.patch(SlaveProtocol, "_held_job", recording)
    return seen


def frame(message) -> bytes:
    """One length-prefixed frame carrying ``message`` (bytes are sent as is)."""
    data = message if isinstance(message, bytes) else json.dumps(message).encode()
    return struct.pack("!I", len(data)) + data


def unframe(data: bytes) -> list:
    """Split a byte stream into its decoded JSON frames; the stream must end on a frame."""
    messages = []
    offset = 0
    while offset < len(data):
        (length,) = struct.unpack_from("!I", data, offset)
        end = offset + 4 + length
        assert len(data) >= end, "stream ends inside a frame"
        messages.append(json.loads(data[offset + 4 : end]))
        offset = end
    return messages


class Peer:
    """A protocol on a StringTransport, driven with whole JSON messages."""

    def __init__(self, factory, address=("10.0.0.1", 1234)):
        self.protocol = factory.buildProtocol(None)
        self.transport = StringTransport(peerAddress=_ipv4(*address))
        self.protocol.makeConnection(self.transport)
        self.unread = []

    def send(self, *messages) -> list:
        """Send messages in one chunk; return every frame written back since."""
        self.protocol.dataReceived(b"".join(frame(m) for m in messages))
        return self.received()

    def received(self) -> list:
        """Every frame written back and not yet read."""
        data = self.transport.value()
        self.transport.clear()
        frames, self.unread = self.unread + unframe(data), []
        return frames

    def disconnect(self) -> None:
        self.protocol.connectionLost(protocol.connectionDone)


def _ipv4(host, port):
    from twisted.internet.address import IPv4Address

    return IPv4Address("TCP", host, port)


class Daemon:
    """A scheduler with both factories, in memory."""

    def __init__(self, max_retries=3, max_frame=1024 * 1024, max_queued=1000, default_timeout=None,
                 journal=None, clock=None, max_detached=1000, jitter=lambda: 0.0, admin=False,
                 **detached):
        """Keyword arguments beyond these go to `gloom.detached.DetachedJobs`;
        retries back off by exactly half their full wait (``jitter``)."""
        from gloom.detached import DetachedJobs

        self.clock = clock or Clock()
        self.scheduler = Scheduler(max_retries=max_retries, clock=self.clock,
                                   default_timeout=default_timeout, jitter=jitter)
        self.detached = DetachedJobs(self.scheduler, self.clock, journal, **detached)
        self.masters = MasterFactory(self.scheduler, self.clock, max_frame, max_queued=max_queued,
                                     detached=self.detached, max_detached=max_detached,
                                     admin=admin)
        self.slaves = SlaveFactory(self.scheduler, self.clock, max_frame)

    def master(self) -> Peer:
        return Peer(self.masters)

    def slave(self, job_type=None) -> Peer:
        """A slave, joined to ``job_type`` if given; a job it got at once stays unread."""
        peer = Peer(self.slaves)
        if job_type is not None:
            frames = peer.send({"action": "join", "type": job_type})
            assert frames[0] == {"ok": True}, frames
            peer.unread = frames[1:]
        return peer


class Framed(protocol.Protocol):
    """A real TCP peer speaking length-prefixed JSON; subclasses take each
    frame in ``frameReceived``.  ``lost`` fires when the connection ends."""

    def __init__(self):
        self.buffer = b""
        self.lost = defer.Deferred()

    def dataReceived(self, data):
        self.buffer += data
        while len(self.buffer) >= 4:
            (length,) = struct.unpack("!I", self.buffer[:4])
            if len(self.buffer) < 4 + length:
                break
            message = json.loads(self.buffer[4 : 4 + length])
            self.buffer = self.buffer[4 + length :]
            self.frameReceived(message)

    def frameReceived(self, message):
        raise NotImplementedError

    def connectionLost(self, reason):
        self.lost.callback(None)

    def send(self, *messages):
        self.transport.write(b"".join(frame(m) for m in messages))


class FrameClient(Framed):
    """A test client: frames arrive in a DeferredQueue."""

    def __init__(self):
        super().__init__()
        self.frames = defer.DeferredQueue()

    def frameReceived(self, message):
        self.frames.put(message)

    def next(self):
        """A Deferred for the next frame (fails the test after 5 s)."""
        from twisted.internet import reactor

        return self.frames.get().addTimeout(5, reactor)

    def close(self):
        self.transport.loseConnection()
        return self.lost


def connect(port: int):
    """Connect a FrameClient to 127.0.0.1:port."""
    from twisted.internet import reactor

    endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    return endpoints.connectProtocol(endpoint, FrameClient())


def occupied_port(test) -> int:
    """A loopback port that something else is listening on for this test."""
    taken = socket.socket()
    test.addCleanup(taken.close)
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    return taken.getsockname()[1]


def reserved_port(test) -> int:
    """A loopback port held for this test by a socket that is bound but
    never listens.  Connecting to it is refused; no other socket is given it
    (binds to port 0 and outgoing connections skip a bound port); yet a
    daemon can listen on it, and listen on it again after a restart, since
    Twisted's listening sockets set SO_REUSEADDR as this one does.

    A port that was bound and closed again is free for anything on the
    machine to take before the test uses it: never count on one."""
    holder = socket.socket()
    test.addCleanup(holder.close)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind(("127.0.0.1", 0))
    return holder.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """The CPU time a process has used so far (Linux /proc), in seconds.

    To bound how long a daemon in a subprocess keeps others waiting, count
    the CPU time it spent meanwhile, not the wall-clock time: on a loaded
    machine the wall clock also counts the time it waited for a CPU."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of stat(5)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def accepted(factory, client_transport):
    """The daemon's protocol for the connection whose client end is
    ``client_transport``, or None while the daemon has not accepted it."""
    local = client_transport.getHost()
    for connection in factory.connections:
        peer = connection.transport.getPeer()
        if (peer.host, peer.port) == (local.host, local.port):
            return connection
    return None


def daemon_side(factory, client_transport):
    """The daemon's protocol for the connection whose client end is
    ``client_transport`` (the daemon must have accepted it already: a
    round trip on the connection makes sure)."""
    connection = accepted(factory, client_transport)
    if connection is None:
        raise AssertionError(f"the daemon has no connection from {client_transport.getHost()}")
    return connection


LISTENING = re.compile(r"Listening for (master|slave)s on 127\.0\.0\.1:(\d+)")
ANY_PORT = ["--master", "tcp:0:interface=127.0.0.1", "--slave", "tcp:0:interface=127.0.0.1"]


def twistd_command():
    """The installed twistd, run by this test's own interpreter."""
    script = shutil.which("twistd", path=os.path.dirname(sys.executable))
    if script:
        return [script]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def without_warm_up(arguments) -> list:
    """twistd's ``arguments`` with ``--warm-up 0`` added after ``gloom``
    unless they name a warm-up: under PyPy the daemon warms up by default,
    which a test that does not test it need not wait for."""
    arguments = list(arguments)
    if "gloom" in arguments and not any(a.startswith("--warm-up") for a in arguments):
        at = arguments.index("gloom") + 1
        arguments[at:at] = ["--warm-up", "0"]
    return arguments


class BlockingClient:
    """A plain-socket client, as a user without any library would write it."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)

    def send(self, message):
        self.sock.sendall(frame(message))

    def _read(self, count):
        data = b""
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                raise EOFError("connection closed")
            data += chunk
        return data

    def receive(self):
        (length,) = struct.unpack("!I", self._read(4))
        return json.loads(self._read(length))

    def close(self):
        self.sock.close()


class TwistdDaemon:
    """``twistd`` in a subprocess, started from a scratch directory so that
    only the installed package can be imported.  ``twistd gloom`` runs
    without a warm-up unless the arguments name one (`without_warm_up`)."""

    def __init__(self, test, *arguments):
        self.cwd = tempfile.mkdtemp()
        test.addCleanup(shutil.rmtree, self.cwd, True)
        self.process = subprocess.Popen(
            twistd_command() + ["--pidfile=", *without_warm_up(arguments)],
            cwd=self.cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        test.addCleanup(self.kill)
        self.output = b""

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.process.stdout.close()

    def read_until(self, predicate, timeout=30):
        """Read output until ``predicate(output_so_far)`` holds; return the output."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.output.decode(errors="replace")
            if predicate(text):
                return text
            if time.monotonic() > deadline:
                raise AssertionError("twistd did not print what was expected:\n" + text)
            ready, _, _ = select.select([self.process.stdout], [], [], 0.2)
            if ready:
                chunk = os.read(self.process.stdout.fileno(), 65536)
                if not chunk:
                    raise AssertionError("twistd exited:\n" + text)
                self.output += chunk

    def ports(self):
        """The master and slave ports twistd reports listening on."""
        text = self.read_until(lambda t: len(dict(LISTENING.findall(t))) == 2)
        found = dict(LISTENING.findall(text))
        return int(found["master"]), int(found["slave"])

    def finish(self, timeout=30):
        """Wait for exit; return the status and everything it printed."""
        rest, _ = self.process.communicate(timeout=timeout)
        self.output += rest
        return self.process.returncode, self.output.decode(errors="replace")


