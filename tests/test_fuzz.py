"""Fuzzing both ports of an in-memory daemon with a hypothesis state machine.

Masters and slaves (several of each, interleaved) send random bytes, random
JSON, truncated and bit-flipped frames, requests with fields of every type
and size, actions of either port on either port, partial frames, pipelined
frames; they pause, disconnect at any point, and the clock moves so that
attempts time out.  A model follows each connection from what the daemon
writes to it (in order), and judges every reply against the README:

- every frame the daemon writes is a length-prefixed UTF-8 JSON object with
  no duplicate keys; error frames are ``{"error","reason"[,"id"]}`` with a
  code from `gloom.wire.ERROR_CODES`;
- every whole request gets exactly one reply, of an allowed kind; answers,
  failures and jobs go only where they belong (a master hears only about its
  own unfinished jobs, once; a slave holds one job at a time, of its type,
  that some master submitted, with that body);
- nothing raises out of ``dataReceived``, ``connectionLost`` or the clock,
  and nothing is logged as an error (or as text a UTF-8 log file cannot take);
- the totals add up (submitted = completed + failed + cancelled + queued +
  running) and the per-type figures match the slaves' states;
- after each example, a fresh master and slave still get a job through; then
  the daemon is stopped or every peer disconnects, and the scheduler must hold
  no job, no idle slave and no timer.

The run is derandomized (the same examples every time, so it cannot flake)
and bounded by a number of examples, not by time.  To explore further::

    GLOOM_FUZZ_EXAMPLES=2000 GLOOM_FUZZ_RANDOM=1 .venv/bin/python -m pytest -q tests/test_fuzz.py

A failure is reported as found, with the frames that led to it, unshrunk
(shrinking can take minutes); ``GLOOM_FUZZ_SHRINK=1`` shrinks it.

``KnownDefectTests`` replays, through the same checks, the shortest frames
that showed each defect the fuzzer found.
"""

from __future__ import annotations

import gc
import itertools
import json
import math
import os
import platform
import random
import struct
import sys
import traceback
from collections import Counter, defaultdict, deque

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from prometheus_client import CollectorRegistry
from twisted.internet import protocol
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from gloom import wire
from gloom.wire import (
    ID_EXISTS,
    INVALID_JSON,
    INVALID_MESSAGE,
    JOB_FAILED,
    NOT_PROCESSING,
    QUEUE_FULL,
    SHUTDOWN,
    SIZE_ERROR,
    TIMED_OUT,
    UNKNOWN_ACTION,
    UNKNOWN_JOB,
    WRONG_JOB,
    WRONG_PORT,
)
from gloom.http import LatencyHistogram, make_site
from gloom.tap import GloomService
from tests.support import Daemon

MAX_FRAME = 65536
MAX_QUEUED = 3
RETRIES = 1
MAX_NAME_BYTES = 1024  # ids and types longer than this (UTF-8) are refused
MAX_TIMEOUT = 30 * 24 * 3600  # a "timeout" over this is refused
DEEP_LIMIT = 400  # frames nesting deeper may be refused for it
MAX_REASON = 400  # an error frame quotes at most 200 characters of the peer's input

OK = "ok"

MASTER_ACTIONS = ("submit", "cancel", "stats")
SLAVE_ACTIONS = ("join", "respond", "fail", "leave", "release")

# A fixed number of examples, not a time budget, so that a run cannot flake;
# fewer under PyPy, where hypothesis itself runs slower, to finish in about
# the same time (some 5 s on CPython, 8 s on PyPy, on a 2-core machine).
EXAMPLES = int(os.environ.get("GLOOM_FUZZ_EXAMPLES",
                              "40" if platform.python_implementation() == "PyPy" else "80"))
STEPS = int(os.environ.get("GLOOM_FUZZ_STEPS", "30"))
# Shrinking a failure can take minutes; the failure message already lists
# the frames that led to it.  GLOOM_FUZZ_SHRINK=1 shrinks it to a minimal case.
PHASES = tuple(Phase) if os.environ.get("GLOOM_FUZZ_SHRINK") else \
    tuple(p for p in Phase if p.name not in ("shrink", "explain"))
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    phases=PHASES,
    stateful_step_count=STEPS,
    deadline=None,
    derandomize=not os.environ.get("GLOOM_FUZZ_RANDOM"),
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much, HealthCheck.large_base_example],
)


# --- JSON: writing what a peer sends, reading what the daemon writes ------


class Raw:
    """A JSON token written (and read back) as its text: numbers no Python
    value writes, or reads exactly (1e400, 10**5000)."""

    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text

    def __eq__(self, other):
        return type(other) is Raw and other.text == self.text

    def __ne__(self, other):
        return not self == other

    def __hash__(self):
        return hash(self.text)

    def __repr__(self):
        text = self.text if len(self.text) < 40 else f"{self.text[:20]}...({len(self.text)} chars)"
        return f"Raw({text!r})"


class Pairs(list):
    """A JSON object written from its (key, value) pairs, in that order,
    duplicate keys and all."""


class _Omit:
    def __repr__(self):
        return "OMIT"


OMIT = _Omit()  # a field left out of a request


def dumps(value, style="ascii") -> bytes:
    """Encode like a peer would: ``ascii`` (escapes), ``utf8`` (raw UTF-8;
    a lone surrogate then makes the frame invalid UTF-8), or ``spaced``."""
    ascii_only = style != "utf8"
    comma, colon = (", ", ": ") if style == "spaced" else (",", ":")

    def enc(v):
        if v is None:
            return "null"
        if v is True:
            return "true"
        if v is False:
            return "false"
        kind = type(v)
        if kind is Raw:
            return v.text
        if kind is int:
            return str(v)
        if kind is float:
            return repr(v)  # nan and inf come out as text no JSON parser takes
        if kind is str:
            return json.dumps(v, ensure_ascii=ascii_only)
        if kind is Pairs:
            return "{" + comma.join(enc(str(k)) + colon + enc(x) for k, x in v) + "}"
        if isinstance(v, dict):
            return "{" + comma.join(enc(str(k)) + colon + enc(x) for k, x in v.items()) + "}"
        if isinstance(v, (list, tuple)):
            return "[" + comma.join(enc(x) for x in v) + "]"
        raise TypeError(f"cannot write {v!r}")

    return enc(value).encode("utf-8", "surrogatepass")


def request(*pairs, style="ascii") -> bytes:
    """A request payload from (key, value) pairs; OMIT values are left out."""
    return dumps(Pairs((k, v) for k, v in pairs if v is not OMIT), style)


def message(style="ascii", **fields) -> bytes:
    return request(*fields.items(), style=style)


class _Obj(dict):
    """A decoded JSON object that remembers whether it had duplicate keys."""

    duplicate = False


def _object(pairs):
    obj = _Obj(pairs)
    obj.duplicate = len(obj) != len(pairs)
    return obj


def _int(text):
    return Raw(text) if len(text) > 4000 else int(text)


def _float(text):
    value = float(text)
    return Raw(text) if math.isinf(value) else value


def _constant(name):
    raise ValueError(f"{name} is not JSON")


_REFERENCE = json.JSONDecoder(parse_int=_int, parse_float=_float, parse_constant=_constant,
                              object_pairs_hook=_object)


def strict_decode(text: str):
    """Decode JSON as the standard library's strict (native) decoder reads it.

    With hooks, PyPy's json falls back to the pure-Python scanner, which
    takes what the native one refuses (``"\\u 123"``: int(" 123", 16) is
    fine; non-ASCII digits in numbers), so the native decoder checks the
    syntax first.  CPython's native decoder refuses integers over 4300
    digits, which are valid JSON: those are left to the hooked decoder,
    native there too."""
    try:
        json.loads(text)
    except ValueError as e:
        if "digits" not in str(e):
            raise
    return _REFERENCE.decode(text)


def classify(payload: bytes):
    """What a frame is, by the standard library's reading of JSON:
    (``invalid_json`` | ``deep`` | ``not_object`` | ``object``, value)."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return INVALID_JSON, None
    try:
        value = strict_decode(text)
    except RecursionError:
        return "deep", None
    except ValueError:
        return INVALID_JSON, None
    if text.count("[") + text.count("{") > DEEP_LIMIT and depth(value, DEEP_LIMIT) > DEEP_LIMIT:
        return "deep", None  # the daemon may refuse nesting this deep
    if type(value) is not _Obj:
        return "not_object", None
    return "object", value


def name_valid(value) -> bool:
    """A usable id or type: a non-empty string of at most MAX_NAME_BYTES of
    UTF-8, with no lone surrogate."""
    if type(value) is not str or not value:
        return False
    try:
        return len(value.encode("utf-8")) <= MAX_NAME_BYTES
    except UnicodeEncodeError:
        return False


def ref_valid(value) -> bool:
    """A ref the daemon echoes: a string like an id (empty allowed), or an
    integer of 64 bits, signed."""
    if type(value) is str:
        return value == "" or name_valid(value)
    return type(value) is int and -2**63 <= value < 2**63


def unicode_valid(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def depth(value, limit=200) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (list, dict)):
            deepest = max(deepest, d)
            if deepest > limit:
                return deepest
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def frame(payload: bytes) -> bytes:
    return struct.pack("!I", len(payload)) + payload


def short(data, limit=300) -> str:
    text = repr(data)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(data)} bytes)"


# --- the harness: a daemon, its peers, and a model of each peer ------------

_failure_classes = {}


def failure_class(key):
    if key not in _failure_classes:
        _failure_classes[key] = type(f"FuzzFailure{len(_failure_classes)}", (AssertionError,),
                                     {"__module__": __name__, "key": key})
    return _failure_classes[key]


class Request:
    __slots__ = ("payload", "kind", "value")

    def __init__(self, payload: bytes):
        self.payload = payload
        self.kind, self.value = classify(payload)


class Job:
    """One acknowledged submit, as the model follows it."""

    __slots__ = ("master", "id", "type", "body", "state", "ended_step")

    def __init__(self, master, job_id, job_type, body):
        self.master, self.id, self.type, self.body = master, job_id, job_type, body
        self.state = "live"  # "cancelled" (withdrawn, may still run), "ended" (its end was sent)
        self.ended_step = None

    def __repr__(self):
        return f"<job {self.id!r} of {self.master} ({self.state})>"


class FuzzPeer:
    """One connection on a StringTransport, and what the model knows of it."""

    def __init__(self, harness, role: str, number: int):
        self.role = role
        self.name = ("m" if role == "master" else "s") + str(number)
        factory = harness.daemon.masters if role == "master" else harness.daemon.slaves
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 1000 + number))
        self.protocol = factory.buildProtocol(None)
        self.pending = deque()  # requests sent, awaiting their reply (the last may be partial)
        self.tail = b""  # the rest of a frame begun and not yet sent
        self.loose = False  # raw bytes were sent: framing unknown, frames only checked for shape
        self.refusing = False  # an oversized frame was sent: the daemon reads nothing more
        self.expect_size_error = False
        self.lost = False
        self.lost_step = None
        self.paused = False
        self.inbox = []
        self.unfinished = {}  # master: id -> Job acknowledged and not ended
        self.joined = None  # slave: the type it serves
        self.held = None  # slave: id of the job it holds
        self.held_type = None
        self.held_job = None  # slave: the Job it holds, when the model can tell which
        self.left = False  # slave: it sent leave, and has not joined since
        self.job_ids = []  # slave: ids of every job it got
        harness.call(f"{self.name}.makeConnection", self.protocol.makeConnection, self.transport)

    def __repr__(self):
        return self.name


class Harness:
    def __init__(self, default_timeout=None, stop_at_end=False, seed=0, collect=True):
        self.daemon = Daemon(max_retries=RETRIES, max_frame=MAX_FRAME, max_queued=MAX_QUEUED,
                             default_timeout=default_timeout)
        self.clock = self.daemon.clock
        self.scheduler = self.daemon.scheduler
        self.service = GloomService(self.scheduler, (self.daemon.masters, self.daemon.slaves), self.clock)
        self.daemon.masters.stats = self.service.stats
        registry = CollectorRegistry()
        latency = LatencyHistogram(registry)
        self.scheduler.on_answer = latency.observe
        if hasattr(latency, "forget"):  # as makeService wires it
            self.scheduler.on_type_unused = latency.forget
        site = make_site(self.service.stats, latency, registry)
        self.pages = {name: site.resource.children[name.encode()] for name in ("status", "metrics")}
        self.stop_at_end = stop_at_end
        self.collect = collect
        self.rng = random.Random(seed)
        self.peers = []
        self.numbers = itertools.count(1)
        self.seen_ids = set()  # every id some master had acknowledged
        self.jobs = defaultdict(list)  # (id, type) -> Jobs acknowledged
        self.accepted = []  # this step: (Job or None, id, kind, value) slaves answered, accepted
        self.delivered = []  # this step: (master, Job, kind, value) masters heard
        self.loose_master_ever = False
        self.later = []  # jobs slaves got, to check against what masters submitted
        self.problems = []
        self.transcript = []
        self.stopping = False
        self.broken = False
        self.step = 0  # settle() calls: jobs that ended in this one may still be handed out in it
        globalLogPublisher.addObserver(self.observe)

    def close(self):
        globalLogPublisher.removeObserver(self.observe)

    # --- failing with a reproduction ---------------------------------------

    def fail(self, problem: str, kind=""):
        """Fail with the frames that led here.  Each kind of failure (where it
        was found, and ``kind``) has its own exception class, so that
        hypothesis reports (and shrinks) distinct defects separately."""
        self.broken = True
        lines = "\n".join(self.transcript[-60:])
        error = failure_class((sys._getframe(1).f_lineno, kind))
        raise error(f"{problem}\n--- frames sent (oldest first, last 60) ---\n{lines}")

    def call(self, what, function, *args):
        try:
            return function(*args)
        except Exception as e:
            self.fail(f"{what} raised {type(e).__name__}: {e}\n{traceback.format_exc()}",
                      type(e).__name__)

    def observe(self, event):
        text = formatEvent(event)
        level = event.get("log_level")
        failure = event.get("log_failure")
        if failure is not None or event.get("isError") or level in (LogLevel.error, LogLevel.critical):
            detail = failure.getTraceback() if failure is not None else ""
            self.problems.append(f"logged as an error: {text}\n{detail}")
        elif text.startswith("Unable to format event"):
            self.problems.append(f"a log event cannot be formatted: {text}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            self.problems.append(
                "a log line holds a lone surrogate: a text log observer (twistd's stdout or "
                f"log file) raises UnicodeEncodeError on it and the line is lost: {text!r}")

    # --- peers ---------------------------------------------------------------

    def add(self, role) -> FuzzPeer:
        peer = FuzzPeer(self, role, next(self.numbers))
        self.peers.append(peer)
        self.transcript.append(f"{peer} connects ({role})")
        return peer

    def live(self, role=None):
        return [p for p in self.peers if not p.lost and (role is None or p.role == role)]

    def lose(self, peer):
        if peer.lost:
            return
        self.drain_all()  # what was written before the connection was lost
        self.transcript.append(f"{peer} disconnects" + (" mid-frame" if peer.tail else ""))
        peer.lost, peer.lost_step = True, self.step
        for job in peer.unfinished.values():
            job.state = "cancelled"
        self.call(f"{peer}.connectionLost", peer.protocol.connectionLost, Failure(protocol.connectionDone))

    def feed(self, peer, data: bytes, cuts=()):
        start = 0
        for cut in sorted(set(cuts)) + [len(data)]:
            if cut > start:
                self.call(f"{peer}.dataReceived", peer.protocol.dataReceived, data[start:cut])
                start = cut

    def send(self, peer, payloads, cuts=(), hold=0):
        """Send frames as one stream after any frame left unfinished, split at
        ``cuts``; keep back the last ``hold`` bytes (of the last frame) for later."""
        data = peer.tail + b"".join(frame(p) for p in payloads)
        requests = {}
        for i, p in enumerate(payloads):
            if i < 3 or i == len(payloads) - 1:
                self.transcript.append(f"{peer} <- {short(p)}")
            elif i == 3:
                self.transcript.append(f"{peer} <- ... ({len(payloads) - 4} more frames) ...")
            if peer.refusing or peer.loose:
                continue
            if len(p) > MAX_FRAME:
                peer.refusing = peer.expect_size_error = True
                continue
            if p not in requests:
                requests[p] = Request(p)
            peer.pending.append(requests[p])
        hold = min(hold, len(frame(payloads[-1])) - 1) if payloads else 0
        if hold > 0:
            data, peer.tail = data[:-hold], data[-hold:]
        else:
            peer.tail = b""
        self.feed(peer, data, [c for c in cuts if 0 < c < len(data)])

    def send_raw(self, peer, data: bytes):
        """Unframed bytes: the stream can no longer be followed frame by frame."""
        self.transcript.append(f"{peer} <- raw {short(peer.tail + data)}")
        peer.loose = True
        if peer.role == "master":
            self.loose_master_ever = True
        peer.pending.clear()
        data, peer.tail = peer.tail + data, b""
        self.feed(peer, data)

    def send_oversized(self, peer, length: int, extra: bytes):
        self.transcript.append(f"{peer} <- header for {length} bytes, then {short(extra)}")
        data, peer.tail = peer.tail + struct.pack("!I", length) + extra, b""
        if not (peer.loose or peer.refusing):
            peer.refusing = peer.expect_size_error = True
        self.feed(peer, data)

    # --- reading what the daemon wrote ---------------------------------------

    def settle(self):
        """Read and judge everything written; let connections the daemon
        closed finish closing; check that every whole request was answered."""
        while True:
            self.drain_all()
            closing = [p for p in self.live() if p.transport.disconnecting]
            if not closing:
                break
            for peer in closing:
                self.lose(peer)
        later, self.later = self.later, []
        for peer, msg in later:
            if not self.candidates(msg) and not self.loose_master_ever:
                self.fail(f"{peer}: a job no master submitted (or one already ended): {short(msg, 600)}"
                          f"\n  submitted with that id and type: {self.jobs.get((msg['id'], msg['type']))!r}")
        self.match_answers()
        self.step += 1
        for peer in self.live():
            if peer.paused or peer.loose or peer.refusing:
                continue
            unanswered = len(peer.pending) - (1 if peer.tail else 0)
            if unanswered > 0:
                self.fail(f"{peer}: no reply to {short(peer.pending[0].payload)}")
        if self.problems:
            problems, self.problems = self.problems, []
            self.fail("\n".join(problems))

    def drain_all(self):
        for peer in sorted(self.peers, key=lambda p: p.role != "master"):
            self.drain(peer)  # masters first: a job a slave gets is then known

    def drain(self, peer):
        data = peer.transport.value()
        if not data:
            return
        peer.transport.clear()
        if peer.lost:
            self.fail(f"{peer}: the daemon wrote to a connection after connectionLost: {short(data)}")
        offset = 0
        while offset < len(data):
            if len(data) - offset < 4:
                self.fail(f"{peer}: the daemon wrote a partial frame header: {short(data[offset:])}")
            (length,) = struct.unpack_from("!I", data, offset)
            end = offset + 4 + length
            if end > len(data):
                self.fail(f"{peer}: the daemon wrote a partial frame: {short(data[offset:])}")
            self.frame_out(peer, data[offset + 4 : end])
            offset = end

    def frame_out(self, peer, payload: bytes):
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError as e:
            self.fail(f"{peer}: the daemon wrote a frame that is not UTF-8 ({e}): {short(payload)}")
        try:
            msg = strict_decode(text)
        except (ValueError, RecursionError) as e:
            self.fail(f"{peer}: the daemon wrote a frame that is not JSON ({e}): {short(payload)}")
        if type(msg) is not _Obj or msg.duplicate:
            self.fail(f"{peer}: the daemon wrote a frame that is no JSON object or repeats a key: "
                      f"{short(payload)}")
        peer.inbox.append(msg)
        if "error" in msg:
            self.check_error_frame(peer, msg)
        if peer.role == "master":
            self.master_frame(peer, msg)
        else:
            self.slave_frame(peer, msg)

    def check_error_frame(self, peer, msg):
        if not set(msg) <= {"error", "reason", "id", "ref"} or type(msg.get("reason")) is not str:
            self.fail(f"{peer}: malformed error frame {msg!r}")
        if msg["error"] not in wire.ERROR_CODES:
            self.fail(f"{peer}: error code {msg['error']!r} is not in gloom.wire.ERROR_CODES: {msg!r}")
        if "id" in msg and type(msg["id"]) is not str:
            self.fail(f"{peer}: error frame with a non-string id: {msg!r}")
        if msg["error"] not in (JOB_FAILED, SHUTDOWN) and len(msg["reason"]) > MAX_REASON:
            self.fail(f"{peer}: an error frame quotes too much of what the peer sent "
                      f"({len(msg['reason'])} characters): {short(msg)}")

    def master_frame(self, peer, msg):
        code = msg.get("error")
        if code in (JOB_FAILED, SHUTDOWN):
            self.job_ended(peer, msg)
        elif code == SIZE_ERROR:
            self.size_error(peer, msg)
        elif code is not None or msg.get("ok") is True:
            self.reply(peer, msg)
        elif set(msg) == {"id", "body"} and type(msg["id"]) is str:
            self.answered(peer, msg)
        else:
            self.fail(f"{peer}: a frame that is no reply, answer or error: {msg!r}")

    def slave_frame(self, peer, msg):
        code = msg.get("error")
        if code == SIZE_ERROR:
            self.size_error(peer, msg)
        elif code is not None or msg.get("ok") is True:
            self.reply(peer, msg)
        elif msg.get("action") == "job":
            self.job_given(peer, msg)
        else:
            self.fail(f"{peer}: a frame that is no reply, job or error: {msg!r}")

    def size_error(self, peer, msg):
        if not (peer.expect_size_error or peer.loose):
            self.fail(f"{peer}: size_error without an oversized frame: {msg!r}")
        if peer.pending and not peer.loose:
            self.fail(f"{peer}: size_error before the replies to earlier requests, "
                      f"e.g. {short(peer.pending[0].payload)}")
        peer.pending.clear()
        peer.refusing = True
        peer.expect_size_error = False

    def reply(self, peer, msg):
        if peer.loose:
            if msg.get("ok") is True and type(msg.get("id")) is str:
                self.seen_ids.add(msg["id"])
            return
        if not peer.pending:
            self.fail(f"{peer}: a reply to no request: {msg!r}")
        req = peer.pending.popleft()
        msg = self.check_ref(peer, req, msg)
        if msg is None:
            return
        own, other = (MASTER_ACTIONS, SLAVE_ACTIONS) if peer.role == "master" else (SLAVE_ACTIONS, MASTER_ACTIONS)
        value = self.judge_generic(peer, req, msg, own, other)
        if value is not None:
            getattr(self, "judge_" + value["action"])(peer, req, value, msg)

    def check_ref(self, peer, req, msg):
        """The reply echoes the request's ref if it is valid, and carries none
        otherwise; an invalid ref refuses the request.  Returns the reply
        without its ref, to be judged further, or None if judged here."""
        ref = req.value.get("ref", OMIT) if req.kind == "object" else OMIT
        if req.kind == "deep":
            return _object([(k, v) for k, v in msg.items() if k != "ref"])
        if ref is OMIT:
            if "ref" in msg:
                self.fail(f"{peer}: sent {short(req.payload)}\n  a reply with a ref it did not send: {msg!r}")
            return msg
        if not ref_valid(ref):
            self.expect(peer, req, msg, {INVALID_MESSAGE})
            if "ref" in msg or "'ref'" not in msg["reason"]:
                self.fail(f"{peer}: sent {short(req.payload)}\n  the invalid ref {ref!r} is not "
                          f"refused as such: {msg!r}")
            return None
        if "ref" not in msg or type(msg["ref"]) is not type(ref) or msg["ref"] != ref:
            self.fail(f"{peer}: sent {short(req.payload)}\n  the reply does not echo its ref {ref!r}: "
                      f"{short(msg, 600)}")
        return _object([(k, v) for k, v in msg.items() if k != "ref"])

    def expect(self, peer, req, msg, allowed):
        outcome = msg.get("error", OK)
        if outcome not in allowed:
            action = req.value.get("action") if req.value is not None else req.kind
            self.fail(f"{peer}: sent {short(req.payload)}\n  expected {' or '.join(sorted(allowed))}, "
                      f"got {short(msg, 600)}", f"{action!r}: {sorted(allowed)} -> {outcome}")
        if outcome == OK and "error" in msg:
            self.fail(f"{peer}: a reply with both ok and error: {msg!r}")
        return outcome

    def judge_generic(self, peer, req, msg, own, other):
        """Judge what does not depend on the action; the request if it does."""
        if req.kind == INVALID_JSON:
            self.expect(peer, req, msg, {INVALID_JSON})
        elif req.kind == "deep":
            self.expect(peer, req, msg, {INVALID_JSON, INVALID_MESSAGE})
        elif req.kind == "not_object":
            self.expect(peer, req, msg, {INVALID_MESSAGE})
        else:
            action = req.value.get("action", OMIT)
            if type(action) is not str:
                self.expect(peer, req, msg, {INVALID_MESSAGE})
            elif action in own:
                return req.value
            elif action in other:
                self.expect(peer, req, msg, {WRONG_PORT})
            else:
                self.expect(peer, req, msg, {UNKNOWN_ACTION})
        return None

    def exact(self, peer, req, msg, wanted):
        if msg != wanted:
            self.fail(f"{peer}: sent {short(req.payload)}\n  expected {wanted!r}, got {short(msg, 600)}")

    # --- the master port -------------------------------------------------------

    def judge_submit(self, peer, req, v, msg):
        job_id = v.get("id", OMIT)
        if not name_valid(job_id):
            self.expect(peer, req, msg, {INVALID_MESSAGE})
            return
        bad = maybe = False
        if not name_valid(v.get("type", OMIT)) or "body" not in v:
            bad = True
        elif depth(v["body"]) > 100:
            maybe = True  # may nest too deeply for the daemon to carry
        priority = v.get("priority", OMIT)
        if priority is not OMIT:
            if type(priority) is int:
                maybe = maybe or abs(priority) > 2**31
            elif type(priority) is Raw and priority.text.lstrip("-").isdigit():
                maybe = True
            else:
                bad = True
        timeout = v.get("timeout", OMIT)
        if timeout is not OMIT:
            if type(timeout) not in (int, float) or timeout <= 0 or timeout > MAX_TIMEOUT + 1:
                bad = True  # includes non-finite timeouts, which are read as Raw
            elif timeout >= MAX_TIMEOUT - 1:
                maybe = True
        if bad:
            allowed = {INVALID_MESSAGE}
        else:
            allowed = {INVALID_MESSAGE} if maybe else set()
            full, duplicate = len(peer.unfinished) >= MAX_QUEUED, job_id in peer.unfinished
            if full:
                allowed.add(QUEUE_FULL)
            if duplicate:
                allowed.add(ID_EXISTS)
            if not (full or duplicate):
                allowed.add(OK)
                if job_id in self.seen_ids:
                    allowed.add(ID_EXISTS)  # another master's id, or one still running
        outcome = self.expect(peer, req, msg, allowed)
        if outcome == OK:
            self.exact(peer, req, msg, {"ok": True, "id": job_id})
            job = peer.unfinished[job_id] = Job(peer, job_id, v["type"], v["body"])
            self.seen_ids.add(job_id)
            self.jobs[(job_id, v["type"])].append(job)
        elif msg.get("id") != job_id:
            self.fail(f"{peer}: sent {short(req.payload)}\n  the refusal {msg!r} does not carry the id")

    def judge_cancel(self, peer, req, v, msg):
        job_id = v.get("id", OMIT)
        if type(job_id) is not str or not job_id:
            self.expect(peer, req, msg, {INVALID_MESSAGE})
            return
        allowed = {OK} if job_id in peer.unfinished else {UNKNOWN_JOB}
        if not name_valid(job_id):
            allowed.add(INVALID_MESSAGE)
        outcome = self.expect(peer, req, msg, allowed)
        if outcome == OK:
            self.exact(peer, req, msg, {"ok": True, "id": job_id})
            peer.unfinished.pop(job_id).state = "cancelled"
        elif outcome == UNKNOWN_JOB and msg.get("id") != job_id:
            self.fail(f"{peer}: sent {short(req.payload)}\n  unknown_job without the id: {msg!r}")

    def judge_stats(self, peer, req, v, msg):
        self.expect(peer, req, msg, {OK})
        stats = msg.get("stats")
        if set(msg) != {"ok", "stats"} or type(stats) is not _Obj:
            self.fail(f"{peer}: a malformed stats reply {msg!r}")
        self.check_figures(stats.get("types"), stats.get("totals"), f"{peer}'s stats reply")

    def answered(self, peer, msg):
        if peer.loose:
            return
        job_id = msg["id"]
        if job_id not in peer.unfinished:
            self.fail(f"{peer}: an answer for {job_id!r}, which it has no unfinished job for: "
                      f"{short(msg, 600)}")
        job = peer.unfinished.pop(job_id)
        job.state, job.ended_step = "ended", self.step
        self.delivered.append((peer, job, "respond", msg["body"]))

    def job_ended(self, peer, msg):
        job_id = msg.get("id")
        if type(job_id) is not str:
            self.fail(f"{peer}: a {msg['error']} frame without an id: {msg!r}")
        if peer.loose:
            return
        if "ref" in msg:
            self.fail(f"{peer}: a {msg['error']} frame with a ref: {msg!r}")
        if msg["error"] == SHUTDOWN and not self.stopping:
            self.fail(f"{peer}: shutdown while the daemon is not stopping: {msg!r}")
        if job_id not in peer.unfinished:
            self.fail(f"{peer}: {msg['error']} for {job_id!r}, which it has no unfinished job for: {msg!r}")
        job = peer.unfinished.pop(job_id)
        job.state, job.ended_step = "ended", self.step
        if msg["error"] == JOB_FAILED:
            self.delivered.append((peer, job, "fail", msg["reason"]))

    # --- the slave port ----------------------------------------------------------

    def judge_join(self, peer, req, v, msg):
        job_type = v.get("type", OMIT)
        if self.expect(peer, req, msg, {OK} if name_valid(job_type) else {INVALID_MESSAGE}) == OK:
            self.exact(peer, req, msg, {"ok": True})
            peer.joined = job_type
            peer.left = False

    def judge_leave(self, peer, req, v, msg):
        self.expect(peer, req, msg, {OK})
        self.exact(peer, req, msg, {"ok": True})
        peer.left = True

    def judge_release(self, peer, req, v, msg):
        given, held = v.get("id", OMIT), peer.held
        if not name_valid(given):
            allowed = {INVALID_MESSAGE}
        elif held is None:
            allowed = {NOT_PROCESSING}
        elif given != held:
            allowed = {WRONG_JOB}  # the held job stays held
        else:
            allowed = {OK, TIMED_OUT}
        outcome = self.expect(peer, req, msg, allowed)
        if outcome == OK:
            self.exact(peer, req, msg, {"ok": True})
        elif outcome in (TIMED_OUT, WRONG_JOB, NOT_PROCESSING) and msg.get("id") != given:
            self.fail(f"{peer}: sent {short(req.payload)}\n  {outcome} without the id: {msg!r}")
        if outcome in (OK, TIMED_OUT):
            peer.held = peer.held_type = peer.held_job = None

    def judge_respond(self, peer, req, v, msg):
        self.judge_answer(peer, req, v, msg, "body")

    def judge_fail(self, peer, req, v, msg):
        self.judge_answer(peer, req, v, msg, "reason")

    def judge_answer(self, peer, req, v, msg, field):
        held = peer.held
        has_id, given = "id" in v, v.get("id")
        if field == "body":
            fields_ok = "body" in v
            maybe = fields_ok and depth(v["body"]) > 100
        else:
            reason = v.get("reason")
            fields_ok = type(reason) is str
            # a reason with a lone surrogate may be refused (it could not be logged)
            maybe = fields_ok and not unicode_valid(reason)
        if held is None:
            allowed = {NOT_PROCESSING}
            if not fields_ok or maybe or has_id:
                allowed.add(INVALID_MESSAGE)
            if has_id:
                allowed.add(WRONG_JOB)
        elif has_id and type(given) is not str:
            allowed = {INVALID_MESSAGE, WRONG_JOB, OK, TIMED_OUT}  # not specified
        elif has_id and given != held:
            allowed = {WRONG_JOB}  # the held job stays held
            if not fields_ok or maybe or not name_valid(given):
                allowed.add(INVALID_MESSAGE)
        else:
            allowed = {OK, TIMED_OUT} if fields_ok else {INVALID_MESSAGE}
            if maybe:
                allowed.add(INVALID_MESSAGE)
        outcome = self.expect(peer, req, msg, allowed)
        if outcome == OK:
            self.exact(peer, req, msg, {"ok": True})
            kind = "respond" if field == "body" else "fail"
            self.accepted.append((peer.held_job, held, kind, v[field]))
        elif outcome == TIMED_OUT and msg.get("id") != held:
            self.fail(f"{peer}: sent {short(req.payload)}\n  timed_out for another job than "
                      f"the held {held!r}: {msg!r}")
        elif outcome == INVALID_MESSAGE and held is not None and (not has_id or given == held) \
                and msg.get("id") != held:
            self.fail(f"{peer}: sent {short(req.payload)}\n  the refusal does not name the held "
                      f"job {held!r}: {msg!r}")
        if outcome in (OK, TIMED_OUT):
            peer.held = peer.held_type = peer.held_job = None

    def job_given(self, peer, msg):
        if set(msg) != {"action", "id", "type", "body"} or type(msg["id"]) is not str \
                or type(msg["type"]) is not str:
            self.fail(f"{peer}: a malformed job frame {short(msg, 600)}")
        if peer.loose:
            return
        if peer.held is not None:
            self.fail(f"{peer}: a second job while it holds {peer.held!r}: {short(msg, 600)}")
        if peer.left:
            self.fail(f"{peer}: a job after it left (and did not join again): {short(msg, 600)}")
        if msg["type"] != peer.joined:
            self.fail(f"{peer}: a job of type {msg['type']!r} for a slave of type {peer.joined!r}")
        candidates = self.candidates(msg)
        if not candidates:
            self.later.append((peer, msg))  # the master's ack may not be read yet
        peer.held_job = candidates[0] if len(candidates) == 1 else None
        peer.held, peer.held_type = msg["id"], msg["type"]
        peer.job_ids.append(msg["id"])

    def match_answers(self):
        """Each answer or slave failure a master heard is one a slave gave for
        that job, this step; each a slave gave and was accepted reached the
        job's master, unless the job was withdrawn."""
        accepted, self.accepted = self.accepted, []
        delivered, self.delivered = self.delivered, []
        loose_slaves = any(p.loose and (not p.lost or p.lost_step == self.step)
                           for p in self.peers if p.role == "slave")
        for master, job, kind, value in delivered:
            for entry in accepted:
                if (entry[0] is job or entry[0] is None and entry[1] == job.id) \
                        and entry[2:] == (kind, value):
                    accepted.remove(entry)
                    break
            else:
                automatic = kind == "fail" and value.startswith(
                    ("timeout: no answer within", "slave disconnected during the job")) \
                    and "gave up after" in value
                if not (automatic or loose_slaves):
                    self.fail(f"{master}: heard {kind} {short(value)} for {job!r}, which no slave "
                              f"gave for that job (a stale or stray answer?); slaves gave {accepted!r}")
        for job, job_id, kind, value in accepted:
            if job is not None and job.state != "cancelled" and not self.stopping \
                    and not (job.master.lost or job.master.loose):
                self.fail(f"a slave's {kind} {short(value)} for {job!r} was accepted (ok), "
                          "and its master did not hear it")

    def candidates(self, msg):
        """The unended jobs a job frame can be."""
        return [job for job in self.jobs.get((msg["id"], msg["type"]), ())
                if (job.state != "ended" or job.ended_step == self.step) and job.body == msg["body"]]

    # --- the figures -------------------------------------------------------------

    def check_figures(self, types, totals, where):
        if not isinstance(types, dict) or not isinstance(totals, dict):
            self.fail(f"{where}: malformed figures {types!r} {totals!r}")
        live = 0
        for name, counts in types.items():
            queued, running = counts["queued"], counts["running"]
            idle, busy = counts["idle_slaves"], counts["busy_slaves"]
            live += queued + running
            if not (queued or running or idle or busy):
                self.fail(f"{where}: type {name!r} is listed with no jobs and no slaves")
            if queued and idle:
                self.fail(f"{where}: {queued} {name!r} jobs wait while {idle} slaves of the type idle")
            if running > busy:
                self.fail(f"{where}: type {name!r} runs {running} jobs on {busy} busy slaves")
        ended = totals["completed"] + totals["failed"] + totals["cancelled"]
        if totals["submitted"] != ended + live:
            self.fail(f"{where}: totals do not add up: submitted {totals['submitted']} != completed "
                      f"{totals['completed']} + failed {totals['failed']} + cancelled {totals['cancelled']}"
                      f" + queued/running {live}\n  types={dict(types)!r}")

    def check_state(self):
        stats = self.call("stats()", self.service.stats)
        self.check_figures(stats["types"], stats["totals"], "stats()")
        if stats["masters"] != len(self.live("master")) or stats["slaves"] != len(self.live("slave")):
            self.fail(f"stats() counts {stats['masters']} masters and {stats['slaves']} slaves; "
                      f"connected: {self.live('master')} {self.live('slave')}")
        if self.stopping:
            return
        slaves = self.live("slave")
        if not any(s.loose for s in slaves):
            idle = Counter(s.joined for s in slaves if s.held is None and s.joined is not None
                           and not s.left)
            busy = Counter(s.held_type for s in slaves if s.held is not None)
            types = stats["types"]
            for name in set(idle) | set(busy) | set(types):
                counts = types.get(name, {})
                got = (counts.get("idle_slaves", 0), counts.get("busy_slaves", 0))
                if got != (idle[name], busy[name]):
                    self.fail(f"type {name!r}: the daemon counts {got[0]} idle and {got[1]} busy "
                              f"slaves; the slaves' frames say {idle[name]} idle, {busy[name]} busy")
        masters = self.live("master")
        if not self.loose_master_ever:
            unfinished = sum(len(m.unfinished) for m in masters)
            if len(self.scheduler) < unfinished:
                self.fail(f"the scheduler holds {len(self.scheduler)} jobs; connected masters "
                          f"await {unfinished}")

    def render_pages(self):
        for name, page in self.pages.items():
            self.call(f"/{name}", page.render_body)

    # --- the end of an example -----------------------------------------------------

    def liveness(self):
        """A fresh master and slave get a job through, end to end."""
        n = next(self.numbers)
        job_type = job_id = f"fuzz-liveness-{n}"
        slave, master = self.add("slave"), self.add("master")
        self.send(slave, [message(action="join", type=job_type)])
        self.settle()
        self.send(master, [message(action="submit", id=job_id, type=job_type, body=["alive", n])])
        self.settle()
        self.send(slave, [message(action="respond", body={"alive": n})])
        self.settle()
        wanted = ([{"ok": True, "id": job_id}, {"id": job_id, "body": {"alive": n}}],
                  [{"ok": True}, {"action": "job", "id": job_id, "type": job_type, "body": ["alive", n]},
                   {"ok": True}])
        if (master.inbox, slave.inbox) != wanted:
            self.fail(f"a fresh master and slave do not get a job through: the master got "
                      f"{master.inbox!r}, the slave {slave.inbox!r}")
        self.lose(master)
        self.lose(slave)
        self.settle()

    def finish(self):
        self.settle()
        self.check_state()
        self.render_pages()
        self.liveness()
        if self.stop_at_end:
            self.stop()
        else:
            peers = self.live()
            self.rng.shuffle(peers)
            for peer in peers:
                self.lose(peer)
                self.settle()
        self.call("clock.advance(0)", self.clock.advance, 0)
        self.settle()
        self.check_state()
        if len(self.scheduler):
            self.fail(f"with every peer gone the scheduler still holds jobs {self.scheduler.jobs()!r}")
        types = self.scheduler.types()
        if types:
            self.fail(f"with every peer gone the scheduler still lists {types!r}")
        for factory in (self.daemon.masters, self.daemon.slaves):
            if factory.connections:
                self.fail(f"connections still tracked: {factory.connections!r}")
        timers = [c for c in self.clock.getDelayedCalls() if c.active()]
        if timers:
            self.fail(f"timers still pending with nothing left to time: {timers!r}")
        if self.collect:
            gc.collect()  # an unhandled error in a Deferred is logged when it is collected
            self.settle()

    def stop(self):
        """Stop the daemon as SIGTERM does: every tracked master hears shutdown
        for each of its unfinished jobs, and every connection is closed."""
        for peer in self.live():
            if peer.paused and not peer.transport.disconnecting:
                peer.paused = False
                self.call(f"{peer}.resumeProducing", peer.protocol.resumeProducing)
        self.settle()
        masters = [p for p in self.live("master") if not p.loose]
        self.stopping = True
        self.transcript.append("the daemon stops")
        outcome = []
        self.call("stopService", self.service.stopService).addBoth(outcome.append)
        self.settle()
        if not outcome or isinstance(outcome[0], Failure):
            self.fail(f"stopping did not finish once every connection closed: {outcome!r}")
        for peer in masters:
            if peer.unfinished:
                self.fail(f"{peer} heard no shutdown for {sorted(peer.unfinished)!r}")


# --- strategies ----------------------------------------------------------------


def weighted(*choices):
    """One of the strategies, picked in proportion to its weight (shrinking
    towards the first)."""
    table = [strategy for weight, strategy in choices for _ in range(weight)]
    index = st.integers(0, len(table) - 1)

    @st.composite
    def pick(draw):
        return draw(table[draw(index)])

    return pick()


SURROGATES = ["\ud800", "\udbff", "\udc00", "\udfff", "\ud83d"]
characters = st.one_of(st.sampled_from(SURROGATES + ["\x00", "\x1f", "\u2028", "\ufeff", "\xe9", "\U0001f600",
                                                     '"', "\\", "/", "a", "1"]),
                       st.integers(0, 0x10FFFF).map(chr))  # surrogates included
short_text = st.text(alphabet=characters, max_size=6)
ID_POOL = ["1", "2", "3", "x", "\xe9", "\U0001f600", "job"]
TYPE_POOL = ["t", "u", "\xe9"]
ODD_NAMES = ["", " ", "\ud800", "a\udfff", "\udc80", "\ud83d", "\ud83d\ude00", "x" * 1024, "x" * 1025,
             "\xe9" * 512, "\xe9" * 513, "\U0001f600" * 256, "\U0001f600" * 257, "y" * 30000]
RAW_NUMBERS = [Raw("1" + "0" * 400), Raw("-" + "9" * 4100), Raw("7" * 5000), Raw("1e400"), Raw("-1e400"),
               Raw("1E+2"), Raw("-0"), Raw("0.0e0"), Raw("1e-400"), Raw("123456789012345678901234567890")]
junk = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                 st.sampled_from(RAW_NUMBERS), st.lists(st.integers(), max_size=2),
                 st.dictionaries(short_text, st.integers(), max_size=2))
leaves = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-10, 10),
                   st.floats(allow_nan=False, allow_infinity=False), short_text,
                   st.sampled_from(RAW_NUMBERS + SURROGATES + [2**63, -2**63 - 1, 2**64, 10**30, 1e300, -0.0]))


def _containers(children):
    pairs = st.lists(st.tuples(st.sampled_from(["a", "a", "action", "id", "body"]) | short_text, children),
                     max_size=4).map(Pairs)
    return st.one_of(st.lists(children, max_size=4), st.dictionaries(short_text, children, max_size=4), pairs)


json_values = st.recursive(leaves, _containers, max_leaves=6)
DEEP = [Raw("[" * 60 + "]" * 60), Raw("[" * 150 + "1" + "]" * 150), Raw('{"a":' * 120 + "1" + "}" * 120),
        Raw("[" * 100000 + "]" * 100000)]
ids = weighted((8, st.sampled_from(ID_POOL)), (2, short_text), (2, st.sampled_from(ODD_NAMES)),
               (1, junk), (1, st.just(OMIT)))
types = weighted((8, st.sampled_from(TYPE_POOL)), (1, short_text), (2, st.sampled_from(ODD_NAMES)),
                 (1, junk), (1, st.just(OMIT)))
bodies = weighted((8, json_values), (1, st.just(OMIT)), (1, st.sampled_from(DEEP)))
priorities = weighted((6, st.just(OMIT)), (4, st.integers(-3, 3)), (1, st.integers()),
                      (2, st.sampled_from([2**31, -2**31 - 1, 2**63, 10**30, 1.0, 1.5, -0.0, True, "9",
                                           None, Raw("1" * 4500), Raw("1e400")])), (1, junk))
timeouts = weighted((6, st.just(OMIT)), (4, st.sampled_from([0.5, 1, 2, 3.5])),
                    (3, st.sampled_from([0, -1, -0.0, 1e-300, 5e-324, 2592000, 2591999.5, 2592000.5, 2592001,
                                         3000000, 1e7, 10**30, Raw("1" + "0" * 400), Raw("1e400"),
                                         Raw("-1e400"), Raw("1e-400"), True, None, "5", [1]])),
                    (1, st.floats()), (1, st.integers()), (1, junk))
reasons = weighted((6, short_text), (1, st.sampled_from(["", "x" * 5000] + SURROGATES)), (1, junk),
                   (1, st.just(OMIT)))
actions = weighted((6, st.sampled_from(MASTER_ACTIONS + SLAVE_ACTIONS)),
                   (1, st.sampled_from(["job", "Submit", "submit ", "", "\ud800", "x" * 3000])),
                   (1, short_text), (1, junk), (1, st.just(OMIT)))
styles = st.sampled_from(["ascii", "ascii", "ascii", "utf8", "spaced"])
extra_fields = st.lists(st.tuples(st.sampled_from(["x", "Action", "ID", "ok", "error", "stats"]) | short_text,
                                  json_values), max_size=2)


@st.composite
def arrange(draw, pairs):
    """The fields, now and then in another order, with extras, or one of
    them twice (the later one is the one read)."""
    pairs = [(k, v) for k, v in pairs if v is not OMIT]
    shape = draw(st.integers(0, 15))
    if shape >= 13:
        pairs += draw(extra_fields)
    if shape >= 10:
        pairs = list(draw(st.permutations(pairs)))
    if shape >= 14 and pairs:
        key, _ = draw(st.sampled_from(pairs))
        pairs.insert(0, (key, draw(junk)))
    return request(*pairs, style=draw(styles))


def maybe(strategy, present=1, absent=1):
    return weighted((absent, st.just(OMIT)), (present, strategy))


refs = weighted((6, st.sampled_from(ID_POOL) | short_text), (3, st.integers(-3, 3) | st.integers()),
               (2, st.sampled_from([2**63 - 1, -2**63, 2**63, -2**63 - 1, 10**30, "", Raw("-0"), Raw("1.0"),
                                    Raw("1e2"), Raw("1" * 4500)] + ODD_NAMES)), (1, junk))
maybe_ids, maybe_types, maybe_bodies = maybe(ids), maybe(types), maybe(bodies)
maybe_refs = maybe(refs, 1, 3)
maybe_priorities, maybe_timeouts, maybe_reasons = (maybe(s, 1, 4) for s in (priorities, timeouts, reasons))


@st.composite
def submits(draw):
    return draw(arrange([("action", "submit"), ("id", draw(ids)), ("type", draw(types)),
                         ("body", draw(bodies)), ("priority", draw(priorities)),
                         ("timeout", draw(timeouts)), ("ref", draw(maybe_refs))]))


@st.composite
def any_requests(draw):
    return draw(arrange([("action", draw(actions)), ("id", draw(maybe_ids)), ("type", draw(maybe_types)),
                         ("body", draw(maybe_bodies)), ("priority", draw(maybe_priorities)),
                         ("timeout", draw(maybe_timeouts)), ("reason", draw(maybe_reasons)),
                         ("ref", draw(maybe_refs))]))


@st.composite
def mutated(draw):
    """A request with bytes truncated, flipped, dropped, inserted or repeated."""
    data = bytearray(draw(any_requests()))
    for _ in range(draw(st.integers(1, 3))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        operation = draw(st.sampled_from(["truncate", "flip", "drop", "insert", "repeat"]))
        if operation == "truncate":
            del data[at:]
        elif operation == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif operation == "drop":
            del data[at]
        elif operation == "insert":
            data.insert(at, draw(st.sampled_from(b'"\\{}[],:0 \x00\xff\xc3')))
        else:
            data[at:at] = data[at : at + draw(st.integers(1, 8))]
    return bytes(data)


# --- the state machine ------------------------------------------------------------


def has(role):
    return lambda self: bool(self.h.live(role))


def has_refusable(self):
    return any(not p.refusing for p in self.h.live())


class GloomMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.h = None

    @initialize(stop=st.booleans(), seed=st.integers(0, 2**16),
                default_timeout=st.sampled_from([None, None, None, 2.5]),
                slave_types=st.lists(st.sampled_from(["t", "t", "u", OMIT]), min_size=1, max_size=3))
    def start(self, stop, seed, default_timeout, slave_types):
        # gc.collect() per example would cost more than the example: the
        # test collects once after the run instead
        self.h = Harness(default_timeout=default_timeout, stop_at_end=stop, seed=seed, collect=False)
        self.h.add("master")
        for job_type in slave_types:
            self.connect_slave(job_type)

    def teardown(self):
        if self.h is None:
            return
        try:
            if not self.h.broken:
                self.h.finish()
        finally:
            self.h.close()

    @invariant()
    def consistent(self):
        if self.h is not None:
            self.h.call("clock.advance(0)", self.h.clock.advance, 0)  # each step is a reactor turn
            self.h.settle()
            self.h.check_state()

    def pick(self, data, role=None, label="peer"):
        return data.draw(st.sampled_from(self.h.live(role)), label=label)

    # --- connections -----------------------------------------------------------

    @precondition(lambda self: len(self.h.live("master")) < 5)
    @rule()
    def connect_master(self):
        self.h.add("master")

    @precondition(lambda self: len(self.h.live("slave")) < 6)
    @rule(job_type=types)
    def connect_slave(self, job_type):
        peer = self.h.add("slave")
        if job_type is not OMIT:
            self.h.send(peer, [message(action="join", type=job_type)])

    @precondition(has(None))
    @rule(data=st.data())
    def disconnect(self, data):
        holding = [p for p in self.h.live("slave") if p.held is not None]
        if holding and data.draw(st.booleans(), label="a slave holding a job"):
            self.h.lose(data.draw(st.sampled_from(holding), label="slave"))
        else:
            self.h.lose(self.pick(data))

    @precondition(lambda self: any(not (p.paused or p.refusing) for p in self.h.live()))
    @rule(data=st.data())
    def pause(self, data):
        peer = data.draw(st.sampled_from([p for p in self.h.live() if not (p.paused or p.refusing)]))
        peer.paused = True
        self.h.transcript.append(f"{peer} stops reading (pauseProducing)")
        self.h.call(f"{peer}.pauseProducing", peer.protocol.pauseProducing)

    @precondition(lambda self: any(p.paused for p in self.h.live()))
    @rule(data=st.data())
    def resume(self, data):
        peer = data.draw(st.sampled_from([p for p in self.h.live() if p.paused]))
        peer.paused = False
        self.h.transcript.append(f"{peer} reads again (resumeProducing)")
        self.h.call(f"{peer}.resumeProducing", peer.protocol.resumeProducing)

    @rule(seconds=st.sampled_from([0, 0.25, 0.5, 1, 1.5, 2.5, 3.5, 10, 20, 3e6]))
    def advance(self, seconds):
        self.h.transcript.append(f"the clock advances {seconds} s")
        self.h.call(f"clock.advance({seconds})", self.h.clock.advance, seconds)

    # --- masters ---------------------------------------------------------------

    @precondition(has("master"))
    @rule(data=st.data())
    def submit(self, data):
        peer = self.pick(data, "master")
        self.h.send(peer, data.draw(st.lists(submits(), min_size=1, max_size=3), label="submits"))

    @precondition(has("master"))
    @rule(data=st.data(), job_id=st.sampled_from(ID_POOL), job_type=st.sampled_from(TYPE_POOL),
          body=json_values, priority=st.integers(-2, 2),
          timeout=st.sampled_from([OMIT, OMIT, OMIT, 0.5, 1, 3, Raw("1" + "0" * 400), MAX_TIMEOUT + 1]))
    def submit_plain(self, data, job_id, job_type, body, priority, timeout):
        peer = self.pick(data, "master")
        self.h.send(peer, [request(("action", "submit"), ("id", job_id), ("type", job_type), ("body", body),
                                   ("priority", priority), ("timeout", timeout))])

    @precondition(has("master"))
    @rule(data=st.data())
    def cancel(self, data):
        peer = self.pick(data, "master")
        known = sorted(peer.unfinished) + [i for p in self.h.peers for i in p.job_ids[-3:]]
        job_id = data.draw(st.sampled_from(known) if known and data.draw(st.booleans()) else ids, label="id")
        self.h.send(peer, [request(("action", "cancel"), ("id", job_id))])

    @precondition(has("master"))
    @rule(data=st.data())
    def stats(self, data):
        self.h.send(self.pick(data, "master"), [message(action="stats")])
        self.h.render_pages()

    # --- slaves ----------------------------------------------------------------

    @precondition(has("slave"))
    @rule(data=st.data(), job_type=types)
    def join(self, data, job_type):
        self.h.send(self.pick(data, "slave"), [request(("action", "join"), ("type", job_type))])

    def answer_id(self, data, peer):
        choice = data.draw(st.sampled_from(["none", "none", "none", "held", "held", "stale", "other"]),
                           label="id is")
        if choice == "held" and peer.held is not None:
            return peer.held
        if choice == "stale" and peer.job_ids:
            return data.draw(st.sampled_from(peer.job_ids), label="stale id")
        if choice == "other":
            return data.draw(ids, label="id")
        return OMIT

    def pick_slave(self, data):
        holding = [p for p in self.h.live("slave") if p.held is not None]
        if holding and data.draw(st.integers(0, 3), label="one holding a job (not 0)"):
            return data.draw(st.sampled_from(holding), label="slave")
        return self.pick(data, "slave", "slave")

    def work(self, data):
        """Keep jobs flowing: a slave holding a job answers, fails or
        releases it (naming it or not); else a master submits a job some
        slave serves."""
        holding = [p for p in self.h.live("slave") if p.held is not None and not p.loose]
        if holding:
            slave = data.draw(st.sampled_from(holding), label="slave")
            if not data.draw(st.integers(0, 5), label="releases it (0)"):
                frames = [message(action="release", id=slave.held)]
                if data.draw(st.booleans(), label="leaves first"):
                    frames.insert(0, message(action="leave"))
                self.h.send(slave, frames)
                return
            named = data.draw(st.booleans(), label="names the job")
            answer = (("body", data.draw(json_values, label="body")) if data.draw(st.integers(0, 3))
                      else ("reason", data.draw(short_text, label="reason")))
            self.h.send(slave, [request(("action", "respond" if answer[0] == "body" else "fail"),
                                        ("id", slave.held if named else OMIT), answer)])
            return
        job_types = sorted({p.joined for p in self.h.live("slave") if name_valid(p.joined)}) or TYPE_POOL
        master = self.pick(data, "master", "master")
        count = data.draw(st.integers(1, 3), label="jobs")
        self.h.send(master, [request(("action", "submit"), ("id", data.draw(st.sampled_from(ID_POOL), label="id")),
                                     ("type", data.draw(st.sampled_from(job_types), label="type")),
                                     ("body", data.draw(json_values, label="body")),
                                     ("timeout", data.draw(st.sampled_from([OMIT, OMIT, 0.5, 1, 2]),
                                                           label="timeout")),
                                     ("ref", data.draw(maybe_refs, label="ref")))
                             for _ in range(count)])

    # work is the likeliest rule: it is three
    flow_1 = precondition(has("master"))(rule(data=st.data())(work))
    flow_2 = precondition(has("master"))(rule(data=st.data())(lambda self, data: self.work(data)))
    flow_3 = precondition(has("master"))(rule(data=st.data())(lambda self, data: self.work(data)))

    @precondition(has("slave"))
    @rule(data=st.data(), body=bodies)
    def respond(self, data, body):
        peer = self.pick_slave(data)
        self.h.send(peer, [request(("action", "respond"), ("id", self.answer_id(data, peer)), ("body", body),
                                   style=data.draw(styles))])

    @precondition(has("slave"))
    @rule(data=st.data(), reason=reasons)
    def fail(self, data, reason):
        peer = self.pick_slave(data)
        self.h.send(peer, [request(("action", "fail"), ("id", self.answer_id(data, peer)), ("reason", reason),
                                   style=data.draw(styles))])

    @precondition(lambda self: self.h.live("master") and any(p.held is not None and not p.loose
                                                               for p in self.h.live("slave")))
    @rule(data=st.data(), second=st.sampled_from(["respond", "fail"]), named=st.booleans())
    def answer_twice(self, data, second, named):
        """A slave answers its job twice in one write, with the next job of
        its type already queued: the second answer must not answer that one
        unless it names it."""
        slave = data.draw(st.sampled_from([p for p in self.h.live("slave") if p.held is not None
                                           and not p.loose]), label="slave")
        held, job_type = slave.held, slave.joined or slave.held_type
        master = self.pick(data, "master", "master")
        self.h.send(master, [message(action="submit", id=f"next-{next(self.h.numbers)}", type=job_type,
                                     body="next")])
        self.h.settle()
        again = (message(action="respond", id=held, body="again") if second == "respond"
                 else message(action="fail", id=held, reason="again"))
        if not named:
            again = message(action=second, body="again", reason="again")
        self.h.send(slave, [message(action="respond", body="first"), again])

    @precondition(has("slave"))
    @rule(data=st.data(), ref=maybe_refs)
    def leave(self, data, ref):
        self.h.send(self.pick(data, "slave"), [request(("action", "leave"), ("ref", ref))])

    @precondition(has("slave"))
    @rule(data=st.data(), leave_first=st.booleans(), ref=maybe_refs)
    def release(self, data, leave_first, ref):
        """A slave hands a job back (its own, another, or none), having
        left or not; then perhaps joins again."""
        peer = self.pick_slave(data)
        frames = [request(("action", "release"), ("id", self.answer_id(data, peer)), ("ref", ref))]
        if leave_first:
            frames.insert(0, message(action="leave"))
        if data.draw(st.booleans(), label="joins again") and name_valid(peer.joined):
            frames.append(message(action="join", type=peer.joined))
        self.h.send(peer, frames)

    # --- anything, anywhere --------------------------------------------------------

    @precondition(has(None))
    @rule(data=st.data())
    def any_request(self, data):
        self.h.send(self.pick(data), data.draw(st.lists(any_requests(), min_size=1, max_size=3), label="frames"))

    @precondition(has(None))
    @rule(data=st.data(), value=json_values | st.sampled_from(DEEP), style=styles)
    def any_json(self, data, value, style):
        self.h.send(self.pick(data), [dumps(value, style)])

    @precondition(has(None))
    @rule(data=st.data(), payload=st.binary(max_size=48))
    def random_frame(self, data, payload):
        self.h.send(self.pick(data), [payload])

    @precondition(has(None))
    @rule(data=st.data())
    def mutated_frame(self, data):
        self.h.send(self.pick(data), [data.draw(mutated(), label="mutated")])

    @precondition(has(None))
    @rule(data=st.data())
    def split_frames(self, data):
        """Frames cut into several reads; maybe the last left unfinished."""
        peer = self.pick(data)
        payloads = data.draw(st.lists(any_requests() | submits(), min_size=1, max_size=3), label="frames")
        size = len(peer.tail) + sum(len(p) + 4 for p in payloads)
        cuts = data.draw(st.lists(st.integers(1, max(1, size - 1)), max_size=4), label="cuts")
        hold = data.draw(st.sampled_from([0, 0, 1, 3, 4, 5, 10 ** 6]), label="hold back")
        self.h.send(peer, payloads, cuts, hold)

    @precondition(has(None))
    @rule(data=st.data(), count=st.sampled_from([20, 100, 250]))
    def burst(self, data, count):
        """Many frames in one read (250 stats replies are more than the
        64 KiB of replies a read may collect before they are written)."""
        peer = self.pick(data)
        payloads = data.draw(st.lists(any_requests() | submits() | st.just(message(action="stats")),
                                      min_size=1, max_size=3), label="frames")
        self.h.send(peer, [payloads[i % len(payloads)] for i in range(count)])

    @precondition(has(None))
    @rule(data=st.data(), raw=st.binary(min_size=1, max_size=40))
    def raw_bytes(self, data, raw):
        self.h.send_raw(self.pick(data), raw)

    @precondition(has_refusable)
    @rule(data=st.data(), length=st.integers(MAX_FRAME + 1, 2**32 - 1), extra=st.binary(max_size=8))
    def oversized(self, data, length, extra):
        peer = data.draw(st.sampled_from([p for p in self.h.live() if not p.refusing]))
        self.h.send_oversized(peer, length, extra)


class FuzzTests(SynchronousTestCase):
    def test_fuzz_both_ports(self):
        errors = []

        def observe(event):
            if "log_failure" in event or event.get("log_level") in (LogLevel.error, LogLevel.critical):
                errors.append(formatEvent(event) + "\n" + (
                    event["log_failure"].getTraceback() if "log_failure" in event else ""))

        run_state_machine_as_test(GloomMachine, settings=FUZZ_SETTINGS)
        globalLogPublisher.addObserver(observe)
        try:
            gc.collect()  # an unhandled error in a Deferred is logged when it is collected
        finally:
            globalLogPublisher.removeObserver(observe)
        self.assertEqual(errors, [])


# --- the defects the fuzzer found, replayed through the same checks ----------


class HarnessTestCase(SynchronousTestCase):
    """Scripted frames, judged by the fuzzer's model and checks."""

    def setUp(self):
        self.h = Harness()
        self.addCleanup(self.h.close)
        self.master = self.h.add("master")

    def slave(self, job_type="t"):
        slave = self.h.add("slave")
        self.h.send(slave, [message(action="join", type=job_type)])
        self.h.settle()
        return slave

    def submit(self, job_id="1", job_type="t", master=None, body=None, **fields):
        self.h.send(master or self.master,
                    [message(action="submit", id=job_id, type=job_type, body=body, **fields)])
        self.h.settle()


class ScenarioTests(HarnessTestCase):
    """What the per-master ids and the named answers must get right."""

    def test_two_masters_one_id(self):
        other = self.h.add("master")
        first, second = self.slave(), self.slave()
        self.submit("1", body="mine")
        self.submit("1", master=other, body="theirs")
        self.h.send(second, [message(action="respond", id="1", body="for theirs")])
        self.h.send(first, [message(action="respond", id="1", body="for mine")])
        self.h.settle()
        self.assertEqual([m for m in other.inbox if "body" in m], [{"id": "1", "body": "for theirs"}])
        self.h.finish()

    def test_cancelled_running_job_and_its_successor(self):
        slave = self.slave()
        self.submit("1", body="old")
        self.h.send(self.master, [message(action="cancel", id="1")])
        self.submit("1", body="new")
        self.h.send(slave, [message(action="respond", body="answer to old")])
        self.h.settle()
        self.h.send(slave, [message(action="respond", id="1", body="answer to new")])
        self.h.settle()
        self.assertEqual([m for m in self.master.inbox if "body" in m], [{"id": "1", "body": "answer to new"}])
        self.h.finish()

    def test_stale_answer_after_a_timeout(self):
        slow, fast = self.slave(), self.slave()
        self.submit("1", timeout=1)
        self.h.call("clock.advance(1)", self.h.clock.advance, 1)
        self.h.settle()
        self.submit("2")
        self.h.send(slow, [message(action="respond", id="1", body="late"),
                           message(action="respond", id="1", body="later")])
        self.h.send(fast, [message(action="respond", id="1", body="on time")])
        self.h.settle()
        self.h.finish()


    def test_refs_leave_and_release(self):
        """Refs echoed (and refused) on both ports; a slave that left gets no
        job until it joins again; a released job goes to another slave."""
        first, second = self.slave(), self.slave()
        self.submit("1", ref="s1")
        self.submit("2", ref=2**63 - 1)
        self.h.send(self.master, [message(action="stats", ref=""), message(action="cancel", id="9", ref=-1),
                                  message(action="submit", id="3", type="t", body=None, ref=2**63)])
        self.h.send(first, [message(action="leave", ref="l"), message(action="release", id=first.held, ref=1)])
        self.h.settle()
        self.assertIsNone(first.held)
        self.h.send(second, [message(action="respond", body="done", ref=[1])])
        self.h.send(second, [message(action="respond", body="done", ref="r")])
        self.h.settle()
        self.h.send(second, [message(action="leave"), message(action="respond", body="done too")])
        self.submit("4")
        self.h.send(first, [message(action="join", type="t")])
        self.h.settle()
        self.assertIsNotNone(first.held)
        self.h.finish()


class KnownDefectTests(HarnessTestCase):
    def test_huge_timeout_with_an_idle_slave(self):
        """callLater(10**400) raises OverflowError inside submit, after the job
        was counted and the idle slave taken."""
        self.slave()
        self.submit(timeout=Raw("1" + "0" * 400))
        self.h.finish()

    def test_huge_timeout_queued_until_a_slave_joins(self):
        self.submit(timeout=Raw("1" + "0" * 400))
        self.slave()
        self.h.finish()

    def test_timeout_over_30_days(self):
        self.submit(timeout=MAX_TIMEOUT + 60)
        self.h.finish()

    def test_respond_twice_answers_the_next_job(self):
        slave = self.slave()
        self.submit("a")
        self.submit("b")
        self.h.send(slave, [message(action="respond", body="A"), message(action="respond", id="a", body="A2")])
        self.h.settle()
        self.h.finish()

    def test_respond_naming_another_job(self):
        slave = self.slave()
        self.submit("a")
        self.h.send(slave, [message(action="respond", id="zzz", body="not for a")])
        self.h.settle()
        self.h.finish()

    def test_lone_surrogate_type(self):
        self.submit(job_type="\ud800")
        self.h.send(self.h.add("slave"), [message(action="join", type="\udfff")])
        self.h.finish()

    def test_lone_surrogate_id(self):
        self.submit(job_id="a\udc80")
        self.h.finish()

    def test_json_the_native_decoders_refuse(self):
        """On PyPy the pure-Python json scanner (which the standard library
        falls back to when given hooks) takes "\\u 123", "\\u+abc" and
        non-ASCII digits; CPython refuses them, and so must the daemon."""
        slave = self.h.add("slave")
        for payload in (rb'{"action":"\u 123"}', rb'{"action":"stats","id":"\u+abc"}',
                        rb'{"action":"join","type":"\u1_23"}', '{"action":"stats","n":1\u0661}'.encode()):
            self.h.send(self.master, [payload])
            self.h.send(slave, [payload])
            self.h.settle()
        self.h.finish()

    def test_shutdown_jobs_counted_in_the_totals(self):
        """A job ended by stopping the daemon must count (as failed or
        cancelled) for submitted = completed + failed + cancelled + live."""
        self.submit("1")
        self.h.stop_at_end = True
        self.h.finish()

    def test_timed_out_quotes_a_long_id_whole(self):
        """The timed_out reason repeats the job's id in full (up to 1,024
        bytes); an error frame is to quote at most 200 characters."""
        slave = self.slave()
        self.submit("x" * 1024, timeout=1)
        self.h.call("clock.advance(1)", self.h.clock.advance, 1)
        self.h.send(slave, [message(action="respond", body="late")])
        self.h.settle()
        self.h.finish()

    def test_ids_and_types_over_1024_bytes(self):
        for job_id, job_type in (("x" * 1025, "t"), ("\xe9" * 513, "t"), ("1", "t" * 1025),
                                 ("y" * 30000, "t")):
            self.submit(job_id, job_type)
        self.h.finish()
