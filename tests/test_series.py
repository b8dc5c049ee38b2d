"""The dashboard's figures: per-second samples of a real scheduler on a
`Clock`, and per-type rates and latency percentiles."""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from prometheus_client import CollectorRegistry

from gloom.http import LatencyHistogram
from gloom.scheduler import Scheduler
from gloom.series import RATE_SECONDS, Series
from tests.test_scheduler import Answer


class Slave:
    peer = "test"

    def __init__(self):
        self.jobs = []

    def job_assigned(self, job):
        self.jobs.append(job)


class SeriesTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.scheduler = Scheduler(clock=self.clock, max_retries=0)
        self.latency = LatencyHistogram(CollectorRegistry())
        self.series = Series(self.clock, self.scheduler, self.latency, seconds=5)
        self.scheduler.on_answer = self.latency.observe
        self.scheduler.on_failure = self.series.failed

        def unused(job_type):
            self.latency.forget(job_type)
            self.series.forget(job_type)

        self.scheduler.on_type_unused = unused
        self.series.start()
        self.addCleanup(self.series.stop)
        self.slave = Slave()
        self.scheduler.join(self.slave, "t")

    def submit(self, count, job_type="t"):
        owners = []
        for n in range(count):
            owner = Answer(self.scheduler)
            owner.job = self.scheduler.submit(owner, f"j{len(owners)}-{n}", job_type, None)
            owners.append(owner)
        return owners

    def answer(self, count, body="ok"):
        for _ in range(count):
            self.scheduler.want_job(self.slave)
            job = self.slave.jobs.pop()
            self.scheduler.complete(self.slave, job, body)

    def fail(self, slave, count):
        """``slave`` takes ``count`` jobs of its type, and fails each."""
        for _ in range(count):
            self.scheduler.want_job(slave)
            self.scheduler.fail(slave, slave.jobs.pop(), "no")

    def failed_once(self, job_type):
        """A new slave of ``job_type``, which failed one job of it."""
        slave = Slave()
        self.scheduler.join(slave, job_type)
        self.submit(1, job_type)
        self.fail(slave, 1)
        return slave

    def test_one_sample_a_second_of_what_happened_in_it(self):
        self.submit(5)
        self.clock.advance(1)  # 5 submitted, none answered, 5 queued
        self.answer(3)
        self.clock.advance(1)
        self.fail(self.slave, 1)
        self.clock.advance(1)
        snapshot = self.series.snapshot()
        self.assertEqual(snapshot["submitted"], [5, 0, 0])
        self.assertEqual(snapshot["answered"], [0, 3, 0])
        self.assertEqual(snapshot["failed"], [0, 0, 1])
        self.assertEqual(snapshot["depth"], [5, 2, 1])
        self.assertEqual((snapshot["interval"], snapshot["end"]), (1, 3.0))

    def test_the_window_is_bounded(self):
        for second in range(12):
            self.submit(second)
            self.clock.advance(1)
        snapshot = self.series.snapshot()
        self.assertEqual(snapshot["submitted"], [7, 8, 9, 10, 11])
        self.assertEqual(len(snapshot["depth"]), 5)

    def test_type_rates_over_the_last_seconds(self):
        for _ in range(RATE_SECONDS):
            self.submit(4)
            self.answer(4)
            self.clock.advance(1)
        figures = self.series.type_figures()["t"]
        self.assertEqual((figures["answered_per_s"], figures["failed_per_s"]), (4.0, 0.0))
        for _ in range(RATE_SECONDS + 1):
            self.clock.advance(1)  # idle: the rate decays to nothing
        self.assertEqual(self.series.type_figures()["t"]["answered_per_s"], 0.0)

    def test_latency_percentiles_from_the_histogram_buckets(self):
        self.clock.advance(1)  # the first sample
        for n in range(100):
            self.submit(1)
            self.clock.advance(0.0001 * (n + 1))  # 0.1 ms .. 10 ms in the queue
            self.answer(1)
        self.clock.advance(1)
        figures = self.series.type_figures()["t"]
        # Interpolated within the histogram's buckets (1, 2.5, 5, 10 ms ...).
        self.assertTrue(2.5 <= figures["p50_ms"] <= 5, figures)
        self.assertTrue(5 <= figures["p99_ms"] <= 10, figures)

    def test_percentiles_are_of_the_recent_answers(self):
        self.clock.advance(1)
        for _ in range(50):
            self.submit(1)
            self.clock.advance(0.2)  # slow answers first
            self.answer(1)
        for _ in range(RATE_SECONDS + 1):
            self.clock.advance(1)
        for _ in range(50):
            self.submit(1)
            self.answer(1)  # then instant ones
        self.clock.advance(1)
        self.assertLessEqual(self.series.type_figures()["t"]["p99_ms"], 1.0)
        for _ in range(RATE_SECONDS + 1):
            self.clock.advance(1)
        self.assertIsNone(self.series.type_figures()["t"]["p50_ms"])  # none answered lately

    def test_failures_by_type(self):
        other = self.failed_once("u")
        self.clock.advance(1)  # the first sample: a rate needs two
        self.assertEqual(self.series.type_figures(), {})
        self.submit(2, "u")
        self.fail(other, 2)
        self.clock.advance(1)
        figures = self.series.type_figures()["u"]
        self.assertEqual((figures["failed_per_s"], figures["answered_per_s"], figures["p50_ms"]),
                         (2.0, 0.0, None))

    def test_a_type_gone_is_forgotten(self):
        other = self.failed_once("u")
        self.clock.advance(1)
        self.clock.advance(1)
        self.assertIn("u", self.series.type_figures())
        self.scheduler.leave(other)
        self.clock.advance(1)
        self.assertNotIn("u", self.series.type_figures())

    def test_nothing_sampled_before_start(self):
        series = Series(self.clock, self.scheduler)
        self.clock.advance(5)
        self.assertEqual(series.snapshot(), {"interval": 1, "end": None, "answered": [], "failed": [],
                                             "submitted": [], "depth": []})
