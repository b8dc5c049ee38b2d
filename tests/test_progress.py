"""Progress and touch: a slave's reports on the job it holds, relayed to the
job's master before the answer, on the daemon's protocols in memory with a
`Clock`; and the memory a master that does not read costs, over real sockets."""

import os
import socket
import struct
import json

from twisted.trial.unittest import SynchronousTestCase, TestCase

from gloom import wire
from tests.support import Daemon, TwistdDaemon, frame, reserved_port


def submit(job_id, **fields):
    return {"action": "submit", "id": job_id, "type": fields.pop("type", "t"),
            "body": fields.pop("body", None), **fields}


class ProgressTests(SynchronousTestCase):
    def setUp(self):
        self.daemon = Daemon()
        self.master = self.daemon.master()
        self.slave = self.daemon.slave("t")

    def running(self, job_id="a", **fields):
        """Submit a job and have the slave take it."""
        self.assertEqual(self.master.send(submit(job_id, **fields)), [{"ok": True, "id": job_id}])
        (job,) = self.slave.received()
        self.assertEqual(job["id"], job_id)
        return job

    def test_progress_reaches_the_master_in_order_before_the_answer(self):
        self.running()
        replies = self.slave.send(
            {"action": "progress", "done": 1, "total": 3},
            {"action": "progress", "id": "a", "done": 2, "total": 3, "data": {"rows": [1, 2]}},
            {"action": "progress", "data": "almost"},
            {"action": "respond", "body": "done"})
        self.assertEqual(replies, [{"ok": True}] * 4)
        self.assertEqual(self.master.received(), [
            {"id": "a", "progress": {"done": 1, "total": 3}},
            {"id": "a", "progress": {"done": 2, "total": 3, "data": {"rows": [1, 2]}}},
            {"id": "a", "progress": {"data": "almost"}},
            {"id": "a", "body": "done"},
        ])
        self.assertEqual(self.daemon.scheduler.totals["progress"], 3)

    def test_data_is_relayed_as_the_slave_wrote_it(self):
        self.running()
        self.slave.protocol.dataReceived(frame(b'{"action":"progress","data":{"b" : 1.50},"done":0.5}'))
        value = self.master.transport.value()
        self.assertIn(b'"progress":{"done":0.5,"data":{"b" : 1.50}}}', value)

    def test_the_reply_echoes_the_ref(self):
        self.running()
        self.assertEqual(self.slave.send({"action": "progress", "done": 1, "ref": 7}),
                         [{"ok": True, "ref": 7}])
        self.assertEqual(self.slave.send({"action": "touch", "ref": "t"}), [{"ok": True, "ref": "t"}])

    def test_status_shows_the_last_progress(self):
        self.running()
        self.slave.send({"action": "progress", "done": 1, "total": 4},
                        {"action": "progress", "done": 2, "total": 4})
        self.assertEqual(len(self.master.received()), 2)
        (status,) = self.master.send({"action": "status", "id": "a"})
        self.assertEqual(status["state"], "running")
        self.assertEqual(status["progress"], {"done": 2, "total": 4})

    def test_a_detached_job_keeps_its_progress_for_status(self):
        self.assertEqual(self.master.send(submit("d", detach=True)), [{"ok": True, "id": "d"}])
        self.slave.received()
        self.assertEqual(self.slave.send({"action": "progress", "done": 5, "total": 10}), [{"ok": True}])
        self.master.disconnect()
        other = self.daemon.master()
        (status,) = other.send({"action": "status", "id": "d"})
        self.assertEqual((status["state"], status["detached"], status["progress"]),
                         ("running", True, {"done": 5, "total": 10}))
        self.assertEqual(other.received(), [])  # no master to send progress to

    def test_a_job_with_no_progress_has_none_in_its_status(self):
        self.running()
        (status,) = self.master.send({"action": "status", "id": "a"})
        self.assertNotIn("progress", status)

    def test_bad_progress_is_refused_and_changes_nothing(self):
        self.running()
        for bad in ({"action": "progress"},
                    {"action": "progress", "done": -1},
                    {"action": "progress", "done": "1"},
                    {"action": "progress", "done": True},
                    {"action": "progress", "total": [1]},
                    {"action": "progress", "total": None},
                    {"action": "progress", "id": 5, "done": 1}):
            (refusal,) = self.slave.send(bad)
            self.assertEqual(refusal["error"], "invalid_message", bad)
        (huge,) = self.slave.send(b'{"action":"progress","done":1e999}')
        self.assertEqual(huge["error"], "invalid_message")
        self.assertEqual(self.master.received(), [])
        self.assertEqual(self.daemon.scheduler.totals["progress"], 0)
        # The job is still the slave's to answer.
        self.assertEqual(self.slave.send({"action": "respond", "body": 1}), [{"ok": True}])
        self.assertEqual(self.master.received(), [{"id": "a", "body": 1}])

    def test_progress_without_a_job_or_for_another_job(self):
        (refusal,) = self.slave.send({"action": "progress", "done": 1})
        self.assertEqual(refusal["error"], "not_processing")
        (refusal,) = self.slave.send({"action": "touch"})
        self.assertEqual(refusal["error"], "not_processing")
        self.running()
        (refusal,) = self.slave.send({"action": "progress", "id": "b", "done": 1})
        self.assertEqual((refusal["error"], refusal["id"]), ("wrong_job", "b"))
        (refusal,) = self.slave.send({"action": "touch", "id": "b"})
        self.assertEqual(refusal["error"], "wrong_job")
        self.assertEqual(self.master.received(), [])

    def test_progress_on_the_master_port_is_wrong_port(self):
        (refusal,) = self.master.send({"action": "progress", "done": 1})
        self.assertEqual(refusal["error"], "wrong_port")
        (refusal,) = self.master.send({"action": "touch"})
        self.assertEqual(refusal["error"], "wrong_port")

    def test_progress_after_a_timeout_is_refused_like_a_late_answer(self):
        self.running(timeout=5)
        self.daemon.clock.advance(5)  # given up: queued again
        (refusal,) = self.slave.send({"action": "progress", "done": 1})
        self.assertEqual((refusal["error"], refusal["id"]), ("timed_out", "a"))
        self.assertIn("progress was refused", refusal["reason"])
        (refusal,) = self.slave.send({"action": "touch"})
        self.assertEqual(refusal["error"], "timed_out")
        self.assertEqual(self.master.received(), [])
        # Another slave gets the retry, and its progress goes through.
        other = self.daemon.slave("t")
        self.assertEqual(other.received()[0]["id"], "a")
        self.assertEqual(other.send({"action": "progress", "done": 1}), [{"ok": True}])
        self.assertEqual(self.master.received(), [{"id": "a", "progress": {"done": 1}}])

    def test_progress_after_a_cancel_says_cancelled(self):
        self.running()
        self.assertEqual(self.master.send({"action": "cancel", "id": "a"}), [{"ok": True, "id": "a"}])
        (refusal,) = self.slave.send({"action": "progress", "done": 1})
        self.assertEqual((refusal["error"], refusal["id"]), ("cancelled", "a"))
        (refusal,) = self.slave.send({"action": "touch"})
        self.assertEqual(refusal["error"], "cancelled")
        # The slave still answers the job it holds, and is free again.
        self.assertEqual(self.slave.send({"action": "respond", "body": 1}), [{"ok": True}])
        self.assertEqual(self.master.received(), [])
        self.running("b")

    def test_progress_after_the_master_went_away_says_cancelled(self):
        self.running()
        self.master.disconnect()
        (refusal,) = self.slave.send({"action": "progress", "done": 1})
        self.assertEqual(refusal["error"], "cancelled")

    def test_a_dead_job_does_not_keep_its_progress(self):
        self.master.send(submit("d", detach=True, retries=0))
        self.slave.received()
        self.slave.send({"action": "progress", "data": "x" * 1000},
                        {"action": "fail", "reason": "no"})
        (status,) = self.master.send({"action": "status", "id": "d"})
        self.assertEqual(status["state"], "dead")
        self.assertNotIn("progress", status)
        self.assertIsNone(self.daemon.detached.dead["d"].job.progress)

    def test_a_count_too_long_to_read_is_out_of_range(self):
        self.running()
        (refusal,) = self.slave.send(b'{"action":"progress","done":' + b"9" * 4001 + b"}")
        self.assertEqual((refusal["error"], refusal["reason"]),
                         ("invalid_message", "field 'done' is out of range"))

    def test_a_taken_detached_id_says_what_has_it(self):
        self.master.send(submit("d", detach=True))
        (refusal,) = self.master.send(submit("d", detach=True))
        self.assertEqual(refusal["error"], "id_exists")
        self.assertIn("is running already", refusal["reason"])

    def test_progress_on_a_cancelled_detached_job_says_cancelled(self):
        self.master.send(submit("d", detach=True))
        self.slave.received()
        self.assertEqual(self.master.send({"action": "cancel", "id": "d"}), [{"ok": True, "id": "d"}])
        (refusal,) = self.slave.send({"action": "progress", "done": 1})
        self.assertEqual(refusal["error"], "cancelled")


class TouchTests(SynchronousTestCase):
    def setUp(self):
        self.daemon = Daemon()
        self.clock = self.daemon.clock
        self.master = self.daemon.master()
        self.slave = self.daemon.slave("t")
        self.master.send(submit("a", timeout=10))
        self.slave.received()

    def test_touch_keeps_a_job_alive_past_its_timeout(self):
        for _ in range(5):  # 40 s in all, on a 10 s timeout
            self.clock.advance(8)
            self.assertEqual(self.slave.send({"action": "touch", "id": "a"}), [{"ok": True}])
        self.clock.advance(8)
        self.assertEqual(self.daemon.scheduler.totals["timed_out"], 0)
        self.assertEqual(self.slave.send({"action": "respond", "body": "late but alive"}), [{"ok": True}])
        self.assertEqual(self.master.received(), [{"id": "a", "body": "late but alive"}])
        self.assertEqual(self.daemon.scheduler.totals["touched"], 5)

    def test_progress_touches_too(self):
        for done in range(3):
            self.clock.advance(9)
            self.slave.send({"action": "progress", "done": done})
        self.clock.advance(9)
        self.assertEqual(self.daemon.scheduler.totals["timed_out"], 0)
        self.assertEqual(self.slave.send({"action": "respond", "body": 1}), [{"ok": True}])

    def test_a_touch_restarts_the_timeout_rather_than_adding_to_it(self):
        self.clock.advance(8)
        self.slave.send({"action": "touch"})
        self.clock.advance(9.9)
        self.assertEqual(self.daemon.scheduler.totals["timed_out"], 0)
        self.clock.advance(0.1)
        self.assertEqual(self.daemon.scheduler.totals["timed_out"], 1)

    def test_without_a_touch_the_job_times_out(self):
        self.clock.advance(10)
        self.assertEqual(self.daemon.scheduler.totals["timed_out"], 1)
        refusal, retry = self.slave.send({"action": "respond", "body": 1})
        self.assertEqual((refusal["error"], retry["id"]), ("timed_out", "a"))

    def test_touching_a_job_without_a_timeout_is_fine(self):
        slave = self.daemon.slave("u")
        self.master.send(submit("b", type="u"))
        slave.received()
        self.assertEqual(slave.send({"action": "touch"}), [{"ok": True}])
        self.clock.advance(10**6)
        self.assertEqual(slave.send({"action": "respond", "body": 2}), [{"ok": True}])
        self.assertIn({"id": "b", "body": 2}, self.master.received())


class BehindMasterTests(SynchronousTestCase):
    """A master that does not read: its connection is paused (its
    transport's buffer is full), and only the latest progress of each of
    its jobs waits for it."""

    def setUp(self):
        self.daemon = Daemon()
        self.master = self.daemon.master()
        self.slaves = [self.daemon.slave("t"), self.daemon.slave("t")]
        for job_id in ("a", "b"):
            self.master.send(submit(job_id))
        for slave in self.slaves:
            slave.received()
        self.master.protocol.pauseProducing()

    def test_only_the_latest_progress_of_each_job_is_held(self):
        first, second = self.slaves
        for done in range(1000):
            self.assertEqual(first.send({"action": "progress", "done": done}), [{"ok": True}])
        second.send({"action": "progress", "done": 7})
        self.assertEqual(self.master.received(), [])
        self.assertEqual(len(self.master.protocol._held_progress), 2)
        self.assertEqual(self.daemon.masters.progress_replaced, 999)
        self.master.protocol.resumeProducing()
        self.assertEqual(self.master.received(), [
            {"id": "a", "progress": {"done": 999}},
            {"id": "b", "progress": {"done": 7}},
        ])
        first.send({"action": "progress", "done": 1000})
        self.assertEqual(self.master.received(), [{"id": "a", "progress": {"done": 1000}}])

    def test_the_held_progress_goes_before_the_answer(self):
        first, _ = self.slaves
        first.send({"action": "progress", "done": 1}, {"action": "progress", "done": 2},
                   {"action": "respond", "body": "x"})
        self.assertEqual(self.master.received(),
                         [{"id": "a", "progress": {"done": 2}}, {"id": "a", "body": "x"}])
        self.assertNotIn("a", self.master.protocol._held_progress)

    def test_the_held_progress_goes_before_a_failure(self):
        first, _ = self.slaves
        first.send({"action": "progress", "done": 1}, {"action": "fail", "reason": "no"})
        frames = self.master.received()
        self.assertEqual(frames[0], {"id": "a", "progress": {"done": 1}})
        self.assertEqual((frames[1]["error"], frames[1]["id"]), ("job_failed", "a"))

    def test_held_progress_goes_before_the_replies_to_requests_sent_meanwhile(self):
        first, _ = self.slaves
        first.send({"action": "progress", "done": 1})
        self.master.protocol.resumeProducing()
        self.master.received()
        self.master.protocol.pauseProducing()
        first.send({"action": "progress", "done": 2})
        self.master.protocol.dataReceived(frame({"action": "cancel", "id": "a"}))
        self.master.protocol.resumeProducing()
        self.assertEqual(self.master.received(),
                         [{"id": "a", "progress": {"done": 2}}, {"ok": True, "id": "a"}])
        self.assertEqual(first.send({"action": "progress", "done": 3})[0]["error"], "cancelled")


def _rss_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


class _Socket:
    """A blocking framed socket client."""

    def __init__(self, port, receive_buffer=None):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.settimeout(60)
        self.sock.connect(("127.0.0.1", port))
        self.pending = b""

    def send(self, *messages):
        self.sock.sendall(b"".join(frame(m) for m in messages))

    def receive(self):
        while True:
            if len(self.pending) >= 4:
                (length,) = struct.unpack_from("!I", self.pending)
                if len(self.pending) >= 4 + length:
                    message = json.loads(self.pending[4:4 + length])
                    self.pending = self.pending[4 + length:]
                    return message
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise EOFError("closed")
            self.pending += chunk


class ClientReadLimitTests(SynchronousTestCase):
    def test_clients_read_what_the_daemon_sends_on_a_frame_at_the_limit(self):
        """A frame at --max-frame that a slave sends comes to its master a
        little longer (the id around it): the clients read it."""
        from gloom import core

        size = core.MAX_FRAME + 2 * 6 * wire.MAX_NAME_BYTES + 100
        self.assertLessEqual(size, core.READ_LIMIT)
        buffer = core.FrameBuffer()
        self.assertEqual(buffer.feed(struct.pack("!I", size)), [])
        with self.assertRaises(core.ProtocolError):
            core.FrameBuffer().feed(struct.pack("!I", core.READ_LIMIT + 1))


class UnixAddressTests(SynchronousTestCase):
    def test_unix_peers_are_named_as_such(self):
        from twisted.internet.address import UNIXAddress

        from gloom.protocol import address_name

        self.assertEqual(address_name(UNIXAddress(None)), "unix socket")
        self.assertEqual(address_name(UNIXAddress(b"/run/gloom/admin.sock")),
                         "unix:/run/gloom/admin.sock")


class FloodTests(TestCase):
    """A slave floods progress to a master that does not read: the daemon
    (a twistd process) holds the latest report, not the flood."""

    def start(self):
        """A twistd daemon, a master that reads next to nothing (a 4 KiB
        receive buffer, and it does not read) and a slave joined to ``t``."""
        if not os.path.exists("/proc/self/status"):
            self.skipTest("needs /proc to read the daemon's memory")
        master_port, slave_port = reserved_port(self), reserved_port(self)
        daemon = TwistdDaemon(self, "-n", "gloom", "--master",
                              f"tcp:{master_port}:interface=127.0.0.1", "--slave",
                              f"tcp:{slave_port}:interface=127.0.0.1")
        daemon.ports()
        master = _Socket(master_port, receive_buffer=4096)
        slave = _Socket(slave_port)
        slave.send({"action": "join", "type": "t"})
        self.assertEqual(slave.receive(), {"ok": True})
        return daemon, master_port, slave_port, master, slave

    def test_a_master_that_does_not_read_costs_bounded_memory(self):
        daemon, master_port, slave_port, master, slave = self.start()
        master.send(submit("a"))
        self.assertEqual(master.receive(), {"ok": True, "id": "a"})
        self.assertEqual(slave.receive()["id"], "a")
        before = _rss_kib(daemon.process.pid)
        data = "x" * 1000
        batch = 1000
        for start in range(0, 100_000, batch):
            slave.send(*({"action": "progress", "done": done, "total": 100_000, "data": data}
                         for done in range(start, start + batch)))
            for _ in range(batch):
                self.assertEqual(slave.receive(), {"ok": True})
        grown = _rss_kib(daemon.process.pid) - before
        # About 100 MB of progress was sent; unbounded, the daemon would hold it.
        self.assertLess(grown, 30 * 1024, f"the daemon grew by {grown} KiB")
        # The rest of the daemon carries on: another master and slave.
        other = _Socket(master_port)
        other.send(submit("b", type="u"))
        self.assertEqual(other.receive(), {"ok": True, "id": "b"})
        worker = _Socket(slave_port)
        worker.send({"action": "join", "type": "u"})
        self.assertEqual(worker.receive(), {"ok": True})
        self.assertEqual(worker.receive()["id"], "b")
        worker.send({"action": "respond", "body": 2})
        self.assertEqual(other.receive(), {"id": "b", "body": 2})
        # The master reads at last: some progress in order, the latest last,
        # then the answer.
        slave.send({"action": "respond", "body": "finished"})
        self.assertEqual(slave.receive(), {"ok": True})
        done, frames = [], 0
        while True:
            message = master.receive()
            frames += 1
            if "progress" in message:
                done.append(message["progress"]["done"])
                continue
            self.assertEqual(message, {"id": "a", "body": "finished"})
            break
        self.assertEqual(done, sorted(done))
        self.assertEqual(done[-1], 99_999)
        self.assertLess(frames, 50_000)
        for client in (master, slave, other, worker):
            client.sock.close()

    def test_many_submitters_of_one_job_that_do_not_read_cost_bounded_memory(self):
        """One master that does not read attaches 5,000 ids to one unique
        job; a 20 KB progress report would be 100 MB of frames for it."""
        daemon, master_port, slave_port, master, slave = self.start()
        for start in range(0, 5000, 500):
            master.send(*(submit(f"i{n}", unique="k") for n in range(start, start + 500)))
            for _ in range(500):
                self.assertTrue(master.receive()["ok"])
        self.assertEqual(slave.receive()["id"], "i0")
        before = _rss_kib(daemon.process.pid)
        slave.send({"action": "progress", "data": "x" * 20_000})
        self.assertEqual(slave.receive(), {"ok": True})
        other = _Socket(master_port)  # a round trip after the report's turn
        other.send({"action": "stats"})
        self.assertEqual(other.receive()["stats"]["totals"]["progress"], 1)
        grown = _rss_kib(daemon.process.pid) - before
        self.assertLess(grown, 30 * 1024, f"the daemon grew by {grown} KiB")
        for client in (master, slave, other):
            client.sock.close()
