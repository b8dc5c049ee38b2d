"""The Twisted client (gloom.txclient): the shell over gloom.core tested
without sockets, on a MemoryReactorClock, against in-memory daemons
(connected with twisted.test.iosim) and scripted daemons (StringTransport);
then a few end-to-end tests against a real daemon on loopback."""

import errno
import math
import shutil
import tempfile

from OpenSSL import SSL
from service_identity import VerificationError
from service_identity.hazmat import DNS_ID, DNSMismatch
from twisted.internet import defer, endpoints, reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, inlineCallbacks
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.test.iosim import ConnectionCompleter
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from gloom import core, txclient
from gloom.core import EncodeError, ServerError, TransportError, WorkerError
from gloom.txclient import MasterClient, Worker, client_endpoint, describe_failure, work
from tests.support import Daemon, frame, live_ids, record_answers, reserved_port, unframe
from tests.test_integration import DaemonTestCase

FAST_RETRY = lambda attempt: 0.02  # noqa: E731  (reconnect at once in tests)
RETRY = lambda attempt: 1.0  # noqa: E731  (in memory: one second of the test's clock)


def refused() -> Failure:
    return Failure(ConnectionRefusedError(osError=errno.ECONNREFUSED))


def forget_stopped(reactor: MemoryReactorClock) -> None:
    """Drop the connection attempts that were cancelled (a real reactor
    stops them; a MemoryReactor only marks their connector)."""
    pairs = [(client, connector) for client, connector in zip(reactor.tcpClients, reactor.connectors)
             if not connector.stoppedConnecting]
    reactor.tcpClients[:] = [client for client, _ in pairs]
    reactor.connectors[:] = [connector for _, connector in pairs]


def daemon_stats(daemon: Daemon) -> dict:
    """The figures of an in-memory daemon, in the shape of the stats reply."""
    return {"version": "test", "uptime": 1.0, "masters": len(daemon.masters.connections),
            "slaves": len(daemon.slaves.connections), "types": daemon.scheduler.types(),
            "totals": dict(daemon.scheduler.totals)}


class Memory:
    """In-memory daemons listening on a MemoryReactorClock; the clients'
    connection attempts are completed to them with iosim, or refused."""

    def __init__(self, count: int = 1, **options):
        self.reactor = MemoryReactorClock()
        self.daemons = [Daemon(**options) for _ in range(count)]
        for index, daemon in enumerate(self.daemons):
            daemon.masters.stats = lambda daemon=daemon: daemon_stats(daemon)
            self.listen(index)
        self.completer = ConnectionCompleter(self.reactor)
        self.pumps = []

    @staticmethod
    def port(index: int, role: str) -> int:
        return 9000 + 10 * index + (role == "slave")

    def name(self, index: int, role: str = "master") -> str:
        return f"tcp:127.0.0.1:{self.port(index, role)}"

    def addresses(self, role: str, *indexes) -> list:
        return [self.name(index, role) for index in (indexes or range(len(self.daemons)))]

    def listen(self, index: int) -> None:
        daemon = self.daemons[index]
        self.reactor.listenTCP(self.port(index, "master"), daemon.masters)
        self.reactor.listenTCP(self.port(index, "slave"), daemon.slaves)

    def flush(self) -> None:
        """Complete pending connections to listening daemons, move bytes and
        run what is due now, until nothing moves."""
        while True:
            moved = False
            while True:
                forget_stopped(self.reactor)
                pump = self.completer.succeedOnce()
                if pump is None:
                    break
                self.pumps.append(pump)
                moved = True
            for pump in list(self.pumps):
                if pump.pump():
                    moved = True
                elif pump.clientIO.disconnected and pump.serverIO.disconnected:
                    self.pumps.remove(pump)
            for daemon in self.daemons:
                daemon.clock.advance(0)
            if not moved:
                return

    def refuse(self) -> int:
        """Refuse every pending connection attempt; return how many."""
        count = 0
        forget_stopped(self.reactor)
        while self.reactor.tcpClients:
            self.completer.failOnce(refused())
            count += 1
        return count

    def kill(self, index: int) -> None:
        """Daemon ``index`` goes away: it stops listening and its
        connections close."""
        daemon = self.daemons[index]
        factories = (daemon.masters, daemon.slaves)
        self.reactor.tcpServers = [server for server in self.reactor.tcpServers if server[1] not in factories]
        for pump in self.pumps:
            if pump.server.factory in factories:
                pump.serverIO.loseConnection()
        self.flush()


class Scripted:
    """Connection attempts accepted by hand: each becomes a `Peer` on a
    StringTransport, whose frames the test reads and answers."""

    def __init__(self):
        self.reactor = MemoryReactorClock()
        self.peers = []

    def accept(self) -> list:
        """Accept every pending attempt; return the new peers."""
        new = []
        forget_stopped(self.reactor)
        while self.reactor.tcpClients:
            host, port, factory, _, _ = self.reactor.tcpClients.pop(0)
            self.reactor.connectors.pop(0)
            protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
            transport = StringTransport(peerAddress=IPv4Address("TCP", host, port))
            peer = Peer(port, protocol, transport)
            protocol.makeConnection(transport)
            new.append(peer)
        self.peers.extend(new)
        return new

    def close_closing(self) -> None:
        """Finish the closes the client asked for."""
        for peer in self.peers:
            if peer.transport.disconnecting and not peer.closed:
                peer.drop(ConnectionDone())


class Peer:
    """A scripted daemon's end of one connection."""

    def __init__(self, port, protocol, transport):
        self.port = port
        self.protocol = protocol
        self.transport = transport
        self.closed = False

    def received(self) -> list:
        data = self.transport.value()
        self.transport.clear()
        return unframe(data)

    def send(self, *messages) -> None:
        self.protocol.dataReceived(b"".join(frame(m) for m in messages))

    def drop(self, reason=None) -> None:
        self.closed = True
        self.protocol.connectionLost(Failure(reason or ConnectionLost()))


# --- masters, in memory ----------------------------------------------------------------------


class MemoryTestCase(SynchronousTestCase):
    def setUp(self):
        self.memory = Memory()

    def master(self, memory=None, **kwargs):
        memory = memory or self.memory
        client = MasterClient(memory.addresses("master"), memory.reactor, retry_policy=RETRY, **kwargs)
        client.start()
        memory.flush()
        return client

    def worker(self, handler, concurrency=1, job_type="t", memory=None, **kwargs):
        memory = memory or self.memory
        worker = Worker(job_type, handler, concurrency, memory.addresses("slave"), memory.reactor,
                        retry_policy=RETRY, **kwargs)
        worker.start()
        memory.flush()
        return worker


class MasterMemoryTests(MemoryTestCase):
    def test_submit_and_answer(self):
        later = defer.Deferred()

        def handler(job):
            if job.body == "later":
                return later
            if job.body == "boom":
                raise KeyError("no such thing")
            return {"echo": job.body}

        self.worker(handler, concurrency=2)
        master = self.master()
        self.assertTrue(master.connected)
        self.assertEqual(master.up, [self.memory.name(0)])
        answers = [master.submit("t", 1, id="one"), master.run("t", "later"), master.submit("t", "boom")]
        self.memory.flush()
        self.assertEqual(self.successResultOf(answers[0]), {"echo": 1})
        error = self.failureResultOf(answers[2], ServerError).value
        self.assertEqual((error.error, error.reason), ("job_failed", "'no such thing'"))
        self.assertNoResult(answers[1])
        later.callback("deferred answer")
        self.memory.flush()
        self.assertEqual(self.successResultOf(answers[1]), "deferred answer")

    def test_submit_before_start_waits_for_the_connection(self):
        master = MasterClient(self.memory.addresses("master"), self.memory.reactor)
        self.worker(lambda job: job.body + 1)
        answer = master.submit("t", 1)
        self.memory.flush()
        self.assertNoResult(answer)
        master.start()
        self.memory.flush()
        self.assertEqual(self.successResultOf(answer), 2)

    def test_refusals_are_matched_to_their_request(self):
        master = self.master()
        queued = master.submit("nobody", 1, id="queued")
        refused = master.submit("nobody", 2, id="bad", timeout=-1)
        self.memory.flush()
        error = self.failureResultOf(refused, ServerError).value
        self.assertEqual((error.error, error.id, error.daemon), ("invalid_message", "bad", self.memory.name(0)))
        self.assertNoResult(queued)
        self.assertRaises(ValueError, master.submit, "nobody", 3, id="queued")
        self.assertEqual(live_ids(self.memory.daemons[0].scheduler), {"queued"})

    def test_cancelling_the_deferred_cancels_the_job(self):
        master = self.master()
        queued = master.submit("nobody", 1, id="x")
        self.memory.flush()
        self.assertEqual(live_ids(self.memory.daemons[0].scheduler), {"x"})
        queued.cancel()
        self.failureResultOf(queued, CancelledError)
        self.memory.flush()
        scheduler = self.memory.daemons[0].scheduler
        self.assertEqual((live_ids(scheduler), scheduler.totals["cancelled"]), (set(), 1))
        self.assertEqual(master._core.in_flight, 0)

    def test_cancel_before_sending_sends_nothing(self):
        master = MasterClient(self.memory.addresses("master"), self.memory.reactor)
        pending = master.submit("nobody", 1)
        pending.cancel()
        self.failureResultOf(pending, CancelledError)
        master.start()
        self.memory.flush()
        self.assertEqual(self.memory.daemons[0].scheduler.totals["submitted"], 0)

    def test_cancel_by_id(self):
        master = self.master()
        queued = master.submit("nobody", 1, id="x")
        self.memory.flush()
        cancelled = master.cancel("x")
        self.failureResultOf(queued, CancelledError)
        self.memory.flush()
        self.assertIsNone(self.successResultOf(cancelled))
        unknown = master.cancel("never")
        self.memory.flush()
        self.assertEqual(self.failureResultOf(unknown, ServerError).value.error, "unknown_job")

    def test_map_answers_in_input_order(self):
        held = {}

        def handler(job):
            held[job.body] = defer.Deferred()
            return held[job.body]

        self.worker(handler, concurrency=3)
        master = self.master()
        result = master.map("t", range(5), window=3)
        self.memory.flush()
        self.assertEqual(sorted(held), [0, 1, 2])
        self.assertEqual(master._core.in_flight, 3)
        for body in (2, 1):
            held[body].callback(body * 10)
        self.memory.flush()
        # 1 and 2 are answered, but stay in the window until 0 is.
        self.assertEqual((master._core.in_flight, sorted(held)), (1, [0, 1, 2]))
        held[0].callback(0)
        self.memory.flush()
        self.assertEqual((master._core.in_flight, sorted(held)), (2, [0, 1, 2, 3, 4]))
        for body in (4, 3):
            held[body].callback(body * 10)
        self.memory.flush()
        self.assertEqual(self.successResultOf(result), [0, 10, 20, 30, 40])

    def test_map_fails_with_the_first_failure_and_cancels_the_rest(self):
        self.worker(lambda job: 1 / job.body, concurrency=2)
        master = self.master()
        result = master.map("t", [1, 0, 2, 4], window=2)
        self.memory.flush()
        error = self.failureResultOf(result, ServerError).value
        self.assertEqual(error.error, "job_failed")
        self.assertEqual(master._core.in_flight, 0)
        self.assertEqual(live_ids(self.memory.daemons[0].scheduler), set())

    def test_map_with_a_body_that_is_not_json_fails(self):
        master = self.master()
        result = master.map("nobody", [1, float("nan")])
        self.memory.flush()
        self.failureResultOf(result, EncodeError)
        self.memory.flush()
        self.assertEqual(live_ids(self.memory.daemons[0].scheduler), set())

    def test_a_body_that_is_not_json_raises_at_once(self):
        master = self.master()
        for body in (float("nan"), math.inf, {1, 2}, object()):
            self.assertRaises(EncodeError, master.submit, "t", body)
        self.memory.flush()
        self.assertEqual(self.memory.daemons[0].scheduler.totals["submitted"], 0)
        self.assertEqual(master._core.in_flight, 0)

    def test_stats_of_one_daemon(self):
        master = self.master()
        master.submit("nobody", 1)
        stats = master.stats()
        self.memory.flush()
        figures = self.successResultOf(stats)
        self.assertEqual(figures["types"]["nobody"]["queued"], 1)
        self.assertNotIn("daemons", figures)

    def test_stats_of_several_daemons_are_added_up(self):
        memory = Memory(2)
        master = self.master(memory)
        for number in range(6):
            master.submit("nobody", number)
        both = master.stats()
        one = master.stats(memory.name(1))
        memory.flush()
        figures = self.successResultOf(both)
        self.assertEqual(sorted(figures["daemons"]), memory.addresses("master"))
        self.assertEqual(figures["types"]["nobody"]["queued"], 6)
        self.assertEqual(figures["totals"]["submitted"], 6)
        self.assertEqual(self.successResultOf(one)["totals"]["submitted"],
                         memory.daemons[1].scheduler.totals["submitted"])
        self.assertRaises(ValueError, master.stats, "elsewhere:1")

    def test_reconnection_runs_on_the_given_reactor(self):
        reactor = self.memory.reactor
        self.memory.reactor.tcpServers = []  # nothing listens
        master = MasterClient(self.memory.name(0), reactor, retry_policy=lambda attempt: 5.0)
        master.start()
        self.assertEqual([(host, port) for host, port, *_ in reactor.tcpClients], [("127.0.0.1", 9000)])
        self.assertEqual(self.memory.refuse(), 1)
        reactor.advance(4.9)
        self.assertEqual(reactor.tcpClients, [])
        reactor.advance(0.2)
        self.assertEqual([(host, port) for host, port, *_ in reactor.tcpClients], [("127.0.0.1", 9000)])
        # Once connected, a lost connection is made again on the same clock.
        self.memory.listen(0)
        self.memory.flush()
        self.assertTrue(master.connected)
        self.memory.kill(0)
        self.assertFalse(master.connected)
        self.assertEqual(reactor.tcpClients, [])
        reactor.advance(5.1)
        self.assertEqual(len(reactor.tcpClients), 1)

    def test_fail_after_failed_attempts(self):
        self.memory.reactor.tcpServers = []
        master = MasterClient(self.memory.name(0), self.memory.reactor, fail_after=2, retry_policy=RETRY)
        master.start()
        pending = master.submit("t", 1)
        self.memory.refuse()
        self.assertNoResult(pending)
        self.memory.reactor.advance(1)
        self.memory.refuse()
        error = self.failureResultOf(pending, TransportError).value
        self.assertEqual(str(error), f"cannot connect to {self.memory.name(0)}: Connection refused")
        # A new request waits through as many failed attempts again.
        again = master.submit("t", 2)
        self.memory.reactor.advance(1)
        self.memory.refuse()
        self.assertNoResult(again)
        self.memory.reactor.advance(1)
        self.memory.refuse()
        self.failureResultOf(again, TransportError)

    def test_fail_after_counts_every_daemon(self):
        memory = Memory(2)
        memory.reactor.tcpServers = []
        master = MasterClient(memory.addresses("master"), memory.reactor, fail_after=1, retry_policy=RETRY)
        master.start()
        pending = master.submit("t", 1)
        memory.completer.failOnce(refused())
        self.assertNoResult(pending)
        memory.refuse()
        message = str(self.failureResultOf(pending, TransportError).value)
        for name in memory.addresses("master"):
            self.assertIn(f"cannot connect to {name}: Connection refused", message)

    def ids_on(self, memory, index, count):
        """``count`` job ids whose rendezvous order puts daemon ``index`` first."""
        names = memory.addresses("master")
        ids = (f"job-{number}" for number in range(10000))
        return [job_id for job_id in ids if core.rendezvous(job_id, names)[0] == names[index]][:count]

    def test_a_lost_daemon_fails_its_jobs_in_flight(self):
        memory = Memory(2)
        master = self.master(memory)
        doomed = {job_id: master.submit("nobody", 1, id=job_id) for job_id in self.ids_on(memory, 1, 3)}
        safe = {job_id: master.submit("nobody", 1, id=job_id) for job_id in self.ids_on(memory, 0, 3)}
        memory.flush()
        self.assertEqual(live_ids(memory.daemons[1].scheduler), set(doomed))
        memory.kill(1)
        name = memory.name(1)
        for job_id, answer in doomed.items():
            error = self.failureResultOf(answer, TransportError).value
            self.assertEqual(error.daemon, name)
            self.assertIn(f"job {job_id!r} was dropped by {name}", str(error))
            self.assertIn(f"the connection to {name} was closed", str(error))
        for answer in safe.values():
            self.assertNoResult(answer)
        self.assertEqual(master.up, [memory.name(0)])
        # New submits go to the survivor, whatever their id.
        more = [master.submit("nobody", 2, id=job_id) for job_id in self.ids_on(memory, 1, 3)]
        memory.flush()
        self.assertEqual(live_ids(memory.daemons[0].scheduler), set(safe) | set(self.ids_on(memory, 1, 3)))
        for answer in more:
            self.assertNoResult(answer)

    def test_resubmit_moves_a_lost_daemons_jobs(self):
        memory = Memory(2)
        master = self.master(memory, resubmit=True)
        moved = {job_id: master.submit("t", job_id, id=job_id) for job_id in self.ids_on(memory, 1, 3)}
        memory.flush()
        memory.kill(1)
        self.assertEqual(live_ids(memory.daemons[0].scheduler), set(moved))
        self.worker(lambda job: job.body.upper(), memory=memory)
        memory.flush()
        for job_id, answer in moved.items():
            self.assertEqual(self.successResultOf(answer), job_id.upper())

    def test_a_daemon_that_comes_back_is_used_again(self):
        memory = Memory(2)
        master = self.master(memory)
        memory.kill(1)
        memory.listen(1)
        memory.reactor.advance(1)
        memory.flush()
        self.assertEqual(master.up, memory.addresses("master"))
        for job_id in self.ids_on(memory, 1, 2):
            master.submit("nobody", 1, id=job_id)
        memory.flush()
        self.assertEqual(live_ids(memory.daemons[1].scheduler), set(self.ids_on(memory, 1, 2)))

    def test_stop_fails_what_is_unfinished(self):
        master = self.master()
        sent = master.submit("nobody", 1)
        self.memory.flush()
        stopping = master.stop()
        self.memory.reactor.advance(0)
        self.memory.flush()
        self.successResultOf(stopping)
        self.assertIn("the client was stopped", str(self.failureResultOf(sent, TransportError).value))
        late = master.submit("nobody", 2)
        self.assertIn("stopped", str(self.failureResultOf(late, TransportError).value))


# --- workers, in memory and scripted -----------------------------------------------------------


class WorkerMemoryTests(MemoryTestCase):
    def test_on_job_and_busy(self):
        seen = []
        held = defer.Deferred()
        worker = self.worker(lambda job: held if job.body == "hold" else 1 / job.body, concurrency=2,
                             on_job=lambda job, seconds, error: seen.append((job.body, seconds, error)))
        master = self.master()
        hold = master.submit("t", "hold")
        failed = master.submit("t", 0)
        self.memory.flush()
        self.failureResultOf(failed, ServerError)
        self.assertEqual(worker.busy, 1)
        self.memory.reactor.advance(2)
        held.callback("done")
        self.memory.flush()
        self.assertEqual(self.successResultOf(hold), "done")
        self.assertEqual(worker.busy, 0)
        self.assertEqual([body for body, _, _ in seen], [0, "hold"])
        self.assertIsInstance(seen[0][2], ZeroDivisionError)
        self.assertEqual((seen[1][1], seen[1][2]), (2, None))

    def test_stop_with_queued_work_runs_none_of_it(self):
        ran = []
        held = defer.Deferred()

        def handler(job):
            ran.append(job.body)
            return held

        worker = self.worker(handler)
        master = self.master()
        first = master.submit("t", 0)
        rest = [master.submit("t", number) for number in range(1, 4)]
        self.memory.flush()
        stopped = worker.stop()
        self.memory.flush()
        self.assertNoResult(stopped)
        held.callback("answer")
        self.memory.flush()
        self.assertEqual(self.successResultOf(first), "answer")
        self.successResultOf(stopped)
        self.successResultOf(worker.done)
        self.assertEqual(ran, [0])
        scheduler = self.memory.daemons[0].scheduler
        self.assertEqual(scheduler.queued("t"), 3)
        self.assertEqual(scheduler.totals["retried"], 0)
        for answer in rest:
            self.assertNoResult(answer)

    def test_stop_before_start(self):
        worker = Worker("t", lambda job: None, 1, self.memory.addresses("slave"), self.memory.reactor)
        self.successResultOf(worker.stop())
        self.successResultOf(worker.done)

    def test_a_refused_join_fails_done(self):
        said = []
        worker = Worker("x" * 1025, lambda job: None, 2, self.memory.addresses("slave"), self.memory.reactor,
                        report=said.append)
        done = worker.done
        worker.start()
        self.memory.flush()
        error = self.failureResultOf(done, WorkerError).value
        self.assertIn("refused to serve", str(error))
        self.assertIn(self.memory.name(0, "slave"), str(error))
        self.assertEqual(said, [str(error)])
        self.assertFalse(worker.running)
        self.failureResultOf(worker.done, WorkerError)
        self.assertEqual(self.memory.daemons[0].slaves.connections, set())

    def test_serves_several_daemons_with_no_more_than_its_concurrency(self):
        """Work on two of three daemons: the asks that bring nothing move on
        as the reactor's clock passes, every job is run once, and the
        daemons together never count more than 2 jobs running."""
        memory = Memory(3)
        held = []

        def handler(job):
            held.append(defer.Deferred())
            return held[-1]

        worker = self.worker(handler, concurrency=2, memory=memory)
        answers = []
        for index in (0, 2):
            master = MasterClient(memory.name(index), memory.reactor, retry_policy=RETRY)
            master.start()
            answers += [master.submit("t", f"{index}-{n}", id=f"{index}-{n}") for n in range(6)]
        memory.flush()
        running = lambda: sum(d.scheduler.types().get("t", {}).get("running", 0)  # noqa: E731
                              for d in memory.daemons)
        most, waited = 0, 0
        for _ in range(200):
            if all(answer.called for answer in answers):
                break
            self.assertLessEqual(running(), 2)
            self.assertEqual(len([d for d in held if not d.called]), worker.busy)
            most = max(most, worker.busy)
            if worker.busy == 2 or (worker.busy and waited >= 3):
                next(d for d in held if not d.called).callback("ok")
                waited = 0
            else:
                memory.reactor.advance(core.WorkerCore.ROTATE_INTERVAL)
                waited += 1
            memory.flush()
        self.assertEqual([self.successResultOf(answer) for answer in answers], ["ok"] * 12)
        self.assertEqual(most, 2)
        self.assertEqual(sum(d.scheduler.totals["retried"] for d in memory.daemons), 0)


class WorkerScriptedTests(SynchronousTestCase):
    def setUp(self):
        self.script = Scripted()
        self.said = []

    def worker(self, handler, concurrency=1, ports=(9001,)):
        worker = Worker("t", handler, concurrency, [f"tcp:127.0.0.1:{port}" for port in ports],
                        self.script.reactor, retry_policy=RETRY, report=self.said.append)
        worker.start()
        return worker

    def joined(self, peers):
        """Answer each peer's joins with ok; return the peers that joined."""
        asking = []
        for peer in peers:
            frames = peer.received()
            if {"action": "join", "type": "t"} in frames:
                asking.append(peer)
            peer.send(*[{"ok": True}] * len(frames))
        return asking

    def test_a_job_that_crosses_a_stop_is_released_unrun(self):
        ran = []
        worker = self.worker(ran.append)
        (peer,) = self.script.accept()
        self.assertEqual(self.joined([peer]), [peer])
        stopped = worker.stop()
        self.assertEqual(peer.received(), [{"action": "leave"}])
        peer.send({"action": "job", "id": "j1", "type": "t", "body": 1})  # sent before the leave arrived
        self.assertEqual(peer.received(), [{"action": "release", "id": "j1"}])
        self.assertEqual((ran, worker.released), ([], 1))
        peer.send({"ok": True})  # the leave
        self.assertNoResult(stopped)
        peer.send({"ok": True})  # the release: nothing can cross any more
        self.assertTrue(peer.transport.disconnecting)
        self.script.close_closing()
        self.successResultOf(stopped)
        self.successResultOf(worker.done)
        self.assertEqual(ran, [])

    def test_stop_finishes_the_job_in_hand_and_leaves_first(self):
        held = defer.Deferred()
        worker = self.worker(lambda job: held)
        (peer,) = self.script.accept()
        self.joined([peer])
        peer.send({"action": "job", "id": "j1", "type": "t", "body": 1})
        self.assertEqual(worker.busy, 1)
        stopped = worker.stop()
        self.assertEqual(peer.received(), [])
        held.callback("answer")
        self.assertEqual(peer.received(), [{"action": "leave"}, {"action": "respond", "id": "j1", "body": "answer"}])
        peer.send({"ok": True}, {"ok": True})
        self.script.close_closing()
        self.successResultOf(stopped)

    def test_a_handler_running_on_after_its_connection_drops_keeps_its_place(self):
        held = defer.Deferred()
        worker = self.worker(lambda job: held, ports=(9001, 9002))
        peers = self.script.accept()
        self.confirm(peers)
        link = next(link for link in worker._core.links if link.wants)  # the one ask
        peer = next(peer for peer in peers if link.daemon.endswith(f":{peer.port}"))
        peer.send({"action": "job", "id": "j1", "type": "t", "body": 1})
        peer.drop(ConnectionLost())
        self.script.reactor.advance(1)
        again = self.script.accept()
        sent = self.confirm(peers + again)
        # The handler still runs: under concurrency 1 nothing may ask for another job.
        self.assertEqual(worker.busy, 1)
        self.assertEqual([frame for frames in sent.values() for frame in frames], [])
        held.callback("late")  # its answer goes nowhere; its place comes free
        sent = self.confirm(peers + again)
        self.assertEqual(worker.busy, 0)
        frames = [frame for frames in sent.values() for frame in frames]
        self.assertEqual(frames, [{"action": "join", "type": "t"}])

    def confirm(self, peers):
        """Answer every request with ok until none is left; return the
        frames each peer sent meanwhile."""
        sent = {peer: [] for peer in peers}
        while True:
            moved = False
            for peer in peers:
                frames = peer.received()
                if frames:
                    moved = True
                    sent[peer] += frames
                    peer.send(*[{"ok": True}] * len(frames))
            if not moved:
                return sent

    @staticmethod
    def asking(sent):
        """The peers whose last join was not taken back by a leave."""
        joins = {"action": "join", "type": "t"}
        return [peer for peer, frames in sent.items()
                if any(f == joins for f in frames)
                and max(i for i, f in enumerate(frames) if f == joins)
                > max((i for i, f in enumerate(frames) if f == {"action": "leave"}), default=-1)]

    def test_holds_no_more_than_its_concurrency_over_several_daemons(self):
        ran = []
        held = []
        worker = self.worker(lambda job: ran.append(job.id) or held.append(defer.Deferred()) or held[-1],
                             concurrency=2, ports=(9001, 9011, 9021))
        peers = self.script.accept()
        self.assertEqual(len(peers), 6)
        # Room for 2: two connections ask, on two daemons (an ask moved
        # off the first daemon once its leave was confirmed).
        asking = self.asking(self.confirm(peers))
        self.assertEqual(len(asking), 2)
        self.assertEqual(len({peer.port for peer in asking}), 2)
        a, b = asking
        a.send({"action": "job", "id": "a", "type": "t", "body": None})
        b.send({"action": "job", "id": "b", "type": "t", "body": None})
        self.assertEqual((ran, worker.busy), (["a", "b"], 2))
        self.assertEqual(self.confirm(peers), {peer: [] for peer in peers})  # no ask while full
        # The answer goes with a leave; the place is asked for elsewhere
        # only once that daemon has confirmed both.
        held[0].callback("done")
        self.assertEqual(a.received(), [{"action": "leave"}, {"action": "respond", "id": "a", "body": "done"}])
        self.assertEqual([peer.received() for peer in peers], [[]] * 6)
        a.send({"ok": True})
        self.assertEqual([peer.received() for peer in peers], [[]] * 6)
        a.send({"ok": True})
        (asker,) = [peer for peer in peers if peer.received() == [{"action": "join", "type": "t"}]]
        self.assertNotEqual(asker.port, a.port)

    def test_asks_that_bring_nothing_move_as_the_clock_passes(self):
        worker = Worker("t", lambda job: None, 1, ["tcp:127.0.0.1:9001", "tcp:127.0.0.1:9011"],
                        self.script.reactor, retry_policy=RETRY, report=self.said.append)
        rotated = []
        rotate = worker._core.rotate
        worker._core.rotate = lambda: rotated.append(self.script.reactor.seconds()) or rotate()
        worker.start()
        first, second = self.script.accept()
        self.assertEqual(self.asking(self.confirm([first, second])), [first])
        interval = core.WorkerCore.ROTATE_INTERVAL
        self.script.reactor.advance(interval / 2)
        self.assertEqual(rotated, [])
        self.script.reactor.advance(interval / 2)
        self.assertEqual(rotated, [interval])
        self.assertEqual(first.received(), [])  # it may not have asked for a whole interval yet
        self.script.reactor.advance(interval)  # now it has, and brought nothing
        self.assertEqual(first.received(), [{"action": "leave"}])
        self.assertEqual(second.received(), [])
        first.send({"ok": True})
        self.assertEqual(second.received(), [{"action": "join", "type": "t"}])
        second.send({"ok": True})
        self.assertEqual(rotated, [interval, 2 * interval])
        stopped = worker.stop()
        self.confirm([first, second])
        self.script.close_closing()
        self.successResultOf(stopped)
        self.script.reactor.advance(10 * interval)
        self.assertEqual(len(rotated), 2)  # the timer stopped with the worker
        self.assertEqual(self.script.reactor.getDelayedCalls(), [])

    def test_a_fatal_error_stops_the_rotation(self):
        worker = self.worker(lambda job: None, ports=(9001, 9011))
        first, second = self.script.accept()
        done = worker.done
        self.assertTrue(worker._rotation.running)
        first.drop(SSL.Error([("SSL routines", "", "tlsv13 alert certificate required")]))
        self.assertFalse(worker._rotation.running)
        self.script.reactor.advance(5)  # the second connection's join goes unanswered
        self.script.close_closing()
        self.failureResultOf(done, WorkerError)
        self.assertEqual(self.script.reactor.getDelayedCalls(), [])

    def test_one_daemon_has_no_rotation_timer(self):
        worker = self.worker(lambda job: None, concurrency=2)
        (first, second) = self.script.accept()
        self.confirm([first, second])
        self.assertEqual(self.script.reactor.getDelayedCalls(), [])
        self.script.reactor.advance(10)
        self.assertEqual([first.received(), second.received()], [[], []])
        self.assertIsNone(worker._rotation)

    def test_failed_attempts_are_reported_once_and_the_recovery(self):
        self.worker(lambda job: None, concurrency=2)
        self.assertEqual(len(self.script.reactor.tcpClients), 2)
        for _ in range(3):
            while self.script.reactor.tcpClients:
                self.script.reactor.tcpClients.pop(0)[2].clientConnectionFailed(
                    self.script.reactor.connectors.pop(0), refused())
            self.script.reactor.advance(1)
        self.assertEqual(self.said, ["cannot connect to tcp:127.0.0.1:9001: Connection refused; retrying"])
        peers = self.script.accept()
        self.assertEqual(self.said[1:], ["connected to tcp:127.0.0.1:9001"])
        peers[0].drop()
        peers[1].drop()
        self.assertEqual(len(self.said), 3)
        self.assertIn("the connection to tcp:127.0.0.1:9001 was lost", self.said[2])

    def test_a_tls_error_retrying_cannot_fix_stops_the_worker(self):
        worker = self.worker(lambda job: None, concurrency=2)
        first, second = self.script.accept()
        done = worker.done
        first.drop(SSL.Error([("SSL routines", "", "tlsv13 alert certificate required")]))
        line = "TLS handshake with tcp:127.0.0.1:9001 failed: the daemon requires a client certificate"
        self.assertEqual(self.said, [line])
        # The other connection's join and leave go unanswered: it waits a while.
        self.assertEqual(second.received(), [{"action": "join", "type": "t"}, {"action": "leave"}])
        self.assertNoResult(done)
        self.script.reactor.advance(5)
        self.assertTrue(second.transport.disconnecting)
        self.script.close_closing()
        error = self.failureResultOf(done, WorkerError).value
        self.assertEqual(str(error), line)
        self.assertFalse(worker.running)
        self.assertEqual(str(self.failureResultOf(worker.wait(), WorkerError).value), line)

    def test_only_a_connection_that_proved_itself_resets_the_backoff(self):
        asked = []
        worker = Worker("t", lambda job: None, 1, ["tcp:127.0.0.1:9001"], self.script.reactor,
                        retry_policy=lambda attempt: asked.append(attempt) or 1.0, report=self.said.append)
        worker.start()
        for _ in range(3):  # a port that closes each connection without a word (TLS, say)
            (peer,) = self.script.accept()
            peer.drop(ConnectionDone())
            self.script.reactor.advance(1)
        self.assertEqual(asked, [1, 2, 3])
        self.assertIn("closed before the daemon said anything (if that port expects TLS, give a tls: address)",
                      self.said[0])
        (peer,) = self.script.accept()
        self.joined([peer])  # the daemon answered: the connection works
        peer.drop(ConnectionDone())
        self.assertEqual(asked[-1], 1)
        for expected in (1, 2):  # closed at once again: the count starts over, and grows
            self.script.reactor.advance(1)
            (peer,) = self.script.accept()
            peer.drop(ConnectionDone())
            self.assertEqual(asked[-1], expected)
        self.script.reactor.advance(2)
        (peer,) = self.script.accept()
        self.script.reactor.advance(txclient.PROVEN_AFTER)  # up long enough, though silent
        peer.drop(ConnectionDone())
        self.assertEqual(asked[-1], 1)
        # A long outage, then a daemon that takes the connection and restarts
        # at once: the refusals count no more once it accepted.
        del asked[:]
        for _ in range(5):
            self.script.reactor.advance(30)
            self.script.reactor.tcpClients.pop(0)[2].clientConnectionFailed(
                self.script.reactor.connectors.pop(0), refused())
        self.assertEqual(asked, [2, 3, 4, 5, 6])  # after the first wait, when it was lost
        self.script.reactor.advance(30)
        (peer,) = self.script.accept()
        peer.drop(ConnectionDone())
        self.assertEqual(asked[-1], 1)
        self.successResultOf(worker.stop())


class MasterScriptedTests(SynchronousTestCase):
    def test_a_port_that_closes_without_a_word_may_expect_tls(self):
        script = Scripted()
        master = MasterClient("tcp:127.0.0.1:9000", script.reactor, fail_after=1)
        master.start()
        answer = master.submit("t", 1, id="j")
        (peer,) = script.accept()
        self.assertEqual(peer.received()[0]["id"], "j")
        peer.drop(ConnectionDone())
        error = self.failureResultOf(answer, TransportError).value
        self.assertEqual(str(error), "the connection to tcp:127.0.0.1:9000 was closed before the daemon said "
                                     "anything (if that port expects TLS, give a tls: address); job 'j' was "
                                     "dropped by tcp:127.0.0.1:9000")

    def test_a_master_connection_closed_at_once_backs_off_too(self):
        script = Scripted()
        asked = []
        master = MasterClient("tcp:127.0.0.1:9000", script.reactor,
                              retry_policy=lambda attempt: asked.append(attempt) or 1.0)
        master.start()
        for delay in (1, 1, 1):
            (peer,) = script.accept()
            peer.drop(ConnectionDone())
            script.reactor.advance(delay)
        self.assertEqual(asked, [1, 2, 3])
        answer = master.submit("t", 1, id="j")
        (peer,) = script.accept()
        (sent,) = peer.received()
        peer.send({"ok": True, "id": "j", "ref": sent["ref"]}, {"id": "j", "body": 2})
        self.assertEqual(self.successResultOf(answer), 2)
        peer.drop(ConnectionDone())
        self.assertEqual(asked[-1], 1)

    def test_daemon_of_names_where_a_job_went(self):
        script = Scripted()
        master = MasterClient("tcp:127.0.0.1:9000", script.reactor)
        answer = master.submit("t", 1, id="j")
        self.assertIsNone(master.daemon_of("j"))  # not started: waiting for a connection
        master.start()
        script.accept()
        self.assertEqual(master.daemon_of("j"), "tcp:127.0.0.1:9000")
        self.assertIsNone(master.daemon_of("other"))
        answer.cancel()
        self.failureResultOf(answer)

    def test_a_quiet_connection_of_long_standing_gets_no_tls_hint(self):
        script = Scripted()
        master = MasterClient("tcp:127.0.0.1:9000", script.reactor, fail_after=1)
        master.start()
        (peer,) = script.accept()
        script.reactor.advance(txclient.PROVEN_AFTER)
        answer = master.submit("t", 1, id="j")
        peer.drop(ConnectionDone())
        error = self.failureResultOf(answer, TransportError).value
        self.assertEqual(str(error), "the connection to tcp:127.0.0.1:9000 was closed; job 'j' was dropped by "
                                     "tcp:127.0.0.1:9000")

    def test_a_frame_over_the_limit_closes_the_connection(self):
        script = Scripted()
        master = MasterClient("tcp:127.0.0.1:9000", script.reactor)
        master.start()
        answer = master.submit("t", 1, id="j")
        (peer,) = script.accept()
        peer.protocol.dataReceived(b"\x7f\xff\xff\xff")
        self.assertTrue(peer.transport.disconnecting)
        peer.drop(ConnectionLost())
        self.assertIn("over the limit", str(self.failureResultOf(answer, TransportError).value))

    def test_a_frame_that_is_not_json_closes_the_connection(self):
        script = Scripted()
        master = MasterClient("tcp:127.0.0.1:9000", script.reactor)
        master.start()
        answer = master.submit("t", 1, id="j")
        (peer,) = script.accept()
        peer.send(b"{nope")
        self.assertTrue(peer.transport.disconnecting)
        peer.drop(ConnectionLost())
        self.assertIn("not JSON", str(self.failureResultOf(answer, TransportError).value))


class DescriptionTests(SynchronousTestCase):
    def describe(self, error):
        return describe_failure(Failure(error))

    def test_tls_failures_in_words(self):
        self.assertEqual(self.describe(SSL.Error([("SSL routines", "", "certificate verify failed")])),
                         "TLS handshake failed: certificate verify failed")
        mismatch = VerificationError(errors=[DNSMismatch(mismatched_id=DNS_ID("gloom.example.com"))])
        self.assertEqual(self.describe(mismatch),
                         "TLS handshake failed: the server's certificate is not for gloom.example.com")
        self.assertEqual(self.describe(SSL.Error([("SSL routines", "", "tlsv13 alert certificate required")])),
                         "TLS handshake failed: the daemon requires a client certificate")

    def test_other_failures(self):
        self.assertEqual(self.describe(ConnectionRefusedError(osError=errno.ECONNREFUSED)), "Connection refused")
        self.assertEqual(self.describe(ConnectionLost("gone.")), "Connection to the other side was lost in a "
                                                                 "non-clean fashion: gone")

    def test_addresses(self):
        self.assertEqual(client_endpoint(reactor, "example.com:9998")._hostBytes, b"example.com")
        self.assertEqual(client_endpoint(reactor, ":9998")._hostBytes, b"127.0.0.1")
        self.assertEqual(client_endpoint(reactor, "[::1]:9998")._hostBytes, b"::1")
        self.assertEqual(client_endpoint(reactor, "tcp:host=h:port=1")._host, "h")
        self.assertRaises(ValueError, client_endpoint, reactor, "no-port-here")

    def test_unreadable_tls_files_are_named_by_option_not_path(self):
        error = self.assertRaises(ValueError, client_endpoint, reactor,
                                  "tls:example.com:9999:certificate=/nowhere/c.pem:privateKey=/nowhere/k.pem")
        self.assertEqual(str(error), "the TLS settings for tls:example.com:9999 cannot be used: certificate "
                                     "and privateKey cannot be read")
        self.assertRaises(ValueError, Worker, "t", None, 1, "tls:example.com:9999:certificate=/nowhere/c.pem")

    def test_several_addresses_and_the_environment(self):
        self.patch(core.os, "environ", {"GLOOM_MASTERS": "tcp:127.0.0.1:1, tcp:127.0.0.1:2"})
        master = MasterClient(reactor=MemoryReactorClock())
        self.assertEqual(master.daemons, ["tcp:127.0.0.1:1", "tcp:127.0.0.1:2"])
        worker = Worker("t", lambda job: None, 3, "tcp:127.0.0.1:3,tcp:127.0.0.1:4", MemoryReactorClock())
        self.assertEqual(len(list(worker)), 6)  # a ClientService per connection


class SharedNamesTests(MemoryTestCase):
    """The names and semantics the Twisted client shares with gloom.aio."""

    def test_master_in_flight_and_close(self):
        master = self.master()
        answer = master.submit("nobody", 1)
        self.memory.flush()
        self.assertEqual(master.in_flight, 1)
        closed = master.close()
        self.memory.reactor.advance(0)
        self.memory.flush()
        self.successResultOf(closed)
        self.failureResultOf(answer, TransportError)
        self.assertEqual((master.in_flight, master.connected), (0, False))

    def test_worker_type_job_type_and_wait(self):
        slaves, reactor = self.memory.addresses("slave"), self.memory.reactor
        worker = Worker(type="t", handler=lambda job: None, slaves=slaves, reactor=reactor, retry_policy=RETRY)
        self.assertEqual((worker.type, worker.job_type), ("t", "t"))
        old = Worker(job_type="u", handler=lambda job: None, slaves=slaves, reactor=reactor)
        self.assertEqual((old.type, old.job_type), ("u", "u"))
        self.assertRaises(TypeError, Worker, "t", lambda job: None, slaves=slaves, job_type="t")
        self.assertRaises(TypeError, Worker, handler=lambda job: None, slaves=slaves)
        self.assertRaises(TypeError, Worker, "t", None, 1, slaves, reactor)
        worker.start()
        self.memory.flush()
        waited = worker.wait()
        self.assertNoResult(waited)
        stopped = worker.stop()
        self.memory.flush()
        self.successResultOf(stopped)
        self.assertIsNone(self.successResultOf(waited))
        self.assertIsNone(self.successResultOf(worker.wait()))

    def test_work_passes_the_workers_options_on(self):
        said, ran = [], []
        worker = work("t", lambda job: job.body, 1, self.memory.addresses("slave"), self.memory.reactor,
                      retry_policy=RETRY, report=said.append, on_job=lambda job, seconds, error: ran.append(job.id))
        self.memory.flush()
        self.assertTrue(worker.running)
        master = self.master()
        answer = master.submit("t", 7, id="j")
        self.memory.flush()
        self.assertEqual((self.successResultOf(answer), ran), (7, ["j"]))
        self.assertEqual(worker.report, said.append)
        stopped = worker.stop()
        self.memory.flush()
        self.successResultOf(stopped)


# --- against a real daemon -------------------------------------------------------------------------


@implementer(IStreamClientEndpoint)
class ObservedEndpoint:
    """A TCP endpoint that keeps, for each connection it makes, a Deferred
    that fires once the client has seen that connection lost."""

    def __init__(self, port):
        self.endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        self.losses = []

    def connect(self, factory):
        def connected(protocol):
            lost = defer.Deferred()
            connection_lost = protocol.connectionLost

            def connectionLost(reason):
                try:
                    connection_lost(reason)
                finally:
                    lost.callback(None)

            protocol.connectionLost = connectionLost
            self.losses.append(lost)
            return protocol

        return self.endpoint.connect(factory).addCallback(connected)


class TxClientTestCase(DaemonTestCase):
    def master(self, address=None, **kwargs):
        if address is None:
            address = f"127.0.0.1:{self.port('master')}"
        client = MasterClient(address, reactor, retry_policy=FAST_RETRY, **kwargs)
        client.start()
        self.addCleanup(client.stop)
        return client

    def worker(self, job_type, handler, concurrency=1):
        worker = Worker(job_type, handler, concurrency, f"127.0.0.1:{self.port('slave')}", reactor,
                        retry_policy=FAST_RETRY)
        worker.start()
        self.addCleanup(worker.stop)
        return worker


class EndToEndTests(TxClientTestCase):
    @inlineCallbacks
    def test_answers_values_deferreds_and_failures(self):
        seen = record_answers(self)

        def handler(job):
            if job.body == "later":
                return task.deferLater(reactor, 0.01, lambda: "deferred answer")
            if job.body == "boom":
                raise KeyError("no such thing")
            return {"echo": job.body, "type": job.type}

        self.worker("t", handler, concurrency=3)
        master = self.master()
        answers = yield defer.gatherResults([master.submit("t", 1, id="a"), master.submit("t", "later", id="b"),
                                             master.submit("t", [2**70], priority=5, id="c")])
        self.assertEqual(answers, [{"echo": 1, "type": "t"}, "deferred answer", {"echo": [2**70], "type": "t"}])
        failure = yield self.assertFailure(master.submit("t", "boom", id="d"), ServerError)
        self.assertEqual((failure.error, failure.reason), ("job_failed", "'no such thing'"))
        self.assertEqual(sorted(seen), [("fail", "d"), ("respond", "a"), ("respond", "b"), ("respond", "c")])
        self.assertEqual((yield master.map("t", range(100), window=7)),
                         [{"echo": n, "type": "t"} for n in range(100)])

    @inlineCallbacks
    def test_refusals_cancel_and_stats(self):
        master = self.master()
        first = master.submit("nobody", 1, id="same")
        refused = yield self.assertFailure(master.submit("nobody", 2, id="other", timeout=-1), ServerError)
        self.assertEqual((refused.error, refused.id), ("invalid_message", "other"))
        stats = yield master.stats()
        self.assertEqual(stats["types"]["nobody"]["queued"], 1)
        first.cancel()
        yield self.assertFailure(first, defer.CancelledError)
        stats = yield master.stats()
        self.assertEqual((stats["types"], stats["totals"]["cancelled"]), ({}, 1))
        self.assertNotIn("same", live_ids(self.scheduler))

    @inlineCallbacks
    def test_jobs_in_flight_fail_when_the_daemon_goes(self):
        master = self.master()
        pending = master.submit("nobody", 1)
        stats = yield master.stats()
        self.assertEqual(stats["types"]["nobody"]["queued"], 1)
        yield self.service.stopService()
        # The daemon fails each job it holds with a shutdown frame before it
        # closes the connection, so the master hears why.
        error = yield self.assertFailure(pending, ServerError)
        self.assertEqual(error.error, "shutdown")

    @inlineCallbacks
    def test_unreachable_daemon(self):
        port = reserved_port(self)  # bound, never listening: connections are refused
        master = MasterClient(f"127.0.0.1:{port}", reactor, fail_after=1)
        master.start()
        self.addCleanup(master.stop)
        error = yield self.assertFailure(master.submit("t", 1), TransportError)
        self.assertEqual(str(error), f"cannot connect to 127.0.0.1:{port}: Connection refused")

    @inlineCallbacks
    def test_reconnects_when_the_daemon_restarts(self):
        self.worker("t", lambda job: job.body + 1)
        endpoint = ObservedEndpoint(self.port("master"))
        master = self.master(endpoint)
        self.assertEqual((yield master.submit("t", 1)), 2)
        yield self.service.stopService()
        yield endpoint.losses[-1]
        self.assertFalse(master.connected)
        self.start_daemon()  # on the same ports, reserved meanwhile
        self.assertEqual((yield master.submit("t", 41)), 42)
        self.assertEqual(len(endpoint.losses), 2)

    @inlineCallbacks
    def test_stop_finishes_the_job_in_hand(self):
        started, release = defer.Deferred(), defer.Deferred()
        ran = []

        def handler(job):
            ran.append(job.body)
            if not started.called:
                started.callback(None)
            return release.addCallback(lambda _: "finished")

        worker = self.worker("t", handler, concurrency=1)
        yield self.until(lambda: self.scheduler.idle_slaves("t") == 1)
        master = self.master()
        answer = master.submit("t", None)
        queued = master.submit("t", "never run")
        yield started
        self.assertEqual(worker.busy, 1)
        stopping = worker.stop()
        yield self.until(lambda: self.scheduler.idle_slaves("t") == 0)
        self.assertFalse(stopping.called)
        release.callback(None)
        self.assertEqual((yield answer), "finished")
        yield stopping
        yield self.until(lambda: len(self.service.factories[1].connections) == 0)
        self.assertEqual(self.scheduler.queued("t"), 1)
        self.assertEqual(self.scheduler.totals["retried"], 0)
        self.assertEqual(ran, [None])
        queued.cancel()
        yield self.assertFailure(queued, CancelledError)

    def test_work_starts_a_worker(self):
        worker = work("t", lambda job: None, concurrency=2, slaves=f"127.0.0.1:{self.port('slave')}")
        self.addCleanup(worker.stop)
        self.assertTrue(worker.running)
        return self.until(lambda: self.scheduler.idle_slaves("t") == 2)

    @inlineCallbacks
    def test_a_refused_join_fails_done(self):
        worker = Worker("x" * 1025, lambda job: None, 1, f"127.0.0.1:{self.port('slave')}", reactor,
                        report=lambda text: None)
        worker.start()
        error = yield self.assertFailure(worker.done, WorkerError)
        self.assertIn("refused to serve", str(error))


class TLSTests(TxClientTestCase):
    """Against a daemon whose ports require TLS with client certificates."""

    def setUp(self):
        from tests.certs import Authority

        self.certs = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.certs, True)
        self.ca = Authority(self.certs)
        key, cert = self.ca.issue("localhost", server=True)
        self.client_key, self.client_cert = self.ca.issue("worker-1", server=False)
        self.roots = f"{self.certs}/roots"
        import os

        os.mkdir(self.roots)
        shutil.copy(self.ca.path, f"{self.roots}/ca.pem")
        self.clients, self._waiters, self._check_call = [], [], None
        self.endpoints = {role: f"mtls:{reserved_port(self)}:interface=127.0.0.1:privateKey={key}:certKey={cert}:"
                                f"caCerts={self.ca.path}" for role in ("master", "slave")}
        self.start_daemon()
        self.addCleanup(self.stop)

    def address(self, role, certificate=True, roots=None):
        extra = f":certificate={self.client_cert}:privateKey={self.client_key}" if certificate else ""
        return f"tls:localhost:{self.port(role)}:trustRoots={roots or self.roots}{extra}"

    @inlineCallbacks
    def test_tls_round_trip(self):
        worker = Worker("t", lambda job: job.body * 2, 1, self.address("slave"), reactor)
        worker.start()
        self.addCleanup(worker.stop)
        master = self.master(self.address("master"))
        self.assertEqual((yield master.submit("t", 21)), 42)

    @inlineCallbacks
    def test_a_worker_without_a_certificate_stops_with_one_line(self):
        said = []
        worker = Worker("t", lambda job: None, 2, self.address("slave", certificate=False), reactor,
                        report=said.append)
        worker.start()
        error = yield self.assertFailure(worker.done, WorkerError)
        self.assertEqual(str(error), f"TLS handshake with tls:localhost:{self.port('slave')} failed: "
                                     "the daemon requires a client certificate")
        self.assertEqual(said, [str(error)])

    @inlineCallbacks
    def test_a_master_that_cannot_verify_the_daemon(self):
        from tests.certs import Authority

        other = Authority(self.certs, name="Other CA")
        roots = f"{self.certs}/other"
        import os

        os.mkdir(roots)
        shutil.copy(other.path, f"{roots}/ca.pem")
        master = self.master(self.address("master", roots=roots))
        error = yield self.assertFailure(master.submit("t", 1), TransportError)
        self.assertEqual(str(error), f"TLS handshake with tls:localhost:{self.port('master')} failed: "
                                     "certificate verify failed")
        self.assertNotIn(self.certs, str(error))
        # The daemon is given up: later requests fail at once.
        self.failureResultOf(master.submit("t", 2), TransportError)
