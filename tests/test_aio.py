"""The asyncio client (gloom/aio.py): the shell over fake transports, then
end to end against real daemons in this process.

Each end-to-end test runs its asyncio code with ``asyncio.run`` in a thread
while the reactor serves the daemons in the main thread (as the blocking
client's tests do); ``self.call`` runs a function in the reactor from there.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import re
import shutil
import ssl
import tempfile
import threading

from twisted.internet import reactor
from twisted.internet.defer import DeferredList
from twisted.internet.threads import blockingCallFromThread, deferToThread
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from gloom import aio, core
from gloom.aio import Master, Worker, work
from gloom.core import EncodeError, ServerError, TransportError, WorkerError
from gloom.tap import makeService
from tests.certs import Authority
from tests.support import reserved_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = dict(retry_initial=0.02, retry_max=0.1)


# --- fakes -----------------------------------------------------------------------------------


class FakeTransport:
    """What a `_Connection` writes to, in memory."""

    def __init__(self, connection):
        self.connection = connection
        self.data = bytearray()
        self.closing = False

    def write(self, data):
        assert not self.closing
        self.data += data

    def is_closing(self):
        return self.closing

    def close(self):
        if not self.closing:
            self.closing = True
            asyncio.get_running_loop().call_soon(self.connection.connection_lost, None)

    def abort(self):
        self.close()

    def frames(self):
        """The frames written since the last call, decoded."""
        self.connection.flush()
        found = core.FrameBuffer().feed(bytes(self.data))
        self.data.clear()
        return [json.loads(data) for data in found]


class FakeNet:
    """Stands in for the network: ``open`` replaces a shell's ``_open``.
    Daemons named in ``refuse`` refuse connections (with ``error``)."""

    def __init__(self, shell):
        self.connections = []
        self.refuse = set()
        self.error = ConnectionRefusedError(111, "Connection refused")
        self.attempts = 0
        shell._open = self.open

    async def open(self, name, received):
        self.attempts += 1
        if name in self.refuse:
            raise self.error
        connection = aio._Connection(name, received)
        connection.connection_made(FakeTransport(connection))
        self.connections.append(connection)
        return connection

    def to(self, name):
        """The live connections to daemon ``name``."""
        return [c for c in self.connections if c.name == name and not c.transport.closing]

    @staticmethod
    def feed(connection, *messages):
        connection.data_received(b"".join(core.frame(m) for m in messages))

    @staticmethod
    def reply_ok(worker):
        """Acknowledge every request the worker's connections await a reply to."""
        for link, connection in list(worker._connections.items()):
            FakeNet.feed(connection, *({"ok": True} for _ in link.replies))


async def turn(times=3):
    """Let the loop run the callbacks and tasks that are ready."""
    for _ in range(times):
        await asyncio.sleep(0)


def run(coroutine, timeout=10):
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


class ClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock moves only when the test advances it.
    Await only what is ready (`turn`) in it: a timer waits for `advance`."""

    def __init__(self):
        super().__init__()
        self.now = 0.0

    def time(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


def run_on_clock(body):
    """Run ``body(loop)`` on a new `ClockLoop`."""
    loop = ClockLoop()
    try:
        return loop.run_until_complete(body(loop))
    finally:
        loop.close()


class MasterShellTests(SynchronousTestCase):
    """`Master` over fake connections: what it writes, and what it makes of
    what it reads."""

    def test_submit_and_answer(self):
        async def body():
            master = Master("d:1", **QUICK)
            net = FakeNet(master)
            await master.start()
            self.assertEqual((master.connected, master.up), (True, ["d:1"]))
            task = asyncio.ensure_future(master.submit("echo", {"x": 1}, id="j"))
            await turn()
            (connection,) = net.connections
            (sent,) = connection.transport.frames()
            self.assertEqual(sent, {"action": "submit", "id": "j", "type": "echo", "body": {"x": 1},
                                    "priority": 0, "ref": 1})
            net.feed(connection, {"ok": True, "id": "j", "ref": 1}, {"id": "j", "body": "answer"})
            self.assertEqual(await task, "answer")
            await master.close()
            self.assertTrue(connection.transport.closing)
        run(body())

    def test_frames_written_in_one_turn_go_out_together(self):
        async def body():
            master = Master("d:1", **QUICK)
            net = FakeNet(master)
            await master.start()
            (connection,) = net.connections
            writes = []
            connection.transport.write = writes.append
            tasks = [asyncio.ensure_future(master.submit("t", i)) for i in range(3)]
            await turn()
            self.assertEqual(len(writes), 1)
            self.assertEqual(len(core.FrameBuffer().feed(writes[0])), 3)
            for task in tasks:
                task.cancel()
            await turn()
            self.assertEqual(len(writes), 2)
            await master.close()
        run(body())

    def test_refusal_and_failure(self):
        async def body():
            master = Master("d:1", **QUICK)
            net = FakeNet(master)
            await master.start()
            (connection,) = net.connections
            refused = asyncio.ensure_future(master.submit("t", 1, id="a"))
            failed = asyncio.ensure_future(master.run("t", 2, id="b"))
            await turn()
            net.feed(connection, {"error": "id_exists", "reason": "taken", "id": "a", "ref": 1},
                     {"ok": True, "id": "b", "ref": 2},
                     {"error": "job_failed", "reason": "boom", "id": "b"})
            error = await asyncio.gather(refused, failed, return_exceptions=True)
            self.assertIsInstance(error[0], ServerError)
            self.assertEqual((error[0].error, error[0].id, error[0].daemon), ("id_exists", "a", "d:1"))
            self.assertEqual((error[1].error, error[1].reason), ("job_failed", "boom"))
            await master.close()
        run(body())

    def test_unencodable_body_raises_at_once(self):
        async def body():
            async with Master("d:1", **QUICK) as master:
                net = FakeNet(master)
                for bad in (float("nan"), {1, 2}, {"x": float("inf")}):
                    with self.assertRaises(EncodeError):
                        await master.submit("t", bad)
                self.assertEqual(master.in_flight, 0)
                self.assertEqual(net.connections, [])
        run(body())

    def test_cancelling_the_awaiting_task_cancels_the_job(self):
        async def body():
            master = Master("d:1", **QUICK)
            net = FakeNet(master)
            await master.start()
            (connection,) = net.connections
            task = asyncio.ensure_future(master.submit("t", None, id="j"))
            await turn()
            net.feed(connection, {"ok": True, "id": "j", "ref": 1})
            task.cancel()
            with self.assertRaises(asyncio.CancelledError):
                await task
            self.assertEqual([f["action"] for f in connection.transport.frames()], ["submit", "cancel"])
            self.assertEqual(master.in_flight, 1)  # until the daemon acks the cancel
            net.feed(connection, {"ok": True, "id": "j", "ref": 2})
            self.assertEqual(master.in_flight, 0)
            await master.close()
        run(body())

    def test_waiting_for_a_daemon_then_fail_after(self):
        async def body():
            master = Master("d:1", fail_after=3, **QUICK)
            net = FakeNet(master)
            net.refuse.add("d:1")
            await master.start()
            self.assertFalse(master.connected)
            with self.assertRaises(TransportError) as caught:
                await master.submit("t", None)
            self.assertGreaterEqual(net.attempts, 3)
            self.assertEqual(str(caught.exception), "cannot connect to d:1: Connection refused")
            # Once given up, a new request fails at once...
            with self.assertRaises(TransportError):
                await master.submit("t", None)
            # ...until the daemon is back.
            net.refuse.clear()
            while not master.connected:
                await asyncio.sleep(0.01)
            task = asyncio.ensure_future(master.submit("t", None, id="x"))
            await turn()
            (connection,) = net.connections
            self.assertEqual(connection.transport.frames()[0]["id"], "x")
            task.cancel()
            await master.close()
        run(body())

    def test_requests_wait_for_a_connection(self):
        async def body():
            master = Master("d:1", **QUICK)
            net = FakeNet(master)
            net.refuse.add("d:1")
            await master.start()
            task = asyncio.ensure_future(master.submit("t", "x", id="later"))
            await asyncio.sleep(0.05)
            self.assertFalse(task.done())
            net.refuse.clear()
            while not net.connections:
                await asyncio.sleep(0.01)
            await turn()
            (connection,) = net.connections
            self.assertEqual(connection.transport.frames()[0]["id"], "later")
            net.feed(connection, {"ok": True, "id": "later", "ref": 1}, {"id": "later", "body": 7})
            self.assertEqual(await task, 7)
            await master.close()
        run(body())

    def test_lost_connection_fails_its_jobs_naming_the_daemon(self):
        async def body():
            master = Master(["a:1", "b:2"], **QUICK)
            net = FakeNet(master)
            await master.start()
            ids = [f"j{i}" for i in range(10)]
            tasks = [asyncio.ensure_future(master.submit("t", None, id=i)) for i in ids]
            await turn()
            (a,) = net.to("a:1")
            on_a = [frame["id"] for frame in a.transport.frames()]
            self.assertEqual(sorted(on_a), sorted(i for i in ids if core.rendezvous(i, ["a:1", "b:2"])[0] == "a:1"))
            self.assertTrue(0 < len(on_a) < 10)
            a.connection_lost(ConnectionResetError(104, "Connection reset by peer"))
            await turn()
            for job_id, task in zip(ids, tasks):
                if job_id in on_a:
                    error = task.exception()
                    self.assertIsInstance(error, TransportError)
                    self.assertEqual(error.daemon, "a:1")
                    self.assertEqual(str(error), f"the connection to a:1 was lost: Connection reset by peer; "
                                                 f"job {job_id!r} was dropped by a:1")
                else:
                    self.assertFalse(task.done())
            await master.close()
            for task in tasks:
                self.assertIsInstance(task.exception(), TransportError)
        run(body())

    def test_bad_frame_drops_the_connection(self):
        async def body():
            master = Master("d:1", **QUICK)
            net = FakeNet(master)
            await master.start()
            (connection,) = net.connections
            task = asyncio.ensure_future(master.submit("t", None, id="j"))
            await turn()
            connection.data_received(core.frame({"ok": True, "id": "j", "ref": 1}) + b"\0\0\0\2[]")
            error = await asyncio.gather(task, return_exceptions=True)
            self.assertIsInstance(error[0], TransportError)
            self.assertIn("not a JSON object", str(error[0]))
            await master.close()
        run(body())

    def test_map_keeps_a_window_and_the_input_order(self):
        async def body():
            master = Master("d:1", **QUICK)
            net = FakeNet(master)
            await master.start()
            (connection,) = net.connections
            answers = []

            async def consume(bodies):
                async for answer in master.map("t", bodies, window=3):
                    answers.append(answer)

            for bodies in (range(7), _agen(range(7))):
                answers.clear()
                task = asyncio.ensure_future(consume(bodies))
                answered = 0
                while answered < 7:
                    await turn(5)
                    sent = connection.transport.frames()
                    self.assertLessEqual(master.in_flight, 3)
                    for frame in reversed(sent):  # answered last first
                        net.feed(connection, {"ok": True, "id": frame["id"], "ref": frame["ref"]},
                                 {"id": frame["id"], "body": frame["body"] * 10})
                        answered += 1
                await task
                self.assertEqual(answers, [i * 10 for i in range(7)])
            await master.close()
        run(body())

    def test_map_raises_in_turn_and_cancels_the_rest(self):
        async def body():
            master = Master("d:1", **QUICK)
            net = FakeNet(master)
            await master.start()
            (connection,) = net.connections
            answers = master.map("t", [1, 2, 3, 4], window=4)
            first = asyncio.ensure_future(answers.__anext__())
            await turn()
            sent = connection.transport.frames()
            self.assertEqual(len(sent), 4)
            net.feed(connection, *({"ok": True, "id": f["id"], "ref": f["ref"]} for f in sent))
            net.feed(connection, {"error": "job_failed", "reason": "no", "id": sent[1]["id"]},
                     {"id": sent[0]["id"], "body": "one"})
            self.assertEqual(await first, "one")
            with self.assertRaises(ServerError):
                await answers.__anext__()
            cancels = connection.transport.frames()
            self.assertEqual(sorted(f["id"] for f in cancels), sorted(f["id"] for f in sent[2:]))
            self.assertEqual({f["action"] for f in cancels}, {"cancel"})
            with self.assertRaises(StopAsyncIteration):
                await answers.__anext__()
            # A body that is not JSON raises in its turn.
            bad = master.map("t", [1, float("nan")])
            first = asyncio.ensure_future(bad.__anext__())
            await turn()
            (frame,) = connection.transport.frames()
            net.feed(connection, {"ok": True, "id": frame["id"], "ref": frame["ref"]},
                     {"id": frame["id"], "body": 1})
            self.assertEqual(await first, 1)
            with self.assertRaises(EncodeError):
                await bad.__anext__()
            await master.close()
        run(body())

    def test_leaving_a_map_early_cancels_what_is_in_flight(self):
        async def body():
            master = Master("d:1", **QUICK)
            net = FakeNet(master)
            await master.start()
            (connection,) = net.connections
            async with master.map("t", range(100), window=5) as answers:
                pending = asyncio.ensure_future(answers.__anext__())
                await turn()
                sent = connection.transport.frames()
                net.feed(connection, {"ok": True, "id": sent[0]["id"], "ref": 1},
                         {"id": sent[0]["id"], "body": "first"})
                self.assertEqual(await pending, "first")
            cancelled = connection.transport.frames()
            self.assertEqual(len(sent), 5)
            self.assertEqual([f["action"] for f in cancelled], ["cancel"] * 4)
            # Cancelling the consuming task does the same.
            task = asyncio.ensure_future(_consume(master.map("t", range(100), window=2)))
            await turn()
            self.assertEqual(len(connection.transport.frames()), 2)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            self.assertEqual([f["action"] for f in connection.transport.frames()], ["cancel"] * 2)
            # A plain break too, once the iterator is collected (at once in CPython).
            async def answer_the_first():
                await turn()
                frame = connection.transport.frames()[0]
                net.feed(connection, {"ok": True, "id": frame["id"], "ref": frame["ref"]},
                         {"id": frame["id"], "body": 0})

            helper = asyncio.ensure_future(answer_the_first())
            answers = master.map("t", range(100), window=3)
            async for _ in answers:
                break
            await helper
            del answers
            gc.collect()
            self.assertEqual([f["action"] for f in connection.transport.frames()], ["cancel"] * 2)
            await master.close()
        run(body())

    def test_resubmit_sends_a_lost_daemons_jobs_elsewhere(self):
        async def body():
            master = Master(["a:1", "b:2"], resubmit=True, **QUICK)
            net = FakeNet(master)
            await master.start()
            ids = [f"j{i}" for i in range(10)]
            tasks = [asyncio.ensure_future(master.submit("t", None, id=i)) for i in ids]
            await turn()
            (a,), (b,) = net.to("a:1"), net.to("b:2")
            on_a = {frame["id"] for frame in a.transport.frames()}
            b.transport.frames()
            net.refuse.add("a:1")
            a.connection_lost(None)
            await turn()
            self.assertEqual({frame["id"] for frame in b.transport.frames()}, on_a)
            self.assertFalse(any(task.done() for task in tasks))
            for task in tasks:
                task.cancel()
            await master.close()
        run(body())

    def test_stats_of_several_daemons(self):
        async def body():
            master = Master("a:1,b:2", **QUICK)
            net = FakeNet(master)
            await master.start()
            task = asyncio.ensure_future(master.stats())
            await turn()
            for number, connection in enumerate(net.connections):
                (frame,) = connection.transport.frames()
                self.assertEqual(frame, {"action": "stats", "ref": 1})
                net.feed(connection, {"ok": True, "ref": 1, "stats": {
                    "masters": 1, "slaves": number, "types": {"t": {"queued": number + 1}}, "totals": {}}})
            stats = await task
            self.assertEqual((stats["slaves"], stats["types"]["t"]["queued"]), (1, 3))
            self.assertEqual(sorted(stats["daemons"]), ["a:1", "b:2"])
            await master.close()
        run(body())

    def test_a_connection_closed_before_any_frame_may_expect_tls(self):
        async def body():
            for tls, hint in ((None, True), (True, False)):
                master = Master("d:1", ssl=tls, **QUICK)
                net = FakeNet(master)
                await master.start()
                task = asyncio.ensure_future(master.submit("t", None, id="j"))
                await turn()
                net.connections[0].connection_lost(None)
                error = await asyncio.gather(task, return_exceptions=True)
                self.assertIsInstance(error[0], TransportError)
                closed = ("the connection to d:1 was closed before the daemon said anything (if that port expects "
                          "TLS, give ssl=)") if hint else "the connection to d:1 was closed"
                self.assertEqual(str(error[0]), f"{closed}; job 'j' was dropped by d:1")
                await master.close()
        run(body())

    def test_names_shared_with_the_twisted_client(self):
        async def body():
            master = Master(["a:1", "b:2"], **QUICK)
            net = FakeNet(master)
            net.refuse.add("b:2")
            # A request before start() starts the master, and waits for a daemon.
            task = asyncio.ensure_future(master.submit("t", None, id="j"))
            await turn()
            (a,) = net.to("a:1")
            (sent,) = a.transport.frames()
            self.assertEqual((sent["id"], master.in_flight), ("j", 1))
            self.assertEqual((master.daemon_of("j"), master.daemon_of("other")), ("a:1", None))
            self.assertEqual(master.daemons, ["a:1", "b:2"])
            self.assertEqual(master.unreachable, {"b:2": "cannot connect to b:2: Connection refused"})
            await master.start()  # started already: it only waits for the first attempts
            with self.assertRaises(RuntimeError):
                await master.start()
            with self.assertRaises(ValueError) as caught:
                await master.stats("c:3")
            self.assertEqual(str(caught.exception), "'c:3' is not one of this client's daemons")
            net.feed(a, {"ok": True, "id": "j", "ref": sent["ref"]}, {"id": "j", "body": 5})
            self.assertEqual((await task, master.in_flight), (5, 0))
            await master.stop()  # close(), by the Twisted client's name
            self.assertTrue(a.transport.closing)
            with self.assertRaises(TransportError):
                await master.submit("t")
        run(body())

    def test_an_admin_request_before_start_waits_for_the_first_attempts(self):
        async def body():
            master = Master(["a:1", "b:2"], **QUICK)
            net = FakeNet(master)
            pausing = asyncio.ensure_future(master.pause("t"))
            await turn(10)
            self.assertEqual(len(net.connections), 2)
            for connection in net.connections:  # every daemon is asked, not only the first up
                (sent,) = connection.transport.frames()
                self.assertEqual((sent["action"], sent["type"]), ("pause", "t"))
                net.feed(connection, {"ok": True, "ref": sent["ref"]})
            self.assertIsNone(await pausing)
            await master.close()
        run(body())

    def test_addresses(self):
        self.assertEqual(Master("a:1, b:2").names, ["a:1", "b:2"])
        self.assertEqual(Master(["[::1]:5"])._hosts, {"[::1]:5": ("::1", 5)})
        self.assertRaises(ValueError, Master, "nonsense")
        self.assertRaises(ValueError, Master, "")
        self.assertRaises(ValueError, Master, "a:1", fail_after=0)


class TLSDescriptionTests(SynchronousTestCase):
    def error(self, cls, reason, verify_message=None):
        error = cls(1, f"[SSL: {reason}] something")
        error.reason = reason
        if verify_message is not None:
            error.verify_message = verify_message
        return error

    def test_lines(self):
        cases = [
            (self.error(ssl.SSLCertVerificationError, "CERTIFICATE_VERIFY_FAILED",
                        "Hostname mismatch, certificate is not valid for 'x'."),
             "TLS with d:1 failed: wrong host name (Hostname mismatch, certificate is not valid for 'x')"),
            (self.error(ssl.SSLCertVerificationError, "CERTIFICATE_VERIFY_FAILED",
                        "unable to get local issuer certificate"),
             "TLS with d:1 failed: certificate verify failed (unable to get local issuer certificate)"),
            (self.error(ssl.SSLError, "TLSV13_ALERT_CERTIFICATE_REQUIRED"),
             "TLS with d:1 failed: the daemon requires a client certificate"),
            (self.error(ssl.SSLError, "TLSV1_ALERT_UNKNOWN_CA"),
             "TLS with d:1 failed: the daemon refused the client certificate (tlsv1 alert unknown ca)"),
            (self.error(ssl.SSLError, "WRONG_VERSION_NUMBER"),
             "TLS with d:1 failed: the daemon does not speak TLS on that port"),
        ]
        for error, line in cases:
            self.assertEqual(aio._connect_failure(error, "d:1", 10), (line, True))
            self.assertEqual(aio._loss(error, "d:1", None), (line, True))
        self.assertIsNone(aio._tls_failure(ssl.SSLEOFError(8, "EOF"), "d:1"))
        self.assertEqual(aio._connect_failure(ConnectionRefusedError(111, "Connection refused"), "d:1", 10),
                         ("cannot connect to d:1: Connection refused", False))
        self.assertEqual(aio._connect_failure(asyncio.TimeoutError(), "d:1", 2.5),
                         ("cannot connect to d:1: no connection within 2.5 s", False))
        self.assertEqual(aio._loss(None, "d:1", None), ("the connection to d:1 was closed", False))


class WorkerShellTests(SynchronousTestCase):
    """`Worker` over fake connections."""

    def worker(self, handler, concurrency=1, slaves="d:1", **kwargs):
        self.reports = []
        self.jobs = []
        worker = Worker("t", handler, concurrency, slaves, report=self.reports.append,
                        on_job=lambda job, seconds, error: self.jobs.append((job.id, error)),
                        **dict(QUICK, **kwargs))
        return worker, FakeNet(worker)

    async def stop(self, worker, net):
        """Stop the worker, the daemons acknowledging what it sends; return
        the frames each connection sent meanwhile."""
        stopping = asyncio.ensure_future(worker.stop())
        await turn()
        sent = {connection: connection.transport.frames() for connection in net.connections
                if not connection.closed.done()}
        net.reply_ok(worker)
        await stopping
        return {connection: frames for connection, frames in sent.items() if frames}

    def test_sync_async_and_failing_handlers(self):
        def sync(job):
            if job.body == "bad":
                raise ValueError("bad body")
            self.assertIsNot(threading.current_thread(), threading.main_thread())
            return job.body.upper()

        async def asynchronous(job):
            await asyncio.sleep(0)
            if job.body == "bad":
                raise KeyError()
            return job.body + "!"

        async def body():
            for handler, good in ((sync, "X"), (asynchronous, "x!"), (lambda job: asynchronous(job), "x!")):
                worker, net = self.worker(handler)
                await worker.start()
                (connection,) = net.connections
                self.assertEqual(connection.transport.frames(), [{"action": "join", "type": "t"}])
                net.feed(connection, {"ok": True}, {"action": "job", "id": "1", "type": "t", "body": "x"})
                while not self.jobs:
                    await asyncio.sleep(0.001)
                net.feed(connection, {"action": "job", "id": "2", "type": "t", "body": "bad"})
                self.assertEqual(connection.transport.frames(), [{"action": "respond", "id": "1", "body": good}])
                while len(self.jobs) < 2:
                    await asyncio.sleep(0.001)
                (failed,) = connection.transport.frames()
                self.assertEqual(failed["action"], "fail")
                self.assertEqual(failed["reason"], "bad body" if handler is sync else "KeyError")
                self.assertEqual([(i, type(e)) for i, e in self.jobs],
                                 [("1", type(None)), ("2", ValueError if handler is sync else KeyError)])
                self.assertEqual(await self.stop(worker, net), {connection: [{"action": "leave"}]})
                await worker.wait()
        run(body())

    def test_plain_handlers_run_in_a_pool_of_concurrency_threads(self):
        concurrency = min(32, (os.cpu_count() or 1) + 4) + 2  # more than the loop's default executor
        barrier = threading.Barrier(concurrency)

        def handler(job):
            barrier.wait(timeout=10)  # passes only once every job runs at once
            return threading.current_thread().name

        async def body():
            worker, net = self.worker(handler, concurrency=concurrency)
            await worker.start()
            executor = worker._executor
            for index, connection in enumerate(net.connections):
                net.feed(connection, {"ok": True}, {"action": "job", "id": str(index), "type": "t", "body": None})
            while len(self.jobs) < concurrency:
                await asyncio.sleep(0.001)
            self.assertEqual([error for _, error in self.jobs], [None] * concurrency)
            answers = [frame["body"] for connection in net.connections for frame in connection.transport.frames()
                       if frame.get("action") == "respond"]
            self.assertEqual(len(answers), concurrency)
            self.assertTrue(all(name.startswith("gloom-t") for name in answers), answers)
            await self.stop(worker, net)
            self.assertTrue(executor._shutdown)
        run(body(), timeout=30)

    def test_stop_finishes_a_plain_handler_before_its_threads_go(self):
        release = threading.Event()

        def handler(job):
            release.wait(10)
            return "done"

        async def asynchronous(job):
            return "done"

        async def body():
            worker, net = self.worker(handler)
            await worker.start()
            (connection,) = net.connections
            net.feed(connection, {"ok": True}, {"action": "job", "id": "1", "type": "t", "body": None})
            await turn()
            stopping = asyncio.ensure_future(worker.stop())
            await turn()
            self.assertFalse(stopping.done())
            self.assertFalse(worker._executor._shutdown)
            release.set()
            while not self.jobs:
                await asyncio.sleep(0.001)
            await turn()
            self.assertEqual(connection.transport.frames(),
                             [{"action": "join", "type": "t"}, {"action": "leave"},
                              {"action": "respond", "id": "1", "body": "done"}])
            net.reply_ok(worker)
            await stopping
            self.assertTrue(worker._executor._shutdown)
            # A coroutine function needs no threads.
            worker, net = self.worker(asynchronous)
            await worker.start()
            self.assertIsNone(worker._executor)
            await self.stop(worker, net)
        run(body())

    def test_only_a_connection_that_proved_itself_resets_the_backoff(self):
        async def body(loop):
            worker, net = self.worker(lambda job: None)
            waits = []
            worker._delay = lambda delay: waits.append(delay) or 0
            await worker.start()
            for _ in range(4):  # closed at once, without a word: a TLS port reached without ssl=
                net.connections[-1].connection_lost(None)
                await turn(10)
            self.assertEqual((waits, len(net.connections)), ([0.02, 0.04, 0.08, 0.1], 5))
            self.assertEqual(self.reports[0], "the connection to d:1 was closed before the daemon said anything "
                                              "(if that port expects TLS, give ssl=) (reconnecting)")
            net.feed(net.connections[-1], {"ok": True})  # the daemon answered the join: it works
            net.connections[-1].connection_lost(None)
            await turn(10)
            self.assertEqual(waits[4:], [0.02])
            for _ in range(2):  # closed at once again: the count starts over, and grows
                net.connections[-1].connection_lost(None)
                await turn(10)
            self.assertEqual(waits[4:], [0.02, 0.02, 0.04])
            loop.advance(aio.PROVEN_AFTER)  # up long enough, though silent
            self.reports.clear()
            net.connections[-1].connection_lost(None)
            await turn(10)
            self.assertEqual(waits[7:], [0.02])
            # A quiet connection of long standing that closes gets no TLS hint.
            self.assertEqual(self.reports[0], "the connection to d:1 was closed (reconnecting)")
            # A long outage, then a daemon that takes the connection and
            # restarts at once: the refusals count no more once it accepted.
            net.refuse.add("d:1")
            connections = len(net.connections)
            net.feed(net.connections[-1], {"ok": True})  # a working connection, then the daemon goes away
            lost = len(waits)
            net.connections[-1].connection_lost(None)
            await turn(10)
            # The loss, then each refusal: counted as the Twisted client counts them.
            self.assertEqual(waits[lost:lost + 3], [0.02, 0.04, 0.08])
            self.assertEqual(waits[-1], 0.1)  # refused again and again: the longest wait
            net.refuse.discard("d:1")
            await turn(10)
            self.assertEqual(len(net.connections), connections + 1)
            waited = len(waits)
            net.connections[-1].connection_lost(None)  # it took the connection, and restarts
            await turn(10)
            self.assertEqual(waits[waited:], [0.02])
            await self.stop(worker, net)
        run_on_clock(body)

    def test_concurrency_over_two_daemons(self):
        release = []
        join, leave = {"action": "join", "type": "t"}, {"action": "leave"}

        async def handler(job):
            gate = asyncio.get_running_loop().create_future()
            release.append(gate)
            await gate
            return job.id

        async def body():
            worker, net = self.worker(handler, concurrency=2, slaves="a:1,b:2")
            await worker.start()
            self.assertEqual(len(net.connections), 4)
            a1, a2 = net.to("a:1")
            b1, b2 = net.to("b:2")
            frames = lambda: [c.transport.frames() for c in (a1, a2, b1, b2)]  # noqa: E731
            # Room for 2: both asked on a, the first daemon up; one moves to
            # b once a has confirmed its leave.
            self.assertEqual(frames(), [[join], [join, leave], [], []])
            net.reply_ok(worker)
            await turn()
            self.assertEqual(frames(), [[], [], [join], []])
            net.reply_ok(worker)
            net.feed(a1, {"action": "job", "id": "1", "type": "t", "body": None})
            net.feed(b1, {"action": "job", "id": "2", "type": "t", "body": None})
            net.feed(a2, {"action": "job", "id": "3", "type": "t", "body": None})  # crossed the leave
            await turn()
            self.assertEqual((worker.busy, len(release)), (2, 2))
            self.assertEqual(frames(), [[], [{"action": "release", "id": "3"}], [], []])
            self.assertEqual((worker.released, worker.type, worker.job_type), (1, "t", "t"))
            # Until a confirms the release, it counts job 3 on us: a1 leaves.
            release[0].set_result(None)
            await turn(5)
            self.assertEqual(frames(), [[leave, {"action": "respond", "id": "1", "body": "1"}], [], [], []])
            net.reply_ok(worker)
            self.assertEqual(frames(), [[join], [], [], []])
            net.reply_ok(worker)
            stopping = asyncio.ensure_future(worker.stop())
            await turn()
            self.assertFalse(stopping.done())
            self.assertEqual(frames(), [[leave], [], [], []])
            release[1].set_result(None)
            await turn(5)
            self.assertEqual(frames(), [[], [], [leave, {"action": "respond", "id": "2", "body": "2"}], []])
            net.reply_ok(worker)
            await stopping
            self.assertTrue(all(c.transport.closing for c in net.connections))
            self.assertEqual(len(release), 2)
        run(body())

    def test_asks_that_bring_nothing_move_on_the_loops_clock(self):
        interval = core.WorkerCore.ROTATE_INTERVAL
        join = {"action": "join", "type": "t"}

        async def body(loop):
            worker, net = self.worker(lambda job: None, slaves="a:1,b:2")
            rotated = []
            rotate = worker._core.rotate
            worker._core.rotate = lambda: rotated.append(loop.time()) or rotate()
            await worker.start()
            a, b = net.connections
            self.assertEqual((a.transport.frames(), b.transport.frames()), ([join], []))
            net.reply_ok(worker)
            loop.advance(interval / 2)
            await turn()
            self.assertEqual(rotated, [])
            loop.advance(interval / 2)
            await turn()
            self.assertEqual((rotated, a.transport.frames()), ([interval], []))
            loop.advance(interval)  # a whole interval of asking brought nothing
            await turn()
            self.assertEqual((a.transport.frames(), b.transport.frames()), ([{"action": "leave"}], []))
            net.reply_ok(worker)
            self.assertEqual(b.transport.frames(), [join])
            net.reply_ok(worker)
            await self.stop(worker, net)
            self.assertEqual(rotated, [interval, 2 * interval])
            loop.advance(10 * interval)
            await turn()
            self.assertEqual(len(rotated), 2)  # the timer was cancelled with the stop
        run_on_clock(body)

    def test_one_daemon_has_no_rotation_timer(self):
        async def body(loop):
            worker, net = self.worker(lambda job: None)
            await worker.start()
            self.assertIsNone(worker._rotation)
            (connection,) = net.connections
            net.reply_ok(worker)
            loop.advance(10)
            await turn()
            self.assertEqual(connection.transport.frames(), [{"action": "join", "type": "t"}])
            await self.stop(worker, net)
        run_on_clock(body)

    def test_a_fatal_error_cancels_the_rotation(self):
        async def body(loop):
            worker, net = self.worker(lambda job: None, slaves="a:1,b:2")
            await worker.start()
            self.assertIsNotNone(worker._rotation)
            a, b = net.connections
            net.feed(a, {"error": "wrong_port", "reason": "join is for the slave port"})
            self.assertIsNone(worker._rotation)
            net.reply_ok(worker)
            with self.assertRaises(WorkerError):
                await worker.wait()
        run_on_clock(body)

    def test_refused_join_is_fatal(self):
        async def body():
            worker, net = self.worker(lambda job: None, concurrency=2)
            await worker.start()
            for connection in net.connections:
                net.feed(connection, {"error": "wrong_port", "reason": "join is for the slave port"})
            net.reply_ok(worker)
            with self.assertRaises(WorkerError) as caught:
                await worker.wait()
            self.assertEqual(str(caught.exception),
                             "d:1 refused to serve 't': wrong_port: join is for the slave port")
            self.assertEqual(self.reports, [str(caught.exception)])
        run(body())

    def test_tls_failure_is_fatal_and_refusal_is_retried(self):
        async def body():
            worker, net = self.worker(lambda job: None, slaves="a:1,b:2")
            net.refuse = {"a:1", "b:2"}
            await worker.start()
            await asyncio.sleep(0.05)
            self.assertEqual(sorted(self.reports), ["cannot connect to a:1: Connection refused (retrying)",
                                                    "cannot connect to b:2: Connection refused (retrying)"])
            error = ssl.SSLCertVerificationError(1, "verify failed")
            error.reason, error.verify_message = "CERTIFICATE_VERIFY_FAILED", "self-signed certificate"
            net.error = error
            with self.assertRaises(WorkerError) as caught:
                await worker.wait()
            self.assertIn("TLS with", str(caught.exception))
            self.assertIn("certificate verify failed (self-signed certificate)", str(caught.exception))
        run(body())

    def test_lost_connection_is_reported_and_retried(self):
        async def body():
            worker, net = self.worker(lambda job: None)
            await worker.start()
            (connection,) = net.connections
            connection.connection_lost(ConnectionResetError(104, "Connection reset by peer"))
            while len(net.connections) < 2:
                await asyncio.sleep(0.005)
            await turn()
            self.assertEqual(net.connections[1].transport.frames(), [{"action": "join", "type": "t"}])
            net.feed(net.connections[1], {"ok": True})
            await self.stop(worker, net)
            self.assertEqual(self.reports, ["the connection to d:1 was lost: Connection reset by peer "
                                            "(reconnecting)", "connected to d:1"])
        run(body())

    async def gated_worker(self):
        """A started worker whose handler waits on a future of ``gate``
        (one per job), holding job "1": (worker, net, connection, gate)."""
        gate = []

        async def handler(job):
            gate.append(asyncio.get_running_loop().create_future())
            return await gate[-1]

        worker, net = self.worker(handler)
        await worker.start()
        (connection,) = net.connections
        net.feed(connection, {"ok": True}, {"action": "job", "id": "1", "type": "t", "body": None})
        await turn()
        return worker, net, connection, gate

    def test_a_handler_that_ends_cancelled_fails_its_job_and_frees_its_place(self):
        async def body():
            worker, net, connection, gate = await self.gated_worker()
            self.assertEqual(worker.busy, 1)
            gate[0].cancel()  # what the handler awaits is cancelled by someone else
            await turn()
            self.assertEqual(worker.busy, 0)
            self.assertEqual(connection.transport.frames()[-1],
                             {"action": "fail", "id": "1", "reason": "the handler was cancelled"})
            net.feed(connection, {"ok": True}, {"action": "job", "id": "2", "type": "t", "body": None})
            await turn()
            self.assertEqual(worker.busy, 1)  # the place came free: it takes the next job
            gate[1].set_result("done")
            await turn()
            self.assertEqual(connection.transport.frames()[-1], {"action": "respond", "id": "2", "body": "done"})
            net.feed(connection, {"ok": True})
            await self.stop(worker, net)
        run(body())

    def test_a_worker_task_cancelled_at_shutdown_leaves_its_job_to_the_daemon(self):
        async def body():
            worker, net, connection, gate = await self.gated_worker()
            (task,) = worker._jobs
            task.cancel()  # as asyncio.run does to the tasks left when it ends (Ctrl-C)
            await turn()
            self.assertTrue(task.cancelled())
            self.assertTrue(gate[0].cancelled())  # the handler was cancelled with it
            self.assertNotIn("fail", [frame.get("action") for frame in connection.transport.frames()])
            self.assertEqual(self.jobs, [])  # no outcome: the job is the daemon's to hand out again
        run(body())

    def test_a_job_in_hand_when_the_connection_drops(self):
        async def body():
            worker, net, connection, gate = await self.gated_worker()
            self.assertEqual(worker.busy, 1)
            connection.connection_lost(None)
            while len(net.connections) < 2:
                await asyncio.sleep(0.005)
            await turn()
            # The handler runs on: it keeps its place, so the new connection asks for nothing.
            self.assertEqual(worker.busy, 1)
            self.assertEqual(net.connections[1].transport.frames(), [])
            gate[0].set_result("late")
            await turn()
            self.assertEqual(worker.busy, 0)
            self.assertEqual(connection.transport.frames(), [{"action": "join", "type": "t"}])
            self.assertEqual(net.connections[1].transport.frames(), [{"action": "join", "type": "t"}])
            self.assertEqual(self.reports, ["the connection to d:1 was closed; job '1' cannot be answered (a "
                                            "daemon still running queues it again)", "connected to d:1"])
            self.assertEqual(self.jobs, [("1", None)])
            await self.stop(worker, net)
        run(body())


async def _agen(items):
    for item in items:
        await asyncio.sleep(0)
        yield item


async def _consume(answers):
    async for _ in answers:
        pass


# --- against real daemons --------------------------------------------------------------------


class Daemon:
    """A Gloom daemon from makeService in this process's reactor, on
    loopback ports reserved for the test (so it can be restarted there).

    :param master: the master port's endpoint, ``{port}`` standing for the
        reserved port.
    :param slave: the same for the slave port.
    """

    def __init__(self, test, master="tcp:{port}:interface=127.0.0.1", slave="tcp:{port}:interface=127.0.0.1"):
        ports = {"master": reserved_port(test), "slave": reserved_port(test)}
        self.endpoints = {"master": master.format(port=ports["master"]),
                          "slave": slave.format(port=ports["slave"])}
        self.master = f"127.0.0.1:{ports['master']}"
        self.slave = f"127.0.0.1:{ports['slave']}"
        self.service = None
        self.start()

    def start(self):
        self.service = makeService({"master": self.endpoints["master"], "slave": self.endpoints["slave"],
                                    "max-frame": 1024 * 1024, "retries": 3}, reactor)
        self.service.startService()

    def stop(self):
        if self.service.running:
            return self.service.stopService()

    def drop_masters(self):
        """Cut every master connection, as a crash would."""
        for connection in list(self.service.factories[0].connections):
            connection.transport.abortConnection()


class DaemonsTestCase(TestCase):
    """Tests with real daemons (`daemon`), whose asyncio code runs in a
    thread (`run_async`)."""

    def setUp(self):
        self.daemons = []
        self.addCleanup(lambda: DeferredList([d for d in (daemon.stop() for daemon in self.daemons) if d]))

    def daemon(self, **kwargs):
        daemon = Daemon(self, **kwargs)
        self.daemons.append(daemon)
        return daemon

    def run_async(self, function, timeout=15):
        """Run ``function()`` (a coroutine function) in a thread's own loop."""
        return deferToThread(run, function(), timeout)

    def call(self, function, *args):
        """Call ``function`` in the reactor thread (from the test's loop)."""
        return blockingCallFromThread(reactor, function, *args)


class EndToEndTests(DaemonsTestCase):
    def test_run_submit_refusal_nan_and_stats(self):
        daemon = self.daemon()

        async def body():
            async with await work("upper", lambda job: job.body.upper(), slaves=daemon.slave, **QUICK):
                async with Master(daemon.master, **QUICK) as master:
                    self.assertEqual(await master.run("upper", "hello"), "HELLO")
                    self.assertEqual(await master.submit("upper", "again", id="mine", priority=3), "AGAIN")
                    with self.assertRaises(ServerError) as caught:
                        await master.submit("upper", 5)
                    self.assertEqual(caught.exception.error, "job_failed")
                    self.assertIn("upper", caught.exception.reason)
                    with self.assertRaises(ServerError) as caught:
                        await master.submit("t", "x", timeout=-1)
                    self.assertEqual(caught.exception.error, "invalid_message")
                    with self.assertRaises(EncodeError):
                        await master.submit("upper", float("nan"))
                    with self.assertRaises(ServerError) as caught:
                        await master.cancel("nothing")
                    self.assertEqual(caught.exception.error, "unknown_job")
                    stats = await master.stats()
                    self.assertEqual(stats["totals"]["completed"], 2)
                    self.assertEqual(stats["types"]["upper"]["idle_slaves"], 1)
        return self.run_async(body)

    def test_cancelling_the_task_cancels_the_job(self):
        daemon = self.daemon()

        async def body():
            async with Master(daemon.master, **QUICK) as master:
                task = asyncio.ensure_future(master.submit("nobody", None))
                while (await master.stats())["types"].get("nobody", {}).get("queued") != 1:
                    await asyncio.sleep(0.005)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                stats = await master.stats()
                self.assertEqual(stats["types"].get("nobody", {}).get("queued", 0), 0)
                self.assertEqual(stats["totals"]["cancelled"], 1)
        return self.run_async(body)

    def test_map_order_window_and_early_break(self):
        daemon = self.daemon()

        async def handler(job):
            await asyncio.sleep(0.001 * (job.body % 3))
            return job.body * 2

        async def body():
            async with await work("double", handler, concurrency=4, slaves=daemon.slave, **QUICK), \
                    Master(daemon.master, **QUICK) as master:
                answers = [answer async for answer in master.map("double", range(50), window=8)]
                self.assertEqual(answers, [i * 2 for i in range(50)])
                answers = [answer async for answer in master.map("double", _agen(range(20)), window=3)]
                self.assertEqual(answers, [i * 2 for i in range(20)])
                async with master.map("nobody", range(1000), window=5) as answers:
                    next_answer = asyncio.ensure_future(answers.__anext__())
                    while (await master.stats())["types"].get("nobody", {}).get("queued") != 5:
                        await asyncio.sleep(0.005)
                    next_answer.cancel()
                stats = await master.stats()
                self.assertEqual(stats["types"].get("nobody", {}).get("queued", 0), 0)
                self.assertEqual(stats["totals"]["cancelled"], 5)
                self.assertEqual(master.in_flight, 0)
        return self.run_async(body)

    def test_reconnects_after_a_restart(self):
        daemon = self.daemon()
        reports = []

        async def body():
            async with await work("echo", lambda job: job.body, slaves=daemon.slave, report=reports.append,
                                  **QUICK), Master(daemon.master, **QUICK) as master:
                self.assertEqual(await master.run("echo", 1), 1)
                self.call(daemon.stop)
                while master.connected:
                    await asyncio.sleep(0.005)
                self.call(daemon.start)
                self.assertEqual(await master.run("echo", 2), 2)
            self.assertIn(f"connected to {daemon.slave}", reports)
        return self.run_async(body)

    def test_several_daemons(self):
        first, second = self.daemon(), self.daemon()

        async def body():
            async with Master([first.master, second.master], **QUICK) as master:
                self.assertEqual(sorted(master.up), sorted([first.master, second.master]))
                ids = [f"job-{i}" for i in range(20)]
                tasks = {i: asyncio.ensure_future(master.submit("nobody", None, id=i)) for i in ids}
                while (await master.stats())["types"].get("nobody", {}).get("queued") != 20:
                    await asyncio.sleep(0.005)
                stats = await master.stats()
                queued = {name: figures["types"]["nobody"]["queued"] for name, figures in stats["daemons"].items()}
                on_second = [i for i in ids if core.rendezvous(i, master.names)[0] == second.master]
                self.assertEqual(queued, {first.master: 20 - len(on_second), second.master: len(on_second)})
                self.assertTrue(on_second and len(on_second) < 20)
                self.call(second.drop_masters)
                for job_id in on_second:
                    with self.assertRaises(TransportError) as caught:
                        await tasks[job_id]
                    self.assertEqual(caught.exception.daemon, second.master)
                    self.assertIn(second.master, str(caught.exception))
                self.assertFalse(any(tasks[i].done() for i in ids if i not in on_second))
                for task in tasks.values():
                    task.cancel()
        return self.run_async(body)

    def test_worker_concurrency_over_two_daemons(self):
        first, second = self.daemon(), self.daemon()
        running = []
        most = []

        async def handler(job):
            running.append(job.id)
            most.append(len(running))
            await asyncio.sleep(0.002)
            running.remove(job.id)
            return job.body

        async def body():
            async with await work("t", handler, concurrency=2, slaves=[first.slave, second.slave], **QUICK), \
                    Master([first.master, second.master], **QUICK) as master:
                self.assertEqual([a async for a in master.map("t", range(60), window=20)], list(range(60)))
                stats = await master.stats()
            self.assertLessEqual(max(most), 2)
            self.assertEqual(max(most), 2)
            self.assertEqual(stats["totals"]["retried"], 0)
            completed = [figures["totals"]["completed"] for figures in stats["daemons"].values()]
            self.assertEqual(sum(completed), 60)
            self.assertTrue(all(completed), completed)
        return self.run_async(body)

    def test_sync_handler_and_graceful_stop(self):
        daemon = self.daemon()
        gate = threading.Event()
        ran = []

        def handler(job):
            ran.append(job.body)
            gate.wait(10)
            return job.body

        async def body():
            worker = await work("slow", handler, concurrency=2, slaves=daemon.slave, **QUICK)
            async with Master(daemon.master, **QUICK) as master:
                tasks = [asyncio.ensure_future(master.submit("slow", i)) for i in range(5)]
                while worker.busy < 2:
                    await asyncio.sleep(0.005)
                stopping = asyncio.ensure_future(worker.stop())
                await asyncio.sleep(0.05)
                self.assertFalse(stopping.done())
                gate.set()
                await stopping
                await worker.wait()
                self.assertEqual(sorted(await asyncio.gather(*tasks[:2])), [0, 1])
                self.assertEqual(sorted(ran), [0, 1])
                stats = await master.stats()
                self.assertEqual(stats["types"]["slow"]["queued"], 3)
                self.assertEqual(stats["totals"]["retried"], 0)
                self.assertEqual(stats["slaves"], 0)
                for task in tasks:
                    task.cancel()
        return self.run_async(body)

    def test_refused_join(self):
        daemon = self.daemon()
        reports = []

        async def body():
            worker = await work("t", lambda job: None, slaves=daemon.master, report=reports.append, **QUICK)
            with self.assertRaises(WorkerError) as caught:
                await worker.wait()
            self.assertIn("refused to serve 't'", str(caught.exception))
            self.assertIn("wrong_port", str(caught.exception))
            self.assertEqual(reports, [str(caught.exception)])
        return self.run_async(body)


class TLSTests(DaemonsTestCase):
    def setUp(self):
        super().setUp()
        self.certs = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.certs, True)
        self.ca = Authority(self.certs)

    def test_tls_with_a_context(self):
        key, cert = self.ca.issue("localhost", server=True)
        daemon = self.daemon(
            master=f"ssl:{{port}}:interface=127.0.0.1:privateKey={key}:certKey={cert}",
            slave=f"mtls:{{port}}:interface=127.0.0.1:privateKey={key}:certKey={cert}:caCerts={self.ca.path}")
        master_address, slave_address = daemon.master, daemon.slave
        worker_key, worker_cert = self.ca.issue("worker-1", server=False)
        reports = []

        async def body():
            trusting = ssl.create_default_context(cafile=self.ca.path)
            with_certificate = ssl.create_default_context(cafile=self.ca.path)
            with_certificate.load_cert_chain(worker_cert, worker_key)
            async with await work("t", lambda job: job.body + "!", slaves=slave_address, ssl=with_certificate,
                                  server_hostname="localhost", **QUICK):
                async with Master(master_address, ssl=trusting, server_hostname="localhost", **QUICK) as master:
                    self.assertEqual(await master.run("t", "hi"), "hi!")
                async with Master(master_address, ssl=trusting, **QUICK) as master:  # 127.0.0.1 is in the SAN
                    self.assertEqual(await master.run("t", "ip"), "ip!")
            async with Master(master_address, ssl=trusting, server_hostname="not-the-server", **QUICK) as master:
                with self.assertRaises(TransportError) as caught:
                    await master.run("t", "x")
            self.assertRegex(str(caught.exception), r"^TLS with 127\.0\.0\.1:\d+ failed: wrong host name")
            self.assertNotIn("\n", str(caught.exception))
            async with Master(master_address, ssl=True, **QUICK) as master:
                with self.assertRaises(TransportError) as caught:
                    await master.run("t", "x")
            self.assertIn("failed: certificate verify failed", str(caught.exception))
            anonymous = await work("t", lambda job: None, slaves=slave_address, ssl=trusting,
                                   server_hostname="localhost", report=reports.append, **QUICK)
            with self.assertRaises(WorkerError) as caught:
                await anonymous.wait()
            self.assertRegex(str(caught.exception), r"^TLS with 127\.0\.0\.1:\d+ failed: ")
            self.assertIn("client certificate", str(caught.exception))
            self.assertEqual(reports, [str(caught.exception)])
        return self.run_async(body)


class ReadmeExampleTests(TestCase):
    """The README's asyncio example runs as printed (against a daemon on
    this test's ports instead of the default ones)."""

    readme = os.path.join(ROOT, "README.rst")
    title = "asyncio client: ``gloom.aio``"

    def example(self):
        """The section's first Python block, as a program."""
        with open(self.readme) as readme:
            text = readme.read()
        if self.title + "\n" not in text:
            raise SkipTest("README.rst has no asyncio section yet")
        section = text.split(self.title + "\n", 1)[1].split("\n", 1)[1]
        section = re.split(r"\n[^\n]+\n===+\n", section, maxsplit=1)[0]
        block = re.findall(r"\.\. code-block:: python\n\n((?:    .*\n|\n)+)", section)[0]
        return "\n".join(line[4:] for line in block.splitlines()) + "\n"

    def test_example(self):
        code = self.example()
        daemon = Daemon(self)
        self.addCleanup(daemon.stop)
        code = code.replace("127.0.0.1:9998", daemon.master).replace("127.0.0.1:9999", daemon.slave)
        printed = []
        namespace = {"__name__": "__main__", "print": lambda *args: printed.append(" ".join(map(str, args)))}

        def check(_):
            self.assertEqual(printed, ["HELLO", "A", "B", "C"])

        return deferToThread(exec, compile(code, "README.rst", "exec"), namespace).addCallback(check)
