"""The Twisted clients against three real daemons in this process, on
loopback TCP: a daemon killed mid-run and brought back, and a worker
serving every daemon without holding more jobs than its concurrency."""

from twisted.internet import defer, reactor, task
from twisted.internet.defer import CancelledError, DeferredList, inlineCallbacks

from gloom import core
from gloom.core import ServerError, TransportError
from gloom.tap import makeService
from gloom.txclient import MasterClient, Worker
from tests.support import live_ids, reserved_port
from tests.test_integration import DaemonTestCase, wait_until

FAST_RETRY = lambda attempt: 0.02  # noqa: E731  (reconnect at once in tests)


class ManyDaemonsTestCase(DaemonTestCase):
    """Three daemons from makeService on ports reserved for the test; a
    daemon can be killed (it stops listening and drops its connections
    without a word, as a crashed process would) and started again on its
    ports.  ``until`` and the ``sample`` hook see every daemon's events."""

    count = 3

    def setUp(self):
        self.clients = []
        self._waiters = []
        self._check_call = None
        self.sample = None
        self.ports = [{role: reserved_port(self) for role in ("master", "slave")} for _ in range(self.count)]
        self.services = [None] * self.count
        self.killed = []
        for index in range(self.count):
            self.start(index)
        self.addCleanup(self.stop_all)

    def start(self, index):
        ports = self.ports[index]
        service = makeService({"master": f"tcp:{ports['master']}:interface=127.0.0.1",
                               "slave": f"tcp:{ports['slave']}:interface=127.0.0.1",
                               "max-frame": self.max_frame, "retries": self.retries}, reactor)
        for factory in service.factories:
            factory.buildProtocol = self._watched(factory.buildProtocol)
        service.startService()
        self.services[index] = service

    def _then_check(self, method):
        checked = DaemonTestCase._then_check(self, method)

        def sampled(*args):
            try:
                return checked(*args)
            finally:
                if self.sample is not None:
                    self.sample()

        return sampled

    @inlineCallbacks
    def kill(self, index):
        """Daemon ``index`` dies: it stops listening and its connections
        are aborted (masters hear no ``shutdown``)."""
        service = self.services[index]
        for role in ("master", "slave"):
            yield service.getServiceNamed(role).disownServiceParent()
        connections = [c for factory in service.factories for c in factory.connections]
        for connection in connections:
            connection.transport.abortConnection()
        yield DeferredList([connection.closed for connection in connections])
        self.killed.append(service)

    @inlineCallbacks
    def stop_all(self):
        if self._check_call is not None:
            self._check_call.cancel()
            self._check_call = None
        for service in self.services + self.killed:
            if service.running:
                yield service.stopService()

    def names(self, role):
        return [f"127.0.0.1:{ports[role]}" for ports in self.ports]

    def master(self, **kwargs):
        client = MasterClient(self.names("master"), reactor, retry_policy=FAST_RETRY, **kwargs)
        client.start()
        self.addCleanup(client.stop)
        return client

    def worker(self, job_type, handler, concurrency, **kwargs):
        worker = Worker(job_type, handler, concurrency, self.names("slave"), reactor,
                        retry_policy=FAST_RETRY, report=lambda text: None, **kwargs)
        worker.start()
        self.addCleanup(worker.stop)
        return worker

    def ids_for(self, index, count, prefix="job"):
        """``count`` job ids that daemon ``index`` comes first for in
        rendezvous order (where a master sends them while it is up)."""
        names = self.names("master")
        found = []
        number = 0
        while len(found) < count:
            job_id = f"{prefix}-{number}"
            if core.rendezvous(job_id, names)[0] == names[index]:
                found.append(job_id)
            number += 1
        return found

    def schedulers(self):
        return [service.scheduler for service in self.services]

    def running(self, job_type):
        return sum(s.types().get(job_type, {}).get("running", 0) for s in self.schedulers())

    def idle(self, job_type):
        return [s.idle_slaves(job_type) for s in self.schedulers()]


class KilledDaemonTests(ManyDaemonsTestCase):
    @inlineCallbacks
    def test_a_daemon_killed_mid_run_and_brought_back(self):
        ran = {}

        def handler(job):
            ran[job.id] = ran.get(job.id, 0) + 1
            return job.body

        self.worker("t", handler, concurrency=3)
        master = self.master()
        moving = self.master(resubmit=True)
        yield self.until(lambda: self.idle("t") == [1, 1, 1])  # 3 places: one ask on each daemon
        yield wait_until(lambda: len(master.up) == len(moving.up) == 3)  # the clients' side: polled

        # Jobs on every daemon are answered; jobs queued on daemon 2 stay there.
        answered = yield defer.gatherResults([master.submit("t", n, id=f"warm-{n}") for n in range(30)])
        self.assertEqual(answered, list(range(30)))
        # On daemon 2: jobs queued there, and jobs a worker is running there.
        doomed = {job_id: master.submit("nobody", job_id, id=job_id) for job_id in self.ids_for(2, 4, "doomed")}
        held = []

        def hold(job):
            held.append(defer.Deferred())
            return held[-1]

        self.worker("held", hold, concurrency=2)
        doomed.update({job_id: master.submit("held", job_id, id=job_id)
                       for job_id in self.ids_for(2, 2, "running")})
        moved = {job_id: moving.submit("later", job_id, id=job_id) for job_id in self.ids_for(2, 4, "moved")}
        survivors = {job_id: master.submit("after", job_id, id=job_id)
                     for index in (0, 1) for job_id in self.ids_for(index, 3, f"safe{index}")}
        yield self.until(lambda: set(doomed) | set(moved) <= live_ids(self.services[2].scheduler)
                         and self.services[2].scheduler.types().get("held", {}).get("running") == 2)

        killed = self.names("master")[2]
        yield self.kill(2)
        for job_id, answer in doomed.items():
            error = yield self.assertFailure(answer, TransportError)
            self.assertEqual(error.daemon, killed)
            self.assertIn(f"job {job_id!r} was dropped by {killed}", str(error))
        # With resubmit the same jobs went to the survivors, where they wait.
        yield self.until(lambda: set(moved) <= live_ids(self.services[0].scheduler)
                         | live_ids(self.services[1].scheduler))
        self.assertEqual(master.up, self.names("master")[:2])
        for answer in survivors.values():
            self.assertFalse(answer.called)

        # New submits go to the survivors, whatever their id; each is answered once.
        rerouted = self.ids_for(2, 10, "after")
        answers = yield defer.gatherResults([master.submit("t", job_id, id=job_id) for job_id in rerouted])
        self.assertEqual(answers, rerouted)
        self.worker("later", lambda job: job.body.upper(), concurrency=1)
        for job_id, answer in moved.items():
            self.assertEqual((yield answer), job_id.upper())
        self.assertEqual(set(ran), {f"warm-{n}" for n in range(30)} | set(rerouted))
        self.assertEqual(set(ran.values()), {1})
        # The jobs on the survivors all along are answered, each once.
        survived = {}

        def after(job):
            survived[job.id] = survived.get(job.id, 0) + 1
            return job.body

        self.worker("after", after, concurrency=2)
        for job_id, answer in survivors.items():
            self.assertEqual((yield answer), job_id)
        self.assertEqual(survived, dict.fromkeys(survivors, 1))
        for answer in held:
            answer.callback("too late")  # their daemon is gone: the answers go nowhere

        # It comes back on the same ports: the workers reconnect (t, held,
        # later and after: 3 + 2 + 1 + 2 connections), the masters use it.
        self.start(2)
        yield self.until(lambda: len(self.services[2].factories[1].connections) == 8)
        yield wait_until(lambda: len(master.up) == 3)
        back = self.ids_for(2, 5, "back")
        answers = yield defer.gatherResults([master.submit("t", job_id, id=job_id) for job_id in back])
        self.assertEqual(answers, back)
        self.assertEqual(self.services[2].scheduler.totals["completed"], 5)
        self.assertEqual(set(ran.values()), {1})


class CommandLineTests(ManyDaemonsTestCase):
    @inlineCallbacks
    def test_submit_lines_goes_on_with_the_survivors(self):
        """``gloom submit --lines`` over three daemons, one killed with jobs
        running there: those lines say connection_error, the other lines in
        flight are answered, and the lines read after go to the survivors."""
        import json
        import os

        from tests.test_cli import _Run, gloom_command

        held = []

        def handler(job):
            if not holding:
                return job.body
            held.append((job, defer.Deferred()))
            return held[-1][1]

        holding = True
        self.worker("t", handler, concurrency=12)
        run = _Run(b"", keep_open=True)
        argv = gloom_command() + ["submit", "t", "--lines", "--master", ",".join(self.names("master"))]
        env = {name: value for name, value in os.environ.items() if not name.startswith("GLOOM_")}
        process = reactor.spawnProcess(run, argv[0], argv, env=env)
        self.addCleanup(lambda: run.ended if run.ended.called else (process.signalProcess("KILL"), run.ended)[1])
        process.write(b"".join(b"%d\n" % n for n in range(1, 13)))
        self.addCleanup(lambda: [answer.callback(None) for _, answer in held if not answer.called])
        yield wait_until(lambda: len(held) == 12)  # the worker's side: polled
        running = [s.types().get("t", {}).get("running", 0) for s in self.schedulers()]
        victim = running.index(max(running))  # 12 jobs on 3 daemons: at least 4 here
        yield self.kill(victim)
        holding = False
        for job, answer in held:
            answer.callback(job.body)
        process.write(b"".join(b"%d\n" % n for n in range(13, 19)))
        process.closeStdin()
        out, err, status = yield run.ended
        lines = [json.loads(line) for line in out.splitlines()]
        self.assertEqual(len(lines), 18, err)
        lost = [n for n, line in enumerate(lines, 1) if isinstance(line, dict)]
        self.assertEqual(len(lost), running[victim], err)
        self.assertTrue(all(lines[n - 1]["error"] == "connection_error" for n in lost))
        self.assertTrue(all(n <= 12 for n in lost))
        self.assertEqual([line for n, line in enumerate(lines, 1) if n not in lost],
                         [n for n in range(1, 19) if n not in lost])
        self.assertEqual(status, 3)
        self.assertNotIn("stopped reading", err)
        self.assertIn(f"dropped by {self.names('master')[victim]}", err)


class ConcurrencyTests(ManyDaemonsTestCase):
    jobs = 12  # per daemon

    @inlineCallbacks
    def load(self, jobs=None):
        """A master per daemon fills its queue with ``jobs`` jobs of type "t"."""
        jobs = self.jobs if jobs is None else jobs
        answers = []
        for index in range(3):
            answers += self.submit(index, [f"{index}-{n}" for n in range(jobs)])
        yield self.until(lambda: [s.queued("t") for s in self.schedulers()] == [jobs] * 3)
        return answers

    def submit(self, index, ids):
        """Submit jobs of type "t" with these ids (and bodies) to daemon ``index`` alone."""
        master = MasterClient(self.names("master")[index], reactor, retry_policy=FAST_RETRY)
        master.start()
        self.addCleanup(master.stop)
        return [master.submit("t", job_id, id=job_id) for job_id in ids]

    def check_attempts(self):
        """No job counts an attempt for having been offered to a busy worker."""
        for scheduler in self.schedulers():
            self.assertEqual(scheduler.totals["retried"], 0)
            for job in scheduler.jobs():
                self.assertLessEqual(job.attempt, 1, job)

    def watch(self, job_type, most):
        """Sample the three daemons after each of their events and every 5 ms,
        checking at cleanup that their sums of running jobs and of busy slaves
        of ``job_type`` stayed within ``most`` and no job's attempts over 1;
        return the samples, ``(running, busy, most attempts)``."""
        samples = []

        def sample():
            figures = [s.types().get(job_type, {}) for s in self.schedulers()]
            attempts = max((job.attempt for s in self.schedulers() for job in s.jobs()), default=0)
            samples.append((sum(f.get("running", 0) for f in figures),
                            sum(f.get("busy_slaves", 0) for f in figures), attempts))

        def check():
            self.sample = None
            if timer.running:
                timer.stop()
            over = [each for each in samples if each[0] > most or each[1] > most or each[2] > 1]
            self.assertEqual(over, [], f"{len(over)} of {len(samples)} samples over the limit")

        self.sample = sample
        timer = task.LoopingCall(sample)
        timer.start(0.005)
        self.addCleanup(check)
        return samples

    @inlineCallbacks
    def test_a_worker_never_holds_more_than_its_concurrency(self):
        """A worker of concurrency 2 serving three daemons with busy queues:
        whenever sampled (after every event of every daemon, and every
        5 ms), the daemons together count at most 2 jobs running, and no
        job ever counts a second attempt."""
        jobs = 40  # per daemon
        answers = yield self.load(jobs)
        ran = []

        def handler(job):
            ran.append(job.id)
            return task.deferLater(reactor, 0.001 * (len(ran) % 4), lambda: "ok")

        samples = self.watch("t", 2)
        watcher = self.master()
        worker = self.worker("t", handler, concurrency=2)
        self.assertEqual((yield defer.gatherResults(answers)), ["ok"] * 3 * jobs)
        self.assertEqual(sorted(ran), sorted(f"{i}-{n}" for i in range(3) for n in range(jobs)))
        self.assertEqual(max(running for running, _, _ in samples), 2)  # it did run two at once
        self.assertGreater(len(samples), 3 * jobs)
        yield wait_until(lambda: len(watcher.up) == 3)
        stats = yield watcher.stats()
        self.assertEqual(sorted(stats["daemons"]), sorted(self.names("master")))
        self.assertEqual(stats["totals"]["completed"], 3 * jobs)
        self.assertEqual(stats["totals"]["retried"], 0)
        self.check_attempts()
        # Jobs that crossed a leave (if any) were handed back, counting no attempt.
        self.assertEqual(sum(s.totals["released"] for s in self.schedulers()), worker.released)

    @inlineCallbacks
    def test_asks_gather_where_the_work_is(self):
        """A worker of concurrency 1 serving three daemons, only the third
        of which has work, finds it and runs its 50 jobs quickly; a job
        queued later on the first daemon is still run, even while the third
        keeps the worker busy."""
        self.watch("t", 1)
        ran = []
        slow = [False]

        def handler(job):
            ran.append(job.id)
            return task.deferLater(reactor, 0.005 if slow[0] else 0, lambda: job.body)

        worker = self.worker("t", handler, concurrency=1)
        yield self.until(lambda: self.idle("t") == [1, 0, 0])  # idle, the ask visits every daemon
        started = reactor.seconds()
        answers = self.submit(2, [f"2-{n}" for n in range(50)])
        self.assertEqual(len((yield defer.gatherResults(answers))), 50)
        self.assertLess(reactor.seconds() - started, 5.0)
        self.assertEqual(len(ran), 50)

        # The third daemon has seconds of work; the first gets one job.
        slow[0] = True
        backlog = self.submit(2, [f"backlog-{n}" for n in range(600)])
        yield self.until(lambda: self.schedulers()[2].queued("t") > 500)
        started = reactor.seconds()
        (late,) = self.submit(0, ["late"])
        self.assertEqual((yield late), "late")
        self.assertLess(reactor.seconds() - started, 3.5)
        self.assertGreater(self.schedulers()[2].queued("t"), 0)  # it was busy all along
        slow[0] = False
        self.assertEqual(len((yield defer.gatherResults(backlog))), 600)
        self.assertEqual(sorted(ran), sorted([f"2-{n}" for n in range(50)] + ["late"]
                                             + [f"backlog-{n}" for n in range(600)]))
        self.assertEqual(worker.busy, 0)
        self.check_attempts()

    @inlineCallbacks
    def test_stop_with_queued_work_runs_none_of_it(self):
        answers = yield self.load()
        held = []

        def handler(job):
            held.append(defer.Deferred())
            return held[-1]

        worker = self.worker("t", handler, concurrency=2)
        yield wait_until(lambda: len(held) == 2 and self.running("t") == 2)
        stopped = worker.stop()
        yield self.until(lambda: self.idle("t") == [0, 0, 0])
        self.assertFalse(stopped.called)
        for deferred in held:
            deferred.callback("answered")
        yield stopped
        yield worker.done
        self.assertEqual(len(held), 2)
        yield self.until(lambda: all(not s.factories[1].connections for s in self.services))
        self.assertEqual(sum(s.queued("t") for s in self.schedulers()), 3 * self.jobs - 2)
        self.check_attempts()
        outcomes = yield defer.gatherResults([answer for answer in answers if answer.called])
        self.assertEqual(outcomes, ["answered", "answered"])
        for answer in answers:
            if not answer.called:
                answer.addErrback(lambda failure: failure.trap(CancelledError, ServerError, TransportError))


class BenchTests(ManyDaemonsTestCase):
    @inlineCallbacks
    def test_bench_spreads_over_every_daemon(self):
        from gloom.bench import Bench

        bench = Bench(reactor, ",".join(self.names("master")), self.names("slave"), masters=2, slaves=2,
                      window=8, jobs=300)
        result = yield bench.run()
        figures = result.figures()
        self.assertEqual((figures["jobs"], figures["errors"], figures["daemons"]), (300, 0, 3))
        self.assertNotIn("interrupted", figures)
        self.assertIn("over 3 daemons", result.table())
        completed = [s.totals["completed"] for s in self.schedulers()]
        self.assertEqual(sum(completed), 300)
        self.assertTrue(all(count > 0 for count in completed), completed)

    @inlineCallbacks
    def test_bench_drains_over_every_daemon(self):
        from gloom.bench import Bench

        bench = Bench(reactor, self.names("master"), self.names("slave"), slaves=2, jobs=90, drain=True)
        result = yield bench.run()
        self.assertEqual((result.jobs, result.errors), (90, []))
        self.assertIsNotNone(result.queue_seconds)

    @inlineCallbacks
    def test_stopping_a_bench_ends_it_as_interrupted(self):
        from gloom.bench import Bench

        bench = Bench(reactor, self.names("master"), self.names("slave"), masters=1, slaves=1, window=4,
                      jobs=10 ** 6)
        running = bench.run()
        yield self.until(lambda: sum(s.totals["completed"] for s in self.schedulers()) >= 20)
        stopped = bench.stop()
        result = yield running
        yield stopped
        self.assertTrue(result.interrupted)
        self.assertEqual(result.figures()["interrupted"], True)
        self.assertGreater(result.jobs, 0)
        self.assertTrue(result.table().startswith(f"interrupted after {result.jobs} of 1000000 jobs"))
        yield self.until(lambda: all(not f.connections for s in self.services for f in s.factories))

    @inlineCallbacks
    def test_cancelling_a_bench_that_is_still_connecting(self):
        from gloom.bench import Bench

        yield self.kill(0)
        bench = Bench(reactor, self.names("master"), self.names("slave")[1:], jobs=10)
        running = bench.run()
        result = yield self.assertFailure(running, TransportError)
        self.assertIn(f"cannot connect to {self.names('master')[0]}", str(result))
        bench = Bench(reactor, self.names("master")[1:], self.names("slave")[1:], jobs=10)
        running = bench.run()
        running.cancel()
        result = yield running
        self.assertTrue(result.interrupted)
        self.assertEqual(result.jobs, 0)
