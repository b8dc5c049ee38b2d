"""Detached, delayed and retried jobs, status and dead letters in the
blocking client, the asyncio client and the ``gloom`` command.

First against fake daemons (a scripted daemon on a real socket for the
blocking client and the command, fake connections for asyncio), which
pin down the frames sent and what is made of the replies; then end to
end, against real daemons served in this process's reactor (as
tests/test_client.py, tests/test_aio.py and tests/test_cli.py do).
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime, timezone

from twisted.internet import defer, protocol, reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase

from gloom import core
from gloom.aio import Master as AsyncMaster
from gloom.aio import work
from gloom.cli import UsageError, format_dead, format_job, parse_time
from gloom.client import Master, Timeout
from gloom.core import DeadList, ServerError, TransportError
from gloom.txclient import MasterClient, Worker
from tests.support import Framed, reserved_port
from tests.test_aio import QUICK, DaemonsTestCase, FakeNet, run, turn
from tests.test_cli import CLITestCase
from tests.test_client import ClientTestCase, ScriptedDaemon

FAST_RETRY = lambda attempt: 0.05  # noqa: E731
ENDED = 1700000000.0  # 2023-11-14T22:13:20Z


def dead_entry(job_id, ended_at=ENDED, **fields):
    return dict({"id": job_id, "type": "report", "priority": 0, "attempts": 4, "reason": "exit status 3: disk",
                 "ended_at": ended_at}, **fields)


class FakeState:
    """What a fake daemon knows: the status of some jobs and a dead list.
    Called with each request, it returns the frames that answer it."""

    def __init__(self, statuses=None, dead=()):
        self.statuses = dict(statuses or {})
        self.dead = list(dead)
        self.requests = []

    def __call__(self, request):
        self.requests.append(request)
        action, job_id = request["action"], request.get("id")
        if action == "submit":
            reply = {"ok": True, "id": job_id}
        elif action == "status":
            reply = dict({"ok": True, "id": job_id}, **self.statuses.get(job_id, {"state": "unknown"}))
        elif action == "dead_list":
            offset, limit = request.get("offset", 0), request.get("limit", 100)
            reply = {"ok": True, "total": len(self.dead), "offset": offset, "dead": self.dead[offset:offset + limit]}
        elif action in ("dead_retry", "dead_discard", "cancel"):
            known = [entry for entry in self.dead if entry["id"] == job_id]
            if action == "cancel":
                known = [job_id] if self.statuses.get(job_id, {}).get("state") in ("queued", "running") else []
            elif known:
                self.dead.remove(known[0])
            if known:
                reply = {"ok": True, "id": job_id}
            else:
                reply = {"error": "unknown_job", "reason": f"no dead job has id '{job_id}'", "id": job_id}
        elif action == "stats":
            reply = {"ok": True, "stats": {"types": {}, "totals": {}, "masters": 1, "slaves": 0, "uptime": 1,
                                           "version": "fake"}}
        else:
            reply = {"error": "unknown_action", "reason": "no"}
        if "ref" in request:
            reply["ref"] = request["ref"]
        return [reply]


def two_ids(names):
    """A job id first in line on the first daemon of ``names``, and one
    first in line on the second."""
    ids = (f"job-{n}" for n in range(10000))
    first = next(i for i in ids if core.rendezvous(i, names)[0] == names[0])
    second = next(i for i in ids if core.rendezvous(i, names)[0] == names[1])
    return first, second


# --- the blocking client, against scripted daemons ------------------------------------------------


class BlockingFakeTests(SynchronousTestCase):
    def test_detached_and_delayed_submits(self):
        state = FakeState()
        daemon = ScriptedDaemon(self, state)
        with Master(daemon.address) as master:
            self.assertEqual(master.submit("d", "t", 1, detach=True, retries=2), "d")
            self.assertRaises(Timeout, master.receive, 0.05)  # a detached job has no answer
            self.assertEqual(master.submit("e", "t", 2, priority=1, delay=0.5, backoff=True), "e")
            self.assertEqual(master.submit("f", "t", 3, at=datetime(2030, 1, 1, tzinfo=timezone.utc)), "f")
        self.assertEqual(state.requests, [
            {"action": "submit", "id": "d", "type": "t", "body": 1, "detach": True, "retries": 2, "ref": 1},
            {"action": "submit", "id": "e", "type": "t", "body": 2, "priority": 1, "delay": 0.5, "backoff": True,
             "ref": 2},
            {"action": "submit", "id": "f", "type": "t", "body": 3, "at": 1893456000.0, "ref": 3},
        ])

    def test_mistakes_raise_before_anything_is_sent(self):
        state = FakeState()
        daemon = ScriptedDaemon(self, state)
        with Master(daemon.address) as master:
            self.assertRaises(ValueError, master.run, "t", 1, detach=True)
            self.assertRaises(ValueError, master.submit, "x", "t", 1, delay=1, at=2)
            self.assertRaises(ValueError, master.submit, "x", "t", 1, delay=-1)
            self.assertRaises(ValueError, list, master.do_many([{"type": "t", "detach": True}]))
            self.assertRaises(ValueError, master.status, "")
            self.assertRaises(ValueError, master.dead_list, -1)
            self.assertEqual(master.stats()["version"], "fake")
        self.assertEqual([request["action"] for request in state.requests], ["stats"])

    def test_a_journal_error(self):
        daemon = ScriptedDaemon(self, lambda request: [{
            "error": "journal_error", "reason": "the journal could not record the job: disk full",
            "id": request["id"], "ref": request["ref"]}])
        with Master(daemon.address) as master:
            error = self.assertRaises(ServerError, master.submit, "d", "t", 1, detach=True)
            self.assertEqual((error.error, error.id), ("journal_error", "d"))
            self.assertEqual(master._core.in_flight, 0)

    def test_status_and_dead_letters(self):
        state = FakeState({"d": {"state": "completed", "detached": True, "result": [1]}},
                          [dead_entry("x"), dead_entry("y", ENDED + 1)])
        daemon = ScriptedDaemon(self, state)
        with Master(daemon.address) as master:
            self.assertEqual(master.status("d"), {"id": "d", "state": "completed", "detached": True, "result": [1]})
            self.assertEqual(master.status("nope"), {"id": "nope", "state": "unknown"})
            page = master.dead_list(limit=1)
            self.assertIsInstance(page, DeadList)
            self.assertEqual((list(page), page.total, page.offset), ([dead_entry("x")], 2, 0))
            self.assertIsNone(master.dead_retry("x"))
            self.assertIsNone(master.dead_discard("y"))
            error = self.assertRaises(ServerError, master.dead_retry, "y")
            self.assertEqual((error.error, error.id), ("unknown_job", "y"))
            self.assertEqual(master.dead_list(), [])
        self.assertEqual(state.requests[2], {"action": "dead_list", "offset": 0, "limit": 1, "ref": 3})

    def test_several_daemons_are_asked_in_turn(self):
        states = [FakeState(), FakeState()]
        daemons = [ScriptedDaemon(self, state) for state in states]
        names = ["%s:%d" % daemon.address for daemon in daemons]
        first, second = two_ids(names)
        # Each job lives on the daemon second in its line (the first was down at its submit).
        states[1].statuses[first] = {"state": "queued"}
        states[0].statuses[second] = {"state": "dead", "reason": "boom"}
        states[0].dead = [dead_entry(second, ENDED + 2)]
        states[1].dead = [dead_entry("a", ENDED + 1), dead_entry("b", ENDED + 3)]
        with Master(names) as master:
            self.assertEqual(master.status(first), {"id": first, "state": "queued", "daemon": names[1]})
            self.assertEqual(master.status(second), {"id": second, "state": "dead", "reason": "boom",
                                                     "daemon": names[0]})
            self.assertEqual(master.status("nope"), {"id": "nope", "state": "unknown"})
            page = master.dead_list()
            self.assertEqual([(entry["id"], entry["daemon"]) for entry in page],
                             [("a", names[1]), (second, names[0]), ("b", names[1])])
            self.assertEqual(page.total, 3)
            self.assertIsNone(master.dead_discard(second))
            self.assertEqual(master.dead_list(offset=1).total, 2)
            self.assertEqual([entry["id"] for entry in master.dead_list(offset=1)], ["b"])
        asked = [[request["action"] for request in state.requests] for state in states]
        self.assertEqual((asked[0].count("status"), asked[1].count("status")), (3, 3))  # each asked of both
        self.assertIn("dead_discard", asked[0])


# --- the asyncio client, over fake connections ---------------------------------------------------


class AsyncioFakeTests(SynchronousTestCase):
    def test_detached_submit_status_and_dead_letters(self):
        state = FakeState({"d": {"state": "delayed", "run_at": 1893456000.0}}, [dead_entry("x")])

        async def body():
            master = AsyncMaster("d:1", **QUICK)
            net = FakeNet(master)
            await master.start()
            (connection,) = net.connections

            async def ask(coroutine):
                task = asyncio.ensure_future(coroutine)
                await turn()
                for request in connection.transport.frames():
                    net.feed(connection, *state(request))
                return await task

            self.assertEqual(await ask(master.submit("t", 1, id="d", detach=True, delay=60)), "d")
            self.assertEqual(state.requests[-1], {"action": "submit", "id": "d", "type": "t", "body": 1,
                                                  "priority": 0, "detach": True, "delay": 60, "ref": 1})
            self.assertEqual(master.in_flight, 0)
            self.assertEqual(await ask(master.status("d")), {"id": "d", "state": "delayed", "run_at": 1893456000.0})
            page = await ask(master.dead_list(0, 10))
            self.assertEqual((list(page), page.total), ([dead_entry("x")], 1))
            self.assertIsNone(await ask(master.dead_retry("x")))
            with self.assertRaises(ServerError) as caught:
                await ask(master.dead_discard("x"))
            self.assertEqual(caught.exception.error, "unknown_job")
            with self.assertRaises(ValueError):
                await master.run("t", 1, detach=True)
            with self.assertRaises(ValueError):
                await master.submit("t", 1, retries=5000)
            self.assertEqual(connection.transport.frames(), [])
            await master.close()
        run(body())

    def test_status_waits_for_a_daemon_and_fails_with_fail_after(self):
        async def body():
            master = AsyncMaster("d:1", fail_after=2, **QUICK)
            net = FakeNet(master)
            net.refuse.add("d:1")
            await master.start()
            with self.assertRaises(TransportError):
                await master.status("d")
            with self.assertRaises(TransportError):
                await master.dead_list()  # at once, until a daemon is up
            await master.close()
        run(body())

    def test_a_detached_submit_lost_before_its_ack(self):
        async def body():
            master = AsyncMaster("d:1", **QUICK)
            net = FakeNet(master)
            await master.start()
            (connection,) = net.connections
            task = asyncio.ensure_future(master.submit("t", 1, id="d", detach=True))
            await turn()
            connection.connection_lost(ConnectionResetError(104, "Connection reset by peer"))
            with self.assertRaises(TransportError) as caught:
                await task
            self.assertIn("may or may not have taken detached job 'd'", str(caught.exception))
            await master.close()
        run(body())


# --- what the command prints -------------------------------------------------------------------


class FormatTests(SynchronousTestCase):
    def test_format_job(self):
        self.assertEqual(format_job({"id": "n", "state": "unknown"}), "n  unknown")
        self.assertEqual(format_job({"id": "d", "state": "completed", "detached": True, "type": "upper",
                                     "priority": 0, "attempts": 1, "result": {"a": "é"}, "ended_at": ENDED,
                                     "daemon": "a:1"}),
                         "d  completed  (on a:1)\n"
                         "  detached, type upper, priority 0, 1 attempt\n"
                         "  ended at 2023-11-14T22:13:20Z\n"
                         '  result: {"a":"é"}')
        self.assertEqual(format_job({"id": "d", "state": "dead", "detached": True, "type": "t", "priority": 2,
                                     "attempts": 4, "reason": "exit 3:\nno disk", "ended_at": ENDED}),
                         "d  dead\n"
                         "  detached, type t, priority 2, 4 attempts\n"
                         "  ended at 2023-11-14T22:13:20Z\n"
                         "  reason: exit 3: no disk")
        self.assertEqual(format_job({"id": "w", "state": "delayed", "detached": False, "type": "t", "priority": 0,
                                     "attempts": 0, "run_at": ENDED + 90}, now=ENDED),
                         "w  delayed\n"
                         "  attached, type t, priority 0, 0 attempts\n"
                         "  runs at 2023-11-14T22:14:50Z (in 1m30s)")

    def test_format_dead(self):
        page = DeadList([dead_entry("nightly", attempts=10), dead_entry("x", ENDED + 61, reason="r" * 100)], 5, 1)
        self.assertEqual(format_dead(page).splitlines(), [
            "ID       TYPE    PRIORITY  ATTEMPTS  ENDED                 REASON",
            "nightly  report         0        10  2023-11-14T22:13:20Z  exit status 3: disk",
            "x        report         0         4  2023-11-14T22:14:21Z  " + "r" * 77 + "...",
            "",
            "dead jobs 2-3 of 5; next: --offset 3",
        ])
        several = DeadList([dead_entry("x", daemon="a:1")], 1, 0)
        self.assertEqual(format_dead(several).splitlines()[0],
                         "ID  TYPE    PRIORITY  ATTEMPTS  ENDED                 DAEMON  REASON")
        self.assertEqual(format_dead(several).splitlines()[-1], "dead jobs 1-1 of 1")
        self.assertEqual(format_dead(DeadList([], 0, 0)), "(no dead jobs)")
        self.assertEqual(format_dead(DeadList([], 3, 10)), "(no dead jobs from number 11; 3 in all)")

    def test_parse_time(self):
        self.assertEqual(parse_time("1700000000.5"), 1700000000.5)
        self.assertEqual(parse_time("2023-11-14T22:13:20Z"), ENDED)
        self.assertEqual(parse_time("2023-11-14T23:13:20+01:00"), ENDED)
        local = datetime(2023, 11, 14, 22, 13, 20).timestamp()
        self.assertEqual(parse_time("2023-11-14 22:13:20"), local)
        for bad in ("tomorrow", "nan", "inf", "", "-1", "1969-12-31T00:00:00Z"):
            self.assertRaises(UsageError, parse_time, bad)


# --- the command, against scripted daemons --------------------------------------------------------


class _FakeConnection(Framed):
    def frameReceived(self, message):
        for reply in self.factory.state(message):
            self.send(reply)


class FakeDaemon(protocol.Factory):
    """A scripted master port in this reactor, answering from a `FakeState`."""

    protocol = _FakeConnection

    def __init__(self, test, state):
        self.state = state
        self.port = reactor.listenTCP(0, self, interface="127.0.0.1")
        self.address = f"127.0.0.1:{self.port.getHost().port}"
        test.addCleanup(self.port.stopListening)


class CLIFakeTests(CLITestCase):
    """``gloom`` as a process (the installed package), against scripted
    daemons."""

    @inlineCallbacks
    def test_submit_detach_and_its_options(self):
        state = FakeState()
        daemon = FakeDaemon(self, state)
        out, err, status = yield self.gloom("submit", "report", '{"day": 1}', "--detach", "--id", "nightly",
                                            "--at", "2023-11-14T22:13:20Z", "--retries", "2", "--backoff",
                                            "--priority", "3", "--master", daemon.address)
        self.assertEqual((out, err, status), ("nightly\n", "", 0))
        (request,) = [r for r in state.requests if r["action"] == "submit"]
        del request["ref"]
        self.assertEqual(request, {"action": "submit", "id": "nightly", "type": "report", "body": {"day": 1},
                                   "priority": 3, "detach": True, "at": ENDED, "retries": 2, "backoff": True})
        out, err, status = yield self.gloom("submit", "report", "--detach", "--lines", "--delay", "5",
                                            "--master", daemon.address, stdin=b"1\n2\n")
        ids = out.splitlines()
        self.assertEqual((len(ids), status), (2, 0), err)
        sent = [r for r in state.requests if r["action"] == "submit"][1:]
        self.assertEqual([(r["id"], r["body"], r["delay"], r["detach"]) for r in sent],
                         [(ids[0], 1, 5.0, True), (ids[1], 2, 5.0, True)])

    @inlineCallbacks
    def test_bad_usage_is_one_line_and_status_2(self):
        cases = [
            (["submit", "t", "--delay", "-1"],
             "gloom: --delay must be a number of seconds from 0 to 31536000 (365 days), not -1\n"),
            (["submit", "t", "--delay", "1", "--at", "2"], "gloom: give --delay or --at, not both\n"),
            (["submit", "t", "--delay", "soon"], "gloom: --delay must be a number of seconds, not 'soon'\n"),
            (["submit", "t", "--at", "tomorrow"],
             "gloom: --at must be seconds since the epoch or an ISO 8601 time such as 2026-01-02T03:00:00Z, "
             "not 'tomorrow'\n"),
            (["submit", "t", "--at", "2100-01-01T00:00:00Z"],
             "gloom: --at must be at most 31536000 seconds (365 days) from now, not 2100-01-01T00:00:00Z\n"),
            (["submit", "t", "--at", "-1"], "gloom: --at must not be before 1970, not '-1'\n"),
            (["submit", "t", "--at", "1960-01-01T00:00:00Z"],
             "gloom: --at must not be before 1970, not '1960-01-01T00:00:00Z'\n"),
            (["submit", "t", "--delay", "31536001"],
             "gloom: --delay must be a number of seconds from 0 to 31536000 (365 days), not 31536001\n"),
            (["submit", "t", "--retries", "1001"], "gloom: --retries must be a whole number from 0 to 1000, "
                                                   "not 1001\n"),
            (["submit", "t", "--detach", "--wait", "5"],
             "gloom: --wait waits for an answer, and a detached job gets none\n"),
            (["submit", "t", "--lines", "--id", "x"], "gloom: --id names one job: not with --lines\n"),
            (["dead", "list", "--limit", "0"], "gloom: --limit must be from 1 to 1000, not 0\n"),
            (["dead", "list", "--offset", "-5"], "gloom: --offset must not be negative, not -5\n"),
            (["job", ""], "gloom: a job id must not be empty\n"),
        ]
        results = yield defer.gatherResults([self.gloom(*args) for args, _ in cases])
        for (args, message), (out, err, status) in zip(cases, results):
            self.assertEqual((out, err, status), ("", message, 2), args)

    @inlineCallbacks
    def test_job(self):
        state = FakeState({"d": {"state": "completed", "detached": True, "type": "upper", "priority": 0,
                                 "attempts": 1, "result": "HI", "ended_at": ENDED},
                           "q": {"state": "queued", "detached": True, "type": "upper", "priority": 0,
                                 "attempts": 0}})
        daemon = FakeDaemon(self, state)
        out, err, status = yield self.gloom("job", "d", "q", "--master", daemon.address)
        self.assertEqual((out, err, status), (
            "d  completed\n  detached, type upper, priority 0, 1 attempt\n  ended at 2023-11-14T22:13:20Z\n"
            '  result: "HI"\n'
            "q  queued\n  detached, type upper, priority 0, 0 attempts\n", "", 0))
        out, err, status = yield self.gloom("job", "q", "nope", "--json", "--master", daemon.address)
        self.assertEqual(([json.loads(line) for line in out.splitlines()], err, status), ([
            {"id": "q", "state": "queued", "detached": True, "type": "upper", "priority": 0, "attempts": 0},
            {"id": "nope", "state": "unknown"}], "", 1))

    @inlineCallbacks
    def test_job_over_several_daemons_one_of_them_down(self):
        states = [FakeState(), FakeState()]
        daemons = [FakeDaemon(self, state) for state in states]
        down = f"127.0.0.1:{reserved_port(self)}"  # bound, never listening
        names = [daemon.address for daemon in daemons]
        first, second = two_ids(names)
        states[1].statuses[first] = {"state": "running"}
        masters = ["--master", ",".join(names + [down])]
        out, err, status = yield self.gloom("job", first, *masters)
        self.assertEqual((out, status), (f"{first}  running  (on {names[1]})\n", 0))
        self.assertEqual(err, f"gloom: cannot connect to {down}: Connection refused\n")
        out, err, status = yield self.gloom("job", first, second, *masters)
        self.assertEqual((out, status), (f"{first}  running  (on {names[1]})\n{second}  unknown\n", 3))
        out, err, status = yield self.gloom("job", second, "--master", ",".join(names))
        self.assertEqual((out, err, status), (f"{second}  unknown\n", "", 1))
        out, err, status = yield self.gloom("job", second, "--master", down)
        self.assertEqual((out, err, status), ("", f"gloom: cannot connect to {down}: Connection refused\n", 3))

    @inlineCallbacks
    def test_dead(self):
        state = FakeState(dead=[dead_entry("a"), dead_entry("b", ENDED + 1)])
        daemon = FakeDaemon(self, state)
        master = ["--master", daemon.address]
        out, err, status = yield self.gloom("dead", "list", *master)
        self.assertEqual((out.splitlines(), err, status), ([
            "ID  TYPE    PRIORITY  ATTEMPTS  ENDED                 REASON",
            "a   report         0         4  2023-11-14T22:13:20Z  exit status 3: disk",
            "b   report         0         4  2023-11-14T22:13:21Z  exit status 3: disk",
            "",
            "dead jobs 1-2 of 2"], "", 0))
        out, err, status = yield self.gloom("dead", "list", "--offset", "1", "--limit", "5", "--json", *master)
        self.assertEqual((json.loads(out), status), ({"total": 2, "offset": 1, "dead": [dead_entry("b", ENDED + 1)]},
                                                     0))
        self.assertEqual({k: v for k, v in state.requests[-1].items() if k != "ref"},
                         {"action": "dead_list", "offset": 1, "limit": 5})
        out, err, status = yield self.gloom("dead", "retry", "a", "nope", *master)
        self.assertEqual((out, err, status),
                         ("", "gloom: job a queued again\ngloom: unknown_job: no dead job has id 'nope'\n", 1))
        out, err, status = yield self.gloom("dead", "discard", "b", *master)
        self.assertEqual((out, err, status), ("", "gloom: job b discarded\n", 0))
        out, err, status = yield self.gloom("dead", "list", *master)
        self.assertEqual((out, status), ("(no dead jobs)\n", 0))

    @inlineCallbacks
    def test_dead_list_over_several_daemons_one_of_them_down(self):
        states = [FakeState(dead=[dead_entry("a1", ENDED + 2)]), FakeState(dead=[dead_entry("b1", ENDED + 1)])]
        daemons = [FakeDaemon(self, state) for state in states]
        down = f"127.0.0.1:{reserved_port(self)}"
        names = [daemon.address for daemon in daemons]
        out, err, status = yield self.gloom("dead", "list", "--json", "--master", ",".join(names + [down]))
        figures = json.loads(out)
        self.assertEqual([(entry["id"], entry["daemon"]) for entry in figures["dead"]],
                         [("b1", names[1]), ("a1", names[0])])
        self.assertEqual((figures["total"], figures["unreachable"], status),
                         (2, {down: f"cannot connect to {down}: Connection refused"}, 3))
        self.assertEqual(err, f"gloom: cannot connect to {down}: Connection refused\n")
        out, err, status = yield self.gloom("dead", "list", "--master", ",".join(names))
        self.assertIn("DAEMON", out.splitlines()[0])
        self.assertEqual(status, 0)


# --- end to end: the blocking client --------------------------------------------------------------


def wait_for(ask, predicate, timeout=10.0):
    """Call ``ask()`` until ``predicate`` holds of its result; return it."""
    deadline = time.monotonic() + timeout
    while True:
        value = ask()
        if predicate(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"still {value!r} after {timeout} s")
        time.sleep(0.01)


class BlockingEndToEndTests(ClientTestCase):
    def test_a_detached_job_runs_and_its_status_says_how_it_went(self):
        def body():
            self.serve_in_background(lambda job: job.body.upper(), "upper")
            address = self.addresses()[0]
            with Master(address) as master:
                job_id = master.submit(type="upper", body="hello", detach=True)
                self.assertRegex(job_id, "^[0-9a-f]{32}$")
            with Master(address) as other:  # the job is the daemon's, not its master's
                done = wait_for(lambda: other.status(job_id), lambda s: s["state"] == "completed")
                self.assertEqual((done["result"], done["detached"], done["attempts"], done["type"]),
                                 ("HELLO", True, 1, "upper"))
                self.assertRaises(Timeout, other.receive, 0.05)
        return deferToThread(body)

    def test_delayed_jobs_and_cancelling_a_detached_job(self):
        def body():
            address = self.addresses()[0]
            with Master(address) as master:
                job_id = master.submit(type="nobody", body=1, detach=True, delay=60)
                status = master.status(job_id)
                self.assertEqual(status["state"], "delayed")
                self.assertLess(abs(status["run_at"] - (time.time() + 60)), 5)  # trial's ignores delta
                with Master(address) as other:
                    self.assertIsNone(other.cancel(job_id))
                status = master.status(job_id)
                self.assertEqual((status["state"], status["reason"]), ("failed", "cancelled by a master"))
                self.assertRaises(ServerError, master.cancel, job_id)
            self.serve_in_background(lambda job: job.body * 2, "double")
            with Master(address) as master:
                self.assertEqual(master.run("double", 21, delay=0.05, retries=0, wait=10), 42)
                self.assertEqual(master.submit("later", "double", 2, at=time.time() + 0.05), "later")
                self.assertEqual(master.receive(10).body, 4)
        return deferToThread(body)

    def test_dead_letters(self):
        def body():
            def handler(job):
                raise RuntimeError(f"cannot do {job.body}")

            self.serve_in_background(handler, "doomed")
            with Master(self.addresses()[0]) as master:
                first = master.submit("first", "doomed", 1, detach=True, retries=0)
                wait_for(lambda: master.status(first), lambda s: s["state"] == "dead")
                second = master.submit("second", "doomed", 2, detach=True, retries=0)
                dead = wait_for(lambda: master.status(second), lambda s: s["state"] == "dead")
                self.assertIn("cannot do 2", dead["reason"])
                error = self.assertRaises(ServerError, master.submit, "second", "doomed", 3, detach=True)
                self.assertEqual(error.error, "id_exists")
                page = master.dead_list()
                self.assertEqual(([e["id"] for e in page], page.total), (["first", "second"], 2))
                self.assertIn("cannot do 1", page[0]["reason"])
                self.assertEqual([e["id"] for e in master.dead_list(offset=1, limit=1)], ["second"])
                master.dead_discard("second")
                master.dead_retry("first")  # it fails again, and dies again
                wait_for(lambda: master.dead_list(), lambda page: [e["id"] for e in page] == ["first"])
                self.assertEqual(self.assertRaises(ServerError, master.dead_retry, "second").error, "unknown_job")
                self.assertEqual(master.status("second")["state"], "unknown")
        return deferToThread(body)

    def test_several_daemons(self):
        other = self.other_daemon()  # in the reactor thread

        def body():
            names = [self.name(self.service), self.name(other)]
            self.serve_in_background(lambda job: job.body, "echo")
            with Master(names) as master:
                ids = [master.submit(type="nobody", body=n, detach=True) for n in range(10)]
            with Master(names) as master:
                for job_id in ids:
                    status = master.status(job_id)
                    self.assertEqual((status["state"], status["daemon"]),
                                     ("queued", core.rendezvous(job_id, names)[0]))
                    master.cancel(job_id)
                    self.assertEqual(master.status(job_id)["state"], "failed")
                self.assertEqual(master.dead_list(), [])
        return deferToThread(body)


# --- end to end: asyncio and Twisted -------------------------------------------------------------


class AsyncioEndToEndTests(DaemonsTestCase):
    def test_detached_delayed_and_dead(self):
        daemon = self.daemon()

        async def fail(job):
            raise RuntimeError("no")

        async def body():
            async with await work("upper", lambda job: job.body.upper(), slaves=daemon.slave, **QUICK), \
                    await work("doomed", fail, slaves=daemon.slave, **QUICK):
                async with AsyncMaster(daemon.master, **QUICK) as master:
                    job_id = await master.submit("upper", "hi", detach=True, delay=0.05)
                    while (await master.status(job_id))["state"] != "completed":
                        await asyncio.sleep(0.01)
                    self.assertEqual((await master.status(job_id))["result"], "HI")
                    self.assertEqual(await master.run("upper", "x", at=time.time() + 0.05, backoff=True), "X")
                    doomed = await master.submit("doomed", 1, detach=True, retries=0)
                    while (await master.status(doomed))["state"] != "dead":
                        await asyncio.sleep(0.01)
                    page = await master.dead_list()
                    self.assertEqual([entry["id"] for entry in page], [doomed])
                    await master.dead_discard(doomed)
                    self.assertEqual((await master.dead_list()).total, 0)
                    with self.assertRaises(ServerError):
                        await master.dead_retry(doomed)
        return self.run_async(body)


class TwistedEndToEndTests(CLITestCase):
    @inlineCallbacks
    def test_detached_job_over_tcp(self):
        worker = Worker("upper", lambda job: job.body.upper(), slaves=f"127.0.0.1:{self.port('slave')}",
                        retry_policy=FAST_RETRY)
        worker.start()
        self.addCleanup(worker.stop)
        master = MasterClient(f"127.0.0.1:{self.port('master')}", retry_policy=FAST_RETRY)
        yield master.start()
        self.addCleanup(master.stop)
        job_id = yield master.submit("upper", "tcp", detach=True)
        yield self.until(lambda: self.scheduler.totals["completed"] == 1)
        status = yield master.status(job_id)
        self.assertEqual((status["state"], status["result"]), ("completed", "TCP"))
        page = yield master.dead_list()
        self.assertEqual((list(page), page.total), ([], 0))


# --- end to end: the command ----------------------------------------------------------------------


class CLIEndToEndTests(CLITestCase):
    @inlineCallbacks
    def test_submit_detach_then_job(self):
        worker = Worker("upper", lambda job: job.body.upper(), slaves=f"127.0.0.1:{self.port('slave')}",
                        retry_policy=FAST_RETRY)
        worker.start()
        self.addCleanup(worker.stop)
        out, err, status = yield self.gloom("submit", "upper", '"hi"', "--detach", *self.master_arg())
        self.assertEqual((status, err), (0, ""))
        job_id = out.strip()
        self.assertRegex(job_id, "^[0-9a-f]{32}$")
        yield self.until(lambda: self.scheduler.totals["completed"] == 1)
        out, err, status = yield self.gloom("job", job_id, "--json", *self.master_arg())
        figures = json.loads(out)
        self.assertEqual((figures["state"], figures["result"], status), ("completed", "HI", 0), err)
        out, err, status = yield self.gloom("job", job_id, *self.master_arg())
        self.assertTrue(out.startswith(f"{job_id}  completed\n  detached, type upper, priority 0, 1 attempt\n"),
                        out)
        self.assertIn('  result: "HI"\n', out)

    @inlineCallbacks
    def test_delay_at_and_cancel(self):
        out, err, status = yield self.gloom("submit", "nobody", "1", "--detach", "--id", "later", "--delay", "3600",
                                            *self.master_arg())
        self.assertEqual((out, status), ("later\n", 0), err)
        out, err, status = yield self.gloom("job", "later", "--json", *self.master_arg())
        figures = json.loads(out)
        self.assertEqual(figures["state"], "delayed")
        self.assertLess(abs(figures["run_at"] - (time.time() + 3600)), 60)
        when = int(time.time()) + 30 * 86400
        iso = datetime.fromtimestamp(when, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        out, err, status = yield self.gloom("submit", "nobody", "1", "--detach", "--id", "dated", "--at", iso,
                                            *self.master_arg())
        self.assertEqual((out, status), ("dated\n", 0), err)
        out, err, status = yield self.gloom("job", "dated", "--json", *self.master_arg())
        self.assertEqual(json.loads(out)["run_at"], when)
        out, err, status = yield self.gloom("cancel", "dated", *self.master_arg())
        self.assertEqual((err, status), ("gloom: job dated cancelled\n", 0))
        out, err, status = yield self.gloom("job", "dated", *self.master_arg())
        self.assertIn("dated  failed\n", out)
        self.assertIn("  reason: cancelled by a master\n", out)

    @inlineCallbacks
    def test_dead_list_retry_and_discard(self):
        def fail(job):
            raise RuntimeError(f"no {job.body}")

        worker = Worker("doomed", fail, slaves=f"127.0.0.1:{self.port('slave')}", retry_policy=FAST_RETRY)
        worker.start()
        self.addCleanup(worker.stop)
        for job_id in ("one", "two"):
            out, err, status = yield self.gloom("submit", "doomed", "1", "--detach", "--id", job_id,
                                                "--retries", "0", *self.master_arg())
            self.assertEqual(status, 0, err)
        yield self.until(lambda: self.service.factories[0].detached.status("two") is not None
                         and self.service.factories[0].detached.status("two")["state"] == "dead")
        yield self.until(lambda: self.service.factories[0].detached.status("one")["state"] == "dead")
        out, err, status = yield self.gloom("dead", "list", *self.master_arg())
        lines = out.splitlines()
        self.assertEqual(lines[0].split(), ["ID", "TYPE", "PRIORITY", "ATTEMPTS", "ENDED", "REASON"])
        self.assertEqual(sorted(line.split()[0] for line in lines[1:3]), ["one", "two"])
        self.assertEqual((lines[-1], status), ("dead jobs 1-2 of 2", 0))
        out, err, status = yield self.gloom("dead", "discard", "one", "two", *self.master_arg())
        self.assertEqual((err, status), ("gloom: job one discarded\ngloom: job two discarded\n", 0))
        out, err, status = yield self.gloom("dead", "retry", "one", *self.master_arg())
        self.assertEqual(status, 1)
        self.assertIn("unknown_job", err)
        out, err, status = yield self.gloom("job", "one", *self.master_arg())
        self.assertEqual((out, status), ("one  unknown\n", 1))
