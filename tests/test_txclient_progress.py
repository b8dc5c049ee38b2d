"""The Twisted client (gloom.txclient) and issue 13: a job's progress and
touch, unique submits, and pause, resume, clear and drain.

First the shell over scripted daemons (StringTransport, on a
MemoryReactorClock: each frame the client writes is read, and each reply
written, by the test); then against in-memory daemons (twisted.test.iosim);
then end to end against a real daemon on loopback."""

import threading

from twisted.internet import defer
from twisted.internet.defer import CancelledError, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.test.iosim import ConnectionCompleter
from twisted.trial.unittest import SynchronousTestCase

from gloom import core
from gloom.core import EncodeError, ServerError, TransportError
from gloom.txclient import MasterClient, Worker
from tests.support import live_ids
from tests.test_txclient import RETRY, Memory, MemoryTestCase, Scripted, TxClientTestCase, refused

JOIN = {"action": "join", "type": "t"}


# --- masters, scripted -----------------------------------------------------------------------


class MasterTestCase(SynchronousTestCase):
    def setUp(self):
        self.script = Scripted()

    def master(self, ports=(9000,), start=True):
        master = MasterClient([f"tcp:127.0.0.1:{port}" for port in ports], self.script.reactor,
                              retry_policy=RETRY)
        if start:
            self.started = master.start()
        return master

    def stop(self, master):
        stopped = master.stop()
        self.script.reactor.advance(0)
        self.script.close_closing()
        self.successResultOf(stopped)


class MasterProgressTests(MasterTestCase):
    def test_progress_comes_in_order_before_the_answer(self):
        master = self.master()
        (peer,) = self.script.accept()
        events = []
        answer = master.submit("t", 1, id="j", unique="key", on_progress=lambda p: events.append(("p", p)))
        answer.addCallback(lambda body: events.append(("answer", body)))
        self.assertEqual(peer.received(), [{"action": "submit", "id": "j", "type": "t", "body": 1,
                                            "priority": 0, "unique": "key", "ref": 1}])
        peer.send({"ok": True, "id": "j", "ref": 1},
                  {"id": "j", "progress": {"done": 1, "total": 3}},
                  {"id": "j", "progress": {"data": {"step": "two"}}})
        self.assertEqual(events, [("p", {"done": 1, "total": 3}), ("p", {"data": {"step": "two"}})])
        self.assertNoResult(answer)
        peer.send({"id": "j", "progress": {"done": 3, "total": 3}}, {"id": "j", "body": "done"})
        self.assertEqual(events[2:], [("p", {"done": 3, "total": 3}), ("answer", "done")])
        self.assertEqual(master._watchers, {})

    def test_run_takes_unique_and_on_progress_too(self):
        master = self.master()
        (peer,) = self.script.accept()
        seen = []
        answer = master.run("t", None, id="r", unique="same", on_progress=seen.append)
        (sent,) = peer.received()
        self.assertEqual(sent["unique"], "same")
        peer.send({"ok": True, "id": "r", "coalesced": True, "ref": 1}, {"id": "r", "progress": {"done": 0.5}},
                  {"error": "job_failed", "reason": "no", "id": "r"})
        self.assertEqual(seen, [{"done": 0.5}])
        self.assertEqual(self.failureResultOf(answer, ServerError).value.error, "job_failed")

    def test_a_cleared_job_fails_with_cleared(self):
        master = self.master()
        (peer,) = self.script.accept()
        answer = master.submit("t", None, id="c")
        peer.received()
        peer.send({"ok": True, "id": "c", "ref": 1}, {"error": "cleared", "reason": "cleared by an admin", "id": "c"})
        error = self.failureResultOf(answer, ServerError).value
        self.assertEqual((error.error, error.id), ("cleared", "c"))

    def test_no_progress_once_the_deferred_is_cancelled(self):
        master = self.master()
        (peer,) = self.script.accept()
        seen = []
        answer = master.submit("t", None, id="j", on_progress=seen.append)
        peer.received()
        peer.send({"ok": True, "id": "j", "ref": 1}, {"id": "j", "progress": {"done": 1}})
        answer.cancel()
        self.failureResultOf(answer, CancelledError)
        self.assertEqual(peer.received(), [{"action": "cancel", "id": "j", "ref": 2}])
        peer.send({"id": "j", "progress": {"done": 2}}, {"ok": True, "id": "j", "ref": 2})
        self.assertEqual(seen, [{"done": 1}])
        self.assertEqual(master._watchers, {})

    def test_an_on_progress_that_raises_is_logged(self):
        master = self.master()
        (peer,) = self.script.accept()
        answer = master.submit("t", None, id="j", on_progress=lambda p: 1 / 0)
        peer.received()
        peer.send({"ok": True, "id": "j", "ref": 1}, {"id": "j", "progress": {"done": 1}},
                  {"id": "j", "progress": {"done": 2}}, {"id": "j", "body": "fine"})
        self.assertEqual(self.successResultOf(answer), "fine")
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 2)
        self.assertFalse(peer.transport.disconnecting)

    def test_progress_of_a_job_without_on_progress_is_kept_on_the_request(self):
        master = self.master()
        (peer,) = self.script.accept()
        answer = master.submit("t", None, id="j")
        request = master._core.jobs["j"]
        peer.received()
        peer.send({"ok": True, "id": "j", "ref": 1}, {"id": "j", "progress": {"done": 7}})
        self.assertEqual(request.progress, {"done": 7})
        peer.send({"id": "j", "body": None})
        self.assertIsNone(self.successResultOf(answer))

    def test_mistakes_raise_at_once_and_send_nothing(self):
        master = self.master()
        (peer,) = self.script.accept()
        self.assertRaises(TypeError, master.submit, "t", 1, on_progress="print")
        self.assertRaises(ValueError, master.submit, "t", 1, unique="")
        self.assertRaises(ValueError, master.submit, "t", 1, unique=7)
        self.assertRaises(ValueError, master.submit, "t", 1, unique="é" * 513)
        self.assertRaises(ValueError, master.submit, "t", 1, unique="k", detach=True)
        self.assertRaises(ValueError, master.run, "t", 1, detach=True, on_progress=print)
        self.assertEqual((peer.received(), master._core.in_flight, master._watchers), ([], 0, {}))
        master.submit("t", 1, unique="é" * 512)  # 1024 bytes: the most
        self.assertEqual(len(peer.received()), 1)


class UniqueRoutingTests(MasterTestCase):
    """A unique submit made before `start` fired waits until every daemon
    was tried, then goes to its key's daemon if that one is up."""

    names = ["tcp:127.0.0.1:9000", "tcp:127.0.0.1:9010"]

    def key_for(self, first):
        return next(key for key in (f"k{n}" for n in range(1000))
                    if core.rendezvous(key, self.names)[0] == first)

    def accept_port(self, port):
        """Accept the pending attempt to ``port`` only."""
        reactor = self.script.reactor
        index = next(i for i, attempt in enumerate(reactor.tcpClients) if attempt[1] == port)
        reactor.tcpClients.insert(0, reactor.tcpClients.pop(index))
        reactor.connectors.insert(0, reactor.connectors.pop(index))
        pending = reactor.tcpClients[1:]
        connectors = reactor.connectors[1:]
        del reactor.tcpClients[1:], reactor.connectors[1:]
        (peer,) = self.script.accept()
        reactor.tcpClients.extend(pending)
        reactor.connectors.extend(connectors)
        return peer

    def test_it_meets_on_the_keys_daemon_even_if_another_connected_first(self):
        master = self.master(ports=(9000, 9010))
        key = self.key_for("tcp:127.0.0.1:9000")
        other = self.accept_port(9010)
        answer = master.submit("t", 1, id="j", unique=key)
        plain = master.submit("t", 2, id="p")
        self.assertEqual([m["id"] for m in other.received()], ["p"])  # the unique one waits
        self.assertNoResult(self.started)
        (own,) = self.script.accept()
        self.assertEqual(own.port, 9000)
        self.assertEqual(own.received(), [{"action": "submit", "id": "j", "type": "t", "body": 1,
                                           "priority": 0, "unique": key, "ref": 1}])
        self.successResultOf(self.started)
        own.send({"ok": True, "id": "j", "ref": 1}, {"id": "j", "body": "done"})
        self.assertEqual(self.successResultOf(answer), "done")
        self.assertNoResult(plain)

    def test_the_keys_daemon_down_it_goes_to_the_next_up(self):
        master = self.master(ports=(9000, 9010))
        key = self.key_for("tcp:127.0.0.1:9000")
        other = self.accept_port(9010)
        master.submit("t", 1, id="j", unique=key)
        self.assertEqual(other.received(), [])
        ConnectionCompleter(self.script.reactor).failOnce(refused())  # 9000's first attempt
        self.successResultOf(self.started)
        self.assertEqual([m["id"] for m in other.received()], ["j"])

    def test_on_ack_says_whether_it_joined_a_job_already_there(self):
        master = self.master()
        (peer,) = self.script.accept()
        acks = []
        first = master.submit("t", 1, id="a", unique="k", on_ack=lambda joined: acks.append(("a", joined)))
        second = master.run("t", 1, id="b", unique="k", on_ack=lambda joined: acks.append(("b", joined)))
        master.submit("t", 1, id="c", on_ack=lambda joined: 1 / 0)
        peer.received()
        peer.send({"ok": True, "id": "a", "ref": 1}, {"ok": True, "id": "b", "coalesced": True, "ref": 2},
                  {"ok": True, "id": "c", "ref": 3})
        self.assertEqual(acks, [("a", False), ("b", True)])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        peer.send({"id": "a", "body": 5}, {"id": "b", "body": 5})
        self.assertEqual((self.successResultOf(first), self.successResultOf(second)), (5, 5))
        self.assertEqual(master._ack_watchers, {k: v for k, v in master._ack_watchers.items() if k.id == "c"})
        self.assertRaises(TypeError, master.submit, "t", 1, on_ack="print")


# --- admin, scripted ---------------------------------------------------------------------------


class AdminTests(MasterTestCase):
    def test_every_daemon_is_asked(self):
        master = self.master(ports=(9000, 9010))
        peers = self.script.accept()
        self.assertEqual(sorted(peer.port for peer in peers), [9000, 9010])
        paused = master.pause("t")
        self.assertEqual([peer.received() for peer in peers], [[{"action": "pause", "type": "t", "ref": 1}]] * 2)
        peers[0].send({"ok": True, "ref": 1})
        self.assertNoResult(paused)
        peers[1].send({"ok": True, "ref": 1})
        self.assertIsNone(self.successResultOf(paused))

        resumed = master.resume("t")
        self.assertEqual([peer.received() for peer in peers], [[{"action": "resume", "type": "t", "ref": 2}]] * 2)
        for peer in peers:
            peer.send({"ok": True, "ref": 2})
        self.assertIsNone(self.successResultOf(resumed))

        cleared = master.clear("t")
        self.assertEqual([peer.received() for peer in peers], [[{"action": "clear", "type": "t", "ref": 3}]] * 2)
        peers[0].send({"ok": True, "cleared": 2, "ref": 3})
        peers[1].send({"ok": True, "cleared": 3, "ref": 3})
        self.assertEqual(self.successResultOf(cleared), 5)

        drained = master.drain()
        self.assertEqual([peer.received() for peer in peers], [[{"action": "drain", "ref": 4}]] * 2)
        for peer in peers:
            peer.send({"ok": True, "ref": 4})
        self.assertIsNone(self.successResultOf(drained))

    def test_a_refusal_wins(self):
        master = self.master(ports=(9000, 9010))
        peers = self.script.accept()
        cleared = master.clear("t")
        for peer in peers:
            peer.received()
        peers[0].send({"ok": True, "cleared": 4, "ref": 1})
        peers[1].send({"error": "forbidden", "reason": "start it with --admin", "ref": 1})
        error = self.failureResultOf(cleared, ServerError).value
        self.assertEqual((error.error, error.daemon), ("forbidden", f"tcp:127.0.0.1:{peers[1].port}"))

    def test_a_daemon_not_connected_is_named_after_the_others_were_asked(self):
        master = self.master(ports=(9000, 9010))
        ConnectionCompleter(self.script.reactor).failOnce(refused())  # 9000's first attempt
        (peer,) = self.script.accept()
        self.assertEqual(peer.port, 9010)
        paused = master.pause("t")
        self.assertEqual(peer.received(), [{"action": "pause", "type": "t", "ref": 1}])
        peer.send({"ok": True, "ref": 1})
        error = self.failureResultOf(paused, TransportError).value
        self.assertEqual(str(error), "tcp:127.0.0.1:9000 not connected: pause was not sent there "
                                     "(done on tcp:127.0.0.1:9010)")
        self.assertEqual(error.daemon, "tcp:127.0.0.1:9000")

    def test_asked_once_every_daemon_was_tried(self):
        master = self.master(ports=(9000,), start=False)
        cleared = master.clear("t")
        self.assertNoResult(cleared)
        self.started = master.start()
        self.assertNoResult(cleared)
        (peer,) = self.script.accept()
        self.assertEqual(peer.received(), [{"action": "clear", "type": "t", "ref": 1}])
        peer.send({"ok": True, "cleared": 0, "ref": 1})
        self.assertEqual(self.successResultOf(cleared), 0)

    def test_mistakes_raise_at_once_and_a_stopped_client_fails(self):
        master = self.master()
        (peer,) = self.script.accept()
        for call in (lambda: master.pause(""), lambda: master.resume(None), lambda: master.clear(3)):
            self.assertRaises(ValueError, call)
        self.assertEqual(peer.received(), [])
        waiting = master.pause("t")
        peer.received()
        self.stop(master)
        self.failureResultOf(waiting, TransportError)
        self.assertEqual(str(self.failureResultOf(master.drain(), TransportError).value),
                         "the client was stopped")


# --- workers, scripted ---------------------------------------------------------------------------


class WorkerProgressTests(SynchronousTestCase):
    def setUp(self):
        self.script = Scripted()
        self.said = []
        self.jobs = []
        self.held = defer.Deferred()

    def handler(self, job):
        self.jobs.append(job)
        return self.held

    def worker(self, handler=None):
        worker = Worker("t", handler or self.handler, 1, ["tcp:127.0.0.1:9001"], self.script.reactor,
                        retry_policy=RETRY, report=self.said.append)
        worker.start()
        (self.peer,) = self.script.accept()
        self.assertEqual(self.peer.received(), [JOIN])
        self.peer.send({"ok": True})
        return worker

    def test_progress_and_touch_from_the_handler(self):
        def handler(job):
            self.assertIs(job.progress(1, 10), True)
            return self.handler(job)

        self.worker(handler)
        peer = self.peer
        peer.send({"action": "job", "id": "j1", "type": "t", "body": None})
        self.assertEqual(peer.received(), [{"action": "progress", "id": "j1", "done": 1, "total": 10}])
        (job,) = self.jobs
        self.assertIs(job.touch(), True)
        self.assertIs(job.progress(data={"step": "two"}), True)
        self.assertIs(job.progress(total=2.5), True)
        self.assertEqual(peer.received(), [{"action": "touch", "id": "j1"},
                                           {"action": "progress", "id": "j1", "data": {"step": "two"}},
                                           {"action": "progress", "id": "j1", "total": 2.5}])
        peer.send({"ok": True}, {"ok": True}, {"ok": True}, {"ok": True})
        self.assertFalse(job.cancelled)
        self.assertRaises(ValueError, job.progress)
        self.assertRaises(ValueError, job.progress, -1)
        self.assertRaises(ValueError, job.progress, True)
        self.assertRaises(EncodeError, job.progress, data=float("nan"))
        self.assertEqual(peer.received(), [])
        self.held.callback("answer")
        self.assertEqual(peer.received(), [{"action": "respond", "id": "j1", "body": "answer"}])
        self.assertIs(job.progress(2, 10), False)
        self.assertIs(job.touch(), False)
        self.assertEqual(peer.received(), [])
        self.assertEqual(self.said, [])

    def test_a_cancelled_reply_sets_cancelled(self):
        self.worker()
        peer = self.peer
        peer.send({"action": "job", "id": "j1", "type": "t", "body": None})
        (job,) = self.jobs
        job.progress(1)
        job.touch()
        peer.received()
        peer.send({"error": "cancelled", "reason": "every master withdrew it", "id": "j1"})
        self.assertTrue(job.cancelled)
        peer.send({"error": "cancelled", "reason": "every master withdrew it", "id": "j1"})
        self.assertEqual(len(self.said), 1)
        self.assertIn("'j1' was cancelled", self.said[0])
        self.held.callback("dropped anyway")  # the job is still answered
        self.assertEqual(peer.received(), [{"action": "respond", "id": "j1", "body": "dropped anyway"}])

    def test_a_late_touch_is_reported(self):
        self.worker()
        peer = self.peer
        peer.send({"action": "job", "id": "j1", "type": "t", "body": None})
        (job,) = self.jobs
        job.touch()
        peer.received()
        peer.send({"error": "timed_out", "reason": "too late", "id": "j1"})
        self.assertFalse(job.cancelled)
        self.assertEqual(len(self.said), 1)
        self.assertIn("timeout", self.said[0])

    def test_from_another_thread_it_goes_through_call_from_thread(self):
        calls = []
        self.script.reactor.callFromThread = lambda f, *args: calls.append((f, args))
        self.worker()
        peer = self.peer
        peer.send({"action": "job", "id": "j1", "type": "t", "body": None})
        (job,) = self.jobs
        outcomes = []

        def in_a_thread():
            payload = {"rows": [1]}
            outcomes.append(job.progress(1, 2, data=payload))
            payload["rows"].append(2)  # too late to change what was sent
            outcomes.append(job.touch())
            try:
                job.progress(done=-3)
            except ValueError as e:
                outcomes.append(str(e))

        thread = threading.Thread(target=in_a_thread)
        thread.start()
        thread.join()
        self.assertEqual(outcomes, [True, True, "progress done must be a number, 0 or more, not -3"])
        self.assertEqual(peer.received(), [])  # nothing written from that thread
        self.assertEqual(len(calls), 2)
        for function, args in calls:
            function(*args)
        self.assertEqual(peer.received(), [
            {"action": "progress", "id": "j1", "done": 1, "total": 2, "data": {"rows": [1]}},
            {"action": "touch", "id": "j1"}])
        self.held.callback(None)
        peer.received()
        del calls[:]
        thread = threading.Thread(target=lambda: outcomes.append(job.progress(2, 2)))
        thread.start()
        thread.join()
        self.assertEqual((outcomes[-1], calls), (False, []))

    def test_a_worker_waits_for_the_replies_to_its_progress_before_disconnecting(self):
        worker = self.worker()
        peer = self.peer
        peer.send({"action": "job", "id": "j1", "type": "t", "body": None})
        (job,) = self.jobs
        stopped = worker.stop()
        job.progress(1, 1)
        self.held.callback("x")
        self.assertEqual(peer.received(), [{"action": "progress", "id": "j1", "done": 1, "total": 1},
                                           {"action": "leave"}, {"action": "respond", "id": "j1", "body": "x"}])
        peer.send({"ok": True}, {"ok": True})
        self.assertFalse(peer.transport.disconnecting)
        peer.send({"ok": True})
        self.assertTrue(peer.transport.disconnecting)
        self.script.close_closing()
        self.successResultOf(stopped)


# --- in-memory daemons ---------------------------------------------------------------------------


class MemoryProgressTests(MemoryTestCase):
    """Masters and workers connected to in-memory daemons (``--admin``)."""

    def setUp(self):
        self.memory = Memory(2, admin=True)

    def test_progress_from_the_worker_reaches_every_submitter_of_a_unique_job(self):
        memory = Memory(1)
        held = defer.Deferred()
        runs = []

        def handler(job):
            runs.append(job)
            job.progress(0, 2)
            return held

        self.worker(handler, memory=memory)
        master = self.master(memory)
        seen = {"a": [], "b": []}
        first = master.submit("t", 1, id="a", unique="k", on_progress=seen["a"].append)
        memory.flush()
        second = master.submit("t", 2, id="b", unique="k", on_progress=seen["b"].append)
        memory.flush()
        self.assertEqual([request.coalesced for request in master._core.jobs.values()], [False, True])
        (job,) = runs
        self.assertIs(job.progress(1, 2, data="half"), True)
        self.assertIs(job.touch(), True)
        memory.flush()
        held.callback("shared")
        memory.flush()
        self.assertEqual((self.successResultOf(first), self.successResultOf(second)), ("shared", "shared"))
        self.assertEqual(seen, {"a": [{"done": 0, "total": 2}, {"done": 1, "total": 2, "data": "half"}],
                                "b": [{"done": 1, "total": 2, "data": "half"}]})
        self.assertEqual(len(runs), 1)
        totals = memory.daemons[0].scheduler.totals
        self.assertEqual((totals["coalesced"], totals["progress"], totals["touched"]), (1, 2, 1))

    def test_pause_clear_resume_over_two_daemons(self):
        ran = []
        self.worker(lambda job: ran.append(job.body) or job.body, concurrency=2)  # one ask on each daemon
        master = self.master()
        paused = master.pause("t")
        self.memory.flush()
        self.assertIsNone(self.successResultOf(paused))
        self.assertEqual([daemon.scheduler.paused for daemon in self.memory.daemons], [{"t"}, {"t"}])
        doomed = [master.submit("t", n) for n in range(6)]
        self.memory.flush()
        self.assertEqual(ran, [])
        self.assertEqual(sum(len(live_ids(daemon.scheduler)) for daemon in self.memory.daemons), 6)
        cleared = master.clear("t")
        self.memory.flush()
        self.assertEqual(self.successResultOf(cleared), 6)
        for answer in doomed:
            self.assertEqual(self.failureResultOf(answer, ServerError).value.error, "cleared")
        kept = master.submit("t", "after")
        self.memory.flush()
        self.assertNoResult(kept)
        resumed = master.resume("t")
        self.memory.flush()
        self.successResultOf(resumed)
        self.assertEqual(self.successResultOf(kept), "after")
        self.assertEqual(ran, ["after"])

    def test_drain_refuses_new_submits(self):
        held = defer.Deferred()
        self.worker(lambda job: held, concurrency=2)
        master = self.master()
        running = master.submit("t", 1)
        self.memory.flush()
        drained = master.drain()
        self.memory.flush()
        self.assertIsNone(self.successResultOf(drained))
        refused = master.submit("t", 2)
        self.memory.flush()
        self.assertEqual(self.failureResultOf(refused, ServerError).value.error, "shutdown")
        held.callback("finished")
        self.memory.flush()
        self.assertEqual(self.successResultOf(running), "finished")


# --- against a real daemon ----------------------------------------------------------------------


class ProgressEndToEndTests(TxClientTestCase):
    options = {"admin": True}

    @inlineCallbacks
    def test_progress_before_the_answer_from_the_reactor_and_a_thread(self):
        def in_a_thread(job):
            job.progress(1, 2, data="thread")
            job.touch()
            return job.body * 2

        def handler(job):
            job.progress(0, 2)
            return deferToThread(in_a_thread, job).addCallback(lambda value: (job.progress(2, 2), value)[1])

        self.worker("t", handler)
        master = self.master()
        events = []
        answer = yield master.run("t", 21, on_progress=events.append)
        self.assertEqual(answer, 42)
        self.assertEqual(events, [{"done": 0, "total": 2}, {"done": 1, "total": 2, "data": "thread"},
                                  {"done": 2, "total": 2}])

    @inlineCallbacks
    def test_unique_submits_share_one_job(self):
        progressed, release = defer.Deferred(), defer.Deferred()
        runs = []

        def handler(job):
            runs.append(job.id)
            job.progress(0, 1)
            return release.addCallback(lambda _: (job.progress(1, 1), "shared")[1])

        def first_progress(progress):
            seen["a"].append(progress)
            if not progressed.called:
                progressed.callback(None)

        self.worker("t", handler)
        master = self.master()
        seen = {"a": [], "b": []}
        first = master.submit("t", 1, id="a", unique="k", on_progress=first_progress)
        yield progressed  # so the second submit comes after the first progress
        second = master.submit("t", 2, id="b", unique="k", on_progress=seen["b"].append)
        yield master.stats()  # the second submit was acked by now
        status = yield master.status("a")
        self.assertEqual((status["state"], status["unique"], status["progress"]),
                         ("running", "k", {"done": 0, "total": 1}))
        release.callback(None)
        self.assertEqual((yield defer.gatherResults([first, second])), ["shared", "shared"])
        self.assertEqual(runs, ["a"])
        self.assertEqual(seen, {"a": [{"done": 0, "total": 1}, {"done": 1, "total": 1}],
                                "b": [{"done": 1, "total": 1}]})
        stats = yield master.stats()
        self.assertEqual(stats["totals"]["coalesced"], 1)

    @inlineCallbacks
    def test_pause_clear_and_resume(self):
        master = self.master()
        ran = []
        self.worker("t", lambda job: ran.append(job.body) or job.body)
        yield master.pause("t")
        stats = yield master.stats()
        self.assertEqual(stats["paused"], ["t"])
        doomed = [master.submit("t", n) for n in range(3)]
        yield self.until(lambda: self.scheduler.queued("t") == 3)
        self.assertEqual((yield master.clear("t")), 3)
        for answer in doomed:
            self.assertEqual((yield self.assertFailure(answer, ServerError)).error, "cleared")
        kept = master.submit("t", "after")
        yield self.until(lambda: self.scheduler.queued("t") == 1)
        self.assertEqual(ran, [])
        yield master.resume("t")
        self.assertEqual((yield kept), "after")
        self.assertEqual(ran, ["after"])


class ForbiddenEndToEndTests(TxClientTestCase):
    @inlineCallbacks
    def test_admin_needs_the_flag(self):
        master = self.master()
        error = yield self.assertFailure(master.pause("t"), ServerError)
        self.assertEqual(error.error, "forbidden")
