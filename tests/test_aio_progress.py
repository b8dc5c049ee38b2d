"""The asyncio client (gloom/aio.py) and issue 13: a job's progress and
touch, unique submits, and pause, resume, clear and drain.

The shell over fake connections first (tests/test_aio.py's `FakeNet`),
then end to end against real daemons in this process (each test's
asyncio code runs in a thread while the reactor serves the daemons)."""

from __future__ import annotations

import asyncio
import logging
import threading

from twisted.trial.unittest import SynchronousTestCase

from twisted.internet import reactor

from gloom import core
from gloom.aio import Master, Worker, work
from gloom.core import EncodeError, ServerError, TransportError
from gloom.tap import makeService
from tests.test_aio import QUICK, Daemon, DaemonsTestCase, FakeNet, run, turn

JOIN = {"action": "join", "type": "t"}


# --- masters ---------------------------------------------------------------------------------


class MasterProgressTests(SynchronousTestCase):
    def test_progress_comes_in_order_before_the_answer(self):
        async def body():
            master = Master("d:1", **QUICK)
            net = FakeNet(master)
            await master.start()
            (connection,) = net.connections
            events = []
            task = asyncio.ensure_future(master.submit("t", 1, id="j", unique="key",
                                                       on_progress=lambda p: events.append(("p", p))))
            task.add_done_callback(lambda t: events.append(("answer", t.result())))
            await turn()
            self.assertEqual(connection.transport.frames(), [{"action": "submit", "id": "j", "type": "t", "body": 1,
                                                              "priority": 0, "unique": "key", "ref": 1}])
            net.feed(connection, {"ok": True, "id": "j", "ref": 1}, {"id": "j", "progress": {"done": 1, "total": 3}},
                     {"id": "j", "progress": {"data": ["two"]}})
            self.assertEqual(events, [("p", {"done": 1, "total": 3}), ("p", {"data": ["two"]})])
            await turn()
            self.assertFalse(task.done())
            net.feed(connection, {"id": "j", "progress": {"done": 3, "total": 3}}, {"id": "j", "body": "done"})
            self.assertEqual(await task, "done")
            await turn()
            self.assertEqual(events[2:], [("p", {"done": 3, "total": 3}), ("answer", "done")])
            self.assertEqual(master._watchers, {})
            await master.close()
        run(body())

    def test_run_takes_unique_and_on_progress_too(self):
        async def body():
            master = Master("d:1", **QUICK)
            net = FakeNet(master)
            await master.start()
            (connection,) = net.connections
            seen = []
            task = asyncio.ensure_future(master.run("t", None, id="r", unique="same", on_progress=seen.append))
            await turn()
            (sent,) = connection.transport.frames()
            self.assertEqual(sent["unique"], "same")
            net.feed(connection, {"ok": True, "id": "r", "coalesced": True, "ref": 1},
                     {"id": "r", "progress": {"done": 0.5}}, {"error": "job_failed", "reason": "no", "id": "r"})
            with self.assertRaises(ServerError) as caught:
                await task
            self.assertEqual((caught.exception.error, seen), ("job_failed", [{"done": 0.5}]))
            await master.close()
        run(body())

    def test_a_cleared_job_fails_with_cleared(self):
        async def body():
            master = Master("d:1", **QUICK)
            net = FakeNet(master)
            await master.start()
            (connection,) = net.connections
            task = asyncio.ensure_future(master.submit("t", None, id="c"))
            await turn()
            net.feed(connection, {"ok": True, "id": "c", "ref": 1},
                     {"error": "cleared", "reason": "cleared by an admin", "id": "c"})
            with self.assertRaises(ServerError) as caught:
                await asyncio.wait_for(task, 1)
            self.assertEqual((caught.exception.error, caught.exception.id), ("cleared", "c"))
            await master.close()
        run(body())

    def test_no_progress_once_the_task_is_cancelled(self):
        async def body():
            master = Master("d:1", **QUICK)
            net = FakeNet(master)
            await master.start()
            (connection,) = net.connections
            seen = []
            task = asyncio.ensure_future(master.submit("t", None, id="j", on_progress=seen.append))
            await turn()
            net.feed(connection, {"ok": True, "id": "j", "ref": 1}, {"id": "j", "progress": {"done": 1}})
            task.cancel()
            with self.assertRaises(asyncio.CancelledError):
                await task
            net.feed(connection, {"id": "j", "progress": {"done": 2}}, {"ok": True, "id": "j", "ref": 2})
            self.assertEqual(seen, [{"done": 1}])
            self.assertEqual(master._watchers, {})
            await master.close()
        run(body())

    def test_an_on_progress_that_raises_is_logged(self):
        async def body():
            master = Master("d:1", **QUICK)
            net = FakeNet(master)
            await master.start()
            (connection,) = net.connections
            task = asyncio.ensure_future(master.submit("t", None, id="j", on_progress=lambda p: 1 / 0))
            await turn()
            net.feed(connection, {"ok": True, "id": "j", "ref": 1}, {"id": "j", "progress": {"done": 1}},
                     {"id": "j", "body": "fine"})
            self.assertEqual(await task, "fine")
            self.assertFalse(connection.transport.closing)
            await master.close()

        with self.assertLogs("gloom.aio", logging.ERROR) as logged:
            run(body())
        self.assertEqual(len(logged.records), 1)
        self.assertIn("on_progress of job 'j'", logged.records[0].getMessage())
        self.assertIs(logged.records[0].exc_info[0], ZeroDivisionError)

    def test_mistakes_raise_at_once_and_send_nothing(self):
        async def body():
            master = Master("d:1", **QUICK)
            net = FakeNet(master)
            await master.start()
            (connection,) = net.connections
            for call, error in ((lambda: master.submit("t", 1, on_progress="print"), TypeError),
                                (lambda: master.submit("t", 1, unique=""), ValueError),
                                (lambda: master.submit("t", 1, unique="é" * 513), ValueError),
                                (lambda: master.submit("t", 1, unique="k", detach=True), ValueError),
                                (lambda: master.run("t", 1, detach=True), ValueError)):
                with self.assertRaises(error):
                    await call()
            await turn()
            self.assertEqual((connection.transport.frames(), master.in_flight, master._watchers), ([], 0, {}))
            await master.close()
        run(body())


# --- admin -----------------------------------------------------------------------------------


class UniqueRoutingTests(SynchronousTestCase):
    def test_a_unique_submit_goes_by_its_key_to_the_daemons_up(self):
        names = ["a:1", "b:2", "c:3"]
        down = next(key for key in (f"k{n}" for n in range(1000)) if core.rendezvous(key, names)[0] == "a:1")
        home = next(key for key in (f"k{n}" for n in range(1000)) if core.rendezvous(key, names)[0] == "c:3")

        async def body():
            master = Master(names, **QUICK)
            net = FakeNet(master)
            net.refuse.add("a:1")  # tried: its first attempt failed
            await master.start()
            self.assertTrue(master._core.tried)
            tasks = [asyncio.ensure_future(master.submit("t", None, id=key, unique=key)) for key in (down, home)]
            await turn()
            placed = {c.name: [frame["id"] for frame in c.transport.frames()] for c in net.connections}
            self.assertEqual(placed["c:3"], [home])
            self.assertIn(down, placed[core.rendezvous(down, ["b:2", "c:3"])[0]])
            for task in tasks:
                task.cancel()
            await master.close()
        run(body())

    def test_a_submit_waits_for_a_daemon_still_connecting(self):
        names = ["a:1", "b:2"]
        key = next(key for key in (f"k{n}" for n in range(1000)) if core.rendezvous(key, names)[0] == "a:1")

        async def body():
            master = Master(names, **QUICK)
            net = FakeNet(master)
            slow = asyncio.get_running_loop().create_future()
            fast_open = net.open

            async def open(name, received):
                if name == "a:1":
                    await slow
                return await fast_open(name, received)

            master._open = open
            master.connect_timeout = 0.05  # start() returns before a:1 is up
            await master.start()
            (b,) = net.connections
            task = asyncio.ensure_future(master.submit("t", 1, id="u", unique=key))
            await turn()
            self.assertEqual(b.transport.frames(), [])  # a:1, the key's daemon, was not tried yet
            slow.set_result(None)
            await turn(6)
            (a,) = net.to("a:1")
            self.assertEqual([frame["id"] for frame in a.transport.frames()], ["u"])
            task.cancel()
            await master.close()
        run(body())


class AdminTests(SynchronousTestCase):
    def test_every_daemon_is_asked(self):
        async def body():
            master = Master(["a:1", "b:2"], **QUICK)
            net = FakeNet(master)
            await master.start()
            a, b = net.to("a:1") + net.to("b:2")
            for ref, (call, frame, replies, outcome) in enumerate((
                    (lambda: master.pause("t"), {"action": "pause", "type": "t"}, ({}, {}), None),
                    (lambda: master.resume("t"), {"action": "resume", "type": "t"}, ({}, {}), None),
                    (lambda: master.clear("t"), {"action": "clear", "type": "t"},
                     ({"cleared": 2}, {"cleared": 3}), 5),
                    (lambda: master.drain(), {"action": "drain"}, ({}, {}), None)), 1):
                task = asyncio.ensure_future(call())
                await turn()
                self.assertEqual([a.transport.frames(), b.transport.frames()], [[dict(frame, ref=ref)]] * 2)
                net.feed(a, dict(replies[0], ok=True, ref=ref))
                await turn()
                self.assertFalse(task.done())
                net.feed(b, dict(replies[1], ok=True, ref=ref))
                self.assertEqual(await task, outcome)
            await master.close()
        run(body())

    def test_a_refusal_wins(self):
        async def body():
            master = Master(["a:1", "b:2"], **QUICK)
            net = FakeNet(master)
            await master.start()
            a, b = net.to("a:1") + net.to("b:2")
            task = asyncio.ensure_future(master.clear("t"))
            await turn()
            net.feed(a, {"ok": True, "cleared": 4, "ref": 1})
            net.feed(b, {"error": "forbidden", "reason": "start it with --admin", "ref": 1})
            with self.assertRaises(ServerError) as caught:
                await task
            self.assertEqual((caught.exception.error, caught.exception.daemon), ("forbidden", "b:2"))
            await master.close()
        run(body())

    def test_a_daemon_not_connected_is_named_after_the_others_were_asked(self):
        async def body():
            master = Master(["a:1", "b:2"], **QUICK)
            net = FakeNet(master)
            net.refuse.add("a:1")
            await master.start()
            (b,) = net.connections
            task = asyncio.ensure_future(master.pause("t"))
            await turn()
            self.assertEqual(b.transport.frames(), [{"action": "pause", "type": "t", "ref": 1}])
            net.feed(b, {"ok": True, "ref": 1})
            with self.assertRaises(TransportError) as caught:
                await task
            self.assertEqual(str(caught.exception), "a:1 not connected: pause was not sent there (done on b:2)")
            self.assertEqual(caught.exception.daemon, "a:1")
            await master.close()
        run(body())

    def test_mistakes_raise_at_once_and_a_closed_master_refuses(self):
        async def body():
            master = Master("d:1", **QUICK)
            net = FakeNet(master)
            await master.start()
            (connection,) = net.connections
            for call in (lambda: master.pause(""), lambda: master.resume(None), lambda: master.clear(3)):
                with self.assertRaises(ValueError):
                    await call()
            await turn()
            self.assertEqual(connection.transport.frames(), [])
            waiting = asyncio.ensure_future(master.clear("t"))
            await turn()
            await master.close()
            with self.assertRaises(TransportError):
                await waiting
            with self.assertRaises(TransportError):
                await master.drain()
        run(body())


# --- workers ---------------------------------------------------------------------------------


class WorkerProgressTests(SynchronousTestCase):
    def worker(self, handler):
        self.reports = []
        worker = Worker("t", handler, 1, "d:1", report=self.reports.append, **QUICK)
        return worker, FakeNet(worker)

    async def started(self, handler):
        worker, net = self.worker(handler)
        await worker.start()
        (connection,) = net.connections
        self.assertEqual(connection.transport.frames(), [JOIN])
        net.feed(connection, {"ok": True})
        return worker, net, connection

    async def stop(self, worker, net):
        stopping = asyncio.ensure_future(worker.stop())
        await turn()
        net.reply_ok(worker)
        await stopping

    def test_an_async_handler_sends_at_once(self):
        outcomes = []
        gate = []

        async def handler(job):
            outcomes.append(job.progress(1, 10))
            outcomes.append(job.touch())
            outcomes.append(job.progress(data={"step": "two"}))
            for bad, error in (((), ValueError), ((-1,), ValueError), ((True,), ValueError)):
                with self.assertRaises(error):
                    job.progress(*bad)
            with self.assertRaises(EncodeError):
                job.progress(data=float("nan"))
            gate.append(asyncio.get_running_loop().create_future())
            await gate[0]
            return job

        async def body():
            worker, net, connection = await self.started(handler)
            net.feed(connection, {"action": "job", "id": "j1", "type": "t", "body": None})
            await turn()
            self.assertEqual(outcomes, [True, True, True])
            self.assertEqual(connection.transport.frames(), [
                {"action": "progress", "id": "j1", "done": 1, "total": 10},
                {"action": "touch", "id": "j1"},
                {"action": "progress", "id": "j1", "data": {"step": "two"}}])
            net.reply_ok(worker)
            job = worker._core.links[0].job
            self.assertFalse(job.cancelled)
            gate[0].set_result(None)
            await turn(5)
            (respond,) = connection.transport.frames()
            self.assertEqual((respond["action"], respond["id"]), ("respond", "j1"))
            self.assertIs(job.progress(2, 10), False)
            self.assertIs(job.touch(), False)
            self.assertEqual(connection.transport.frames(), [])
            net.reply_ok(worker)
            await self.stop(worker, net)
            self.assertEqual(self.reports, [])
        run(body())

    def test_a_plain_handler_in_a_thread_hands_them_to_the_loop(self):
        go, sent = threading.Event(), threading.Event()
        outcomes = []

        def handler(job):
            self.assertIsNot(threading.current_thread(), threading.main_thread())
            payload = {"rows": [1]}
            outcomes.append(job.progress(1, 2, data=payload))
            payload["rows"].append(2)  # too late to change what is sent
            outcomes.append(job.touch())
            try:
                job.progress(total=float("inf"))
            except ValueError as e:
                outcomes.append(str(e))
            sent.set()
            go.wait(5)
            return "answer"

        async def body():
            loop = asyncio.get_running_loop()
            worker, net, connection = await self.started(handler)
            net.feed(connection, {"action": "job", "id": "j1", "type": "t", "body": None})
            await loop.run_in_executor(None, sent.wait, 5)
            await turn()
            self.assertEqual(outcomes, [True, True, "progress total must be a number, 0 or more, not inf"])
            self.assertEqual(connection.transport.frames(), [
                {"action": "progress", "id": "j1", "done": 1, "total": 2, "data": {"rows": [1]}},
                {"action": "touch", "id": "j1"}])
            net.reply_ok(worker)
            go.set()
            while not connection.transport.data:
                await asyncio.sleep(0.001)
                connection.flush()
            self.assertEqual(connection.transport.frames(), [{"action": "respond", "id": "j1", "body": "answer"}])
            net.reply_ok(worker)
            await self.stop(worker, net)
        run(body())

    def test_a_cancelled_reply_sets_cancelled(self):
        jobs = []

        async def handler(job):
            jobs.append(job)
            job.progress(1)
            while not job.cancelled:
                await asyncio.sleep(0.001)
            return "stopped early"

        async def body():
            worker, net, connection = await self.started(handler)
            net.feed(connection, {"action": "job", "id": "j1", "type": "t", "body": None})
            await turn()
            self.assertEqual(connection.transport.frames(), [{"action": "progress", "id": "j1", "done": 1}])
            net.feed(connection, {"error": "cancelled", "reason": "every master withdrew it", "id": "j1"})
            while not connection.transport.data:
                await asyncio.sleep(0.001)
                connection.flush()
            self.assertEqual(connection.transport.frames(),
                             [{"action": "respond", "id": "j1", "body": "stopped early"}])
            self.assertTrue(jobs[0].cancelled)
            self.assertEqual(len(self.reports), 1)
            self.assertIn("'j1' was cancelled", self.reports[0])
            net.reply_ok(worker)
            await self.stop(worker, net)
        run(body())


# --- against real daemons --------------------------------------------------------------------


class AdminDaemon(Daemon):
    """A `tests.test_aio.Daemon` that takes admin actions (``--admin``)."""

    def start(self):
        self.service = makeService({"master": self.endpoints["master"], "slave": self.endpoints["slave"],
                                    "max-frame": 1024 * 1024, "retries": 3, "admin": True}, reactor)
        self.service.startService()


class ProgressEndToEndTests(DaemonsTestCase):
    def daemon(self, admin=False):
        daemon = (AdminDaemon if admin else Daemon)(self)
        self.daemons.append(daemon)
        return daemon

    def test_progress_from_async_and_plain_handlers(self):
        daemon = self.daemon(admin=True)

        async def asynchronous(job):
            job.progress(0, 2)
            await asyncio.sleep(0.01)
            job.touch()
            job.progress(1, 2, data="async")
            return job.body * 2

        def plain(job):
            job.progress(1, 2, data="thread")
            job.touch()
            return job.body * 3

        async def body():
            async with await work("async", asynchronous, slaves=daemon.slave, **QUICK), \
                    await work("plain", plain, slaves=daemon.slave, **QUICK):
                async with Master(daemon.master, **QUICK) as master:
                    seen = []
                    self.assertEqual(await master.run("async", 21, on_progress=seen.append), 42)
                    self.assertEqual(seen, [{"done": 0, "total": 2}, {"done": 1, "total": 2, "data": "async"}])
                    seen = []
                    self.assertEqual(await master.submit("plain", 2, on_progress=seen.append), 6)
                    self.assertEqual(seen, [{"done": 1, "total": 2, "data": "thread"}])
                    stats = await master.stats()
                    self.assertEqual((stats["totals"]["progress"], stats["totals"]["touched"]), (3, 2))
        return self.run_async(body)

    def test_touch_keeps_a_long_job_alive(self):
        daemon = self.daemon()
        attempts = []

        async def handler(job):
            attempts.append(job.id)
            for _ in range(10):  # a second in all, with a timeout of half that
                await asyncio.sleep(0.1)
                self.assertIs(job.touch(), True)
            return "alive"

        async def body():
            async with await work("slow", handler, slaves=daemon.slave, **QUICK):
                async with Master(daemon.master, **QUICK) as master:
                    self.assertEqual(await master.run("slow", None, id="long", timeout=0.5), "alive")
                    stats = await master.stats()
                    self.assertEqual((stats["totals"]["touched"], stats["totals"]["retried"]), (10, 0))
            self.assertEqual(attempts, ["long"])
        return self.run_async(body)

    def test_unique_submits_share_one_job(self):
        daemon = self.daemon(admin=True)
        runs = []

        async def body():
            started = asyncio.Event()
            release = asyncio.Event()

            async def handler(job):
                runs.append(job.id)
                started.set()
                await release.wait()
                job.progress(1, 1)
                return "shared"

            async with await work("t", handler, slaves=daemon.slave, **QUICK):
                async with Master(daemon.master, **QUICK) as master:
                    seen = {"a": [], "b": []}
                    first = asyncio.ensure_future(master.submit("t", 1, id="a", unique="k",
                                                                on_progress=seen["a"].append))
                    await started.wait()
                    second = asyncio.ensure_future(master.submit("t", 2, id="b", unique="k",
                                                                 on_progress=seen["b"].append))
                    while (await master.stats())["totals"].get("coalesced", 0) < 1:
                        await asyncio.sleep(0.005)
                    release.set()
                    self.assertEqual(await asyncio.gather(first, second), ["shared", "shared"])
                    self.assertEqual(seen, {"a": [{"done": 1, "total": 1}], "b": [{"done": 1, "total": 1}]})
            self.assertEqual(runs, ["a"])
        return self.run_async(body)

    def test_pause_clear_and_resume(self):
        daemon = self.daemon(admin=True)

        async def body():
            ran = []
            async with Master(daemon.master, **QUICK) as master:
                await master.pause("t")
                self.assertEqual((await master.stats())["paused"], ["t"])
                async with await work("t", lambda job: ran.append(job.body) or job.body, slaves=daemon.slave,
                                      **QUICK):
                    doomed = [asyncio.ensure_future(master.submit("t", n)) for n in range(3)]
                    while (await master.stats())["types"].get("t", {}).get("queued") != 3:
                        await asyncio.sleep(0.005)
                    self.assertEqual(await master.clear("t"), 3)
                    for outcome in await asyncio.gather(*doomed, return_exceptions=True):
                        self.assertIsInstance(outcome, ServerError)
                        self.assertEqual(outcome.error, "cleared")
                    kept = asyncio.ensure_future(master.submit("t", "after"))
                    while (await master.stats())["types"].get("t", {}).get("queued") != 1:
                        await asyncio.sleep(0.005)
                    self.assertEqual(ran, [])
                    await master.resume("t")
                    self.assertEqual(await kept, "after")
                    self.assertEqual(ran, ["after"])
        return self.run_async(body)

    def test_admin_needs_the_flag(self):
        daemon = self.daemon()

        async def body():
            async with Master(daemon.master, **QUICK) as master:
                with self.assertRaises(ServerError) as caught:
                    await master.pause("t")
                self.assertEqual(caught.exception.error, "forbidden")
        return self.run_async(body)
