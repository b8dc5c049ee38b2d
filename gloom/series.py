"""The figures behind the dashboard's graphs: per-second counts of the
last 15 minutes, and per type the recent answer and failure rates and
latencies.

Nothing here runs per job beyond what the scheduler's ``on_answer`` and
``on_failure`` hooks already cost (a counter and a slot in a ring of
floats): the graphs are made by sampling the scheduler's running totals
once a second, so their memory is bounded by the window, whatever the
load.
"""

from __future__ import annotations

from array import array
from collections import deque
from typing import Any, Deque, Dict, List, Optional

from twisted.internet.task import LoopingCall

DEFAULT_SECONDS = 900
"""How many seconds the graphs cover (15 minutes)."""

RATE_SECONDS = 10
"""Over how many seconds a type's answer and failure rates are averaged."""

LATENCY_SAMPLES = 512
"""How many of a type's latest answers its latency percentiles are read from."""


class _TypeFigures:
    """One type's running counts and its latest latencies, in a ring."""

    __slots__ = ("answered", "failed", "latencies", "next", "filled")

    def __init__(self) -> None:
        self.answered = 0
        self.failed = 0
        self.latencies = array("d", bytes(8 * LATENCY_SAMPLES))
        self.next = 0
        self.filled = 0

    def observe(self, seconds: float) -> None:
        self.answered += 1
        self.latencies[self.next] = seconds
        self.next = (self.next + 1) % LATENCY_SAMPLES
        if self.filled < LATENCY_SAMPLES:
            self.filled += 1

    def percentiles(self) -> Dict[str, Optional[float]]:
        if not self.filled:
            return {"p50_ms": None, "p99_ms": None}
        ordered = sorted(self.latencies[:self.filled])
        last = len(ordered) - 1
        return {"p50_ms": round(ordered[int(last * 0.50)] * 1000, 3),
                "p99_ms": round(ordered[int(last * 0.99)] * 1000, 3)}


class Series:
    """Samples a scheduler once a second into rings of per-second counts
    (answered, failed, submitted, and the queue depth at that moment), and
    keeps per type the counts and latencies its rates and percentiles are
    read from.

    Wire `observe`, `failed` and `forget` to the scheduler's
    ``on_answer``, ``on_failure`` and ``on_type_unused`` hooks (the daemon
    does), then `start` it.
    """

    def __init__(self, clock: Any, scheduler: Any, seconds: int = DEFAULT_SECONDS):
        """
        :param clock: what samples are timed and scheduled with (the reactor).
        :param scheduler: the daemon's `gloom.scheduler.Scheduler`.
        :param seconds: how many one-second samples are kept.
        """
        self.clock = clock
        self.scheduler = scheduler
        self.answered: Deque[int] = deque(maxlen=seconds)
        self.failed_counts: Deque[int] = deque(maxlen=seconds)
        self.submitted: Deque[int] = deque(maxlen=seconds)
        self.depth: Deque[int] = deque(maxlen=seconds)
        self.end: Optional[float] = None
        self._last: Optional[tuple] = None
        self._types: Dict[str, _TypeFigures] = {}
        # Each second's running counts per type, for the rates.
        self._history: Deque[tuple] = deque(maxlen=RATE_SECONDS + 1)
        self._loop = LoopingCall(self.sample)
        self._loop.clock = clock

    # --- the scheduler's hooks --------------------------------------------

    def observe(self, job_type: str, seconds: float) -> None:
        """A job of ``job_type`` was answered, ``seconds`` after its submit."""
        figures = self._types.get(job_type)
        if figures is None:
            figures = self._types[job_type] = _TypeFigures()
        figures.observe(seconds)

    def failed(self, job_type: str) -> None:
        """A job of ``job_type`` ended failed."""
        figures = self._types.get(job_type)
        if figures is None:
            figures = self._types[job_type] = _TypeFigures()
        figures.failed += 1

    def forget(self, job_type: str) -> None:
        """The type has no jobs and no slaves left: drop its figures."""
        self._types.pop(job_type, None)

    # --- sampling -----------------------------------------------------------

    def start(self) -> None:
        """Sample once a second from now on."""
        if not self._loop.running:
            self._last = self._totals()
            self._loop.start(1.0, now=False)

    def stop(self) -> None:
        """Stop sampling."""
        if self._loop.running:
            self._loop.stop()

    def _totals(self) -> tuple:
        totals = self.scheduler.totals
        return totals["completed"], totals["failed"], totals["submitted"]

    def sample(self) -> None:
        """Take this second's sample (called once a second once started)."""
        now = self._totals()
        last = self._last if self._last is not None else now
        self.answered.append(now[0] - last[0])
        self.failed_counts.append(now[1] - last[1])
        self.submitted.append(now[2] - last[2])
        self.depth.append(self.scheduler.queued_total())
        self._last = now
        self.end = self.clock.seconds()
        self._history.append((self.end, {name: (figures.answered, figures.failed)
                                         for name, figures in self._types.items()}))

    # --- reading ------------------------------------------------------------

    def snapshot(self) -> Dict[str, Any]:
        """The graphs: one count per second, oldest first, the last one
        for the second that ended at ``end`` (a Unix time)."""
        return {"interval": 1, "end": self.end, "answered": list(self.answered),
                "failed": list(self.failed_counts), "submitted": list(self.submitted),
                "depth": list(self.depth)}

    def type_figures(self) -> Dict[str, Dict[str, Optional[float]]]:
        """Per type seen lately: answers and failures per second (over the
        last `RATE_SECONDS` seconds sampled) and the latency percentiles of
        its latest `LATENCY_SAMPLES` answers, in milliseconds."""
        rates: Dict[str, List[float]] = {}
        if len(self._history) >= 2:
            (first_at, first), (last_at, last) = self._history[0], self._history[-1]
            span = last_at - first_at
            if span > 0:
                for name, (answered, failed) in last.items():
                    was = first.get(name, (0, 0))
                    rates[name] = [round((answered - was[0]) / span, 3),
                                   round((failed - was[1]) / span, 3)]
        figures = {}
        for name, kept in self._types.items():
            answered, failed = rates.get(name, (0.0, 0.0))
            figures[name] = {"answered_per_s": answered, "failed_per_s": failed,
                             **kept.percentiles()}
        return figures
