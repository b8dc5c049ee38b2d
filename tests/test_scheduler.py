"""The scheduler alone: no reactor, no sockets, no JSON."""

from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from gloom.scheduler import (
    ENDED,
    AttemptGivenUp,
    QUEUED,
    RUNNING,
    DuplicateJobId,
    JobFailed,
    Scheduler,
    ShuttingDown,
)


class Outcome:
    """Records how a Deferred fired."""

    def __init__(self, deferred):
        self.results, self.failures = [], []
        deferred.addCallbacks(self.results.append, self.failures.append)

    @property
    def fired(self):
        return bool(self.results or self.failures)


def take(scheduler, job_type):
    """The job an idle slave of this type gets now, or None."""
    jobs = []
    waiting = scheduler.next_job(job_type)
    waiting.addCallback(jobs.append)
    if not jobs:
        waiting.cancel()
        waiting.addErrback(lambda f: f.trap(CancelledError))
        return None
    return jobs[0]


class QueueOrderTests(SynchronousTestCase):
    def setUp(self):
        self.scheduler = Scheduler(clock=Clock())

    def drain(self, job_type):
        ids = []
        while True:
            job = take(self.scheduler, job_type)
            if job is None:
                return ids
            ids.append(job.id)

    def test_higher_priority_first_then_oldest(self):
        for job_id, priority in [("a", 0), ("b", 5), ("c", 0), ("d", -3), ("e", 5), ("f", 10**20),
                                 ("g", -10**30), ("h", -1)]:
            self.scheduler.submit(job_id, "t", None, priority)
        self.assertEqual(self.drain("t"), ["f", "b", "e", "a", "c", "h", "d", "g"])

    def test_types_are_separate(self):
        self.scheduler.submit("x1", "x", None)
        self.scheduler.submit("y1", "y", None, 100)
        self.assertEqual(self.drain("x"), ["x1"])
        self.assertEqual(self.scheduler.queued("y"), 1)
        self.assertEqual(self.drain("y"), ["y1"])

    def test_take_hands_over_a_queued_job_without_waiting(self):
        self.assertIsNone(self.scheduler.take("t"))
        self.scheduler.submit("a", "t", None, 1)
        self.scheduler.submit("b", "t", None, 2)
        job = self.scheduler.take("t")
        self.assertEqual((job.id, job.state, job.attempt), ("b", RUNNING, 1))
        self.assertEqual(self.scheduler.types()["t"], {"queued": 1, "running": 1, "idle_slaves": 0, "busy_slaves": 1})
        self.assertEqual(self.scheduler.idle_slaves("t"), 0)

    def test_submit_reaches_a_waiting_slave_at_once(self):
        got = Outcome(self.scheduler.next_job("t"))
        self.assertFalse(got.fired)
        self.scheduler.submit("a", "t", "body")
        (job,) = got.results
        self.assertEqual((job.id, job.type, job.body, job.state), ("a", "t", "body", RUNNING))
        self.assertEqual(self.scheduler.queued("t"), 0)

    def test_idle_slaves_served_in_arrival_order(self):
        first, second = Outcome(self.scheduler.next_job("t")), Outcome(self.scheduler.next_job("t"))
        self.assertEqual(self.scheduler.idle_slaves("t"), 2)
        self.scheduler.submit("a", "t", None)
        self.assertTrue(first.fired)
        self.assertFalse(second.fired)
        self.scheduler.submit("b", "t", None)
        self.assertEqual(second.results[0].id, "b")
        self.assertEqual(self.scheduler.idle_slaves("t"), 0)

    def test_cancelled_slave_gets_nothing(self):
        gone = self.scheduler.next_job("t")
        gone.addErrback(lambda f: f.trap(CancelledError))
        gone.cancel()
        self.assertEqual(self.scheduler.idle_slaves("t"), 0)
        self.scheduler.submit("a", "t", None)
        self.assertEqual(self.scheduler.queued("t"), 1)

    def test_cancelled_queued_jobs_leave_the_queue(self):
        answers = {i: self.scheduler.submit(str(i), "t", None, i % 7) for i in range(1000)}
        for i in range(1000):
            if i % 3:
                answers[i].addErrback(lambda f: f.trap(CancelledError))
                answers[i].cancel()
        kept = [i for i in range(1000) if i % 3 == 0]
        self.assertEqual(self.scheduler.queued("t"), len(kept))
        expected = [str(i) for i in sorted(kept, key=lambda i: (-(i % 7), i))]
        self.assertEqual(self.drain("t"), expected)

    def test_empty_types_are_forgotten(self):
        answer = self.scheduler.submit("a", "t", None)
        answer.addErrback(lambda f: f.trap(CancelledError))
        answer.cancel()
        waiting = self.scheduler.next_job("u")
        waiting.addErrback(lambda f: f.trap(CancelledError))
        waiting.cancel()
        self.assertEqual((self.scheduler._queues, self.scheduler._idle), ({}, {}))


class JobLifeTests(SynchronousTestCase):
    def setUp(self):
        self.scheduler = Scheduler(max_retries=2, clock=Clock())

    def test_answer_reaches_the_master_and_frees_the_id(self):
        answer = Outcome(self.scheduler.submit("a", "t", "in"))
        job = take(self.scheduler, "t")
        self.assertIn("a", self.scheduler)
        self.scheduler.complete(job, job.attempt, "out")
        self.assertEqual(answer.results, ["out"])
        self.assertNotIn("a", self.scheduler)
        self.assertEqual(job.state, ENDED)

    def test_duplicate_id_refused_while_queued_or_running(self):
        self.scheduler.submit("a", "t", None)
        self.assertRaises(DuplicateJobId, self.scheduler.submit, "a", "other", None)
        job = take(self.scheduler, "t")
        self.assertRaises(DuplicateJobId, self.scheduler.submit, "a", "t", None)
        self.scheduler.complete(job, job.attempt, None)
        self.scheduler.submit("a", "t", None)
        self.assertEqual(self.scheduler.queued("t"), 1)

    def test_failed_job_errbacks_without_retry(self):
        answer = Outcome(self.scheduler.submit("a", "t", None))
        job = take(self.scheduler, "t")
        self.scheduler.fail(job, job.attempt, "boom")
        (failure,) = answer.failures
        self.assertIsInstance(failure.value, JobFailed)
        self.assertEqual(failure.value.reason, "boom")
        self.assertNotIn("a", self.scheduler)
        self.assertIsNone(take(self.scheduler, "t"))

    def test_withdrawn_queued_job_frees_its_id(self):
        answer = self.scheduler.submit("a", "t", None)
        answer.addErrback(lambda f: f.trap(CancelledError))
        answer.cancel()
        self.assertNotIn("a", self.scheduler)
        self.assertEqual(self.scheduler.queued("t"), 0)
        self.assertIsNone(take(self.scheduler, "t"))

    def test_withdrawn_running_job_finishes_and_its_answer_is_dropped(self):
        answer = self.scheduler.submit("a", "t", None)
        failures = []
        answer.addErrback(failures.append)
        job = take(self.scheduler, "t")
        answer.cancel()
        self.assertTrue(failures[0].check(CancelledError))
        self.assertIn("a", self.scheduler)
        self.assertRaises(DuplicateJobId, self.scheduler.submit, "a", "t", None)
        self.scheduler.complete(job, job.attempt, "late")
        self.assertNotIn("a", self.scheduler)

    def test_released_job_goes_ahead_of_later_jobs_of_its_priority(self):
        self.scheduler.submit("a", "t", None)
        job = take(self.scheduler, "t")
        self.scheduler.submit("b", "t", None)
        self.scheduler.submit("c", "t", None, 1)
        self.scheduler.release(job, job.attempt)
        self.assertEqual(job.state, QUEUED)
        self.assertEqual(job.retries, 1)
        self.assertEqual([take(self.scheduler, "t").id for _ in range(3)], ["c", "a", "b"])

    def test_released_job_goes_to_a_waiting_slave(self):
        self.scheduler.submit("a", "t", None)
        job = take(self.scheduler, "t")
        other = Outcome(self.scheduler.next_job("t"))
        self.scheduler.release(job, job.attempt)
        self.assertIs(other.results[0], job)

    def test_retries_run_out(self):
        answer = Outcome(self.scheduler.submit("a", "t", None))
        attempts = 0
        while not answer.fired:
            job = take(self.scheduler, "t")
            attempts += 1
            self.scheduler.release(job, job.attempt)
        self.assertEqual(attempts, 3)
        failure = answer.failures[0]
        self.assertIsInstance(failure.value, JobFailed)
        self.assertIn("3 attempts", failure.value.reason)
        self.assertNotIn("a", self.scheduler)
        self.assertIsNone(take(self.scheduler, "t"))

    def test_no_retries(self):
        scheduler = Scheduler(max_retries=0, clock=Clock())
        answer = Outcome(scheduler.submit("a", "t", None))
        job = take(scheduler, "t")
        scheduler.release(job, job.attempt)
        self.assertIsInstance(answer.failures[0].value, JobFailed)

    def test_released_job_of_a_departed_master_ends(self):
        answer = self.scheduler.submit("a", "t", None)
        answer.addErrback(lambda f: f.trap(CancelledError))
        job = take(self.scheduler, "t")
        answer.cancel()
        self.scheduler.release(job, job.attempt)
        self.assertNotIn("a", self.scheduler)
        self.assertEqual(self.scheduler.queued("t"), 0)


class StopTests(SynchronousTestCase):
    def test_stop_fails_every_unfinished_job(self):
        scheduler = Scheduler(clock=Clock())
        scheduler.startService()
        queued = Outcome(scheduler.submit("q", "t", None))
        running = Outcome(scheduler.submit("r", "u", None))
        job = take(scheduler, "u")
        idle = Outcome(scheduler.next_job("v"))
        scheduler.stopService()
        for outcome in (queued, running):
            self.assertIsInstance(outcome.failures[0].value, ShuttingDown)
        self.assertTrue(idle.failures[0].check(CancelledError))
        self.assertRaises(ShuttingDown, scheduler.submit, "n", "t", None)
        scheduler.complete(job, job.attempt, "late")
        self.assertNotIn("r", scheduler)
        self.assertEqual(scheduler.types(), {})


class TimeoutTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.scheduler = Scheduler(max_retries=1, clock=self.clock)

    def test_attempt_past_its_timeout_is_retried_elsewhere(self):
        answer = Outcome(self.scheduler.submit("a", "t", "in", timeout=2.5))
        slow = take(self.scheduler, "t")
        slow_attempt = slow.attempt
        self.clock.advance(2.4)
        self.assertEqual(self.scheduler.queued("t"), 0)
        self.clock.advance(0.1)
        self.assertEqual(self.scheduler.queued("t"), 1)
        self.assertEqual(self.scheduler.totals["timed_out"], 1)
        self.assertEqual(self.scheduler.types()["t"], {"queued": 1, "running": 0, "idle_slaves": 0, "busy_slaves": 1})
        fast = take(self.scheduler, "t")
        self.assertIs(fast, slow)
        self.assertRaises(AttemptGivenUp, self.scheduler.complete, slow, slow_attempt, "late")
        self.assertFalse(answer.fired)
        self.scheduler.complete(fast, fast.attempt, "on time")
        self.assertEqual(answer.results, ["on time"])
        self.assertEqual(self.scheduler.types(), {})

    def test_last_attempt_timing_out_fails_the_job(self):
        answer = Outcome(self.scheduler.submit("a", "t", None, timeout=1))
        for _ in range(2):
            take(self.scheduler, "t")
            self.clock.advance(1)
        failure = answer.failures[0].value
        self.assertIsInstance(failure, JobFailed)
        self.assertTrue(failure.reason.startswith("timeout"), failure.reason)
        self.assertIn("2 attempts", failure.reason)
        self.assertNotIn("a", self.scheduler)
        self.assertEqual(self.scheduler.totals["timed_out"], 2)
        self.assertEqual(self.scheduler.totals["failed"], 1)

    def test_answer_in_time_cancels_the_timer(self):
        answer = Outcome(self.scheduler.submit("a", "t", None, timeout=1))
        job = take(self.scheduler, "t")
        self.scheduler.complete(job, job.attempt, "done")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(answer.results, ["done"])

    def test_queued_time_does_not_count(self):
        answer = Outcome(self.scheduler.submit("a", "t", None, timeout=1))
        self.clock.advance(100)
        job = take(self.scheduler, "t")
        self.clock.advance(0.9)
        self.scheduler.complete(job, job.attempt, "done")
        self.assertEqual(answer.results, ["done"])

    def test_default_timeout_and_its_override(self):
        scheduler = Scheduler(max_retries=0, clock=self.clock, default_timeout=5)
        defaulted = Outcome(scheduler.submit("d", "t", None))
        own = Outcome(scheduler.submit("o", "t", None, timeout=50))
        take(scheduler, "t")
        take(scheduler, "t")
        self.clock.advance(5)
        self.assertTrue(defaulted.fired)
        self.assertFalse(own.fired)

    def test_late_failure_and_late_departure(self):
        Outcome(self.scheduler.submit("a", "t", None, timeout=1))
        job = take(self.scheduler, "t")
        first = job.attempt
        self.clock.advance(1)
        self.assertRaises(AttemptGivenUp, self.scheduler.fail, job, first, "too late")
        second = take(self.scheduler, "t")
        self.scheduler.release(second, first)
        self.assertEqual(job.state, RUNNING)
        self.assertEqual(self.scheduler.totals["retried"], 1)

    def test_withdrawn_running_job_frees_its_id_at_timeout(self):
        answer = self.scheduler.submit("a", "t", None, timeout=1)
        answer.addErrback(lambda f: f.trap(CancelledError))
        job = take(self.scheduler, "t")
        answer.cancel()
        self.clock.advance(1)
        self.assertNotIn("a", self.scheduler)
        self.assertEqual(self.scheduler.queued("t"), 0)
        self.assertRaises(AttemptGivenUp, self.scheduler.complete, job, 1, "late")


class FigureTests(SynchronousTestCase):
    def test_totals_add_up(self):
        clock = Clock()
        scheduler = Scheduler(max_retries=1, clock=clock)
        answered = []
        scheduler.on_answer = lambda job_type, seconds: answered.append((job_type, seconds))
        for i in range(6):
            Outcome(scheduler.submit(str(i), "t", None))
        clock.advance(3)
        job = take(scheduler, "t")
        scheduler.complete(job, job.attempt, "ok")
        job = take(scheduler, "t")
        scheduler.fail(job, job.attempt, "no")
        job = take(scheduler, "t")
        scheduler.release(job, job.attempt)
        job = take(scheduler, "t")
        scheduler.release(job, job.attempt)
        queued = scheduler.submit("q", "t", None)
        queued.addErrback(lambda f: f.trap(CancelledError))
        queued.cancel()
        take(scheduler, "t")
        self.assertEqual(scheduler.totals, {"submitted": 7, "completed": 1, "failed": 2, "cancelled": 1,
                                            "retried": 1, "timed_out": 0})
        self.assertEqual(answered, [("t", 3.0)])
        self.assertEqual(scheduler.types(), {"t": {"queued": 2, "running": 1, "idle_slaves": 0, "busy_slaves": 1}})
        self.assertEqual(len(scheduler), 3)
