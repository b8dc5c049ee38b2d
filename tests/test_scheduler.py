"""The scheduler alone: no reactor, no sockets, no JSON."""

import random

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from zope.interface import implementer
from zope.interface.verify import verifyObject

from gloom.scheduler import (
    ENDED,
    QUEUED,
    RUNNING,
    AttemptGivenUp,
    IJobOwner,
    ISlave,
    JobFailed,
    Scheduler,
    ShuttingDown,
)
from tests.support import live_ids


@implementer(IJobOwner)
class Answer:
    """A job's owner that records how the job ended."""

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.job = None
        self.results, self.failures, self.progress = [], [], []

    def job_answered(self, job, body):
        assert job is self.job
        self.results.append(body)

    def job_failed(self, job, error):
        assert job is self.job
        self.failures.append(error)

    def job_progress(self, job, report):
        assert job is self.job
        self.progress.append(report)

    @property
    def fired(self):
        return bool(self.results or self.failures)

    def cancel(self):
        self.scheduler.cancel(self.job)


def submit(scheduler, *args, **kwargs):
    """Submit a job owned by a new `Answer`, and return the Answer."""
    answer = Answer(scheduler)
    answer.job = scheduler.submit(answer, *args, **kwargs)
    return answer


@implementer(ISlave)
class Slave:
    """A slave as the scheduler sees it: records the jobs it is handed."""

    def __init__(self, scheduler, name="slave"):
        self.scheduler = scheduler
        self.peer = name
        self.results = []

    def job_assigned(self, job):
        self.results.append(job)

    @property
    def fired(self):
        return bool(self.results)

    def ask(self):
        self.scheduler.want_job(self)
        return self

    def cancel(self):
        self.scheduler.stop_waiting(self)


def waiting(scheduler, job_type):
    """A new slave of this type that asked for a job."""
    slave = Slave(scheduler)
    scheduler.join(slave, job_type)
    return slave.ask()


def take(scheduler, job_type):
    """The job a new slave of this type gets now (its ``holder``), or None."""
    slave = waiting(scheduler, job_type)
    if not slave.results:
        slave.cancel()
        return None
    return slave.results[0]


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
            submit(self.scheduler, job_id, "t", None, priority)
        self.assertEqual(self.drain("t"), ["f", "b", "e", "a", "c", "h", "d", "g"])

    def test_types_are_separate(self):
        submit(self.scheduler, "x1", "x", None)
        submit(self.scheduler, "y1", "y", None, 100)
        self.assertEqual(self.drain("x"), ["x1"])
        self.assertEqual(self.scheduler.queued("y"), 1)
        self.assertEqual(self.drain("y"), ["y1"])

    def test_a_queued_job_is_handed_over_without_waiting(self):
        self.assertIsNone(take(self.scheduler, "t"))
        submit(self.scheduler, "a", "t", None, 1)
        submit(self.scheduler, "b", "t", None, 2)
        slave = Slave(self.scheduler)
        self.scheduler.join(slave, "t")
        (job,) = slave.ask().results
        self.assertEqual((job.id, job.state, job.attempt, job.holder), ("b", RUNNING, 1, slave))
        self.assertEqual(self.scheduler.types()["t"], {"queued": 1, "delayed": 0, "running": 1, "idle_slaves": 0, "busy_slaves": 1, "paused": False})
        self.assertEqual(self.scheduler.idle_slaves("t"), 0)

    def test_submit_reaches_a_waiting_slave_at_once(self):
        got = (waiting(self.scheduler, "t"))
        self.assertFalse(got.fired)
        submit(self.scheduler, "a", "t", "body")
        (job,) = got.results
        self.assertEqual((job.id, job.type, job.body, job.state), ("a", "t", "body", RUNNING))
        self.assertEqual(self.scheduler.queued("t"), 0)

    def test_idle_slaves_served_in_arrival_order(self):
        first, second = (waiting(self.scheduler, "t")), (waiting(self.scheduler, "t"))
        self.assertEqual(self.scheduler.idle_slaves("t"), 2)
        submit(self.scheduler, "a", "t", None)
        self.assertTrue(first.fired)
        self.assertFalse(second.fired)
        submit(self.scheduler, "b", "t", None)
        self.assertEqual(second.results[0].id, "b")
        self.assertEqual(self.scheduler.idle_slaves("t"), 0)

    def test_cancelled_slave_gets_nothing(self):
        gone = waiting(self.scheduler, "t")
        gone.cancel()
        self.assertEqual(self.scheduler.idle_slaves("t"), 0)
        submit(self.scheduler, "a", "t", None)
        self.assertEqual(self.scheduler.queued("t"), 1)

    def test_cancelled_queued_jobs_leave_the_queue(self):
        answers = {i: submit(self.scheduler, str(i), "t", None, i % 7) for i in range(1000)}
        for i in range(1000):
            if i % 3:
                answers[i].cancel()
        kept = [i for i in range(1000) if i % 3 == 0]
        self.assertEqual(self.scheduler.queued("t"), len(kept))
        expected = [str(i) for i in sorted(kept, key=lambda i: (-(i % 7), i))]
        self.assertEqual(self.drain("t"), expected)

    def test_order_holds_through_cancels_and_returns(self):
        """Against a model (every live queued job sorted by priority, then
        submission order), through submits, cancels, takes and lost attempts,
        for few priorities (long queues per priority) and many (one each)."""
        for priorities in (3, 10**6):
            scheduler = Scheduler(max_retries=10**6, clock=Clock())
            rng = random.Random(priorities)
            answers, running, order = {}, [], {}
            for step in range(5000):
                roll = rng.random()
                if roll < 0.5:
                    job_id = str(step)
                    order[job_id] = step
                    answers[job_id] = submit(scheduler, job_id, "t", None, rng.randrange(priorities))
                elif roll < 0.65 and answers:
                    job_id = rng.choice(sorted(answers))
                    if answers[job_id].job.state is QUEUED:
                        answers.pop(job_id).cancel()
                elif roll < 0.75 and running:
                    job = running.pop(rng.randrange(len(running)))
                    scheduler.release(job.holder, job)
                else:
                    queued = [a.job for a in answers.values() if a.job.state is QUEUED]
                    expected = min(queued, key=lambda j: (-j.priority, order[j.id]), default=None)
                    job = take(scheduler, "t")
                    self.assertIs(job, expected)
                    if job is not None:
                        running.append(job)
                self.assertEqual(scheduler.queued("t"),
                                 sum(a.job.state is QUEUED for a in answers.values()))

    def test_empty_types_are_forgotten(self):
        answer = submit(self.scheduler, "a", "t", None)
        answer.cancel()
        waiting(self.scheduler, "u").cancel()
        self.assertEqual((self.scheduler._queues, self.scheduler._idle), ({}, {}))


class JobLifeTests(SynchronousTestCase):
    def setUp(self):
        self.scheduler = Scheduler(max_retries=2, clock=Clock())

    def test_answer_reaches_the_master_and_frees_the_id(self):
        answer = submit(self.scheduler, "a", "t", "in")
        job = take(self.scheduler, "t")
        self.assertIn("a", live_ids(self.scheduler))
        self.scheduler.complete(job.holder, job, "out")
        self.assertEqual(answer.results, ["out"])
        self.assertNotIn("a", live_ids(self.scheduler))
        self.assertEqual(job.state, ENDED)

    def test_ids_are_the_owners_business(self):
        """The scheduler tells jobs apart by object, not by id: two owners
        may use one id at once, and each hears only of its own job."""
        first = submit(self.scheduler, "a", "t", "first")
        second = submit(self.scheduler, "a", "t", "second")
        job = take(self.scheduler, "t")
        self.scheduler.complete(job.holder, job, "one")
        job = take(self.scheduler, "t")
        self.scheduler.complete(job.holder, job, "two")
        self.assertEqual((first.results, second.results), (["one"], ["two"]))

    def test_failed_job_errbacks_without_retry(self):
        answer = submit(self.scheduler, "a", "t", None)
        job = take(self.scheduler, "t")
        self.scheduler.fail(job.holder, job, "boom")
        (failure,) = answer.failures
        self.assertIsInstance(failure, JobFailed)
        self.assertEqual(failure.reason, "boom")
        self.assertNotIn("a", live_ids(self.scheduler))
        self.assertIsNone(take(self.scheduler, "t"))

    def test_withdrawn_queued_job_frees_its_id(self):
        answer = submit(self.scheduler, "a", "t", None)
        answer.cancel()
        self.assertNotIn("a", live_ids(self.scheduler))
        self.assertEqual(self.scheduler.queued("t"), 0)
        self.assertIsNone(take(self.scheduler, "t"))

    def test_withdrawn_running_job_finishes_and_its_answer_is_dropped(self):
        answer = submit(self.scheduler, "a", "t", None)
        job = take(self.scheduler, "t")
        answer.cancel()
        self.assertFalse(answer.fired)
        self.assertIn("a", live_ids(self.scheduler))
        self.scheduler.complete(job.holder, job, "late")
        self.assertNotIn("a", live_ids(self.scheduler))

    def test_released_job_goes_ahead_of_later_jobs_of_its_priority(self):
        submit(self.scheduler, "a", "t", None)
        job = take(self.scheduler, "t")
        submit(self.scheduler, "b", "t", None)
        submit(self.scheduler, "c", "t", None, 1)
        self.scheduler.release(job.holder, job)
        self.assertEqual(job.state, QUEUED)
        self.assertEqual(job.retries, 1)
        self.assertEqual([take(self.scheduler, "t").id for _ in range(3)], ["c", "a", "b"])

    def test_released_job_goes_to_a_waiting_slave(self):
        submit(self.scheduler, "a", "t", None)
        job = take(self.scheduler, "t")
        other = (waiting(self.scheduler, "t"))
        self.scheduler.release(job.holder, job)
        self.assertIs(other.results[0], job)

    def test_retries_run_out(self):
        answer = submit(self.scheduler, "a", "t", None)
        attempts = 0
        while not answer.fired:
            job = take(self.scheduler, "t")
            attempts += 1
            self.scheduler.release(job.holder, job)
        self.assertEqual(attempts, 3)
        failure = answer.failures[0]
        self.assertIsInstance(failure, JobFailed)
        self.assertIn("3 attempts", failure.reason)
        self.assertNotIn("a", live_ids(self.scheduler))
        self.assertIsNone(take(self.scheduler, "t"))

    def test_no_retries(self):
        scheduler = Scheduler(max_retries=0, clock=Clock())
        answer = submit(scheduler, "a", "t", None)
        job = take(scheduler, "t")
        scheduler.release(job.holder, job)
        self.assertIsInstance(answer.failures[0], JobFailed)

    def test_released_job_of_a_departed_master_ends(self):
        answer = submit(self.scheduler, "a", "t", None)
        job = take(self.scheduler, "t")
        answer.cancel()
        self.scheduler.release(job.holder, job)
        self.assertNotIn("a", live_ids(self.scheduler))
        self.assertEqual(self.scheduler.queued("t"), 0)


class HandBackTests(SynchronousTestCase):
    """`Scheduler.hand_back`: a job handed back unrun goes to the front of
    its queue, with no attempt or retry counted."""

    def setUp(self):
        self.clock = Clock()
        self.scheduler = Scheduler(max_retries=0, clock=self.clock)

    def test_front_of_its_priority(self):
        submit(self.scheduler, "a", "t", None)
        job = take(self.scheduler, "t")
        for job_id, priority in (("b", 0), ("c", 1), ("d", -1)):
            submit(self.scheduler, job_id, "t", None, priority)
        self.scheduler.hand_back(job.holder, job)
        self.assertEqual((job.state, job.attempt, job.retries), (QUEUED, 0, 0))
        self.assertEqual([take(self.scheduler, "t").id for _ in range(4)], ["c", "a", "b", "d"])
        self.assertEqual((self.scheduler.totals["released"], self.scheduler.totals["retried"]), (1, 0))

    def test_ahead_of_an_older_job_that_came_back(self):
        submit(self.scheduler, "old", "t", None)
        submit(self.scheduler, "young", "t", None)
        old, young = take(self.scheduler, "t"), take(self.scheduler, "t")
        scheduler = self.scheduler
        scheduler.max_retries = 1
        scheduler.release(old.holder, old)  # back by age
        scheduler.hand_back(young.holder, young)  # back at the very front
        self.assertEqual([take(scheduler, "t").id for _ in range(2)], ["young", "old"])

    def test_to_a_waiting_slave_and_with_the_timer_cancelled(self):
        submit(self.scheduler, "a", "t", None, timeout=5)
        job = take(self.scheduler, "t")
        other = waiting(self.scheduler, "t")
        self.scheduler.hand_back(job.holder, job)
        self.assertEqual(other.results, [job])
        self.assertIs(job.holder, other)
        self.assertEqual(len([c for c in self.clock.getDelayedCalls() if c.active()]), 1)  # the new attempt's
        self.assertEqual(job.attempt, 1)

    def test_timed_out_attempt_raises_and_changes_nothing(self):
        answer = submit(self.scheduler, "a", "t", None, timeout=1)
        slow = take(self.scheduler, "t").holder
        self.scheduler.max_retries = 1
        self.clock.advance(1)
        job = take(self.scheduler, "t")
        self.assertRaises(AttemptGivenUp, self.scheduler.hand_back, slow, answer.job)
        self.assertIs(job, answer.job)
        self.assertEqual((job.state, job.attempt), (RUNNING, 2))
        self.assertIsNot(job.holder, slow)
        self.assertEqual(self.scheduler.totals["released"], 0)
        self.assertEqual(self.scheduler.types(), {"t": {"queued": 0, "delayed": 0, "running": 1, "idle_slaves": 0,
                                                        "busy_slaves": 1, "paused": False}})

    def test_withdrawn_job_ends(self):
        answer = submit(self.scheduler, "a", "t", None)
        job = take(self.scheduler, "t")
        answer.cancel()
        self.scheduler.hand_back(job.holder, job)
        self.assertEqual((job.state, len(self.scheduler), self.scheduler.queued("t")), (ENDED, 0, 0))
        self.assertEqual((self.scheduler.totals["cancelled"], self.scheduler.totals["released"]), (1, 0))
        self.assertFalse(answer.fired)

    def test_a_type_no_slave_serves_any_more_is_kept_while_queued(self):
        unused = []
        self.scheduler.on_type_unused = unused.append
        submit(self.scheduler, "a", "t", None)
        job = take(self.scheduler, "t")
        self.scheduler.leave(job.holder)
        self.scheduler.hand_back(job.holder, job)
        self.assertEqual((unused, self.scheduler.queued("t")), ([], 1))


class StopTests(SynchronousTestCase):
    def test_stop_fails_every_unfinished_job(self):
        scheduler = Scheduler(clock=Clock())
        scheduler.startService()
        queued = submit(scheduler, "q", "t", None)
        running = submit(scheduler, "r", "u", None)
        job = take(scheduler, "u")
        idle = (waiting(scheduler, "v"))
        scheduler.stopService()
        for outcome in (queued, running):
            self.assertIsInstance(outcome.failures[0], ShuttingDown)
        self.assertEqual(scheduler.idle_slaves("v"), 0)
        self.assertFalse(idle.fired)
        self.assertRaises(ShuttingDown, submit, scheduler, "n", "t", None)
        scheduler.complete(job.holder, job, "late")
        self.assertNotIn("r", live_ids(scheduler))
        self.assertEqual(scheduler.types(), {})


class TimeoutTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.scheduler = Scheduler(max_retries=1, clock=self.clock)

    def test_attempt_past_its_timeout_is_retried_elsewhere(self):
        answer = submit(self.scheduler, "a", "t", "in", timeout=2.5)
        slow = take(self.scheduler, "t")
        slow_slave = slow.holder
        self.clock.advance(2.4)
        self.assertEqual(self.scheduler.queued("t"), 0)
        self.clock.advance(0.1)
        self.assertEqual(self.scheduler.queued("t"), 1)
        self.assertEqual(self.scheduler.totals["timed_out"], 1)
        self.assertEqual(self.scheduler.types()["t"], {"queued": 1, "delayed": 0, "running": 0, "idle_slaves": 0, "busy_slaves": 1, "paused": False})
        fast = take(self.scheduler, "t")
        self.assertIs(fast, slow)
        self.assertRaises(AttemptGivenUp, self.scheduler.complete, slow_slave, slow, "late")
        self.assertFalse(answer.fired)
        self.scheduler.complete(fast.holder, fast, "on time")
        self.assertEqual(answer.results, ["on time"])
        self.assertEqual(self.scheduler.types(), {})

    def test_last_attempt_timing_out_fails_the_job(self):
        answer = submit(self.scheduler, "a", "t", None, timeout=1)
        for _ in range(2):
            take(self.scheduler, "t")
            self.clock.advance(1)
        failure = answer.failures[0]
        self.assertIsInstance(failure, JobFailed)
        self.assertTrue(failure.reason.startswith("timeout"), failure.reason)
        self.assertIn("2 attempts", failure.reason)
        self.assertNotIn("a", live_ids(self.scheduler))
        self.assertEqual(self.scheduler.totals["timed_out"], 2)
        self.assertEqual(self.scheduler.totals["failed"], 1)

    def test_answer_in_time_cancels_the_timer(self):
        answer = submit(self.scheduler, "a", "t", None, timeout=1)
        job = take(self.scheduler, "t")
        self.scheduler.complete(job.holder, job, "done")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(answer.results, ["done"])

    def test_queued_time_does_not_count(self):
        answer = submit(self.scheduler, "a", "t", None, timeout=1)
        self.clock.advance(100)
        job = take(self.scheduler, "t")
        self.clock.advance(0.9)
        self.scheduler.complete(job.holder, job, "done")
        self.assertEqual(answer.results, ["done"])

    def test_default_timeout_and_its_override(self):
        scheduler = Scheduler(max_retries=0, clock=self.clock, default_timeout=5)
        defaulted = submit(scheduler, "d", "t", None)
        own = submit(scheduler, "o", "t", None, timeout=50)
        take(scheduler, "t")
        take(scheduler, "t")
        self.clock.advance(5)
        self.assertTrue(defaulted.fired)
        self.assertFalse(own.fired)

    def test_late_failure_and_late_departure(self):
        submit(self.scheduler, "a", "t", None, timeout=1)
        job = take(self.scheduler, "t")
        first = job.holder
        self.clock.advance(1)
        self.assertRaises(AttemptGivenUp, self.scheduler.fail, first, job, "too late")
        second = take(self.scheduler, "t")
        self.assertEqual(second.attempt, 2)
        self.scheduler.release(first, second)
        self.assertEqual(job.state, RUNNING)
        self.assertEqual(self.scheduler.totals["retried"], 1)

    def test_withdrawn_running_job_frees_its_id_at_timeout(self):
        answer = submit(self.scheduler, "a", "t", None, timeout=1)
        job = take(self.scheduler, "t")
        slave = job.holder
        answer.cancel()
        self.clock.advance(1)
        self.assertNotIn("a", live_ids(self.scheduler))
        self.assertEqual(self.scheduler.queued("t"), 0)
        self.assertRaises(AttemptGivenUp, self.scheduler.complete, slave, job, "late")


class FigureTests(SynchronousTestCase):
    def test_totals_add_up(self):
        clock = Clock()
        scheduler = Scheduler(max_retries=1, clock=clock)
        answered = []
        scheduler.on_answer = lambda job_type, seconds: answered.append((job_type, seconds))
        for i in range(6):
            submit(scheduler, str(i), "t", None)
        clock.advance(3)
        job = take(scheduler, "t")
        scheduler.complete(job.holder, job, "ok")
        job = take(scheduler, "t")
        scheduler.fail(job.holder, job, "no")
        job = take(scheduler, "t")
        scheduler.release(job.holder, job)
        job = take(scheduler, "t")
        scheduler.release(job.holder, job)
        queued = submit(scheduler, "q", "t", None)
        queued.cancel()
        take(scheduler, "t")
        self.assertEqual(scheduler.totals, {"submitted": 7, "completed": 1, "failed": 2, "cancelled": 1,
                                            "retried": 1, "timed_out": 0, "released": 0, "delayed": 0,
                                            "coalesced": 0, "progress": 0, "touched": 0, "cleared": 0})
        self.assertEqual(answered, [("t", 3.0)])
        self.assertEqual(scheduler.types(), {"t": {"queued": 2, "delayed": 0, "running": 1, "idle_slaves": 0, "busy_slaves": 1, "paused": False}})
        self.assertEqual(len(scheduler), 3)


class SlaveTests(SynchronousTestCase):
    def setUp(self):
        self.scheduler = Scheduler(clock=Clock())
        self.unused = []
        self.scheduler.on_type_unused = self.unused.append

    def test_the_daemons_connections_provide_the_interfaces(self):
        from tests.support import Daemon

        daemon = Daemon()
        verifyObject(IJobOwner, daemon.master().protocol)
        verifyObject(ISlave, daemon.slave().protocol)
        verifyObject(IJobOwner, Answer(self.scheduler))

    def test_a_slave_serves_the_type_it_joined_last(self):
        slave = Slave(self.scheduler)
        self.scheduler.join(slave, "t")
        self.scheduler.join(slave, "u")
        self.assertEqual(self.unused, ["t"])
        submit(self.scheduler, "a", "t", None)
        submit(self.scheduler, "b", "u", None)
        self.assertEqual(slave.ask().results[0].id, "b")

    def test_joining_the_same_type_again_changes_nothing(self):
        slave = Slave(self.scheduler)
        self.scheduler.join(slave, "t")
        self.scheduler.join(slave, "t")
        self.scheduler.leave(slave)
        self.assertEqual(self.unused, ["t"])
        self.scheduler.leave(slave)
        self.assertEqual(self.unused, ["t"])

    def test_a_type_is_unused_once_its_last_slave_left_and_its_jobs_ended(self):
        slave = Slave(self.scheduler)
        self.scheduler.join(slave, "t")
        answer = submit(self.scheduler, "a", "t", None)
        job = slave.ask().results[0]
        self.scheduler.leave(slave)
        self.assertEqual(self.unused, [])
        self.scheduler.complete(slave, job, "done")
        self.assertEqual(answer.results, ["done"])
        self.assertEqual(self.unused, ["t"])

    def test_only_the_holder_may_answer(self):
        answer = submit(self.scheduler, "a", "t", None)
        job = take(self.scheduler, "t")
        self.assertRaises(AttemptGivenUp, self.scheduler.complete, Slave(self.scheduler, "other"), job, "stray")
        self.scheduler.complete(job.holder, job, "right")
        self.assertEqual(answer.results, ["right"])

    def test_each_hand_out_is_one_attempt(self):
        clock = Clock()
        scheduler = Scheduler(max_retries=5, clock=clock)
        submit(scheduler, "a", "t", None, timeout=1)
        attempts = []
        for _ in range(3):
            job = take(scheduler, "t")
            attempts.append(job.attempt)
            clock.advance(1)
        self.assertEqual(attempts, [1, 2, 3])
        self.assertEqual(job.retries, 3)

    def test_a_slave_that_cannot_take_its_job_gives_it_back(self):
        class Refusing(Slave):
            def job_assigned(self, job):
                raise RuntimeError("no room")

        answer = submit(self.scheduler, "a", "t", None)
        refusing = Refusing(self.scheduler)
        self.scheduler.join(refusing, "t")
        refusing.ask()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual((self.scheduler.queued("t"), answer.job.retries), (1, 1))
        idle = waiting(self.scheduler, "u")
        submit(self.scheduler, "b", "u", None)
        self.assertEqual(idle.results[0].id, "b")
        self.scheduler.join(refusing, "u")
        refusing.ask()
        submit(self.scheduler, "c", "u", None)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.scheduler.queued("u"), 1)
        self.assertEqual(self.scheduler.types()["u"]["busy_slaves"], 1)
