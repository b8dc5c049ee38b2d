"""Bodies are carried as the bytes the peer sent: never decoded into Python
objects, never longer, on every path a frame can take through gloom.wire
(msgspec's, the scanner's), and through a daemon, whose memory and
responsiveness a large hostile body must not blow up."""

from __future__ import annotations

import json
import os
import random
import select
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from gloom import rawjson, wire
from tests.support import Daemon, cpu_seconds

SUBMIT = b'{"action":"submit","id":"j","type":"t","body":'

# Leading whitespace that sends the same frame down each path: msgspec's
# hot path (at most MAX_DEPTH bytes), msgspec in one go (at most
# _TYPED_LIMIT), msgspec with raw fields, and the same beyond _SCAN_LIMIT.
PADS = (0, 600, 5000, 70000)

BODIES = [
    '"caf\u00e9 \u2603 \U0001f600 \u20ac"'.encode("utf-8"),
    b'"\\ud800, \\udc00\\ud800 and \\uDBFF: lone surrogate escapes"',
    b'"escapes \\" \\\\ \\/ \\b \\f \\n \\r \\t \\u00e9 \\u0000"',
    b"[1e400, -1E-400, -0.0, 1E+2, 0.1, 12345678901234567890123456789]",
    b"9" * 5000,
    b'{ "b" : 1 ,\n\t"a" : [ ] , "b" : "again" }',
    '{"\u00e9":["\u00e9",{"\\u00e9":null}],"x":true,"y":false}'.encode("utf-8"),
    b"null",
    b"[" * 400 + b"]" * 400,
]


def payloads(data: bytes) -> list:
    """The payloads of the frames in a byte stream, as bytes."""
    frames = []
    while data:
        (length,) = struct.unpack("!I", data[:4])
        frames.append(data[4 : 4 + length])
        data = data[4 + length :]
    return frames


def exchange(peer, payload: bytes) -> list:
    """Send one frame to a tests.support.Peer; the payloads written back."""
    peer.protocol.dataReceived(struct.pack("!I", len(payload)) + payload)
    return written(peer)


def written(peer) -> list:
    data = peer.transport.value()
    peer.transport.clear()
    return payloads(data)


class DecodeTests(SynchronousTestCase):
    """wire.decode: what msgspec decides, where it is installed."""

    def decode(self, payload: bytes, pad: int = 0):
        return wire.decode(b" " * pad + payload)

    def refused(self, payload: bytes, code: str, pad: int = 0) -> str:
        error = self.assertRaises(wire.MessageError, self.decode, payload, pad)
        self.assertEqual(error.code, code, f"{payload[:60]!r} with {pad} spaces: {error.reason}")
        return error.reason

    def test_bodies_come_out_as_sent(self):
        for body in BODIES:
            for pad in PADS:
                message = self.decode(SUBMIT + body + b"}", pad)
                self.assertEqual(bytes(message.body), body, pad)
                self.assertEqual((message.action, message.id, message.type), ("submit", "j", "t"))

    def test_body_beside_large_values(self):
        """A body after a large unknown field, and in a large frame."""
        for extra in (b'"' + "\u00e9".encode() * 40000 + b'"', b"[" + b"{}," * 30000 + b"{}]"):
            for body in BODIES:
                frame = b'{"x":' + extra + b',"action":"respond","body":' + body + b',"y":' + extra + b"}"
                self.assertEqual(bytes(self.decode(frame).body), body)

    def test_last_of_repeated_keys(self):
        message = self.decode(b'{"body":1,"id":"a","body":[2],"\\u0069d":"b"}')
        self.assertEqual((bytes(message.body), message.id), (b"[2]", "b"))

    def test_fields_other_than_the_body(self):
        for pad in PADS:
            message = self.decode(b'{"action":"caf\\u00e9","id":"\xc3\xa9\\ud800","reason":"r\\n",'
                                  b'"priority":' + b"9" * 40 + b',"timeout":1.5,"type":true}', pad)
            self.assertEqual((message.action, message.id, message.reason, message.priority, message.timeout,
                              message.type),
                             ("caf\u00e9", "\u00e9\ud800", "r\n", 10**40 - 1, 1.5, True), pad)
            message = self.decode(b'{"priority":' + b"9" * 5000 + b',"timeout":1e400,"id":null}', pad)
            self.assertEqual((message.priority, message.timeout, message.id),
                             (wire.RawNumber("9" * 5000), wire.RawNumber("1e400"), None))
            message = self.decode(b'{"id":[1,{"a":2}],"type":{}}', pad)
            self.assertEqual((message.id, message.type), ([1, {"a": 2}], {}))

    def test_large_array_in_a_field(self):
        """...is not decoded, and is not what any field should hold."""
        message = self.decode(b'{"id":[' + b"{}," * 30000 + b'{}],"body":1}')
        self.assertNotIn(type(message.id), (str, int, float, bool, type(None)))
        self.assertRaises(wire.MessageError, wire.required_name, message, "id")

    def test_invalid_utf8(self):
        for bad in (b"\xff", b"\xed\xa0\x80", b"\xe2\x82", b"\xc0\xaf", b"\xf4\x90\x80\x80", b"\x80"):
            for where in (b'{"body":"' + bad + b'"}', b'{"body":"\xc3\xa9' + bad + b'", "x":1}',
                          b'{"x":"' + bad + b'","body":1}', b'{"body":' + bad + b"}", b'{"body":1}' + bad):
                for pad in PADS:
                    reason = self.refused(where, wire.INVALID_JSON, pad)
                    self.assertIn(f"bad byte at offset {pad + where.index(bad[0])}", reason)

    def test_not_json(self):
        for text in (b'{"body":NaN}', b'{"body":[Infinity]}', b'{"body":-Infinity}', b'{"body":[1,]}',
                     b'{"body":"\\x"}', b'{"body":"\\u12"}', b'{"body":"a\x01"}', b'{"body":01}',
                     b'{"body":1.}', b'{"body":.5}', b'{"body":+1}', b'{"body":tru}', b'{"body":1', b"",
                     b'{"body":1}}', b'{"body" 1}', b'{"body":1 "id":2}', b"{'body':1}", b'{"body":"\\u 123"}',
                     '{"body":\u0661}'.encode("utf-8"), b'\xef\xbb\xbf{"body":1}', b'{"body":1\x0c}'):
            for pad in PADS:
                self.assertIn("JSON", self.refused(text, wire.INVALID_JSON, pad))

    def test_not_an_object(self):
        for text in (b"[1,2]", b'"submit"', b"3", b"null", b"[" + b'{"a":"\xc3\xa9"},' * 10000 + b"0]"):
            for pad in PADS:
                self.refused(text, wire.INVALID_MESSAGE, pad)
        for pad in PADS:
            self.refused(b"[" + b"{}," * 10000 + b"0", wire.INVALID_JSON, pad)

    def test_nesting(self):
        """At most MAX_DEPTH arrays and objects, the message itself included."""
        limit = rawjson.MAX_DEPTH
        for opener, closer in ((b"[", b"]"), (b'{"a":', b"}"), (b'[{"a":', b"}]")):
            depth = len(opener.replace(b'"a":', b""))
            levels = (limit - 1) // depth
            fits = opener * levels + b"1" + closer * levels
            too_deep = opener * (levels + 1) + b"1" + closer * (levels + 1)
            for pad in PADS:
                for field in (b"body", b"x"):
                    self.decode(b'{"' + field + b'":' + fits + b"}", pad)
                    reason = self.refused(b'{"' + field + b'":' + too_deep + b"}", wire.INVALID_JSON, pad)
                    self.assertIn("nests too deeply", reason)
                    surrogate = b'{"id":"\\ud800","' + field + b'":' + too_deep + b"}"
                    self.refused(surrogate, wire.INVALID_JSON, pad)
                self.refused(b"[" + fits + b"]", wire.INVALID_MESSAGE, pad)
                self.refused(b"[" + too_deep + b"]", wire.INVALID_JSON, pad)
                self.refused(b"[" * 100000, wire.INVALID_JSON, pad)

    def test_lone_surrogate_escape_beside_a_large_body(self):
        body = b'["\\ud800",' + b"{}," * 30000 + b'"\\uDC00\\ud800x"]'
        for extra in (b"", b',"type":"\\udfff"'):
            message = self.decode(SUBMIT + body + extra + b"}")
            self.assertEqual(bytes(message.body), body)
        self.assertEqual(message.type, "\udfff")


class ScannedDecodeTests(DecodeTests):
    """The same without msgspec, as on PyPy: the scanner decides everything."""

    def setUp(self):
        self.patch(wire, "_fast_decode", None)


class SamePathsTests(SynchronousTestCase):
    """msgspec and the scanner accept and refuse the same frames, and read the
    same fields from them (so CPython and PyPy do)."""

    def setUp(self):
        if wire._fast_decode is None:
            raise SkipTest("msgspec is not installed")

    def outcome(self, payload: bytes, scanned: bool):
        fast_decode = wire._fast_decode
        if scanned:
            wire._fast_decode = None
        try:
            message = wire.decode(payload)
        except wire.MessageError as e:
            return e.code
        finally:
            wire._fast_decode = fast_decode
        return {name: bytes(value) if name == "body" else repr(value)
                for name in wire.MESSAGE_FIELDS for value in [getattr(message, name)]
                if value is not wire.MISSING}

    def test_random_frames(self):
        rng = random.Random(1)
        pieces = [b"{", b"}", b"[", b"]", b",", b":", b" ", b'"', b"\\", b"\\u", b"\\ud800", b"\\uDC00",
                  b"\\u00e9", b"0", b"-", b"1.5", b"e", b"E+", b"true", b"nul", b"NaN", b'"body"', b'"id"',
                  b'"action"', b'"priority"', b'"\\u0062ody"', "\u00e9".encode(), b"\xff", b"\x01", b"\n",
                  b"[" * 600, b"]" * 600, b'"x"', b"12345678901234567890"]
        skeletons = [b'{"action":"submit","id":"i","body":%s,"priority":%s}', b'{"body":%s,"x":%s}',
                     b"{%s:%s}", b"[%s,%s]", b"%s%s"]
        for number in range(1500):
            parts = [b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 6))) for _ in range(2)]
            if rng.random() < 0.5:
                parts = [json.dumps(rng.choice([None, 1, "\u00e9", [1, {"a": "\ud800"}], {"b": []}]))
                         .encode("utf-8", "surrogatepass") + p if rng.random() < 0.5 else p for p in parts]
            payload = rng.choice(skeletons) % tuple(parts)
            for pad in PADS if number % 8 == 0 else PADS[:-1]:
                padded = b" " * pad + payload
                self.assertEqual(self.outcome(padded, False), self.outcome(padded, True), padded[pad:])


class RoundTripTests(SynchronousTestCase):
    """Through a daemon in memory: master to slave and back, byte for byte."""

    max_frame = 1024 * 1024
    envelope = 64  # what a job or answer frame adds to its id, type and body

    def setUp(self):
        self.daemon = Daemon(max_frame=self.max_frame)
        self.master = self.daemon.master()
        self.slave = self.daemon.slave()
        self.assertEqual(exchange(self.slave, b'{"action":"join","type":"t"}'), [b'{"ok":true}'])

    def test_bodies_both_ways(self):
        near_the_limit = self.max_frame - 100
        bodies = BODIES + [
            b'"' + "\u00e9".encode() * (near_the_limit // 2) + b'"',
            b'"' + "\U0001f600".encode() * (near_the_limit // 4) + b'"',
            b'["\xc3\xa9",' + b"{}," * (near_the_limit // 3) + b"{}]",
            b'["\xc3\xa9",' + b"[]," * (near_the_limit // 3) + b"[]]",
            b'"' + b"\\u00e9" * (near_the_limit // 6) + b'"',
            b'"\\ud800' + b"\\\\" * (near_the_limit // 2) + b'"',
        ]
        for number, body in enumerate(bodies):
            job_id = f"j\u00e9{number}".encode()
            submit = b'{"action":"submit","id":"' + job_id + b'","type":"t","body":' + body + b"}"
            self.assertLessEqual(len(submit), self.max_frame)
            self.assertEqual(exchange(self.master, submit), [b'{"ok":true,"id":"' + job_id + b'"}'])
            (job,) = written(self.slave)
            self.assertEqual(job, b'{"action":"job","id":"' + job_id + b'","type":"t","body":' + body + b"}")
            self.assertLessEqual(len(job), len(submit))
            self.assertLessEqual(len(job), self.max_frame + self.envelope)
            respond = b'{"action":"respond","body":' + body + b"}"
            self.assertEqual(exchange(self.slave, respond), [b'{"ok":true}'])
            (answer,) = written(self.master)
            self.assertEqual(answer, b'{"id":"' + job_id + b'","body":' + body + b"}")
            self.assertLessEqual(len(answer), len(respond) + len(job_id) + self.envelope)

    def test_error_frames_are_no_longer_than_what_they_quote(self):
        reason = "\u00e9" * 100000
        self.assertEqual(exchange(self.master, b'{"action":"submit","id":"a","type":"u","body":1}'),
                         [b'{"ok":true,"id":"a"}'])
        slave = self.daemon.slave()
        exchange(slave, b'{"action":"join","type":"u"}')
        exchange(slave, json.dumps({"action": "fail", "reason": reason}, ensure_ascii=False).encode())
        (failed,) = written(self.master)
        self.assertEqual(json.loads(failed)["error"], wire.JOB_FAILED)
        self.assertLess(len(failed), len(reason.encode()) + 100)  # not written as \u00e9 (6 bytes each)
        self.assertNotIn(b"\\u00e9", failed)


class ScannedRoundTripTests(RoundTripTests):
    def setUp(self):
        self.patch(wire, "_fast_decode", None)
        super().setUp()


# --- a real daemon: its peak memory, and how long one frame holds it up ------

DAEMON = """
import sys
from twisted.internet import reactor
from gloom.tap import makeService
service = makeService({"master": "tcp:0:interface=127.0.0.1", "slave": "tcp:0:interface=127.0.0.1",
                       "max-frame": int(sys.argv[1]), "retries": 3}, reactor)
service.startService()
reactor.callWhenRunning(lambda: print(service.getServiceNamed("master").port.getHost().port,
                                      service.getServiceNamed("slave").port.getHost().port, flush=True))
reactor.run()
"""


class Connection:
    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)

    def send(self, payload: bytes) -> None:
        self.sock.sendall(struct.pack("!I", len(payload)) + payload)

    def _read(self, count: int) -> bytes:
        data = bytearray()
        while len(data) < count:
            chunk = self.sock.recv(min(count - len(data), 1 << 20))
            if not chunk:
                raise EOFError("connection closed")
            data += chunk
        return bytes(data)

    def receive(self) -> bytes:
        (length,) = struct.unpack("!I", self._read(4))
        return self._read(length)

    def close(self) -> None:
        self.sock.close()


class DaemonTests(SynchronousTestCase):
    """One large body through a daemon in a subprocess (running the gloom
    this test imports): the daemon's peak memory grows by less than 8 times
    the frame, and other connections are answered meanwhile: no stats
    request waits while the daemon spends more than a second of CPU time
    (CPU time, not wall-clock time, which on a loaded machine also counts
    the daemon's waits for a CPU)."""

    frame_size = 16 * 1024 * 1024
    most_memory = 8  # times the frame
    longest_stall = 1.0  # CPU seconds the daemon spends while a stats request waits

    def setUp(self):
        if not os.path.exists("/proc/self/status"):
            raise SkipTest("needs /proc to read a process's peak memory")
        package = os.path.dirname(os.path.dirname(os.path.abspath(wire.__file__)))
        path = [package] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
        self.process = subprocess.Popen([sys.executable, "-c", DAEMON, str(self.frame_size + 1024)],
                                        cwd=tempfile.gettempdir(), env=env, stdout=subprocess.PIPE)
        self.addCleanup(self._stop)
        ready, _, _ = select.select([self.process.stdout], [], [], 60)
        if not ready:
            raise AssertionError("the daemon did not say which ports it listens on")
        master_port, slave_port = map(int, self.process.stdout.readline().split())
        self.master, self.slave, self.watcher = (
            Connection(port) for port in (master_port, slave_port, master_port))
        for connection in (self.master, self.slave, self.watcher):
            self.addCleanup(connection.close)
        self.slave.send(b'{"action":"join","type":"t"}')
        self.assertEqual(self.slave.receive(), b'{"ok":true}')
        for number in range(200):  # warm up (PyPy's JIT)
            self.run_job(f"w{number}".encode(), b'{"n":[%d,"\xc3\xa9",1.5,{}]}' % number)
            self.watcher.send(b'{"action":"stats"}')
            self.watcher.receive()

    def _stop(self):
        self.process.kill()
        self.process.wait()
        self.process.stdout.close()

    def peak_memory(self) -> int:
        with open(f"/proc/{self.process.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM")

    def run_job(self, job_id: bytes, body: bytes, answer: bytes = None) -> tuple:
        """Submit ``body``, take the job and answer it with ``answer`` (the
        same body by default); the frames the slave and the master got."""
        answer = body if answer is None else answer
        submit = b'{"action":"submit","id":"' + job_id + b'","type":"t","body":' + body + b"}"
        self.master.send(submit)
        self.assertEqual(self.master.receive(), b'{"ok":true,"id":"' + job_id + b'"}')
        job = self.slave.receive()
        self.slave.send(b'{"action":"respond","body":' + answer + b"}")
        self.assertEqual(self.slave.receive(), b'{"ok":true}')
        return job, self.master.receive()

    def check(self, body: bytes, answered: bool = False) -> None:
        """One frame carries ``body``: a submit, or (``answered``) a respond."""
        stalls = []
        done = threading.Event()

        def watch():
            while not done.is_set():
                started = cpu_seconds(self.process.pid)
                self.watcher.send(b'{"action":"stats"}')
                self.watcher.receive()
                stalls.append(cpu_seconds(self.process.pid) - started)
                time.sleep(0.005)

        before = self.peak_memory()
        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            job, answer = self.run_job(b"big", b"1" if answered else body, body if answered else b"2")
        finally:
            done.set()
            watcher.join()
        growth = self.peak_memory() - before
        frame = len(body) + 50
        self.assertLess(growth, self.most_memory * frame,
                        f"peak memory grew by {growth / frame:.1f} times the frame")
        self.assertLess(max(stalls), self.longest_stall,
                        f"CPU seconds the daemon spent while a stats request waited ({len(stalls)} requests)")
        if answered:
            self.assertEqual(answer, b'{"id":"big","body":' + body + b"}")
        else:
            self.assertEqual(job, b'{"action":"job","id":"big","type":"t","body":' + body + b"}")

    def test_non_ascii_string_submitted(self):
        self.check(b'"' + "\u00e9".encode() * (self.frame_size // 2) + b'"')

    def test_non_ascii_string_answered(self):
        self.check(b'"' + "\u00e9".encode() * (self.frame_size // 2) + b'"', answered=True)

    def test_empty_objects_and_one_non_ascii_character_submitted(self):
        self.check(b'["\xc3\xa9",' + b"{}," * (self.frame_size // 3) + b"{}]")

    def test_empty_objects_and_one_non_ascii_character_answered(self):
        self.check(b'["\xc3\xa9",' + b"{}," * (self.frame_size // 3) + b"{}]", answered=True)
