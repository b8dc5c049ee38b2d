"""The blocking client's progress, touch, unique jobs and admin actions.

`FakeDaemonTests` script the daemon's side frame by frame over real
sockets (so the order of frames, and what several threads write, is
checked on the wire); `DaemonTests` run against the real daemon."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
import unittest

from gloom import core
from gloom.client import Master, ServerError, Slave, Timeout, TransportError
from tests.support import reserved_port


class FakePeer:
    """The daemon's end of one client connection."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.sock.settimeout(10)
        self.buffer = b""

    def send(self, *messages) -> None:
        self.sock.sendall(b"".join(core.frame(message) for message in messages))

    def receive(self) -> dict:
        while True:
            if len(self.buffer) >= 4:
                (length,) = struct.unpack("!I", self.buffer[:4])
                if len(self.buffer) >= 4 + length:
                    data, self.buffer = self.buffer[4:4 + length], self.buffer[4 + length:]
                    return json.loads(data)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("the client closed the connection")
            self.buffer += chunk

    def close(self) -> None:
        self.sock.close()


class FakeDaemon:
    """A listening socket on loopback whose connections a test scripts."""

    def __init__(self, test: unittest.TestCase):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.listener.settimeout(10)
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.peers = []
        test.addCleanup(self.close)

    def accept(self) -> FakePeer:
        sock, _ = self.listener.accept()
        peer = FakePeer(sock)
        self.peers.append(peer)
        return peer

    def close(self) -> None:
        for peer in self.peers:
            peer.close()
        self.listener.close()


def in_thread(test: unittest.TestCase, target, *args) -> dict:
    """Run ``target`` in a thread; the result's ``error`` or ``value`` once
    joined (the test joins it at cleanup at the latest)."""
    outcome: dict = {}

    def run():
        try:
            outcome["value"] = target(*args)
        except BaseException as e:  # handed to the test
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    outcome["thread"] = thread
    test.addCleanup(thread.join, 10)
    return outcome


def joined(outcome: dict) -> object:
    outcome["thread"].join(10)
    assert not outcome["thread"].is_alive(), "the scripted daemon did not finish"
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


class FakeMasterTests(unittest.TestCase):
    def connect(self, **kwargs):
        daemon = FakeDaemon(self)
        master = Master(daemon.address, **kwargs)
        self.addCleanup(master.disconnect)
        return master, daemon.accept()

    def test_run_calls_on_progress_in_order_before_returning(self):
        master, peer = self.connect()
        seen = []

        def script():
            submit = peer.receive()
            peer.send({"ok": True, "id": submit["id"], "ref": submit["ref"]},
                      {"id": submit["id"], "progress": {"done": 1, "total": 3}},
                      {"id": "someone-else", "progress": {"done": 9}})
            time.sleep(0.05)  # in a frame of its own
            peer.send({"id": submit["id"], "progress": {"done": 3, "total": 3, "data": {"step": "z"}}},
                      {"id": submit["id"], "body": "result"})
            return submit

        returned = []
        scripted = in_thread(self, script)
        caller = threading.current_thread()
        answer = master.run("t", {"x": 1}, unique="k-1",
                            on_progress=lambda p: seen.append((p, bool(returned), threading.current_thread())))
        returned.append(True)
        submit = joined(scripted)
        self.assertEqual(answer, "result")
        self.assertEqual(submit["unique"], "k-1")
        self.assertEqual(seen, [({"done": 1, "total": 3}, False, caller),
                                ({"done": 3, "total": 3, "data": {"step": "z"}}, False, caller)])

    def test_submit_on_progress_comes_before_receive_returns_the_answer(self):
        master, peer = self.connect()
        seen = []

        def script():
            first = peer.receive()
            peer.send({"ok": True, "id": first["id"], "ref": first["ref"]})
            second = peer.receive()
            peer.send({"ok": True, "id": second["id"], "ref": second["ref"], "coalesced": True},
                      {"id": first["id"], "progress": {"done": 5}},
                      {"id": second["id"], "progress": {"done": 5}},
                      {"id": first["id"], "body": "r"}, {"id": second["id"], "body": "r"})

        scripted = in_thread(self, script)
        one = master.submit(type="t", body=1, unique="same", on_progress=lambda p: seen.append(("one", p)))
        two = master.submit(type="t", body=2, unique="same", on_progress=lambda p: seen.append(("two", p)))
        joined(scripted)
        first = master.receive(5)
        self.assertEqual(seen, [("one", {"done": 5}), ("two", {"done": 5})])
        second = master.receive(5)
        self.assertEqual({first.id: first.body, second.id: second.body}, {one: "r", two: "r"})

    def test_an_exception_in_on_progress_comes_out_of_run_and_the_answer_goes_to_receive(self):
        master, peer = self.connect()

        def script():
            submit = peer.receive()
            peer.send({"ok": True, "id": submit["id"], "ref": submit["ref"]},
                      {"id": submit["id"], "progress": {"done": 1}})
            time.sleep(0.05)
            peer.send({"id": submit["id"], "progress": {"done": 2}}, {"id": submit["id"], "body": "late"})
            return submit["id"]

        def boom(progress):
            raise KeyError("on_progress broke")

        scripted = in_thread(self, script)
        with self.assertRaises(KeyError):
            master.run("t", None, on_progress=boom)
        job_id = joined(scripted)
        answer = master.receive(5)  # the callback is gone: the later progress is not given to it
        self.assertEqual((answer.id, answer.body), (job_id, "late"))

    def test_bad_unique_and_on_progress_raise_before_sending(self):
        master, peer = self.connect()
        for bad in ("", "x" * 1025, 5):
            self.assertRaises(ValueError, master.submit, type="t", unique=bad)
            self.assertRaises(ValueError, master.run, "t", unique=bad)
        self.assertRaises(ValueError, master.submit, type="t", unique="k", detach=True)
        self.assertRaises(TypeError, master.submit, type="t", on_progress="not callable")
        master.disconnect()
        peer.sock.settimeout(2)
        self.assertRaises(EOFError, peer.receive)  # nothing was ever sent

    def test_admin_actions_and_their_refusal(self):
        master, peer = self.connect()

        def script():
            replies = []
            for reply in ({"ok": True}, {"ok": True}, {"ok": True, "cleared": 4}, {"ok": True},
                          {"error": "forbidden", "reason": "admin actions need --admin"}):
                request = peer.receive()
                replies.append(request)
                peer.send(dict(reply, ref=request["ref"]))
            return replies

        scripted = in_thread(self, script)
        self.assertIsNone(master.pause("resize"))
        self.assertIsNone(master.resume("resize"))
        self.assertEqual(master.clear("resize"), 4)
        self.assertIsNone(master.drain())
        with self.assertRaises(ServerError) as caught:
            master.pause("x")
        self.assertEqual(caught.exception.error, "forbidden")
        sent = joined(scripted)
        self.assertEqual([{k: v for k, v in m.items() if k != "ref"} for m in sent], [
            {"action": "pause", "type": "resize"}, {"action": "resume", "type": "resize"},
            {"action": "clear", "type": "resize"}, {"action": "drain"}, {"action": "pause", "type": "x"}])
        self.assertRaises(ValueError, master.pause, "")
        self.assertRaises(ValueError, master.clear, None)

    def test_admin_goes_to_every_daemon_and_clear_adds_up(self):
        daemons = [FakeDaemon(self) for _ in range(3)]
        master = Master([daemon.address for daemon in daemons])
        self.addCleanup(master.disconnect)
        peers = [daemon.accept() for daemon in daemons]

        def script(peer, cleared):
            request = peer.receive()
            peer.send({"ok": True, "cleared": cleared, "ref": request["ref"]})
            return request

        outcomes = [in_thread(self, script, peer, n) for peer, n in zip(peers, (2, 3, 5))]
        self.assertEqual(master.clear("t"), 10)
        self.assertEqual([joined(o)["action"] for o in outcomes], ["clear"] * 3)

    def test_admin_says_which_daemons_were_not_reached(self):
        up = FakeDaemon(self)
        missing = f"127.0.0.1:{reserved_port(self)}"  # bound, never listening: refused
        master = Master([up.address, missing], connect_timeout=2)
        self.addCleanup(master.disconnect)
        peer = up.accept()

        def script():
            request = peer.receive()
            peer.send({"ok": True, "ref": request["ref"]})

        scripted = in_thread(self, script)
        with self.assertRaises(TransportError) as caught:
            master.pause("t")
        joined(scripted)
        self.assertIn(f"{missing} not connected: pause was not sent there (done on {up.address})",
                      str(caught.exception))


    def test_a_unique_submit_goes_by_its_key_to_the_daemons_up_at_once(self):
        up = FakeDaemon(self)
        missing = f"127.0.0.1:{reserved_port(self)}"  # bound, never listening: refused
        names = [up.address, missing]
        key = next(key for key in (f"k{n}" for n in range(1000)) if core.rendezvous(key, names)[0] == missing)
        master = Master(names, connect_timeout=2)
        self.addCleanup(master.disconnect)
        peer = up.accept()

        def script():
            sent = peer.receive()
            peer.send({"ok": True, "id": sent["id"], "ref": sent["ref"]})
            return sent

        scripted = in_thread(self, script)
        # The key's daemon was tried (it refused): the submit does not wait for it.
        self.assertEqual(master.submit("u", "t", 1, unique=key), "u")
        sent = joined(scripted)
        self.assertEqual((sent["id"], sent["unique"]), ("u", key))


class FakeSlaveTests(unittest.TestCase):
    def connect(self):
        daemon = FakeDaemon(self)
        slave = Slave(daemon.address)
        self.addCleanup(slave.disconnect)
        peer = daemon.accept()
        return slave, peer

    def joined_with_job(self, slave, peer, job_id="j1"):
        def script():
            join = peer.receive()
            assert join == {"action": "join", "type": "t"}, join
            peer.send({"ok": True}, {"action": "job", "id": job_id, "type": "t", "body": "b"})

        scripted = in_thread(self, script)
        slave.join("t")
        job = slave.job(timeout=5)
        joined(scripted)
        return job

    def test_progress_and_touch_frames_and_cancelled(self):
        slave, peer = self.connect()
        job = self.joined_with_job(slave, peer)
        self.assertTrue(job.progress(1, 4))
        self.assertTrue(job.progress(data={"stage": "upload"}))
        self.assertTrue(job.touch())
        self.assertEqual(peer.receive(), {"action": "progress", "id": "j1", "done": 1, "total": 4})
        self.assertEqual(peer.receive(), {"action": "progress", "id": "j1", "data": {"stage": "upload"}})
        self.assertEqual(peer.receive(), {"action": "touch", "id": "j1"})
        peer.send({"ok": True}, {"ok": True},
                  {"error": "cancelled", "reason": "every master withdrew the job", "id": "j1"})
        self.assertFalse(job.cancelled)  # not read yet: the next call reads what came
        deadline = time.monotonic() + 5
        while not job.cancelled and time.monotonic() < deadline:
            self.assertTrue(job.touch())
            frame = peer.receive()
            self.assertEqual(frame, {"action": "touch", "id": "j1"})
            peer.send({"error": "cancelled", "reason": "", "id": "j1"})
        self.assertTrue(job.cancelled)
        self.assertRaises(ValueError, job.progress)
        self.assertRaises(ValueError, job.progress, done=-2)

        def answer():
            frame = peer.receive()
            peer.send({"ok": True})
            return frame

        scripted = in_thread(self, answer)
        slave.fail("cancelled")
        self.assertEqual(joined(scripted), {"action": "fail", "id": "j1", "reason": "cancelled"})
        self.assertFalse(job.progress(2))  # answered: not held any more
        self.assertFalse(job.touch())

    def test_progress_from_many_threads_while_the_answer_goes(self):
        slave, peer = self.connect()
        job = self.joined_with_job(slave, peer)
        stop = threading.Event()
        sent_true = []
        sent_false = []

        def hammer(number):
            count = 0
            while not stop.is_set():
                count += 1
                if job.progress(count, data=number):
                    sent_true.append(number)
                else:
                    sent_false.append(number)
                    return

        workers = [threading.Thread(target=hammer, args=(n,), daemon=True) for n in range(4)]

        def daemon_side():
            seen = []
            while True:
                frame = peer.receive()
                seen.append(frame)
                peer.send({"ok": True})
                if frame["action"] == "respond":
                    return seen

        scripted = in_thread(self, daemon_side)
        for thread in workers:
            thread.start()
        time.sleep(0.2)
        slave.respond("done")  # from the main thread, while the others still send
        stop.set()
        for thread in workers:
            thread.join(10)
        seen = joined(scripted)
        self.assertEqual(seen[-1], {"action": "respond", "id": "j1", "body": "done"})
        progress = seen[:-1]
        self.assertGreater(len(progress), 20)
        self.assertTrue(all(frame["action"] == "progress" and frame["id"] == "j1" for frame in progress))
        self.assertEqual(len(progress), len(sent_true))  # every True was sent, nothing after the answer
        for number in range(4):
            dones = [frame["done"] for frame in progress if frame["data"] == number]
            self.assertEqual(dones, sorted(dones))

    def test_progress_from_another_thread_while_the_slave_waits_for_a_job(self):
        slave, peer = self.connect()
        job = self.joined_with_job(slave, peer)

        def answer():
            frame = peer.receive()
            peer.send({"ok": True})
            return frame

        scripted = in_thread(self, answer)
        slave.respond("first")
        joined(scripted)
        waiting = in_thread(self, slave.job, 5)  # blocked in the selector
        time.sleep(0.1)
        self.assertFalse(job.progress(1))  # a stale job: nothing sent
        peer.send({"action": "job", "id": "j2", "type": "t", "body": "second"})
        second = joined(waiting)
        self.assertEqual(second.id, "j2")
        # A second thread reports on the new job while the main one waits
        # for the answer's reply: both go out, in order.
        progressing = in_thread(self, second.progress, 1, 2)
        self.assertTrue(joined(progressing))
        self.assertEqual(peer.receive(), {"action": "progress", "id": "j2", "done": 1, "total": 2})

        def late_replies():
            frame = peer.receive()
            peer.send({"ok": True}, {"ok": True})  # the progress's reply, then the answer's
            return frame

        scripted = in_thread(self, late_replies)
        slave.respond("second")
        self.assertEqual(joined(scripted), {"action": "respond", "id": "j2", "body": "second"})

    def test_progress_after_disconnect_is_not_sent(self):
        slave, peer = self.connect()
        job = self.joined_with_job(slave, peer)
        slave.disconnect()
        self.assertFalse(job.progress(1))
        self.assertFalse(job.touch())

    def test_serve_handlers_see_cancelled(self):
        slave, peer = self.connect()
        steps = []

        def handler(job):
            for step in range(1000):
                if job.cancelled:
                    raise RuntimeError(f"cancelled at step {step}")
                job.progress(step)
                steps.append(step)
                time.sleep(0.005)
            return "finished"

        def script():
            join = peer.receive()
            peer.send({"ok": True}, {"action": "job", "id": "j1", "type": "t", "body": None})
            frames = []
            while True:
                frame = peer.receive()
                frames.append(frame)
                if frame["action"] == "progress" and frame["done"] >= 3:
                    peer.send({"error": "cancelled", "reason": "withdrawn", "id": "j1"})
                elif frame["action"] == "fail":
                    peer.send({"ok": True})
                    slave.disconnect()
                    return join, frames
                else:
                    peer.send({"ok": True})

        scripted = in_thread(self, script)
        slave.serve(handler, type="t")
        join, frames = joined(scripted)
        self.assertEqual(frames[-1]["action"], "fail")
        self.assertRegex(frames[-1]["reason"], r"^cancelled at step \d+$")
        self.assertLess(len(steps), 50)


# --- against the real daemon ---------------------------------------------------------------

from twisted.internet.threads import deferToThread  # noqa: E402

from tests.test_client import ClientTestCase  # noqa: E402


class DaemonTests(ClientTestCase):
    """The blocking client against a real daemon (with ``--admin``)."""

    options = {"admin": True}

    def test_progress_comes_in_order_before_the_answer(self):
        def body():
            def handler(job):
                for done in range(1, 4):
                    self.assertTrue(job.progress(done, 3, data=f"step {done}"))
                job.touch()
                return job.body * 2

            self.serve_in_background(handler, "double")
            seen, returned = [], []
            with Master(self.addresses()[0]) as master:
                answer = master.run("double", 21, wait=10, on_progress=lambda p: seen.append((p, bool(returned))))
                returned.append(True)
                self.assertEqual(answer, 42)
                self.assertEqual(seen, [({"done": n, "total": 3, "data": f"step {n}"}, False) for n in (1, 2, 3)])
                # submit + receive: the callbacks come before receive returns the answer
                got = []
                job_id = master.submit(type="double", body=1, on_progress=lambda p: got.append(p["done"]))
                answer = master.receive(10)
                self.assertEqual((answer.id, answer.body, got), (job_id, 2, [1, 2, 3]))
        return deferToThread(body)

    def test_unique_jobs_coalesce_across_two_masters(self):
        def body():
            ran = []
            release = threading.Event()

            def handler(job):
                ran.append(job.body)
                job.progress(1, 2)
                release.wait(10)
                job.progress(2, 2)
                return f"report for {job.body}"

            seen = {"first": [], "second": []}
            with Master(self.addresses()[0]) as first, Master(self.addresses()[0]) as second:
                one = first.submit(type="report", body="day 1", unique="day-1",
                                   on_progress=lambda p: seen["first"].append(p))
                two = second.submit(type="report", body="ignored", unique="day-1", priority=9,
                                    on_progress=lambda p: seen["second"].append(p))
                self.assertNotEqual(one, two)
                self.assertEqual(second.status(two).get("unique"), "day-1")
                self.serve_in_background(handler, "report")
                other = first.submit(type="report", body="day 2", unique="day-2")
                release.set()
                answers = [first.receive(10), first.receive(10)]
                self.assertEqual({a.id: a.body for a in answers},
                                 {one: "report for day 1", other: "report for day 2"})
                answer = second.receive(10)
                self.assertEqual((answer.id, answer.body), (two, "report for day 1"))
                self.assertEqual(seen["first"], [{"done": 1, "total": 2}, {"done": 2, "total": 2}])
                self.assertEqual(seen["second"], seen["first"])
                self.assertEqual(sorted(ran), ["day 1", "day 2"])  # the second submit ran nothing
                self.assertEqual(first.stats()["totals"]["coalesced"], 1)
        return deferToThread(body)

    def test_touch_keeps_a_long_job_alive_past_its_timeout(self):
        self.scheduler.max_retries = 0

        def body():
            def handler(job):
                for _ in range(6):  # 1.5 s in all, touched every 0.25 s
                    time.sleep(0.25)
                    self.assertTrue(job.touch())
                return "alive"

            self.serve_in_background(handler, "long")
            with Master(self.addresses()[0]) as master:
                self.assertEqual(master.run("long", None, timeout=1.0, wait=10), "alive")
                touched = master.stats()["totals"]["touched"]
                self.assertGreaterEqual(touched, 6)
        return deferToThread(body)

    def test_a_worker_sees_its_job_cancelled(self):
        def body():
            started = threading.Event()
            seen = []

            def handler(job):
                started.set()
                deadline = time.monotonic() + 10
                while not job.cancelled and time.monotonic() < deadline:
                    job.progress(data="working")
                    time.sleep(0.01)
                seen.append(job.cancelled)
                raise RuntimeError("stopped: cancelled")

            self.serve_in_background(handler, "cancel-me")
            with Master(self.addresses()[0]) as master:
                job_id = master.submit(type="cancel-me", body=None)
                self.assertTrue(started.wait(10))
                master.cancel(job_id)
                deadline = time.monotonic() + 10
                while not seen and time.monotonic() < deadline:
                    time.sleep(0.01)
                self.assertEqual(seen, [True])
        return deferToThread(body)

    def test_status_shows_the_latest_progress(self):
        def body():
            release = threading.Event()

            def handler(job):
                job.progress(5, 10, data={"file": "b.png"})
                release.wait(10)
                return "done"

            with Master(self.addresses()[0]) as master:
                seen = []
                job_id = master.submit(type="shown", body=None, unique="only-one",
                                       on_progress=seen.append)
                self.serve_in_background(handler, "shown")
                deadline = time.monotonic() + 10
                status = master.status(job_id)
                while "progress" not in status and time.monotonic() < deadline:
                    time.sleep(0.02)
                    status = master.status(job_id)
                self.assertEqual(status["state"], "running")
                self.assertEqual(status["progress"], {"done": 5, "total": 10, "data": {"file": "b.png"}})
                self.assertEqual(status["unique"], "only-one")
                release.set()
                self.assertEqual(master.receive(10).body, "done")
                self.assertEqual(seen, [{"done": 5, "total": 10, "data": {"file": "b.png"}}])
        return deferToThread(body)

    def test_pause_resume_and_clear(self):
        def body():
            self.serve_in_background(lambda job: job.body, "paused")
            with Master(self.addresses()[0]) as master:
                master.pause("paused")
                stats = master.stats()
                self.assertEqual(stats["paused"], ["paused"])
                job_id = master.submit(type="paused", body="held")
                self.assertRaises(Timeout, master.receive, 0.3)  # not handed out
                master.resume("paused")
                answer = master.receive(10)
                self.assertEqual((answer.id, answer.body), (job_id, "held"))
                self.assertEqual(master.stats()["paused"], [])

                master.pause("paused")
                ids = [master.submit(type="paused", body=n) for n in range(3)]
                self.assertEqual(master.clear("paused"), 3)
                failures = {answer.id: answer.error for answer in (master.receive(10) for _ in ids)}
                self.assertEqual(failures, dict.fromkeys(ids, "cleared"))
                self.assertEqual(master.clear("paused"), 0)
                self.assertEqual(master.stats()["totals"]["cleared"], 3)
        return deferToThread(body)

    def test_drain_finishes_the_jobs_then_the_daemon_stops(self):
        stopped = threading.Event()
        self.service.stop_reactor = stopped.set  # in a real daemon: the reactor stops, and it exits 0

        def body():
            release = threading.Event()

            def handler(job):
                release.wait(10)
                return job.body

            self.serve_in_background(handler, "last")
            with Master(self.addresses()[0]) as master, Master(self.addresses()[0]) as other:
                job_id = master.submit(type="last", body="finished")
                master.drain()
                self.assertTrue(master.stats()["draining"])
                error = self.assertRaises(ServerError, other.submit, type="last", body="refused")
                self.assertEqual(error.error, "shutdown")
                self.assertFalse(stopped.is_set())  # a job is running
                release.set()
                answer = master.receive(10)
                self.assertEqual((answer.id, answer.body), (job_id, "finished"))
                self.assertTrue(stopped.wait(10))
        return deferToThread(body)


class ForbiddenTests(ClientTestCase):
    """A daemon without ``--admin`` refuses the admin actions."""

    def test_forbidden_without_admin(self):
        def body():
            with Master(self.addresses()[0]) as master:
                for call in (lambda: master.pause("t"), lambda: master.resume("t"),
                             lambda: master.clear("t"), master.drain):
                    error = self.assertRaises(ServerError, call)
                    self.assertEqual(error.error, "forbidden")
                    self.assertIn("--admin", error.reason)
                self.assertEqual(master.stats()["paused"], [])
        return deferToThread(body)
