"""The figures behind the dashboard's graphs: per-second counts of the
last 15 minutes, and per type the recent answer and failure rates and
latencies.

Nothing here runs per job: the graphs are made by sampling the
scheduler's running totals once a second, and the per-type rates and
latencies by sampling the latency histogram ``/metrics`` keeps anyway
(its counts per bucket, ten seconds apart); only a failed job costs a
counter.  Memory is bounded by the window, whatever the load.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Deque, Dict, List, Optional, Tuple

from twisted.internet.task import LoopingCall

DEFAULT_SECONDS = 900
"""How many seconds the graphs cover (15 minutes)."""

RATE_SECONDS = 10
"""Over how many seconds a type's answer and failure rates are averaged."""



class Series:
    """Samples a scheduler once a second into rings of per-second counts
    (answered, failed, submitted, and the queue depth at that moment), and
    per type the latency histogram's counts, from which its rates and
    percentiles are read.

    Wire `failed` and `forget` to the scheduler's ``on_failure`` and
    ``on_type_unused`` hooks (the daemon does), then `start` it.
    """

    def __init__(self, clock: Any, scheduler: Any, latency: Any = None,
                 seconds: int = DEFAULT_SECONDS):
        """
        :param clock: what samples are timed and scheduled with (the reactor).
        :param scheduler: the daemon's `gloom.scheduler.Scheduler`.
        :param latency: the daemon's `gloom.http.LatencyHistogram` (fed by
            the scheduler's ``on_answer``), or None for no per-type figures
            but failures.
        :param seconds: how many one-second samples are kept.
        """
        self.clock = clock
        self.scheduler = scheduler
        self.latency = latency
        self.answered: Deque[int] = deque(maxlen=seconds)
        self.failed_counts: Deque[int] = deque(maxlen=seconds)
        self.submitted: Deque[int] = deque(maxlen=seconds)
        self.depth: Deque[int] = deque(maxlen=seconds)
        self.end: Optional[float] = None
        self._last: Optional[tuple] = None
        self._failed: Dict[str, int] = {}
        # Each second's running counts per type: (answered, failed, buckets).
        self._history: Deque[tuple] = deque(maxlen=RATE_SECONDS + 1)
        self._loop = LoopingCall(self.sample)
        self._loop.clock = clock

    # --- the scheduler's hooks --------------------------------------------

    def failed(self, job_type: str) -> None:
        """A job of ``job_type`` ended failed."""
        self._failed[job_type] = self._failed.get(job_type, 0) + 1

    def forget(self, job_type: str) -> None:
        """The type has no jobs and no slaves left: drop its figures."""
        self._failed.pop(job_type, None)

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
        answered = self._histogram()
        failed = self._failed
        self._history.append((self.end, {
            name: (count, failed.get(name, 0), buckets)
            for name, (count, buckets) in answered.items()} | {
            name: (0, count, ()) for name, count in failed.items() if name not in answered}))

    def _histogram(self) -> Dict[str, Tuple[int, Tuple[Tuple[float, float], ...]]]:
        """Per type: answers counted, and the cumulative count per bucket
        as ``(upper bound, count)`` pairs."""
        if self.latency is None:
            return {}
        found: Dict[str, list] = {}
        for family in self.latency.histogram.collect():
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    found.setdefault(sample.labels["type"], []).append(
                        (float(sample.labels["le"]), sample.value))
        return {name: (int(buckets[-1][1]), tuple(buckets)) for name, buckets in found.items()}

    # --- reading ------------------------------------------------------------

    def snapshot(self) -> Dict[str, Any]:
        """The graphs: one count per second, oldest first, the last one
        for the second that ended at ``end`` (a Unix time)."""
        return {"interval": 1, "end": self.end, "answered": list(self.answered),
                "failed": list(self.failed_counts), "submitted": list(self.submitted),
                "depth": list(self.depth)}

    def type_figures(self) -> Dict[str, Dict[str, Optional[float]]]:
        """Per type seen lately: answers and failures per second and the
        latency percentiles (in milliseconds, read from the histogram's
        buckets) of its answers, over the last `RATE_SECONDS` seconds
        sampled; percentiles are None for a type with no answer then."""
        figures: Dict[str, Dict[str, Optional[float]]] = {}
        if len(self._history) < 2:
            return figures
        (first_at, first), (last_at, last) = self._history[0], self._history[-1]
        span = last_at - first_at
        for name, (answered, failed, buckets) in last.items():
            was = first.get(name, (0, 0, ()))
            before = dict(was[2])
            recent = [(bound, count - before.get(bound, 0)) for bound, count in buckets]
            figures[name] = {"answered_per_s": round((answered - was[0]) / span, 3),
                             "failed_per_s": round((failed - was[1]) / span, 3),
                             "p50_ms": _percentile(recent, 0.50),
                             "p99_ms": _percentile(recent, 0.99)}
        return figures


def _percentile(buckets: List[Tuple[float, float]], fraction: float) -> Optional[float]:
    """The latency below which ``fraction`` of the answers fell, in
    milliseconds, from cumulative ``(upper bound, count)`` buckets:
    interpolated within the bucket it falls in (the open last bucket
    gives its lower bound)."""
    if not buckets or not buckets[-1][1]:
        return None
    wanted = fraction * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= wanted:
            if bound == float("inf"):
                return round(lower * 1000, 3)
            share = (wanted - below) / (count - below) if count > below else 1.0
            return round((lower + (bound - lower) * share) * 1000, 3)
        lower, below = bound, count
    return round(lower * 1000, 3)
