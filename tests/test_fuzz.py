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
  delayed + running; see `Harness.check_figures` for how detached jobs count)
  and the per-type figures match the slaves' states;
- detached and delayed jobs (README, "Detached and delayed jobs"): submits
  carry detach, delay, at, retries and backoff, valid or not; masters send
  status, dead_list, dead_retry and dead_discard, and cancel one another's
  detached jobs.  The model follows every detached job through its life
  (queued, delayed, running, completed, failed, dead, forgotten), the clock
  stopping at each timer on its way, so that it knows what each timer did:
  a detached job is acked and never answered to anyone, outlives its master,
  is retried after its backoff when its slave fails, disconnects or times
  out, and is dead once its retries are used up; a delayed job is not
  handed out before its time; status (the master's own attached job first,
  then the detached one, never another master's), dead_list, id_exists,
  queue_full (--max-detached), the kept ends and the dead list with their
  bounds, and the detached figures of stats are judged exactly.  Where the
  model cannot follow (a peer whose framing was lost, a job frame that can
  be more than one job), it says so in the frames and judges their shape;
- progress and touch (README, "Progress"): slaves report on the job they
  hold, named or not, well-formed or not, and are told ok, not_processing,
  wrong_job, invalid_message, timed_out (an attempt given up: the model
  knows a detached job's, and moves its deadline on each touch and
  progress) or cancelled (nobody waits for the job).  Each progress a
  master hears is for one of its unfinished jobs, before its answer, and
  is one a slave sent on that job; one a slave was told ok for reaches the
  job's master at once if it reads (else the daemon keeps the latest for
  it: see ``ProgressScenarioTests``); status shows a detached job's last
  progress; the totals count them;
- the administrative actions (pause, resume, clear, drain) are refused
  with forbidden (the daemon runs without --admin), and nothing is paused,
  cleared or drained;
- after each example, a fresh master and slave still get a job through,
  attached and detached; then the daemon is stopped (and no timer may be
  left), or every peer disconnects: only detached jobs and their timers may
  be left, a new master cancels or discards them all, and once their ends
  expired the scheduler must hold no job, no idle slave and no timer.

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
from collections import Counter, OrderedDict, defaultdict, deque

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
from gloom.detached import MAX_REASON as MAX_DEAD_REASON  # a dead job's reason is cut to this
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

# The administrative actions (README, "Administration") are refused with
# forbidden: the fuzzed daemon runs without --admin.
ADMIN_ACTIONS = ("pause", "resume", "clear", "drain")
MASTER_ACTIONS = ("submit", "cancel", "stats", "status", "dead_list", "dead_retry",
                  "dead_discard") + ADMIN_ACTIONS
SLAVE_ACTIONS = ("join", "respond", "fail", "leave", "release", "progress", "touch")
PROGRESS_FIELDS = ("done", "total", "data")  # a progress carries one or more of these
WITHDRAWN = wire.CANCELLED  # progress or touch on a job nobody waits for any more
FORBIDDEN = wire.FORBIDDEN

# Detached and delayed jobs (README, "Detached and delayed jobs"; "Protocol
# reference > Master port").  The bounds are set low so that the fuzzer
# reaches them: the live detached jobs (--max-detached), the kept ends
# (--keep-results-max) and the dead list (--dead-max; some examples run
# without one).
MAX_DELAY = 365 * 24 * 3600  # a "delay" over this, or an "at" further ahead, is refused
MAX_RETRIES = 1000  # "retries": 0 to this
MAX_PAGE = 1000  # dead_list "limit": 1 to this
MAX_OFFSET = 2**31  # dead_list "offset": 0 to this (gloom.master)
MAX_DETACHED = 6
KEEP_RESULTS = 600  # seconds the end of a detached job is kept (the default)
KEEP_RESULTS_MAX = 4
DEAD_MAX = 3
BACKOFF, BACKOFF_MAX = 1.0, 300.0  # --retry-backoff, --retry-backoff-max (the defaults)
CANCELLED = "cancelled by a master"
LIVE = ("queued", "delayed", "running")
STATES = LIVE + ("completed", "failed", "dead", "unknown")
# Tracking detached jobs exactly stops (see Harness.unsure) for frames that
# may touch them sent where the model cannot follow what the daemon reads.
DETACHED_MARKERS = (b"detach", b"cancel", b"dead_retry", b"dead_discard")

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


# What the examples reached (GLOOM_FUZZ_COVERAGE=1 prints it after the run).
COVERAGE = Counter()


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


def count_valid(value) -> bool:
    """A progress's ``done`` or ``total``: a JSON number from 0 (finite: an
    infinite one is read as Raw), not a boolean."""
    return type(value) in (int, float) and value >= 0


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


def millisecond_up(when: float) -> float:
    """A delayed job's time, as the daemon keeps it: rounded up to the
    millisecond (README, "Performance": a delayed job's run time)."""
    return math.ceil(when * 1000) / 1000


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
    """One acknowledged submit, as the model follows it.

    An attached job is followed from its master's frames (``state``).  A
    detached job is followed through its whole life (``phase``: queued,
    delayed, running, completed, failed, dead, or gone once its end is no
    longer kept), from the acks, the slaves' frames and the clock."""

    __slots__ = ("master", "id", "type", "body", "state", "ended_step", "detached", "priority",
                 "timeout", "limit", "backoff", "run_at", "handed", "phase", "attempts", "retried",
                 "attempt", "ended_at", "end_attempts", "result", "reason", "in_scheduler",
                 "cancel_step", "cancel_index", "taken_step", "reports", "progress")

    def __init__(self, master, job_id, job_type, body, detached=False, priority=0, timeout=None,
                 limit=None, backoff=False, run_at=None):
        self.master, self.id, self.type, self.body = master, job_id, job_type, body
        self.state = "live"  # "cancelled" (withdrawn, may still run), "ended" (its end was sent)
        self.ended_step = None
        self.detached = detached
        self.priority = priority
        self.timeout = timeout  # the attempt's timeout: its own, else the daemon's --job-timeout
        self.limit = RETRIES if limit is None else limit  # its retries
        self.backoff = backoff
        self.run_at = run_at  # delayed until then (the clock's time), or None
        self.handed = 0  # job frames slaves got that can only be this job
        # detached jobs only:
        self.phase = "queued"
        self.attempts = 0  # attempts started (less those handed back unrun)
        self.retried = 0  # lost attempts queued again
        self.attempt = None  # the current Attempt, while running
        self.ended_at = self.end_attempts = self.result = self.reason = None
        self.in_scheduler = True  # queued, delayed or running (cancelled or not)
        self.cancel_step = None  # the step it was cancelled in, if it may have run just before
        self.cancel_index = None  # then: where its cancel is in the step's status history
        self.taken_step = None
        self.reports = []  # the progress reports slaves sent on it (and the daemon took)
        self.progress = None  # the latest of them: status shows it

    def __repr__(self):
        if self.detached:
            return f"<detached job {self.id!r} of {self.master} ({self.phase})>"
        return f"<job {self.id!r} of {self.master} ({self.state})>"


class Attempt:
    """A detached job handed to a slave: current until the slave answers,
    fails, releases it or goes away, or it runs past its deadline."""

    __slots__ = ("job", "slave", "deadline", "current")

    def __init__(self, job, slave, deadline):
        self.job, self.slave, self.deadline, self.current = job, slave, deadline, True

    def __repr__(self):
        return f"<attempt of {self.job!r} on {self.slave}{'' if self.current else ' (given up)'}>"


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
        self.held_attempt = None  # slave: the Attempt it holds, if a detached job
        self.left = False  # slave: it sent leave, and has not joined since
        self.job_ids = []  # slave: ids of every job it got
        harness.call(f"{self.name}.makeConnection", self.protocol.makeConnection, self.transport)

    def __repr__(self):
        return self.name


class Harness:
    def __init__(self, default_timeout=None, stop_at_end=False, seed=0, collect=True,
                 dead_max=DEAD_MAX):
        # retries back off by exactly half their full wait (Daemon's jitter)
        self.daemon = Daemon(max_retries=RETRIES, max_frame=MAX_FRAME, max_queued=MAX_QUEUED,
                             default_timeout=default_timeout, max_detached=MAX_DETACHED,
                             keep_results=KEEP_RESULTS, keep_results_max=KEEP_RESULTS_MAX,
                             dead_max=dead_max)
        self.default_timeout = default_timeout
        self.dead_max = dead_max
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
        # progress (README, "Progress"): the reports slaves sent on jobs the
        # model knows, that the daemon took, this step, as (Job, report,
        # whether its master must hear it now); the progress frames masters
        # heard this step, as (master, Job, report); reports on jobs the model
        # could not tell apart, by id; the ids of jobs held by slaves whose
        # frames cannot be followed
        self.reported = []
        self.heard = []
        self.reports_by_id = defaultdict(list)
        self.loose_job_ids = set()
        self.loose_slave_ever = False
        self.problems = []
        self.transcript = []
        self.stopping = False
        self.broken = False
        self.step = 0  # settle() calls: jobs that ended in this one may still be handed out in it
        self.acting = []  # the peers sent to since their frames were last read, in order
        # detached jobs, followed exactly while `sure`
        self.sure = True
        self.detached = {}  # id -> the latest detached Job with that id (any phase)
        self.in_scheduler = []  # detached Jobs the scheduler holds (cancelled running ones too)
        self.dead = OrderedDict()  # id -> dead Job, oldest first
        self.kept = OrderedDict()  # id -> completed or failed Job whose end is kept, oldest first
        self.figures = Counter()  # totals: detached (taken), dead, dead_dropped, results_dropped
        self.history = {}  # id -> what status may say of it, in order, since the last settle
        self.statuses = []  # status replies to judge at the end of the settle
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
        attempt, peer.held_attempt = peer.held_attempt, None
        if attempt is not None and attempt.current and self.following():
            self.attempt_lost(attempt, "slave disconnected during the job")

    def unsure(self, why):
        """Stop following detached jobs exactly: from here on they are
        judged by the shape of what the daemon says of them only."""
        if self.sure:
            self.sure = False
            COVERAGE[f"unsure: {why}"] += 1
            self.transcript.append(f"(the model no longer follows detached jobs exactly: {why})")

    def following(self) -> bool:
        return self.sure and not self.stopping

    def now(self) -> float:
        return self.clock.seconds()

    def advance(self, seconds):
        """Move the clock on by ``seconds``, stopping at each timer whose
        time the model must know (a delayed job waking, an attempt timing
        out, kept ends expiring): the model then follows what it did before
        the next one runs.  Other timers run as `Clock.advance` runs them,
        at the time the clock stops at (a periodic one does not run again
        for each of its periods on the way)."""
        clock = self.clock
        target = clock.seconds() + seconds
        if seconds:
            self.transcript.append(f"the clock advances {seconds} s")
        timed = (self.scheduler._wake, self.scheduler._timed_out, self.daemon.detached._expire)
        for _ in range(100000):
            due = min((c.getTime() for c in clock.getDelayedCalls() if c.func in timed), default=None)
            if due is None or due > target:
                break
            clock.rightNow = max(clock.rightNow, due)
            self.turn()
        else:
            self.fail(f"timers keep coming due at {clock.seconds()}: {clock.getDelayedCalls()!r}")
        clock.rightNow = target
        self.turn()

    def turn(self):
        self.call(f"clock.advance(0) at {self.clock.seconds()}", self.clock.advance, 0)
        self.tick()
        self.settle()
        self.tick()  # attempts handed out as the clock moved, with a deadline already past

    def feed(self, peer, data: bytes, cuts=()):
        self.acted(peer)
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
            if peer.loose and not peer.refusing and peer.role == "master" \
                    and any(m in p for m in DETACHED_MARKERS):
                self.unsure(f"{peer}, whose frames cannot be followed, was sent {short(p, 60)}")
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
            if any(m in r.payload for r in peer.pending for m in DETACHED_MARKERS) \
                    or any(m in peer.tail + data for m in DETACHED_MARKERS):
                self.unsure(f"{peer} had detached work in flight when its framing was lost")
        else:
            self.loose_slave_ever = True
            if peer.held is not None:
                self.loose_job_ids.add(peer.held)
            if peer.held_attempt is not None:
                self.unsure(f"{peer} holds a detached job and its framing was lost")
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
            candidates = self.candidates(msg)
            if not candidates and not self.loose_master_ever:
                self.fail(f"{peer}: a job no master submitted (or one already ended): {short(msg, 600)}"
                          f"\n  submitted with that id and type: {self.jobs.get((msg['id'], msg['type']))!r}")
            if candidates and peer.held == msg["id"] and peer.held_job is None:
                peer.held_job = candidates[0] if len(candidates) == 1 else None
                self.hand_out(peer, candidates)
        self.match_answers()
        self.match_progress()
        self.judge_statuses()
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

    def acted(self, peer):
        if peer not in self.acting:
            self.acting.append(peer)

    def drain_all(self):
        # The peers sent to first, in that order, as what they sent came
        # first (a slave's release before the job going to another slave);
        # then masters: a job a slave gets is then known.
        acting, self.acting = self.acting, []
        rest = sorted((p for p in self.peers if p not in acting), key=lambda p: p.role != "master")
        for peer in acting + rest:
            self.drain(peer)

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
        elif set(msg) == {"id", "progress"}:
            self.progress_heard(peer, msg)
        else:
            self.fail(f"{peer}: a frame that is no reply, answer, progress or error: {msg!r}")

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
        # the fields beyond 2009: "detach" and "backoff" are booleans,
        # "retries" an integer from 0 to 1,000, "delay" (0 to a year) or
        # "at" (a Unix time at most a year ahead; a past one means now)
        detach, backoff, retries = v.get("detach", OMIT), v.get("backoff", OMIT), v.get("retries", OMIT)
        for flag in (detach, backoff):
            if flag is not OMIT and type(flag) is not bool:
                bad = True
        if retries is not OMIT and (type(retries) is not int or not 0 <= retries <= MAX_RETRIES):
            bad = True
        now, run_at = self.now(), None
        delay, at = v.get("delay", OMIT), v.get("at", OMIT)
        if delay is not OMIT and at is not OMIT:
            bad = True
        elif delay is not OMIT:
            if type(delay) not in (int, float) or not 0 <= delay <= MAX_DELAY:
                bad = True
            elif delay:
                run_at = now + delay
        elif at is not OMIT:
            if type(at) not in (int, float) or at < 0 or at > now + MAX_DELAY:
                bad = True  # non-finite times are read as Raw
            elif at > now:
                run_at = at
        if run_at is not None and not run_at > now:
            run_at = None  # too small a delay to make a later time: it runs now
        if run_at is not None:
            run_at = millisecond_up(run_at)
        detached = detach is True
        if bad:
            allowed = {INVALID_MESSAGE}
        elif detached:
            # one namespace and one limit for the whole daemon; the master's
            # own ids and limit do not apply
            allowed = {INVALID_MESSAGE} if maybe else set()
            if not self.following():
                allowed |= {OK, ID_EXISTS, QUEUE_FULL}
            elif self.live_detached() >= MAX_DETACHED:
                allowed.add(QUEUE_FULL)
            elif self.taken(job_id):
                allowed.add(ID_EXISTS)
            else:
                allowed.add(OK)
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
            job = Job(peer, job_id, v["type"], v["body"], detached, v.get("priority", 0),
                      self.default_timeout if timeout is OMIT else timeout,
                      None if retries is OMIT else retries, backoff is True, run_at)
            self.seen_ids.add(job_id)
            self.jobs[(job_id, v["type"])].append(job)
            if not detached:
                peer.unfinished[job_id] = job
            elif self.following():
                self.take(job)
            COVERAGE["ack: " + ("detached" if detached else "attached") +
                      (" delayed" if run_at is not None else "")] += 1
        else:
            if msg.get("id") != job_id:
                self.fail(f"{peer}: sent {short(req.payload)}\n  the refusal {msg!r} does not carry the id")
            if detached:
                COVERAGE[f"detached submit: {outcome}"] += 1

    def judge_cancel(self, peer, req, v, msg):
        job_id = v.get("id", OMIT)
        if type(job_id) is not str or not job_id:
            self.expect(peer, req, msg, {INVALID_MESSAGE})
            return
        own = job_id in peer.unfinished  # the master's own attached job first
        if own:
            allowed = {OK}
        elif self.following():
            allowed = {OK} if self.is_live(job_id) else {UNKNOWN_JOB}
        else:
            allowed = {OK, UNKNOWN_JOB}
        if not name_valid(job_id):
            allowed.add(INVALID_MESSAGE)
        outcome = self.expect(peer, req, msg, allowed)
        if outcome == OK:
            self.exact(peer, req, msg, {"ok": True, "id": job_id})
            if own:
                peer.unfinished.pop(job_id).state = "cancelled"
            elif self.following():
                self.cancel_detached(self.detached[job_id])
        elif outcome == UNKNOWN_JOB and msg.get("id") != job_id:
            self.fail(f"{peer}: sent {short(req.payload)}\n  unknown_job without the id: {msg!r}")

    def judge_status(self, peer, req, v, msg):
        """The master's own unfinished attached job, else the detached job
        with the id (never another master's attached job)."""
        job_id = v.get("id", OMIT)
        if not name_valid(job_id):
            self.expect(peer, req, msg, {INVALID_MESSAGE})
            return
        self.expect(peer, req, msg, {OK})
        self.check_status_shape(peer, req, msg, job_id)
        own = peer.unfinished.get(job_id)
        state = msg["state"]
        if own is not None:
            COVERAGE["status: own attached job"] += 1
            if state == "unknown" or msg["detached"] is not False or msg["type"] != own.type \
                    or msg["priority"] != own.priority:
                self.fail(f"{peer}: sent {short(req.payload)}\n  the reply is not about its own "
                          f"unfinished job {own!r} (type {own.type!r}, priority {own.priority!r}): {msg!r}")
            if own.run_at is not None and self.now() < own.run_at:  # it cannot have run yet
                self.exact(peer, req, msg, {"ok": True, "id": job_id, "state": "delayed", "detached": False,
                                            "type": own.type, "priority": own.priority, "attempts": 0,
                                            "run_at": own.run_at})
            elif state not in (LIVE if own.backoff else ("queued", "running")) \
                    or msg["attempts"] > own.limit + 1:
                self.fail(f"{peer}: sent {short(req.payload)}\n  impossible for its job {own!r} "
                          f"(retries {own.limit}, backoff {own.backoff}): {msg!r}")
            return
        COVERAGE[f"status: {state}"] += 1
        if job_id not in self.seen_ids and job_id not in self.detached and not self.loose_master_ever \
                and state != "unknown":
            self.fail(f"{peer}: sent {short(req.payload)}\n  an id no master used is {state}: {msg!r}")
        if self.following():
            self.statuses.append((peer, req, msg, job_id, len(self.history_of(job_id)) - 1))

    def check_status_shape(self, peer, req, msg, job_id):
        state = msg.get("state")
        wrong = None
        if msg.get("ok") is not True or msg.get("id") != job_id or state not in STATES:
            wrong = "no such state, or not the id asked about"
        elif state == "unknown":
            if set(msg) != {"ok", "id", "state"}:
                wrong = "an unknown job with fields"
        else:
            keys = {"ok", "id", "state", "detached", "type", "priority", "attempts"}
            keys |= {"delayed": {"run_at"}, "completed": {"result", "ended_at"},
                     "failed": {"reason", "ended_at"}, "dead": {"reason", "ended_at"}}.get(state, set())
            if "progress" in msg and state in LIVE + ("dead",):
                keys.add("progress")  # the last progress its slave sent
            number = (int, float)
            if set(msg) != keys:
                wrong = f"the fields should be {sorted(keys)}"
            elif type(msg["detached"]) is not bool or (msg["detached"] is False and state not in LIVE):
                wrong = "detached must be true or false, and an attached job is queued, delayed or running"
            elif type(msg["type"]) is not str or type(msg["priority"]) is not int \
                    or type(msg["attempts"]) is not int or msg["attempts"] < 0:
                wrong = "a field of the wrong type"
            elif state == "delayed" and not (type(msg["run_at"]) in number and msg["run_at"] > self.now()):
                wrong = "a delayed job runs later"
            elif "ended_at" in msg and not (type(msg["ended_at"]) in number and msg["ended_at"] <= self.now()):
                wrong = "it ended, so before now"
            elif "reason" in msg and type(msg["reason"]) is not str:
                wrong = "a reason is a string"
            elif "progress" in msg and not self.report_shaped(msg["progress"]):
                wrong = "a progress is an object of done, total and data"
        if wrong:
            self.fail(f"{peer}: sent {short(req.payload)}\n  a malformed status reply ({wrong}): "
                      f"{short(msg, 600)}")

    def judge_statuses(self):
        """Each status reply about a detached id (judged once every frame
        of the step is read: the job a slave got in it may have been handed
        out before the reply was written) says what the model says of the
        id at some moment since the request."""
        statuses, self.statuses = self.statuses, []
        if self.following():
            for peer, req, msg, job_id, index in statuses:
                got = {k: v for k, v in msg.items() if k not in ("ok", "id")}
                options = self.history[job_id][index:]
                if got not in options:
                    self.fail(f"{peer}: sent {short(req.payload)}\n  expected status "
                              f"{' or '.join(map(repr, options))}\n  got {short(msg, 600)}",
                              "status")
        self.history.clear()

    def judge_dead_list(self, peer, req, v, msg):
        offset, limit = v.get("offset", OMIT), v.get("limit", OMIT)
        if not ((offset is OMIT or type(offset) is int and 0 <= offset <= MAX_OFFSET)
                and (limit is OMIT or type(limit) is int and 1 <= limit <= MAX_PAGE)):
            self.expect(peer, req, msg, {INVALID_MESSAGE})
            return
        self.expect(peer, req, msg, {OK})
        offset = 0 if offset is OMIT else offset
        limit = 100 if limit is OMIT else limit
        total, dead = msg.get("total"), msg.get("dead")
        entry = {"id", "type", "priority", "attempts", "reason", "ended_at"}
        if set(msg) != {"ok", "total", "offset", "dead"} or type(total) is not int or total < 0 \
                or type(msg["offset"]) is not int or msg["offset"] != offset or type(dead) is not list \
                or len(dead) != max(0, min(limit, total - offset)) \
                or any(type(e) is not _Obj or set(e) != entry for e in dead):
            self.fail(f"{peer}: sent {short(req.payload)}\n  a malformed dead_list reply {short(msg, 600)}")
        COVERAGE[f"dead_list: {'some' if dead else 'none'}"] += 1
        if self.following():
            wanted = [self.dead_entry(job) for job in list(self.dead.values())[offset:offset + limit]]
            if total != len(self.dead) or dead != wanted:
                self.fail(f"{peer}: sent {short(req.payload)}\n  expected total {len(self.dead)}, "
                          f"dead {wanted!r}\n  got {short(msg, 600)}")

    def judge_dead_retry(self, peer, req, v, msg):
        self.judge_dead_action(peer, req, v, msg, retry=True)

    def judge_dead_discard(self, peer, req, v, msg):
        self.judge_dead_action(peer, req, v, msg, retry=False)

    def judge_dead_action(self, peer, req, v, msg, retry):
        job_id = v.get("id", OMIT)
        if not name_valid(job_id):
            self.expect(peer, req, msg, {INVALID_MESSAGE})
            return
        if self.following():
            allowed = {OK} if job_id in self.dead else {UNKNOWN_JOB}
            if retry and job_id in self.dead and self.live_detached() >= MAX_DETACHED:
                # the daemon holds at most --max-detached live detached jobs (README):
                # refused (queue_full, as a detached submit), or see check_detached
                allowed.add(QUEUE_FULL)
        else:
            allowed = {OK, UNKNOWN_JOB, QUEUE_FULL} if retry else {OK, UNKNOWN_JOB}
        outcome = self.expect(peer, req, msg, allowed)
        COVERAGE[f"dead_{'retry' if retry else 'discard'}: {outcome}"] += 1
        if outcome == OK:
            self.exact(peer, req, msg, {"ok": True, "id": job_id})
            if self.following():
                self.touch(job_id)
                old = self.dead.pop(job_id)
                old.phase = "gone"
                if retry:  # queued again with fresh retries, attempts counted from zero
                    self.take(Job(peer, job_id, old.type, old.body, True, old.priority, old.timeout,
                                  old.limit))
                self.record(job_id)
        elif msg.get("id") != job_id:
            self.fail(f"{peer}: sent {short(req.payload)}\n  unknown_job without the id: {msg!r}")

    def judge_stats(self, peer, req, v, msg):
        self.expect(peer, req, msg, {OK})
        stats = msg.get("stats")
        if set(msg) != {"ok", "stats"} or type(stats) is not _Obj:
            self.fail(f"{peer}: a malformed stats reply {msg!r}")
        self.check_figures(stats.get("types"), stats.get("totals"), f"{peer}'s stats reply", stats)

    def judge_admin(self, peer, req, v, msg):
        """pause, resume, clear and drain: the fuzzed daemon runs without
        --admin, so each is refused, whatever it carries (README,
        "Administration")."""
        self.expect(peer, req, msg, {FORBIDDEN})
        if set(msg) != {"error", "reason"} or "--admin" not in msg["reason"]:
            self.fail(f"{peer}: sent {short(req.payload)}\n  forbidden should say to start the "
                      f"daemon with --admin, and name no job: {msg!r}")

    judge_pause = judge_resume = judge_clear = judge_drain = judge_admin

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

    def judge_progress(self, peer, req, v, msg):
        self.judge_report(peer, req, v, msg, "progress")

    def judge_touch(self, peer, req, v, msg):
        self.judge_report(peer, req, v, msg, "touch")

    def judge_report(self, peer, req, v, msg, kind):
        """progress or touch (README, "Progress") on the held job, named or
        not: a progress carries done or total (numbers from 0) or data (any
        JSON), else invalid_message; refused not_processing without a job,
        wrong_job naming another, timed_out once the attempt was given up,
        cancelled once nobody waits for the job; ok restarts the attempt's
        timeout, and a progress reaches the job's master."""
        held = peer.held
        has_id, given = "id" in v, v.get("id")
        maybe = False
        fields_ok = True
        if kind == "progress":
            counts = [v[name] for name in ("done", "total") if name in v]
            fields_ok = any(name in v for name in PROGRESS_FIELDS) and \
                all(count_valid(c) or type(c) is Raw for c in counts)
            # a number of over 4,000 digits, a deeply nested data: not specified
            maybe = any(type(c) is Raw for c in counts) or ("data" in v and depth(v["data"]) > 100)
        if has_id and not name_valid(given):
            allowed = {INVALID_MESSAGE}
        elif held is None:
            allowed = {NOT_PROCESSING}
        elif has_id and given != held:
            allowed = {WRONG_JOB}  # the held job stays held
        elif not fields_ok:
            allowed = {INVALID_MESSAGE}
        else:
            allowed = self.still_held(peer)
            if maybe:
                allowed.add(INVALID_MESSAGE)
        outcome = self.expect(peer, req, msg, allowed)
        COVERAGE[f"{kind}: {outcome}"] += 1
        if outcome == OK:
            self.exact(peer, req, msg, {"ok": True})
            self.reported_on(peer, {name: v[name] for name in PROGRESS_FIELDS if name in v}
                             if kind == "progress" else None)
        elif outcome in (NOT_PROCESSING, WRONG_JOB) and has_id and msg.get("id") != given:
            self.fail(f"{peer}: sent {short(req.payload)}\n  {outcome} without the id: {msg!r}")
        elif outcome in (TIMED_OUT, WITHDRAWN) and msg.get("id") != held:
            self.fail(f"{peer}: sent {short(req.payload)}\n  {outcome} does not name the held "
                      f"job {held!r}: {msg!r}")

    def still_held(self, peer):
        """What a well-formed progress or touch on the held job gets: ok
        while its attempt stands and someone waits for the job; timed_out
        once the attempt was given up; cancelled once nobody waits for it
        (the model follows a detached job's attempts, not an attached one's)."""
        attempt = peer.held_attempt
        if attempt is not None and self.following():
            if not attempt.current:
                return {TIMED_OUT}
            return {WITHDRAWN} if attempt.job.state == "cancelled" else {OK}
        job = peer.held_job
        if job is None or job.detached or self.stopping or job.master.loose:
            return {OK, TIMED_OUT, WITHDRAWN}
        if job.state == "live" and not job.master.lost:
            return {OK, TIMED_OUT}
        return {TIMED_OUT, WITHDRAWN}  # its master withdrew it, went away, or heard its end

    def reported_on(self, peer, report):
        """The daemon took a progress (``report``) or a touch (None) on the
        slave's job: the attempt's timeout starts again; a progress is the
        job's latest (status shows it), and goes to its master."""
        job, attempt = peer.held_job, peer.held_attempt
        if attempt is not None and attempt.current and self.following():
            job = attempt.job
            if job.timeout is not None:
                attempt.deadline = self.now() + job.timeout
            if report is not None:
                self.touch(job.id)
                job.progress = report
                self.record(job.id)
        self.figures["touched" if report is None else "progress"] += 1
        if report is None:
            return
        if job is None:
            self.reports_by_id[peer.held].append(report)
            return
        job.reports.append(report)
        master = job.master
        must_hear = not (job.detached or job.state != "live" or self.stopping
                         or master.lost or master.loose or master.paused)
        self.reported.append((job, report, must_hear))

    def judge_release(self, peer, req, v, msg):
        given, held = v.get("id", OMIT), peer.held
        if not name_valid(given):
            allowed = {INVALID_MESSAGE}
        elif held is None:
            allowed = {NOT_PROCESSING}
        elif given != held:
            allowed = {WRONG_JOB}  # the held job stays held
        else:
            allowed = self.done(peer)
        outcome = self.expect(peer, req, msg, allowed)
        if outcome == OK:
            self.exact(peer, req, msg, {"ok": True})
        elif outcome in (TIMED_OUT, WRONG_JOB, NOT_PROCESSING) and msg.get("id") != given:
            self.fail(f"{peer}: sent {short(req.payload)}\n  {outcome} without the id: {msg!r}")
        if outcome in (OK, TIMED_OUT):
            peer.held = peer.held_type = peer.held_job = None
            attempt, peer.held_attempt = peer.held_attempt, None
            if outcome == OK and attempt is not None and attempt.current and self.following():
                self.attempt_released(attempt)

    def done(self, peer):
        """What a slave's well-formed answer (or release) of the job it
        holds gets: ok, or timed_out if its attempt was given up (which the
        model knows of a detached job's)."""
        attempt = peer.held_attempt
        if attempt is None or not self.following():
            return {OK, TIMED_OUT}
        return {OK} if attempt.current else {TIMED_OUT}

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
            allowed = self.done(peer) if fields_ok else {INVALID_MESSAGE}
            if maybe:
                allowed.add(INVALID_MESSAGE)
        outcome = self.expect(peer, req, msg, allowed)
        if outcome == OK:
            self.exact(peer, req, msg, {"ok": True})
            kind = "respond" if field == "body" else "fail"
            self.accepted.append((peer.held_job, held, kind, v[field]))
            attempt = peer.held_attempt
            if attempt is not None and attempt.current and self.following():
                if kind == "respond":
                    self.attempt_answered(attempt, v["body"])
                else:  # a detached job's failed attempt is retried
                    self.attempt_lost(attempt, f"its slave failed it: {v['reason']}")
        elif outcome == TIMED_OUT and msg.get("id") != held:
            self.fail(f"{peer}: sent {short(req.payload)}\n  timed_out for another job than "
                      f"the held {held!r}: {msg!r}")
        elif outcome == INVALID_MESSAGE and held is not None and (not has_id or given == held) \
                and msg.get("id") != held:
            self.fail(f"{peer}: sent {short(req.payload)}\n  the refusal does not name the held "
                      f"job {held!r}: {msg!r}")
        if outcome in (OK, TIMED_OUT):
            peer.held = peer.held_type = peer.held_job = peer.held_attempt = None

    def job_given(self, peer, msg):
        if set(msg) != {"action", "id", "type", "body"} or type(msg["id"]) is not str \
                or type(msg["type"]) is not str:
            self.fail(f"{peer}: a malformed job frame {short(msg, 600)}")
        if peer.loose:
            self.loose_job_ids.add(msg["id"])
            if any(job.detached for job in self.candidates(msg)):
                self.unsure(f"{peer}, whose frames cannot be followed, got a detached job")
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
        peer.held_attempt = None
        peer.job_ids.append(msg["id"])
        if candidates:
            self.hand_out(peer, candidates)

    def progress_heard(self, peer, msg):
        """A progress frame: for one of the master's unfinished jobs, before
        its answer; what it says is judged once the step's frames are read
        (`match_progress`)."""
        job_id, report = msg["id"], msg["progress"]
        if type(job_id) is not str or not self.report_shaped(report):
            self.fail(f"{peer}: a malformed progress frame {short(msg, 600)}")
        if peer.loose:
            return
        job = peer.unfinished.get(job_id)
        if job is None:
            self.fail(f"{peer}: progress on {job_id!r}, which it has no unfinished job for: "
                      f"{short(msg, 600)}")
        self.heard.append((peer, job, report))
        COVERAGE["progress heard"] += 1

    @staticmethod
    def report_shaped(report) -> bool:
        """A progress as masters and status show it: done, total (numbers
        from 0) and data, whichever the slave sent, at least one."""
        return (type(report) is _Obj and not report.duplicate and bool(report)
                and set(report) <= set(PROGRESS_FIELDS)
                and all(count_valid(report[name]) for name in ("done", "total") if name in report))

    def match_progress(self):
        """Each progress a master heard is one a slave sent on that job (and
        the daemon took); each one a slave sent on a job whose master reads
        and still waits for it reached that master in the same step."""
        reported, self.reported = self.reported, []
        heard, self.heard = self.heard, []
        for master, job, report in heard:
            if not (report in job.reports or report in self.reports_by_id.get(job.id, ())
                    or job.id in self.loose_job_ids):
                self.fail(f"{master}: heard progress {short(report)} on {job!r}, which no slave "
                          f"sent on that job; slaves sent {job.reports!r}")
        for job, report, must_hear in reported:
            for entry in heard:
                if entry[1] is job and entry[2] == report:
                    heard.remove(entry)
                    break
            else:
                if must_hear:
                    self.fail(f"a slave's progress {short(report)} on {job!r} was taken (ok), and its "
                              "master, which reads, did not hear it")

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
            if job is not None and not job.detached and job.state != "cancelled" and not self.stopping \
                    and not (job.master.lost or job.master.loose):
                self.fail(f"a slave's {kind} {short(value)} for {job!r} was accepted (ok), "
                          "and its master did not hear it")

    def candidates(self, msg):
        """The unended jobs a job frame can be."""
        return [job for job in self.jobs.get((msg["id"], msg["type"]), ())
                if job.body == msg["body"] and (
                    job.state != "ended" or (job.cancel_step == self.step if job.detached and self.sure
                                             else job.ended_step == self.step)
                    or job.detached and not self.sure)]

    # --- detached jobs ---------------------------------------------------------------
    #
    # Followed exactly while `sure`: every change the daemon makes to one is
    # made here too, at the clock's time (`advance` stops at each timer), so
    # that status, dead_list, cancel, id_exists and the figures can be judged
    # exactly.  `history` keeps what status may say of an id since the last
    # settle.

    def status_of(self, job_id) -> dict:
        """What status says now of the detached job with this id (for a
        master without an unfinished attached job of that id)."""
        job = self.detached.get(job_id)
        if job is None or job.phase == "gone":
            return {"state": "unknown"}
        phase = job.phase
        status = {"state": phase, "detached": True, "type": job.type, "priority": job.priority}
        if phase in LIVE:
            status["attempts"] = job.attempts
            if phase == "delayed":
                status["run_at"] = job.run_at
        elif phase == "dead":
            status.update(attempts=job.attempts, reason=job.reason, ended_at=job.ended_at)
        else:
            status.update(attempts=job.end_attempts, ended_at=job.ended_at)
            if phase == "completed":
                status["result"] = job.result
            else:
                status["reason"] = job.reason
        if phase in LIVE + ("dead",) and job.progress is not None:
            status["progress"] = job.progress  # the last progress its slaves sent
        return status

    def history_of(self, job_id) -> list:
        if job_id not in self.history:
            self.history[job_id] = [self.status_of(job_id)]
        return self.history[job_id]

    def touch(self, job_id):
        """Before a change: keep what status said of the id until now."""
        self.history_of(job_id)

    def record(self, job_id):
        """After a change: status may say this from now on."""
        self.history_of(job_id).append(self.status_of(job_id))

    @staticmethod
    def dead_entry(job) -> dict:
        return {"id": job.id, "type": job.type, "priority": job.priority, "attempts": job.attempts,
                "reason": job.reason, "ended_at": job.ended_at}

    def live_detached(self) -> int:
        return sum(1 for job in self.detached.values() if job.phase in LIVE)

    def is_live(self, job_id) -> bool:
        job = self.detached.get(job_id)
        return job is not None and job.phase in LIVE

    def taken(self, job_id) -> bool:
        """Whether a detached submit with this id is refused id_exists."""
        job = self.detached.get(job_id)
        return job is not None and job.phase in LIVE + ("dead",)

    def take(self, job):
        """A detached job acked (or a dead one queued again): it replaces
        the kept end of its id, if any."""
        job_id = job.id
        self.touch(job_id)
        old = self.kept.pop(job_id, None)
        if old is not None:
            old.phase = "gone"
        self.detached[job_id] = job
        self.in_scheduler.append(job)
        self.figures["detached"] += 1
        job.taken_step = self.step
        job.phase = "delayed" if job.run_at is not None else "queued"
        if job not in self.jobs[(job_id, job.type)]:
            self.jobs[(job_id, job.type)].append(job)
        self.record(job_id)

    def leave_scheduler(self, job):
        job.in_scheduler = False
        self.in_scheduler.remove(job)
        job.state, job.ended_step = "ended", self.step

    def end(self, job, phase, result=None, reason=None):
        """A detached job completed or failed: its end is kept, within the
        bound (the oldest kept end goes first)."""
        job.phase, job.result, job.reason = phase, result, reason
        job.ended_at, job.end_attempts = self.now(), job.attempts
        self.kept.pop(job.id, None)
        self.kept[job.id] = job
        while len(self.kept) > KEEP_RESULTS_MAX:
            old_id, old = self.kept.popitem(last=False)
            self.touch(old_id)
            old.phase = "gone"
            self.figures["results_dropped"] += 1
            self.record(old_id)
            COVERAGE["kept end dropped"] += 1

    def die(self, job, reason):
        job.phase, job.reason, job.ended_at = "dead", reason, self.now()
        self.dead[job.id] = job
        self.figures["dead"] += 1
        COVERAGE["dead"] += 1
        while len(self.dead) > self.dead_max:
            old_id, old = self.dead.popitem(last=False)
            self.touch(old_id)
            old.phase = "gone"
            self.figures["dead_dropped"] += 1
            self.record(old_id)
            COVERAGE["dead job dropped"] += 1

    def cancel_detached(self, job):
        """Any master cancelled a live detached job: it ends failed; a
        running one runs on, its answer to be dropped."""
        self.touch(job.id)
        if job.phase == "running":
            job.state = "cancelled"
        else:
            if job.phase == "queued" and job.taken_step == self.step:
                # unless it was handed out as it was taken, in this step (see `handed`)
                job.cancel_step = self.step
            self.leave_scheduler(job)
        COVERAGE[f"detached job cancelled while {job.phase}"] += 1
        self.end(job, "failed", reason=CANCELLED)
        self.record(job.id)
        if job.cancel_step == self.step:
            job.cancel_index = len(self.history[job.id]) - 1

    def handed(self, job, slave):
        """A slave got this detached job: a new attempt."""
        now = self.now()
        self.touch(job.id)
        if job.state == "ended" and job.cancel_step == self.step:
            # cancelled in this step after all: it was running by then
            job.cancel_step = None
            job.state, job.in_scheduler = "cancelled", True
            self.in_scheduler.append(job)
            job.end_attempts += 1
            self.ran_before_cancel(job)
        elif job.phase == "delayed":
            self.fail(f"{slave}: got {job!r}, delayed until {job.run_at}, at {now}: before its time")
        elif job.state != "live" or job.phase != "queued":
            self.fail(f"{slave}: got {job!r}, which is not queued (attempt {job.attempt!r})")
        else:
            job.phase = "running"
        job.attempts += 1
        job.attempt = slave.held_attempt = Attempt(
            job, slave, None if job.timeout is None else now + job.timeout)
        COVERAGE["detached job handed out"] += 1
        self.record(job.id)

    def ran_before_cancel(self, job):
        """A detached job was handed out as it was taken, and cancelled later
        in the same step (one write of submit, status, cancel): between the
        two, status said it was running."""
        at = job.cancel_index
        self.history[job.id].insert(at, {"state": "running", "detached": True, "type": job.type,
                                         "priority": job.priority, "attempts": job.attempts + 1})
        self.statuses = [(peer, req, msg, job_id, index + 1 if job_id == job.id and index >= at
                          else index) for peer, req, msg, job_id, index in self.statuses]
        COVERAGE["detached job ran before its cancel"] += 1

    def attempt_answered(self, attempt, body):
        job = attempt.job
        self.touch(job.id)
        attempt.current, job.attempt = False, None
        cancelled = job.state == "cancelled"
        self.leave_scheduler(job)
        if not cancelled:  # else its answer is dropped
            self.end(job, "completed", result=body)
        COVERAGE["detached job answered" + (" (dropped)" if cancelled else "")] += 1
        self.record(job.id)

    def attempt_released(self, attempt):
        job = attempt.job
        self.touch(job.id)
        attempt.current, job.attempt = False, None
        job.attempts -= 1
        if job.state == "cancelled":
            self.leave_scheduler(job)
        else:
            job.phase = "queued"
        self.record(job.id)

    def attempt_lost(self, attempt, why):
        """The slave failed the attempt, went away, or it timed out: the job
        waits out its backoff and queues again, or it is dead once its
        retries are used up."""
        job = attempt.job
        self.touch(job.id)
        attempt.current, job.attempt = False, None
        if job.state == "cancelled":
            self.leave_scheduler(job)
        elif job.retried >= job.limit:
            reason = f"{why}; gave up after {job.attempts} attempt{'' if job.attempts == 1 else 's'}"
            if len(reason) > MAX_DEAD_REASON:
                reason = f"{reason[:MAX_DEAD_REASON]}... ({len(reason)} characters in all)"
            self.leave_scheduler(job)
            if self.dead_max > 0:
                self.die(job, reason)
            else:
                self.end(job, "failed", reason=reason)
        else:
            wait = min(BACKOFF_MAX, BACKOFF * 2.0 ** min(job.retried, 64))
            job.phase, job.run_at = "delayed", millisecond_up(self.now() + (wait / 2 + wait / 2 * 0.0))
            job.retried += 1
            COVERAGE[f"detached job backs off ({job.retried})"] += 1
        self.record(job.id)

    def tick(self):
        """What the timers that ran did: attempts past their deadline are
        given up, delayed jobs whose time came are queued (a slave's job
        frame says if one was handed out), kept ends expire."""
        if not self.following():
            return
        now = self.now()
        for job in list(self.in_scheduler):
            attempt = job.attempt
            if attempt is not None and attempt.deadline is not None and attempt.deadline <= now:
                COVERAGE["detached attempt timed out"] += 1
                self.attempt_lost(attempt, f"timeout: no answer within {job.timeout:g} s")
        for job in self.in_scheduler:
            if job.phase == "delayed" and job.run_at <= now:
                self.touch(job.id)
                job.phase = "queued"
                self.record(job.id)
        for job_id, job in list(self.kept.items()):
            if job.ended_at + KEEP_RESULTS <= now:
                self.touch(job_id)
                del self.kept[job_id]
                job.phase = "gone"
                self.record(job_id)
                COVERAGE["kept end expired"] += 1

    def hand_out(self, slave, candidates):
        """A slave got a job that can be any of ``candidates``."""
        now = self.now()
        if candidates and all(not job.detached and job.run_at is not None and now < job.run_at
                              for job in candidates):
            self.fail(f"{slave}: got a job delayed until {candidates[0].run_at}, at {now}: "
                      f"before its time ({candidates!r})")
        detached = [job for job in candidates if job.detached]
        if detached and self.following():
            if len(candidates) > 1:
                self.unsure(f"{slave} got a job frame that can be any of {candidates!r}")
            else:
                self.handed(detached[0], slave)
        elif len(candidates) == 1:
            candidates[0].handed += 1

    # --- the figures -------------------------------------------------------------

    def check_figures(self, types, totals, where, stats):
        """The figures add up.  Every job ends once, as completed, failed or
        cancelled (gloom.scheduler: Scheduler._end), so submitted =
        completed + failed + cancelled + queued + delayed + running, where:
        a detached job counts in submitted when it is taken, and again each
        time dead_retry queues it again; one that goes to the dead list (or
        ends failed without one) counts as failed, each time; one a master
        cancels, or whose master went away, or that the daemon stopped,
        counts as cancelled (a running one once its attempt is over:
        until then it counts as running)."""
        if not isinstance(types, dict) or not isinstance(totals, dict):
            self.fail(f"{where}: malformed figures {types!r} {totals!r}")
        live = delayed_jobs = 0
        for name, counts in types.items():
            if set(counts) != {"queued", "delayed", "running", "idle_slaves", "busy_slaves", "paused"}:
                self.fail(f"{where}: type {name!r} has figures {counts!r}")
            queued, delayed, running = counts["queued"], counts["delayed"], counts["running"]
            idle, busy = counts["idle_slaves"], counts["busy_slaves"]
            live += queued + delayed + running
            delayed_jobs += delayed
            if counts["paused"] is not False:
                self.fail(f"{where}: type {name!r} is paused, on a daemon without --admin")
            if not (queued or delayed or running or idle or busy):
                self.fail(f"{where}: type {name!r} is listed with no jobs and no slaves")
            if queued and idle:
                self.fail(f"{where}: {queued} {name!r} jobs wait while {idle} slaves of the type idle")
            if running > busy:
                self.fail(f"{where}: type {name!r} runs {running} jobs on {busy} busy slaves")
        if stats.get("paused") != [] or stats.get("draining") is not False or totals["cleared"]:
            self.fail(f"{where}: without --admin no type is paused or cleared, and the daemon does "
                      f"not drain: paused {stats.get('paused')!r}, draining {stats.get('draining')!r}, "
                      f"cleared {totals['cleared']!r}")
        ended = totals["completed"] + totals["failed"] + totals["cancelled"] + totals["cleared"]
        if totals["submitted"] != ended + live:
            self.fail(f"{where}: totals do not add up: submitted {totals['submitted']} != completed "
                      f"{totals['completed']} + failed {totals['failed']} + cancelled {totals['cancelled']}"
                      f" + queued/delayed/running {live}\n  types={dict(types)!r}")
        detached = stats.get("detached")
        if stats.get("types_omitted") == 0 and stats.get("delayed") != delayed_jobs:
            self.fail(f"{where}: {stats.get('delayed')!r} delayed jobs in all, {delayed_jobs} by type")
        if type(detached) is not _Obj and type(detached) is not dict \
                or set(detached) != {"live", "results", "results_bytes", "dead"} \
                or any(type(n) is not int or n < 0 for n in detached.values()) \
                or detached["results_bytes"] < 200 * detached["results"] or stats.get("journal") is not None:
            self.fail(f"{where}: malformed detached figures {detached!r} (journal {stats.get('journal')!r})")
        if totals["dead"] < detached["dead"] or totals["detached"] < detached["live"] \
                or totals["dead_dropped"] > totals["dead"] or totals["failed"] < totals["dead"]:
            self.fail(f"{where}: the detached totals {totals!r} do not fit {detached!r}")

    def check_state(self):
        stats = self.call("stats()", self.service.stats)
        self.check_figures(stats["types"], stats["totals"], "stats()", stats)
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
            detached = len(self.in_scheduler) if self.sure else 0
            if len(self.scheduler) < unfinished + detached:
                self.fail(f"the scheduler holds {len(self.scheduler)} jobs; connected masters "
                          f"await {unfinished}, and {detached} detached jobs are live")
        self.check_delayed_timer(masters)
        if not self.loose_slave_ever:
            for key in ("progress", "touched"):
                if stats["totals"][key] != self.figures[key]:
                    self.fail(f"totals[{key!r}] is {stats['totals'][key]}; the slaves were told ok "
                              f"{self.figures[key]} times")
        if self.sure:
            self.check_detached(stats)

    def check_delayed_timer(self, masters):
        """Delayed jobs have the wake timer, set no later than the earliest
        of them the model knows (attached ones not yet run, detached ones)."""
        now = self.now()
        known = [job.run_at for m in masters if not m.loose for job in m.unfinished.values()
                 if job.run_at is not None and now < job.run_at]
        if self.sure:
            known += [job.run_at for job in self.in_scheduler if job.phase == "delayed"]
        wake = [c for c in self.clock.getDelayedCalls() if c.func == self.scheduler._wake]
        if len(wake) > 1 or self.scheduler.delayed() and not wake:
            self.fail(f"{self.scheduler.delayed()} delayed jobs, and wake timers {wake!r}")
        if known and wake and wake[0].getTime() > min(known) * (1 + 1e-12) + 1e-9:
            self.fail(f"the wake timer is set for {wake[0].getTime()}, after a job delayed until "
                      f"{min(known)}")

    def check_detached(self, stats):
        """What the daemon holds of detached jobs is what the model holds."""
        detached, totals, types = stats["detached"], stats["totals"], stats["types"]
        wanted = {"live": self.live_detached(), "results": len(self.kept), "dead": len(self.dead)}
        got = {key: detached[key] for key in wanted}
        if got != wanted:
            self.fail(f"the daemon holds detached jobs {got!r}; the model {wanted!r}:\n"
                      f"  live {sorted(self.daemon.detached.live)!r} / model "
                      f"{sorted(j.id for j in self.detached.values() if j.phase in LIVE)!r}\n"
                      f"  kept {list(self.daemon.detached.results)!r} / model {list(self.kept)!r}\n"
                      f"  dead {list(self.daemon.detached.dead)!r} / model {list(self.dead)!r}")
        if detached["live"] > MAX_DETACHED:
            self.fail(f"the daemon holds {detached['live']} live detached jobs; the README: "
                      f"\"The daemon holds at most --max-detached ({MAX_DETACHED}) live detached jobs "
                      f"(queue_full beyond)\"", "max-detached")
        for key in ("detached", "dead", "dead_dropped", "results_dropped"):
            if totals[key] != self.figures[key]:
                self.fail(f"totals[{key!r}] is {totals[key]}; the model counts {self.figures[key]}")
        owned = sum(1 for job in self.scheduler.jobs() if job.owner is self.daemon.detached)
        if owned != self.live_detached():
            self.fail(f"the scheduler holds {owned} detached jobs; {self.live_detached()} are live")
        counts = defaultdict(Counter)
        for job in self.in_scheduler:
            if job.attempt is not None and job.attempt.current:
                counts[job.type]["running"] += 1
            elif job.phase in ("queued", "delayed"):
                counts[job.type][job.phase] += 1
        for name, least in counts.items():
            figures = types.get(name, {})
            for key, n in least.items():
                if figures.get(key, 0) < n:
                    self.fail(f"type {name!r}: {figures.get(key, 0)} {key} jobs; {n} detached ones are")
        if self.kept:
            expiry = [c for c in self.clock.getDelayedCalls() if c.func == self.daemon.detached._expire]
            oldest = next(iter(self.kept.values())).ended_at + KEEP_RESULTS
            if len(expiry) != 1 or expiry[0].getTime() > oldest * (1 + 1e-12) + 1e-9:
                self.fail(f"kept ends expire from {oldest}; the expiry timers are {expiry!r}")

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
        # A detached job: it outlives its master, nobody hears its answer,
        # and any master can read it with status.
        job_id = f"fuzz-liveness-detached-{n}"
        full = len(self.daemon.detached.live) >= MAX_DETACHED
        del master.inbox[:], slave.inbox[:]
        self.send(master, [message(action="submit", id=job_id, type=job_type, body=["detached", n],
                                   detach=True)])
        self.settle()
        if full:
            if [m.get("error") for m in master.inbox] != [QUEUE_FULL]:
                self.fail(f"a detached submit while the daemon holds {MAX_DETACHED} detached jobs: "
                          f"{master.inbox!r}")
        else:
            self.lose(master)
            self.settle()
            self.send(slave, [message(action="respond", body={"detached": n})])
            self.settle()
            reader = self.add("master")
            self.send(reader, [message(action="status", id=job_id)])
            self.settle()
            wanted = ([{"ok": True, "id": job_id}],
                      [{"action": "job", "id": job_id, "type": job_type, "body": ["detached", n]},
                       {"ok": True}],
                      [{"ok": True, "id": job_id, "state": "completed", "detached": True, "type": job_type,
                        "priority": 0, "attempts": 1, "ended_at": self.now(), "result": {"detached": n}}])
            if (master.inbox, slave.inbox, reader.inbox) != wanted:
                self.fail(f"a detached job does not get through: its master got {master.inbox!r}, "
                          f"the slave {slave.inbox!r}, a master asking its status {reader.inbox!r}")
            self.lose(reader)
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
            self.advance(0)
            self.check_state()
            self.clear_detached()
        self.advance(0)
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

    def clear_detached(self):
        """With every peer gone, only detached jobs (queued or delayed, the
        dead list, kept ends) and their timers may be left.  A new master
        cancels and discards them all; once their ends expire and the
        wake timer of cancelled delayed jobs has run, nothing is left."""
        owners = {job.owner for job in self.scheduler.jobs()}
        if owners - {self.daemon.detached}:
            self.fail(f"with every peer gone the scheduler still holds jobs {self.scheduler.jobs()!r}")
        mine = (self.scheduler._wake, self.daemon.detached._expire)
        timers = [c for c in self.clock.getDelayedCalls() if c.func not in mine]
        if timers:
            self.fail(f"timers still pending with nothing left to time but detached jobs: {timers!r}")
        detached = self.daemon.detached
        frames = [message(action="cancel", id=job_id) for job_id in sorted(detached.live)]
        frames += [message(action="dead_discard", id=job_id) for job_id in list(detached.dead)]
        if frames:
            master = self.add("master")
            self.send(master, frames)
            self.settle()
            if any(m.get("ok") is not True for m in master.inbox) or len(master.inbox) != len(frames):
                self.fail(f"cancelling every detached job and discarding the dead ones: {master.inbox!r}")
            self.lose(master)
            self.settle()
        if len(self.scheduler) or detached.live or detached.dead:
            self.fail(f"the scheduler still holds jobs {self.scheduler.jobs()!r} "
                      f"(detached: {sorted(detached.live)!r}, dead: {list(detached.dead)!r})")
        self.advance(KEEP_RESULTS + MAX_DELAY + 1)
        self.check_state()
        if detached.results:
            self.fail(f"ends still kept {KEEP_RESULTS + MAX_DELAY + 1} s on: {list(detached.results)!r}")

    def stop(self):
        """Stop the daemon as SIGTERM does: every tracked master hears shutdown
        for each of its unfinished jobs, and every connection is closed."""
        for peer in self.live():
            if peer.paused and not peer.transport.disconnecting:
                # one at a time: what each does is read before the next acts
                peer.paused = False
                self.transcript.append(f"{peer} reads again (resumeProducing)")
                self.acted(peer)
                self.call(f"{peer}.resumeProducing", peer.protocol.resumeProducing)
                self.settle()
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
flags = weighted((8, st.booleans()), (1, st.sampled_from([0, 1, 1.0, "true", None, [], Raw("1")])), (1, junk))
delays = weighted((6, st.sampled_from([0, 0.25, 0.5, 1, 2.5, 10])),
                  (2, st.sampled_from([-0.0, -1, -0.5, 1e-300, 5e-324, MAX_DELAY, MAX_DELAY - 0.5,
                                       MAX_DELAY + 0.5, MAX_DELAY + 1, 10**30, Raw("1e400"), Raw("-1e400"),
                                       Raw("1e-400"), Raw("-0"), True, None, "5", [1]])),
                  (1, st.floats()), (1, st.integers()), (1, junk))
times = weighted((4, st.sampled_from([0, 1, 2.5, 10, 100, 1e6, 4e7, 1.7e9])),
                 (2, st.sampled_from([-1, -0.0, 1e-300, MAX_DELAY, MAX_DELAY + 1, 10**30, Raw("1e400"),
                                      Raw("-1e400"), True, None, "1", [0]])),
                 (1, st.floats()), (1, st.integers()), (1, junk))
retry_counts = weighted((6, st.integers(0, 3)),
                        (2, st.sampled_from([MAX_RETRIES, MAX_RETRIES + 1, -1, 2**63, 1.0, True, None, "1",
                                             Raw("1" * 4500), Raw("1e2")])),
                        (1, st.integers()), (1, junk))
offsets = weighted((5, st.integers(0, 4)),
                   (2, st.sampled_from([MAX_OFFSET, MAX_OFFSET + 1, -1, 1.0, True, None, "0", 10**30,
                                        Raw("9" * 4500)])),
                   (1, st.integers()), (1, junk))
limits = weighted((5, st.integers(1, 4)),
                  (2, st.sampled_from([0, MAX_PAGE, MAX_PAGE + 1, -1, 2.0, True, None, "1"])),
                  (1, st.integers()), (1, junk))
DETACHED_POOL = ["d1", "d2", "d3", "d4", "d5"]
detached_ids = weighted((3, st.sampled_from(DETACHED_POOL)), (1, st.sampled_from(ID_POOL)))
detach_flags = weighted((9, st.just(True)), (1, flags))
small_bodies = st.sampled_from([None, 0, "", "x", [1], {"a": 1}])
long_reasons = weighted((4, short_text), (1, st.just("r" * 1500)))  # a dead job's reason is cut
_CHOICES = {}


def choice(*values):
    """st.sampled_from(values), built once: building strategies in every
    step costs hypothesis much more time than drawing from them."""
    key = tuple((type(v), repr(v)) for v in values)
    strategy = _CHOICES.get(key)
    if strategy is None:
        strategy = _CHOICES[key] = st.sampled_from(values)
    return strategy


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
often_offsets, often_limits = maybe(offsets, 2, 1), maybe(limits, 2, 1)
SUBMIT_OPTIONS = (("detach", flags), ("delay", delays), ("at", times), ("retries", retry_counts),
                  ("backoff", flags))
# a progress's done and total: numbers from 0, and what is not
counts = weighted((8, st.integers(0, 100) | st.sampled_from([0.5, 1e300, 5e-324, -0.0, 2**63, 10**30])),
                  (2, st.sampled_from([-1, -0.5, True, False, None, "1", [1], Raw("1e400"), Raw("-1e400"),
                                       Raw("1e-400"), Raw("-0"), Raw("1E+2"), Raw("1" * 4500)])),
                  (1, st.floats()), (1, junk))
MORE_OPTIONS = SUBMIT_OPTIONS + (("offset", offsets), ("limit", limits), ("done", counts),
                                 ("total", counts), ("data", json_values))


@st.composite
def options(draw, fields):
    """One request in six carries one or two of the fields beyond 2009
    (the rules for detached work send them all the time; drawing them for
    every request would cost hypothesis much of its time)."""
    if draw(st.integers(0, 5)):
        return []
    chosen = draw(st.lists(st.sampled_from(fields), min_size=1, max_size=2, unique_by=lambda f: f[0]))
    return [(name, draw(values)) for name, values in chosen]


@st.composite
def submits(draw):
    return draw(arrange([("action", "submit"), ("id", draw(ids)), ("type", draw(types)),
                         ("body", draw(bodies)), ("priority", draw(priorities)),
                         ("timeout", draw(timeouts)), *draw(options(SUBMIT_OPTIONS)), ("ref", draw(maybe_refs))]))


@st.composite
def any_requests(draw):
    extra = draw(options(MORE_OPTIONS))
    return draw(arrange([("action", draw(actions)), ("id", draw(maybe_ids)), ("type", draw(maybe_types)),
                         ("body", draw(maybe_bodies)), ("priority", draw(maybe_priorities)),
                         ("timeout", draw(maybe_timeouts)), ("reason", draw(maybe_reasons)), *extra,
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
                slave_types=st.lists(st.sampled_from(["t", "t", "u", OMIT]), min_size=1, max_size=3),
                dead_max=st.sampled_from([DEAD_MAX, DEAD_MAX, DEAD_MAX, 0]))
    def start(self, stop, seed, default_timeout, slave_types, dead_max):
        # gc.collect() per example would cost more than the example: the
        # test collects once after the run instead
        self.h = Harness(default_timeout=default_timeout, stop_at_end=stop, seed=seed, collect=False,
                         dead_max=dead_max)
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
            self.h.advance(0)  # each step is a reactor turn
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
        self.h.acted(peer)
        self.h.call(f"{peer}.resumeProducing", peer.protocol.resumeProducing)

    @rule(seconds=st.sampled_from([0, 0.25, 0.5, 1, 1.5, 2.5, 3.5, 10, 20, 3e6]))
    def advance(self, seconds):
        self.h.advance(seconds)

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
        known = sorted(peer.unfinished) + [i for p in self.h.peers for i in p.job_ids[-3:]] \
            + sorted(self.h.detached)  # detached ones, of any master
        job_id = data.draw(st.sampled_from(known) if known and data.draw(st.booleans()) else ids, label="id")
        self.h.send(peer, [request(("action", "cancel"), ("id", job_id))])

    DETACHED_WORK = ("submit_detached", "submit_detached", "submit_delayed", "status", "status", "dead_list",
                     "dead_action", "cancel_detached", "answer_detached", "answer_detached", "to_the_dead",
                     "to_the_dead", "shared_id", "flood")

    def detached_work(self, data):
        """Detached and delayed jobs, status, the dead list: one of these,
        picked by the example's seeded generator (hypothesis's own choice
        favours the first few, over 80 examples)."""
        getattr(self, self.h.rng.choice(self.DETACHED_WORK))(data)

    # detached work is two rules (work is three)
    detached_1 = precondition(has("master"))(rule(data=st.data())(detached_work))
    detached_2 = precondition(has("master"))(rule(data=st.data())(lambda self, data: self.detached_work(data)))

    def answer_detached(self, data):
        """A slave holding a detached job fails it (it is retried after
        its backoff, or dead), answers or releases it; else a detached
        submit."""
        holding = [p for p in self.h.live("slave") if p.held_attempt is not None and not p.loose]
        if not holding:
            return self.submit_detached(data)
        slave = data.draw(st.sampled_from(holding), label="slave")
        how = data.draw(choice("fail", "fail", "respond", "release"), label="how")
        named = data.draw(st.booleans(), label="names the job")
        if how == "release":
            frames = [message(action="release", id=slave.held)]
        else:
            frames = [request(("action", how), ("id", slave.held if named else OMIT),
                              ("body", data.draw(json_values, label="body")) if how == "respond"
                              else ("reason", data.draw(long_reasons, label="reason")))]
        self.h.send(slave, frames)

    def to_the_dead(self, data):
        """A detached job with few retries, run by an idle slave that fails
        it or lets it run past its timeout: it waits its backoff (doubling),
        runs again, ... until it is dead.  Then the dead list (a page of
        it), the job's status, and perhaps dead_retry or dead_discard."""
        idle = [p for p in self.h.live("slave") if p.held is None and name_valid(p.joined) and not
                (p.left or p.loose or p.paused or p.refusing)]
        if not idle and len(self.h.live("slave")) < 6:
            idle = [self.h.add("slave")]
            self.h.send(idle[0], [message(action="join", type="t")])
            self.h.settle()
        if not idle:
            return self.submit_detached(data)
        master = self.clean_master(data)
        slave = data.draw(st.sampled_from(idle), label="slave")
        # (hypothesis draws the first choice most: the likelier one goes first)
        job_id = f"d{next(self.h.numbers)}" if data.draw(choice(True, True, False), label="fresh id") \
            else data.draw(detached_ids, label="id")
        timeout = self.h.rng.choice([OMIT, OMIT, 0.5])
        self.h.send(master, [request(("action", "submit"), ("id", job_id), ("type", slave.joined),
                                     ("body", data.draw(small_bodies, label="body")), ("detach", True),
                                     ("retries", self.h.rng.choice([0, 0, 1, 2])), ("timeout", timeout),
                                     ("priority", data.draw(choice(OMIT, 1), label="priority")))])
        self.h.settle()
        for retried in range(3):
            runs = [p for p in self.h.live("slave") if p.held_attempt is not None and p.held == job_id
                    and not (p.loose or p.paused or p.refusing)]
            if not runs:
                break
            if timeout is not OMIT and self.h.rng.random() < 0.5:
                self.h.advance(timeout)  # given up; its slave's answer comes too late
                self.h.send(runs[0], [message(action="respond", body="late")])
            else:
                self.h.send(runs[0], [message(action="fail", reason=data.draw(long_reasons, label="reason"))])
            self.h.settle()
            wait = BACKOFF * 2**retried / 2
            self.h.advance(self.h.rng.choice([wait, wait, wait - 0.25, wait + 1]))
        frames = [request(("action", "dead_list"), ("offset", data.draw(often_offsets, label="offset")),
                          ("limit", data.draw(often_limits, label="limit"))),
                  message(action="status", id=job_id)]
        then = self.h.rng.choice([None, None, "dead_retry", "dead_retry", "dead_discard"])
        if then:  # else it stays on the dead list (which holds DEAD_MAX)
            frames += [message(action=then, id=job_id), message(action="status", id=job_id)]
        self.h.send(master, frames)

    def clean_master(self, data):
        """A master whose every frame is read and answered at once."""
        masters = [p for p in self.h.live("master") if not (p.loose or p.paused or p.refusing)]
        if not masters:
            return self.h.add("master")
        return data.draw(st.sampled_from(masters), label="master")

    def flood(self, data):
        """More detached jobs than the daemon holds (of a type no slave
        serves, some delayed): queue_full once it holds its
        --max-detached; then another master cancels some of them."""
        master = self.clean_master(data)
        ids = [f"flood-{next(self.h.numbers)}" for _ in range(MAX_DETACHED + 1)]
        self.h.send(master, [request(("action", "submit"), ("id", job_id), ("type", "nobody"), ("body", i),
                                     ("detach", True), ("delay", data.draw(choice(OMIT, OMIT, 5), label="delay")))
                             for i, job_id in enumerate(ids)])
        self.h.settle()
        others = [p for p in self.h.live("master") if p is not master]
        canceller = data.draw(st.sampled_from(others), label="canceller") if others else master
        kept = data.draw(choice(0, 0, 0, 1, 2, MAX_DETACHED), label="left live")  # most go: they would fill
        self.h.send(canceller, [message(action="cancel", id=job_id) for job_id in ids[kept:]])

    def shared_id(self, data):
        """Two masters and one id: one's attached job, perhaps a detached
        job too.  Status and cancel look at the asking master's own job
        first, then the detached one; never at another master's."""
        masters = [p for p in self.h.live("master") if not (p.loose or p.paused or p.refusing)]
        if len(masters) < 2 and len(self.h.live("master")) < 5:
            masters.append(self.h.add("master"))
        if len(masters) < 2:
            return self.status(data)
        first = data.draw(st.sampled_from(masters), label="master")
        second = data.draw(st.sampled_from([p for p in masters if p is not first]), label="other master")
        job_id = data.draw(choice(*DETACHED_POOL[:2], *ID_POOL[:2]), label="id")
        job_type = data.draw(choice(*TYPE_POOL), label="type")
        frames = [message(action="submit", id=job_id, type=job_type, body="attached")]
        if data.draw(st.booleans(), label="and a detached one"):
            frames.append(message(action="submit", id=job_id, type=job_type, body="detached", detach=True,
                                  delay=data.draw(choice(0, 1), label="delay")))
        self.h.send(first, frames)
        self.h.settle()
        askers = [first, second] if data.draw(choice(True, False), label="its master asks first") \
            else [second, first]
        for asker in askers:
            self.h.send(asker, [message(action="status", id=job_id), message(action="cancel", id=job_id),
                                message(action="status", id=job_id)])
            self.h.settle()

    def submit_detached(self, data):
        """Detached jobs of types slaves serve, now, after a delay or at a
        time; their retries (few, to reach the dead list), backoff (which
        changes nothing for them), timeout and priority."""
        master = self.pick(data, "master", "master")
        job_types = sorted({p.joined for p in self.h.live("slave") if name_valid(p.joined)}) or TYPE_POOL
        frames = []
        for _ in range(data.draw(st.integers(1, 2), label="jobs")):
            when = data.draw(choice("now", "now", "delay", "at"), label="when")
            frames.append(request(
                ("action", "submit"),
                ("id", data.draw(detached_ids,
                                 label="id")),
                ("type", data.draw(st.sampled_from(job_types), label="type")),
                ("body", data.draw(json_values, label="body")),
                ("detach", data.draw(detach_flags, label="detach")),
                ("delay", data.draw(choice(0, 0.5, 1, 2.5, 10, MAX_DELAY), label="delay")
                 if when == "delay" else OMIT),
                ("at", self.h.now() + data.draw(choice(-5, 0, 0.5, 1, 2.5, 30, MAX_DELAY,
                                                                 MAX_DELAY + 1), label="at")
                 if when == "at" else OMIT),
                ("retries", data.draw(choice(OMIT, 0, 0, 0, 1, 2), label="retries")),
                ("backoff", data.draw(choice(OMIT, OMIT, True, False), label="backoff")),
                ("timeout", data.draw(choice(OMIT, OMIT, 0.5, 1, 3.5), label="timeout")),
                ("priority", data.draw(choice(OMIT, OMIT, -1, 2), label="priority")),
                ("ref", data.draw(maybe_refs, label="ref"))))
        self.h.send(master, frames)

    def submit_delayed(self, data):
        """Attached jobs with a delay or a time, their own retries, backoff."""
        master = self.pick(data, "master", "master")
        job_types = sorted({p.joined for p in self.h.live("slave") if name_valid(p.joined)}) or TYPE_POOL
        when = data.draw(choice("delay", "delay", "at", "now"), label="when")
        self.h.send(master, [request(
            ("action", "submit"), ("id", data.draw(st.sampled_from(ID_POOL), label="id")),
            ("type", data.draw(st.sampled_from(job_types), label="type")),
            ("body", data.draw(json_values, label="body")),
            ("detach", data.draw(choice(OMIT, OMIT, False), label="detach")),
            ("delay", data.draw(choice(0, 0.5, 1, 2.5, 10), label="delay") if when == "delay" else OMIT),
            ("at", self.h.now() + data.draw(choice(-5, 0, 0.5, 1, 2.5), label="at")
             if when == "at" else OMIT),
            ("retries", data.draw(choice(OMIT, 0, 1, 2), label="retries")),
            ("backoff", data.draw(choice(OMIT, True, False), label="backoff")),
            ("timeout", data.draw(choice(OMIT, OMIT, 0.5, 1), label="timeout")))])

    def status(self, data):
        """Status of the master's own job, another master's, a detached
        one, an id never used, or anything."""
        master = self.pick(data, "master", "master")
        others = sorted({i for p in self.h.live("master") if p is not master for i in p.unfinished})
        pools = [("own", sorted(master.unfinished)), ("other", others),
                 ("detached", sorted(set(self.h.detached) | set(DETACHED_POOL)))]
        frames = []
        for _ in range(data.draw(st.integers(1, 2), label="requests")):
            kind = data.draw(choice("own", "other", "detached", "detached", "never", "any"),
                             label="whose")
            pool = dict(pools).get(kind)
            if pool:
                job_id = data.draw(st.sampled_from(pool), label="id")
            elif kind == "never":
                job_id = f"never-{next(self.h.numbers)}"
            else:
                job_id = data.draw(ids, label="id")
            frames.append(request(("action", "status"), ("id", job_id),
                                  ("ref", data.draw(maybe_refs, label="ref"))))
        self.h.send(master, frames)

    def dead_list(self, data):
        self.h.send(self.pick(data, "master", "master"),
                    [request(("action", "dead_list"), ("offset", data.draw(often_offsets, label="offset")),
                             ("limit", data.draw(often_limits, label="limit")),
                             ("ref", data.draw(maybe_refs, label="ref")))])

    def cancel_detached(self, data):
        """Any master cancels a detached job (live, or not), perhaps then
        asks its status or submits it again."""
        master = self.pick(data, "master", "master")
        known = sorted(set(self.h.detached) | set(DETACHED_POOL))
        job_id = data.draw(st.sampled_from(known), label="id")
        frames = [message(action="cancel", id=job_id)]
        then = data.draw(choice(None, "status", "submit"), label="then")
        if then == "status":
            frames.append(message(action="status", id=job_id))
        elif then == "submit":
            frames.append(message(action="submit", id=job_id, type="t", body=None, detach=True))
        self.h.send(master, frames)

    def dead_action(self, data):
        """Retry or discard a dead job (or a live one, or any id); perhaps
        followed by another action on the same id."""
        action = data.draw(choice("dead_retry", "dead_retry", "dead_discard"), label="action")
        then = data.draw(choice(None, None, "status", "cancel", "dead_retry", "dead_discard"),
                         label="then")
        master = self.pick(data, "master", "master")
        dead = list(self.h.dead) or list(self.h.daemon.detached.dead)
        live = sorted(job_id for job_id in self.h.detached if self.h.is_live(job_id))
        kind = data.draw(choice("dead", "dead", "dead", "live", "any"), label="which")
        pool = {"dead": dead, "live": live}.get(kind)
        job_id = data.draw(st.sampled_from(pool) if pool else ids, label="id")
        frames = [request(("action", action), ("id", job_id), ("ref", data.draw(maybe_refs, label="ref")))]
        if then:
            frames.append(message(action=then, id=job_id))
        self.h.send(master, frames)

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
            # a detached job's failure is retried, until it is dead: fail those more
            answer = (("body", data.draw(json_values, label="body"))
                      if data.draw(st.integers(0, 1 if slave.held_attempt is not None else 3), label="fails (0)")
                      else ("reason", data.draw(short_text, label="reason")))
            # progress first, now and then: its master hears it before the answer
            frames = [self.report_frame(data, slave, "progress")
                      for _ in range(data.draw(choice(0, 1, 1, 2), label="progress first"))]
            COVERAGE[f"rule: work answers, after {len(frames)} progress"] += 1
            self.h.send(slave, frames + [request(("action", "respond" if answer[0] == "body" else "fail"),
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
                                     ("detach", data.draw(choice(OMIT, OMIT, OMIT, True), label="detach")),
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

    def report_frame(self, data, peer, kind=None):
        """A progress (done, total, data: one or more, now and then none or
        malformed) or a touch, naming the held job or not."""
        kind = kind or data.draw(choice("progress", "progress", "touch"), label="progress or touch")
        pairs = [("action", kind), ("id", self.answer_id(data, peer))]
        if kind == "progress":
            pairs += [("done", data.draw(maybe(counts, 3, 1), label="done")),
                      ("total", data.draw(maybe(counts, 1, 1), label="total")),
                      ("data", data.draw(maybe(json_values, 1, 2), label="data"))]
        pairs.append(("ref", data.draw(maybe_refs, label="ref")))
        return request(*pairs, style=data.draw(styles, label="style"))

    def report(self, data):
        """A slave reports progress on its job, or touches it (README,
        "Progress"); once or a few times in one write."""
        peer = self.pick_slave(data)
        COVERAGE["rule: report" + (" (holding a job)" if peer.held is not None else "")] += 1
        count = data.draw(choice(1, 1, 2, 3), label="reports")
        self.h.send(peer, [self.report_frame(data, peer) for _ in range(count)])

    # reporting is two rules
    report_1 = precondition(has("slave"))(rule(data=st.data())(report))
    report_2 = precondition(has("slave"))(rule(data=st.data())(lambda self, data: self.report(data)))

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
        if os.environ.get("GLOOM_FUZZ_COVERAGE"):
            print("\n".join(f"{n:7d} {what}" for what, n in sorted(COVERAGE.items())))
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
        self.h.advance(1)
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


class DetachedScenarioTests(HarnessTestCase):
    """Detached and delayed jobs, status and the dead list, scripted."""

    def test_detached_job_outlives_its_master_until_dead(self):
        slave = self.slave()
        self.submit("d", detach=True, retries=1)
        self.assertEqual(slave.inbox[-1]["id"], "d")
        self.h.lose(self.master)
        self.h.send(slave, [message(action="fail", reason="no")])
        self.h.settle()
        other = self.h.add("master")
        self.h.send(other, [message(action="status", id="d")])
        self.h.settle()
        # its first retry waits half of --retry-backoff (the test daemon's jitter)
        self.assertEqual(other.inbox[-1], {"ok": True, "id": "d", "state": "delayed", "detached": True,
                                           "type": "t", "priority": 0, "attempts": 1, "run_at": 0.5})
        self.h.advance(0.25)
        self.assertEqual(slave.inbox[-1], {"ok": True})
        self.h.advance(0.25)
        self.assertEqual(slave.inbox[-1]["id"], "d")
        self.h.send(slave, [message(action="fail", reason="still no")])
        self.h.settle()
        self.h.send(other, [message(action="dead_list"), message(action="submit", id="d", type="t", body=None,
                                                                   detach=True),
                            message(action="dead_retry", id="d"), message(action="status", id="d")])
        self.h.settle()
        dead = {"id": "d", "type": "t", "priority": 0, "attempts": 2, "ended_at": 0.5,
                "reason": "its slave failed it: still no; gave up after 2 attempts"}
        self.assertEqual(other.inbox[-4:], [
            {"ok": True, "total": 1, "offset": 0, "dead": [dead]},
            {"error": ID_EXISTS, "reason": other.inbox[-3]["reason"], "id": "d"},
            {"ok": True, "id": "d"},
            {"ok": True, "id": "d", "state": "running", "detached": True, "type": "t", "priority": 0,
             "attempts": 1}])
        self.h.finish()

    def test_status_and_cancel_look_at_the_own_job_first(self):
        other, third = self.h.add("master"), self.h.add("master")
        self.submit("1", body="attached")
        self.submit("1", master=other, body="detached", detach=True)
        for master in (self.master, other, third):
            self.h.send(master, [message(action="status", id="1")])
        self.h.send(third, [message(action="cancel", id="1"), message(action="status", id="1")])
        self.h.send(self.master, [message(action="status", id="1")])
        self.h.settle()
        # the master's own attached job, before and after the detached one is cancelled
        self.assertEqual([(m["state"], m["detached"]) for m in self.master.inbox if "state" in m],
                         [("queued", False), ("queued", False)])
        # the detached job, for the master that submitted it and for any other
        self.assertEqual([(m["state"], m["detached"]) for m in other.inbox if "state" in m], [("queued", True)])
        self.assertEqual([m.get("state") for m in third.inbox], ["queued", None, "failed"])
        self.assertEqual(third.inbox[-1]["reason"], "cancelled by a master")
        self.h.finish()

    def test_delayed_job_waits_for_its_time(self):
        slave = self.slave()
        self.submit("1", delay=1)
        self.submit("2", detach=True, at=0.5)
        self.assertEqual(slave.inbox, [{"ok": True}])
        self.h.advance(0.5)
        self.assertEqual([m.get("id") for m in slave.inbox], [None, "2"])
        self.h.send(slave, [message(action="respond", body=2)])
        self.h.settle()
        self.h.advance(0.499)
        self.assertEqual([m.get("id") for m in slave.inbox], [None, "2", None])
        self.h.advance(0.001)
        self.assertEqual([m.get("id") for m in slave.inbox], [None, "2", None, "1"])
        self.h.finish()


    def test_timed_out_attempts_until_dead(self):
        slave = self.slave()
        self.submit("d", detach=True, retries=1, timeout=1)
        self.h.advance(1)  # given up: its slave stays busy until it answers
        self.h.send(slave, [message(action="respond", body="late")])
        self.h.settle()
        self.assertEqual(slave.inbox[-1]["error"], TIMED_OUT)
        self.h.advance(0.5)
        self.assertEqual(slave.inbox[-1]["id"], "d")
        self.h.advance(1)
        self.h.send(self.master, [message(action="status", id="d")])
        self.h.settle()
        self.assertEqual(self.master.inbox[-1], {
            "ok": True, "id": "d", "state": "dead", "detached": True, "type": "t", "priority": 0, "attempts": 2,
            "reason": "timeout: no answer within 1 s; gave up after 2 attempts", "ended_at": 2.5})
        self.h.finish()

    def test_submit_status_cancel_in_one_write(self):
        """Handed to the idle slave as it is taken, the job is running when
        status asks, and failed (one attempt) once cancelled."""
        slave = self.slave()
        self.h.send(self.master, [message(action="submit", id="d", type="t", body=None, detach=True),
                                  message(action="status", id="d"), message(action="cancel", id="d"),
                                  message(action="status", id="d")])
        self.h.settle()
        self.assertEqual([(m.get("state"), m.get("attempts")) for m in self.master.inbox],
                         [(None, None), ("running", 1), (None, None), ("failed", 1)])
        self.h.send(slave, [message(action="progress", done=1), message(action="respond", body=1)])
        self.h.finish()

    def test_the_bounds_drop_the_oldest(self):
        """KEEP_RESULTS_MAX kept ends, DEAD_MAX dead jobs, MAX_DETACHED
        live detached jobs."""
        slave = self.slave()
        for n in range(KEEP_RESULTS_MAX + 1):
            self.submit(f"done-{n}", detach=True)
            self.h.send(slave, [message(action="respond", body=n)])
        for n in range(DEAD_MAX + 1):
            self.submit(f"dead-{n}", detach=True, retries=0)
            self.h.send(slave, [message(action="fail", reason="no")])
        self.h.send(self.master, [
            message(action="status", id="done-0"), message(action="status", id="dead-0"),
            message(action="dead_list", offset=1, limit=1)])
        self.h.settle()
        self.assertEqual([m.get("state") for m in self.master.inbox[-3:-1]], ["unknown", "unknown"])
        self.assertEqual([e["id"] for e in self.master.inbox[-1]["dead"]], ["dead-2"])
        for n in range(MAX_DETACHED + 1):
            self.submit(f"waits-{n}", job_type="nobody", detach=True)
        self.assertEqual(self.master.inbox[-1]["error"], QUEUE_FULL)
        totals = self.h.service.stats()["totals"]
        self.assertEqual((totals["results_dropped"], totals["dead_dropped"]), (1, 1))
        self.h.finish()


class ProgressScenarioTests(HarnessTestCase):
    """Progress and touch, and the administrative actions of a daemon
    without --admin, scripted through the model."""

    def pause(self, peer):
        peer.paused = True
        self.h.call(f"{peer}.pauseProducing", peer.protocol.pauseProducing)

    def resume(self, peer):
        peer.paused = False
        self.h.acted(peer)
        self.h.call(f"{peer}.resumeProducing", peer.protocol.resumeProducing)
        self.h.settle()

    def test_progress_reaches_the_master_before_the_answer(self):
        slave = self.slave()
        self.submit("1")
        self.h.send(slave, [message(action="progress", done=1, total=2),
                            message(action="progress", id="1", data={"step": ["b"]}),
                            message(action="touch"),
                            message(action="progress", done=Raw("1E+2"), ref=4),
                            message(action="respond", body="done")])
        self.h.settle()
        self.assertEqual(self.master.inbox[1:], [
            {"id": "1", "progress": {"done": 1, "total": 2}},
            {"id": "1", "progress": {"data": {"step": ["b"]}}},
            {"id": "1", "progress": {"done": 100.0}},
            {"id": "1", "body": "done"}])
        self.assertEqual(slave.inbox[-4:], [{"ok": True}, {"ok": True}, {"ok": True, "ref": 4},
                                            {"ok": True}])
        self.h.finish()

    def test_refusals(self):
        slave = self.slave()
        self.h.send(slave, [message(action="progress", done=1), message(action="touch", id="1")])
        self.submit("1")
        self.h.send(slave, [message(action="progress", id="2", done=1), message(action="progress"),
                            message(action="progress", id="1", done=-1),
                            message(action="progress", total=True), message(action="touch", id=""),
                            message(action="progress", done=Raw("1e400"))])
        self.h.settle()
        self.h.send(self.master, [message(action="cancel", id="1")])
        self.h.settle()
        self.h.send(slave, [message(action="progress", done=2), message(action="touch", id="1")])
        self.h.settle()
        self.assertEqual([m.get("error", "ok") for m in slave.inbox[1:] if "action" not in m], [
            NOT_PROCESSING, NOT_PROCESSING, WRONG_JOB, INVALID_MESSAGE, INVALID_MESSAGE,
            INVALID_MESSAGE, INVALID_MESSAGE, INVALID_MESSAGE, WITHDRAWN, WITHDRAWN])
        self.assertEqual([m for m in self.master.inbox if "progress" in m], [])
        self.h.send(slave, [message(action="respond", body="dropped")])
        self.h.finish()

    def test_a_master_that_does_not_read_hears_the_latest_progress(self):
        slave = self.slave()
        self.submit("1")
        self.submit("2")
        self.pause(self.master)
        self.h.send(slave, [message(action="progress", done=n) for n in (1, 2, 3)])
        self.h.settle()
        self.assertEqual([m for m in self.master.inbox if "progress" in m], [])
        self.resume(self.master)
        self.assertEqual([m for m in self.master.inbox if "progress" in m],
                         [{"id": "1", "progress": {"done": 3}}])
        self.pause(self.master)
        self.h.send(slave, [message(action="progress", total=9), message(action="respond", body=1)])
        self.h.settle()
        self.assertEqual(self.master.inbox[-2:], [{"id": "1", "progress": {"total": 9}},
                                                  {"id": "1", "body": 1}])
        self.assertEqual(self.h.service.stats()["totals"]["progress_replaced"], 2)
        self.resume(self.master)
        self.h.finish()

    def test_touch_and_progress_keep_a_detached_attempt_alive(self):
        slave = self.slave()
        self.submit("d", detach=True, timeout=1)
        self.h.advance(0.75)
        self.h.send(slave, [message(action="touch")])
        self.h.settle()
        self.h.advance(0.75)  # past the first deadline, within the new one
        self.h.send(slave, [message(action="progress", done=1, data="half")])
        self.h.settle()
        self.h.advance(0.75)
        self.h.send(self.master, [message(action="status", id="d")])
        self.h.settle()
        self.assertEqual(self.master.inbox[-1], {
            "ok": True, "id": "d", "state": "running", "detached": True, "type": "t", "priority": 0,
            "attempts": 1, "progress": {"done": 1, "data": "half"}})
        self.h.advance(0.25)  # given up: retried after its backoff, its progress kept
        self.h.send(slave, [message(action="touch")])
        self.h.send(self.master, [message(action="status", id="d")])
        self.h.settle()
        self.assertEqual(slave.inbox[-1]["error"], TIMED_OUT)
        self.assertEqual((self.master.inbox[-1]["state"], self.master.inbox[-1]["progress"]),
                         ("delayed", {"done": 1, "data": "half"}))
        self.h.finish()

    def test_admin_actions_are_forbidden(self):
        frames = [message(action="pause", type="t"), message(action="resume", type=5),
                  message(action="clear"), message(action="drain", ref=1)]
        self.h.send(self.master, frames)
        slave = self.h.add("slave")
        self.h.send(slave, frames)
        self.h.settle()
        self.assertEqual([m["error"] for m in self.master.inbox], [FORBIDDEN] * 4)
        self.assertEqual([m["error"] for m in slave.inbox], [WRONG_PORT] * 4)
        self.h.finish()


class KnownDefectTests(HarnessTestCase):
    def test_dead_retry_beyond_max_detached(self):
        """README: "The daemon holds at most --max-detached live detached
        jobs (queue_full beyond)": a dead_retry then is refused queue_full
        like a detached submit (it once queued the dead job all the same,
        and the daemon held --max-detached + 1)."""
        slave = self.slave()
        self.submit("dead", detach=True, retries=0)
        self.h.send(slave, [message(action="fail", reason="no")])
        self.h.settle()
        for n in range(MAX_DETACHED):
            self.submit(f"live-{n}", job_type="nobody", detach=True)
        self.h.send(self.master, [message(action="dead_retry", id="dead")])
        self.h.settle()
        self.h.check_state()
        self.h.finish()

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
        self.h.advance(1)
        self.h.send(slave, [message(action="respond", body="late")])
        self.h.settle()
        self.h.finish()

    def test_ids_and_types_over_1024_bytes(self):
        for job_id, job_type in (("x" * 1025, "t"), ("\xe9" * 513, "t"), ("1", "t" * 1025),
                                 ("y" * 30000, "t")):
            self.submit(job_id, job_type)
        self.h.finish()
