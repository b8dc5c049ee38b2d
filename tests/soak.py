"""Soak: many masters and slaves over real TCP, faults injected at random,
then proof that nothing was lost.

Slaves answer, fail, stall past their job's timeout, or vanish mid-job;
masters cancel jobs and disconnect.  At the end every job of a master that
stayed connected must have exactly one outcome (an answer carrying its own
body, a job_failed error, or a cancel confirmation), the daemon must hold no
job, and its stats totals must add up.

In the suite it runs small (tests/test_soak.py).  For a long run:

    python -m tests.soak --jobs 200000 --masters 16 --slaves 32

which starts its own daemon in this process, or ``--master-port P
--slave-port Q`` to soak a daemon that is already running (started with
``--job-timeout`` unset and ``--retries`` of at least 1).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter

from twisted.internet import defer, endpoints, task

from tests.support import Framed

TYPES = ("alpha", "beta", "gamma")


class SoakSlave(Framed):
    """Runs jobs badly on purpose, some of the time."""

    def __init__(self, soak, job_type):
        super().__init__()
        self.soak = soak
        self.job_type = job_type
        self.pending = None
        self.gone = False

    def connectionMade(self):
        self.send({"action": "join", "type": self.job_type})

    def frameReceived(self, message):
        soak = self.soak
        if message.get("action") == "job":
            behaviour = soak.rng.choices(
                ("answer", "fail", "stall", "vanish"),
                (soak.answer_weight, 0.05, 0.05, soak.vanish_weight))[0]
            soak.faults[behaviour] += 1
            if behaviour == "vanish" and not soak.settling:
                self.gone = True
                self.transport.abortConnection()
                return
            if behaviour == "fail":
                self.send({"action": "fail", "reason": "injected failure"})
                return
            delay = soak.stall if behaviour == "stall" else soak.rng.random() * 0.002
            reply = {"action": "respond", "body": {"echo": message["body"], "id": message["id"]}}
            self.pending = soak.reactor.callLater(delay, self._reply, reply)
        elif message.get("error") == "timed_out":
            soak.faults["late answers refused"] += 1
        elif message.get("error"):
            soak.problems.append(f"slave got an unexpected error: {message}")

    def _reply(self, reply):
        self.pending = None
        self.send(reply)

    def connectionLost(self, reason):
        if self.pending is not None and self.pending.active():
            self.pending.cancel()
        super().connectionLost(reason)
        self.soak.slave_left(self)


class SoakMaster(Framed):
    """Submits its share of jobs with a window in flight; cancels some and
    may walk away.  ``outcomes`` maps each job id to what it got."""

    def __init__(self, soak, name, quota):
        super().__init__()
        self.soak = soak
        self.name = name
        self.quota = quota
        self.jobs = {}
        self.acked = set()
        self.cancelling = set()
        self.outcomes = {}
        self.submitted = 0
        self.walked_away = False
        self.finished = defer.Deferred()

    def connectionMade(self):
        for _ in range(min(self.soak.window, self.quota)):
            self._submit()

    def _submit(self):
        soak = self.soak
        self.submitted += 1
        job_id = f"{self.name}-{self.submitted}"
        body = soak.rng.choice([
            self.submitted,
            {"n": 10**40 + self.submitted, "f": 0.1, "s": "\u2603 snow"},
            ["x" * soak.rng.randrange(200), None, True],
        ])
        message = {"action": "submit", "id": job_id, "type": soak.rng.choice(TYPES), "body": body,
                   "priority": soak.rng.randrange(-5, 6)}
        if soak.rng.random() < 0.3:
            message["timeout"] = soak.timeout
        self.jobs[job_id] = body
        self.send(message)

    def frameReceived(self, message):
        job_id = message.get("id")
        if job_id not in self.jobs:
            self.soak.problems.append(f"{self.name} got a frame for no job of its own: {message}")
            return
        if message.get("ok"):
            if job_id not in self.acked:
                self.acked.add(job_id)
                self._maybe_misbehave(job_id)
                return
            self._outcome(job_id, "cancelled")
        elif "error" in message:
            if message["error"] == "job_failed":
                self._outcome(job_id, "failed")
            elif message["error"] == "unknown_job" and job_id in self.cancelling:
                if job_id not in self.outcomes:
                    self.soak.problems.append(f"{job_id}: cancel refused but the job had no outcome")
            else:
                self.soak.problems.append(f"{job_id}: unexpected error {message}")
        elif "body" in message:
            expected = {"echo": self.jobs[job_id], "id": job_id}
            if message["body"] != expected:
                self.soak.problems.append(f"{job_id}: wrong answer {message['body']!r}")
            self._outcome(job_id, "answered")

    def _maybe_misbehave(self, job_id):
        soak = self.soak
        if soak.settling:
            return
        roll = soak.rng.random()
        if roll < 0.04:
            target = soak.rng.choice([j for j in self.jobs if j not in self.outcomes])
            self.cancelling.add(target)
            soak.faults["cancel"] += 1
            self.send({"action": "cancel", "id": target})
        elif roll < 0.04 + soak.walk_away:
            self.walked_away = True
            soak.faults["master disconnect"] += 1
            self.transport.loseConnection()

    def _outcome(self, job_id, outcome):
        if job_id in self.outcomes:
            self.soak.problems.append(f"{job_id}: second outcome {outcome} after {self.outcomes[job_id]}")
            return
        self.outcomes[job_id] = outcome
        if self.submitted < self.quota:
            self._submit()
        elif len(self.outcomes) == len(self.jobs) and not self.finished.called:
            self.finished.callback(self)

    def connectionLost(self, reason):
        super().connectionLost(reason)
        if not self.finished.called:
            self.finished.callback(self)


class Soak:
    """One soak run against a daemon listening on the given ports."""

    def __init__(self, reactor, master_port, slave_port, jobs=600, masters=4, slaves=6,
                 window=16, seed=None, timeout=0.05, walk_away=0.001, vanish_weight=0.05,
                 limit=None):
        self.reactor = reactor
        self.master_port = master_port
        self.slave_port = slave_port
        self.jobs = jobs
        self.master_count = masters
        self.slave_count = slaves
        self.window = window
        self.seed = random.randrange(1 << 30) if seed is None else seed
        self.rng = random.Random(self.seed)
        self.timeout = timeout
        self.stall = timeout * 3
        self.walk_away = walk_away
        self.vanish_weight = vanish_weight
        self.answer_weight = 1 - 0.1 - vanish_weight
        self.limit = 60 + jobs / 200 if limit is None else limit
        self.faults = Counter()
        self.problems = []
        self.settling = False
        self.slaves = set()
        self.connecting = set()  # slaves' connection attempts under way
        self.masters = []

    def _endpoint(self, port):
        return endpoints.TCP4ClientEndpoint(self.reactor, "127.0.0.1", port)

    def _add_slave(self, job_type):
        """Connect a slave; a failure is a problem, not an unhandled error."""
        slave = SoakSlave(self, job_type)
        self.slaves.add(slave)
        attempt = endpoints.connectProtocol(self._endpoint(self.slave_port), slave)
        self.connecting.add(attempt)

        def failed(failure):
            self.slaves.discard(slave)
            self.problems.append(f"a {job_type} slave could not connect: {failure.getErrorMessage()}")

        def done(result):
            self.connecting.discard(attempt)
            return result

        return attempt.addErrback(failed).addBoth(done)

    def slave_left(self, slave):
        self.slaves.discard(slave)
        if slave.gone and not self.settling:
            self._add_slave(slave.job_type)

    @defer.inlineCallbacks
    def _run_master(self, index, quota):
        """Keep one master's share going, replacing it if it walks away."""
        generation = 0
        while quota > 0:
            generation += 1
            master = SoakMaster(self, f"m{index}.{generation}", quota)
            self.masters.append(master)
            yield endpoints.connectProtocol(self._endpoint(self.master_port), master)
            yield master.finished
            quota = quota - master.submitted if master.walked_away else 0

    @defer.inlineCallbacks
    def stats(self, timeout=30):
        """The daemon's stats, through the stats action."""
        master = _StatsClient()
        yield endpoints.connectProtocol(self._endpoint(self.master_port), master)
        master.send({"action": "stats"})
        try:
            reply = yield master.reply.addTimeout(timeout, self.reactor)
        finally:
            master.transport.loseConnection()
            yield master.lost
        return reply["stats"]

    @defer.inlineCallbacks
    def run(self):
        started = time.monotonic()
        for i in range(self.slave_count):
            yield self._add_slave(TYPES[i % len(TYPES)])
        shares = [self.jobs // self.master_count] * self.master_count
        shares[0] += self.jobs - sum(shares)
        # consumeErrors: when the time limit cancels the masters, their
        # CancelledErrors are not left unhandled.
        runs = [self._run_master(i, q) for i, q in enumerate(shares)]
        running = defer.gatherResults(runs, consumeErrors=True)
        running.addTimeout(self.limit, self.reactor)
        try:
            yield running
        except defer.TimeoutError:
            self.problems.append(f"masters did not get all their outcomes within {self.limit} s")
        except defer.FirstError as e:
            self.problems.append(f"a master failed: {e.subFailure.getErrorMessage()}")
            for run in runs:
                run.cancel()
        self.settling = True
        deadline = time.monotonic() + 30
        while True:
            stats = yield self.stats()
            busy = any(t["queued"] or t["running"] or t["busy_slaves"] for t in stats["types"].values())
            if not busy or time.monotonic() > deadline:
                break
            yield task.deferLater(self.reactor, 0.02, lambda: None)
        kept = [m for m in self.masters if not m.walked_away and m.transport is not None]
        self._check(kept, stats)
        # A slave replacing one that vanished just before settling may still
        # be connecting: let it finish (or fail) before closing everything.
        yield defer.DeferredList(list(self.connecting))
        for slave in list(self.slaves):
            slave.transport.loseConnection()
        for master in kept:
            master.transport.loseConnection()
        yield defer.DeferredList([p.lost for p in list(self.slaves) + kept])
        outcomes = Counter(o for m in kept for o in m.outcomes.values())
        return {
            "seed": self.seed,
            "seconds": round(time.monotonic() - started, 2),
            "jobs submitted": sum(m.submitted for m in self.masters),
            "jobs checked (masters that stayed)": sum(len(m.jobs) for m in kept),
            "outcomes": dict(outcomes),
            "faults injected": dict(self.faults),
            "daemon totals": stats["totals"],
            "problems": list(self.problems),
        }

    def _check(self, kept, stats):
        for master in kept:
            for job_id in master.jobs:
                if job_id not in master.outcomes:
                    self.problems.append(f"{job_id}: no outcome (lost)")
        busy = {name: t for name, t in stats["types"].items()
                if t["queued"] or t["running"] or t["busy_slaves"]}
        if busy:
            self.problems.append(f"daemon still holds jobs: {busy}")
        totals = stats["totals"]
        ended = totals["completed"] + totals["failed"] + totals["cancelled"]
        if totals["submitted"] != ended:
            self.problems.append(f"totals do not add up: {totals}")
        if totals["submitted"] != sum(m.submitted for m in self.masters):
            self.problems.append(f"daemon counted {totals['submitted']} submits, masters sent "
                                 f"{sum(m.submitted for m in self.masters)}")


class _StatsClient(Framed):
    def __init__(self):
        super().__init__()
        self.reply = defer.Deferred()

    def frameReceived(self, message):
        self.reply.callback(message)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--masters", type=int, default=8)
    parser.add_argument("--slaves", type=int, default=12)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=0.05,
                        help="seconds given to the jobs that carry a timeout")
    parser.add_argument("--walk-away", type=float, default=0.0001,
                        help="chance, per acknowledged job, that its master disconnects")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--master-port", type=int, help="soak a running daemon instead of starting one")
    parser.add_argument("--slave-port", type=int)
    args = parser.parse_args(argv)

    from twisted.internet import reactor

    service = None
    master_port, slave_port = args.master_port, args.slave_port
    if master_port is None:
        from gloom.tap import makeService

        service = makeService({"master": "tcp:0:interface=127.0.0.1", "slave": "tcp:0:interface=127.0.0.1",
                               "max-frame": 1 << 20, "retries": 3}, reactor)
        service.startService()
        master_port = service.getServiceNamed("master").port.getHost().port
        slave_port = service.getServiceNamed("slave").port.getHost().port
    soak = Soak(reactor, master_port, slave_port, jobs=args.jobs, masters=args.masters,
                slaves=args.slaves, window=args.window, seed=args.seed, timeout=args.timeout,
                walk_away=args.walk_away)
    report = {}

    @defer.inlineCallbacks
    def go():
        try:
            report.update((yield soak.run()))
        finally:
            if service is not None:
                yield service.stopService()
            reactor.stop()

    reactor.callWhenRunning(go)
    reactor.run()
    print(json.dumps(report, indent=2))
    return 1 if report.get("problems") or not report else 0


if __name__ == "__main__":
    sys.exit(main())
