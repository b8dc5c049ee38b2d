"""The sans-IO client core, by plain unit tests: frames in, frames out."""

from __future__ import annotations

import json
import struct
import unittest

from gloom import core


def unframe(data: bytes) -> dict:
    (length,) = struct.unpack("!I", data[:4])
    assert length == len(data) - 4
    return json.loads(data[4:])


class Wire:
    """Records what a core sends, decoded, by daemon."""

    def __init__(self):
        self.sent = []
        self.ended = []

    def send(self, daemon, data):
        self.sent.append((daemon, unframe(data)))

    def to(self, daemon):
        return [message for name, message in self.sent if name == daemon]


def master(daemons=("a:1",), **kwargs):
    wire = Wire()
    return core.MasterCore(list(daemons), wire.send, wire.ended.append, **kwargs), wire


class FramingTests(unittest.TestCase):
    def test_frame_is_length_prefixed_utf8_json(self):
        data = core.frame({"body": "héllo"})
        self.assertEqual(data[:4], struct.pack("!I", len(data) - 4))
        self.assertEqual(data[4:].decode(), '{"body":"héllo"}')

    def test_nan_and_sets_are_refused_at_once(self):
        for body in (float("nan"), float("inf"), {1, 2}, object()):
            with self.assertRaises(core.EncodeError) as caught:
                core.frame({"body": body})
            self.assertIn("cannot be sent as JSON", str(caught.exception))
            self.assertIsInstance(caught.exception, ValueError)

    def test_frame_over_the_limit_is_refused(self):
        with self.assertRaises(core.EncodeError) as caught:
            core.frame({"body": "x" * 100}, limit=50)
        self.assertIn("at most 50", str(caught.exception))

    def test_buffer_splits_frames_however_the_bytes_arrive(self):
        stream = core.frame({"a": 1}) + core.frame({"b": 2}) + core.frame({"c": "ü"})
        for size in (1, 3, 7, len(stream)):
            buffer = core.FrameBuffer()
            frames = []
            for start in range(0, len(stream), size):
                frames += buffer.feed(stream[start:start + size])
            self.assertEqual([core.decode(f) for f in frames], [{"a": 1}, {"b": 2}, {"c": "ü"}])

    def test_buffer_refuses_an_announced_frame_over_the_limit(self):
        buffer = core.FrameBuffer(limit=10)
        with self.assertRaises(core.ProtocolError):
            buffer.feed(struct.pack("!I", 11))

    def test_a_tls_record_read_as_a_frame_says_tls(self):
        with self.assertRaises(core.ProtocolError) as caught:
            core.FrameBuffer().feed(b"\x15\x03\x01\x00\x02\x02\x46")  # a TLS alert
        self.assertIn("these bytes are TLS: that port expects a tls: address", str(caught.exception))

    def test_decode_refuses_what_is_not_an_object(self):
        with self.assertRaises(core.ProtocolError):
            core.decode(b"[1]")
        with self.assertRaises(core.ProtocolError):
            core.decode(b"{nope")


class AddressTests(unittest.TestCase):
    def test_given_beats_environment_beats_default(self):
        env = {"GLOOM_MASTERS": "x:1,y:2", "GLOOM_MASTER": "z:3"}
        self.assertEqual(core.addresses("a:1", core.MASTERS_ENV, core.DEFAULT_MASTER, env), ["a:1"])
        self.assertEqual(core.addresses(None, core.MASTERS_ENV, core.DEFAULT_MASTER, env), ["x:1", "y:2"])
        self.assertEqual(core.addresses(None, core.MASTERS_ENV, core.DEFAULT_MASTER, {"GLOOM_MASTER": "z:3"}),
                         ["z:3"])
        self.assertEqual(core.addresses(None, core.MASTERS_ENV, core.DEFAULT_MASTER, {}),
                         ["127.0.0.1:9998"])
        self.assertEqual(core.addresses(None, core.SLAVES_ENV, core.DEFAULT_SLAVE, {}), ["127.0.0.1:9999"])

    def test_lists_commas_ipv6_and_duplicates(self):
        self.assertEqual(core.addresses(" a:1 , [::1]:2,a:1,", (), "d:0"), ["a:1", "[::1]:2"])
        self.assertEqual(core.addresses(["a:1", "b:2"], (), "d:0"), ["a:1", "b:2"])
        with self.assertRaises(ValueError):
            core.addresses(" , ", (), "d:0")

    def test_host_port(self):
        self.assertEqual(core.host_port("h:9"), ("h", 9))
        self.assertEqual(core.host_port("[::1]:9"), ("::1", 9))
        self.assertEqual(core.host_port(":9"), ("127.0.0.1", 9))
        for bad in ("h", "h:x", "h:0", "::1:9"):
            with self.assertRaises(ValueError):
                core.host_port(bad)

    def test_display_name_hides_key_paths(self):
        self.assertEqual(core.display_name("tls:h:9:trustRoots=/ca:privateKey=/k.pem"), "tls:h:9")
        self.assertEqual(core.display_name("h:9"), "h:9")


class RoutingTests(unittest.TestCase):
    def test_rendezvous_is_stable_and_spreads(self):
        daemons = ["a:1", "b:1", "c:1"]
        firsts = [core.rendezvous(str(n), daemons)[0] for n in range(3000)]
        for daemon in daemons:
            self.assertGreater(firsts.count(daemon), 800)
        self.assertEqual(core.rendezvous("42", daemons), core.rendezvous("42", list(reversed(daemons))))

    def test_only_a_down_daemons_share_moves(self):
        daemons = ["a:1", "b:1", "c:1"]
        for n in range(500):
            order = core.rendezvous(str(n), daemons)
            without = core.rendezvous(str(n), [d for d in daemons if d != "b:1"])
            self.assertEqual(without, [d for d in order if d != "b:1"])

    def test_submits_go_to_the_first_daemon_up_in_hash_order(self):
        cores, wire = master(["a:1", "b:1", "c:1"])
        cores.connected("a:1")
        cores.connected("c:1")
        for n in range(50):
            request = cores.submit("t", n, id=f"job{n}")
            expected = next(d for d in core.rendezvous(f"job{n}", ["a:1", "b:1", "c:1"]) if d != "b:1")
            self.assertEqual(request.daemon, expected)
        self.assertEqual(wire.to("b:1"), [])


class MasterCoreTests(unittest.TestCase):
    def test_submit_waits_for_a_connection_then_goes_with_a_ref(self):
        cores, wire = master()
        request = cores.submit("upper", "x", id="j")
        self.assertEqual(wire.sent, [])
        cores.connected("a:1")
        self.assertEqual(wire.to("a:1"), [{"action": "submit", "id": "j", "type": "upper", "body": "x",
                                           "ref": request.ref}])
        cores.received("a:1", {"ok": True, "id": "j", "ref": request.ref})
        self.assertTrue(request.acked)
        self.assertFalse(request.done)
        cores.received("a:1", {"id": "j", "body": "X"})
        self.assertEqual(request.result(), "X")
        self.assertEqual(wire.ended, [request])
        self.assertEqual(cores.in_flight, 0)

    def test_priority_timeout_and_extra_fields(self):
        cores, wire = master()
        cores.connected("a:1")
        cores.submit("t", None, priority=5, id="j", timeout=2.5, detach=True)
        self.assertEqual(wire.to("a:1")[0]["priority"], 5)
        self.assertEqual(wire.to("a:1")[0]["timeout"], 2.5)
        self.assertIs(wire.to("a:1")[0]["detach"], True)

    def test_bad_submits_raise_before_anything_is_sent(self):
        cores, wire = master()
        cores.connected("a:1")
        with self.assertRaises(core.EncodeError):
            cores.submit("t", float("nan"))
        with self.assertRaises(ValueError):
            cores.submit("", 1)
        cores.submit("t", 1, id="j")
        with self.assertRaises(ValueError):
            cores.submit("t", 1, id="j")
        self.assertEqual(len(wire.sent), 1)
        self.assertEqual(cores.in_flight, 1)

    def test_refusal_matched_by_ref_even_among_several(self):
        cores, wire = master()
        cores.connected("a:1")
        first = cores.submit("t", 1, id="j1")
        second = cores.submit("t", 2, id="j2")
        cores.received("a:1", {"error": "queue_full", "reason": "full", "id": "j2", "ref": second.ref})
        self.assertIsInstance(second.error, core.ServerError)
        self.assertEqual(second.error.error, "queue_full")
        self.assertEqual(second.error.daemon, "a:1")
        self.assertFalse(first.done)
        # The id is free again.
        cores.submit("t", 2, id="j2")

    def test_refusal_without_id_or_ref_fails_the_oldest_request(self):
        cores, wire = master()
        cores.connected("a:1")
        first = cores.submit("t", 1, id="j1")
        second = cores.submit("t", 2, id="j2")
        cores.received("a:1", {"error": "wrong_port", "reason": "belongs on the slave port"})
        self.assertEqual(first.error.error, "wrong_port")
        self.assertFalse(second.done)

    def test_a_daemon_without_refs_is_matched_by_id(self):
        cores, wire = master()
        cores.connected("a:1")
        first = cores.submit("t", 1, id="j1")
        second = cores.submit("t", 2, id="j2")
        cores.received("a:1", {"ok": True, "id": "j2"})
        self.assertTrue(second.acked)
        self.assertFalse(first.acked)
        cores.received("a:1", {"error": "id_exists", "reason": "dup", "id": "j1"})
        self.assertEqual(first.error.error, "id_exists")
        stats = cores.stats()
        cores.received("a:1", {"stats": {"masters": 1}})
        self.assertEqual(stats.result(), {"masters": 1})

    def test_job_failed_ends_the_job_with_a_server_error(self):
        cores, wire = master()
        cores.connected("a:1")
        request = cores.submit("t", 1, id="j")
        cores.received("a:1", {"ok": True, "id": "j", "ref": request.ref})
        cores.received("a:1", {"error": "job_failed", "reason": "boom", "id": "j"})
        with self.assertRaises(core.ServerError) as caught:
            request.result()
        self.assertEqual((caught.exception.error, caught.exception.reason), ("job_failed", "boom"))

    def test_cancel_acked_ends_the_job_cancelled(self):
        cores, wire = master()
        cores.connected("a:1")
        job = cores.submit("t", 1, id="j")
        cores.received("a:1", {"ok": True, "id": "j", "ref": job.ref})
        cancel = cores.cancel("j")
        self.assertEqual(wire.to("a:1")[-1], {"action": "cancel", "id": "j", "ref": cancel.ref})
        self.assertFalse(job.done)
        cores.received("a:1", {"ok": True, "id": "j", "ref": cancel.ref})
        self.assertIsNone(cancel.result())
        self.assertIsInstance(job.error, core.Cancelled)
        # A late answer for it is ignored.
        cores.received("a:1", {"id": "j", "body": 1})
        self.assertIsInstance(job.error, core.Cancelled)

    def test_cancel_crossing_the_jobs_failure(self):
        """The job failed before the daemon read the cancel: the job ends
        with its failure, the cancel with the refusal; nothing is guessed."""
        cores, wire = master()
        cores.connected("a:1")
        job = cores.submit("t", 1, id="j")
        cores.received("a:1", {"ok": True, "id": "j", "ref": job.ref})
        cancel = cores.cancel("j")
        cores.received("a:1", {"error": "job_failed", "reason": "boom", "id": "j"})
        cores.received("a:1", {"error": "unknown_job", "reason": "no such job", "id": "j",
                               "ref": cancel.ref})
        self.assertEqual(job.error.error, "job_failed")
        self.assertEqual(cancel.error.error, "unknown_job")

    def test_cancel_of_a_job_not_yet_sent_ends_both_at_once(self):
        cores, wire = master()
        job = cores.submit("t", 1, id="j")
        cancel = cores.cancel("j")
        self.assertTrue(cancel.done and job.done)
        self.assertIsInstance(job.error, core.Cancelled)
        cores.connected("a:1")
        self.assertEqual(wire.sent, [])

    def test_cancel_of_an_unknown_job_asks_the_daemon(self):
        cores, wire = master()
        cancel = cores.cancel("nope")  # perhaps a detached job: it waits for a daemon
        self.assertFalse(cancel.done)
        cores.connected("a:1")
        self.assertFalse(cancel.done)
        self.assertEqual(wire.to("a:1")[-1], {"action": "cancel", "id": "nope", "ref": cancel.ref})
        cores.received("a:1", {"error": "unknown_job", "reason": "no", "id": "nope", "ref": cancel.ref})
        self.assertEqual(cancel.error.error, "unknown_job")

    def test_lost_daemon_fails_its_jobs_naming_it(self):
        cores, wire = master(["a:1", "b:1"])
        cores.connected("a:1")
        cores.connected("b:1")
        jobs = [cores.submit("t", n, id=str(n)) for n in range(20)]
        on_b = [job for job in jobs if job.daemon == "b:1"]
        self.assertTrue(on_b)
        cores.lost("b:1", "the connection to b:1 was lost")
        for job in jobs:
            if job.daemon == "b:1":
                self.assertIsInstance(job.error, core.TransportError)
                self.assertEqual(job.error.daemon, "b:1")
                self.assertEqual(job.error.id, job.id)
                self.assertIn("dropped by b:1", str(job.error))
            else:
                self.assertFalse(job.done)
        later = [cores.submit("t", n, id=f"later{n}") for n in range(20)]
        self.assertTrue(all(job.daemon == "a:1" for job in later))

    def test_lost_daemon_resubmits_when_asked(self):
        cores, wire = master(["a:1", "b:1"], resubmit=True)
        cores.connected("a:1")
        cores.connected("b:1")
        jobs = [cores.submit("t", n, id=str(n)) for n in range(20)]
        moved = [job for job in jobs if job.daemon == "b:1"]
        cores.lost("b:1", "lost")
        for job in moved:
            self.assertFalse(job.done)
            self.assertEqual(job.daemon, "a:1")
            self.assertEqual(job.tried, ["b:1", "a:1"])
        self.assertEqual(len([m for m in wire.to("a:1") if m["action"] == "submit"]), 20)

    def test_resubmit_with_every_daemon_down_waits_in_the_backlog(self):
        cores, wire = master(["a:1"], resubmit=True)
        cores.connected("a:1")
        job = cores.submit("t", 1, id="j")
        cores.lost("a:1", "lost")
        self.assertFalse(job.done)
        cores.unreachable("cannot connect to a:1")
        self.assertIsInstance(job.error, core.TransportError)

    def test_a_close_after_an_unmatched_error_says_what_the_daemon_said(self):
        cores, wire = master()
        cores.connected("a:1")
        job = cores.submit("t", "x", id="j")
        cores.received("a:1", {"ok": True, "id": "j", "ref": job.ref})
        cores.received("a:1", {"error": "size_error", "reason": "a frame of 70000000 bytes is over 67108864"})
        cores.lost("a:1", "a:1 closed the connection")
        self.assertIn("size_error", str(job.error))

    def test_a_close_after_an_error_that_ended_a_request_says_what_the_daemon_said(self):
        cores, wire = master()
        cores.connected("a:1")
        first = cores.submit("t", "x", id="a")
        cores.received("a:1", {"ok": True, "id": "a", "ref": first.ref})
        big = cores.submit("t", "x" * 100, id="b")
        # The daemon could not read the second frame: its refusal carries no ref or id.
        cores.received("a:1", {"error": "size_error", "reason": "a frame of 70000000 bytes is over 67108864"})
        self.assertEqual(big.error.error, "size_error")
        cores.lost("a:1", "a:1 closed the connection")
        self.assertIsInstance(first.error, core.TransportError)
        self.assertIn("it said size_error: a frame of 70000000 bytes", str(first.error))

    def test_stats_from_each_daemon_and_summed(self):
        cores, wire = master(["a:1", "b:1"])
        pending = cores.stats()
        cores.connected("a:1")
        self.assertEqual(wire.to("a:1")[-1], {"action": "stats", "ref": pending.ref})
        cores.connected("b:1")
        other = cores.stats("b:1")
        cores.received("b:1", {"stats": {"masters": 2}, "ref": other.ref})
        cores.received("a:1", {"stats": {"masters": 1}, "ref": pending.ref})
        self.assertEqual((pending.result(), other.result()), ({"masters": 1}, {"masters": 2}))

    def test_unexpected_frames_are_protocol_errors(self):
        cores, wire = master()
        cores.connected("a:1")
        with self.assertRaises(core.ProtocolError):
            cores.received("a:1", {"what": 1})


class InOrderTests(unittest.TestCase):
    def test_results_come_out_in_input_order(self):
        cores, wire = master()
        cores.connected("a:1")
        window = core.InOrder(3)
        jobs = []
        while window.room:
            job = cores.submit("t", len(jobs), id=str(len(jobs)))
            window.add(job)
            jobs.append(job)
        self.assertEqual(len(window), 3)
        cores.received("a:1", {"id": "2", "body": 2})
        cores.received("a:1", {"id": "1", "body": 1})
        self.assertEqual(list(window.ready()), [])
        cores.received("a:1", {"id": "0", "body": 0})
        self.assertEqual([r.result() for r in window.ready()], [0, 1, 2])
        self.assertTrue(window.room)
        self.assertIsNone(window.head())

    def test_window_must_be_positive(self):
        with self.assertRaises(ValueError):
            core.InOrder(0)


class WorkerWire:
    def __init__(self):
        self.sent = []
        self.started = []
        self.reports = []
        self.replies = []

    def send(self, link, data):
        self.sent.append((link, unframe(data)))

    def run(self, link, job):
        self.started.append((link, job))

    def report(self, text, fatal):
        self.reports.append((text, fatal))

    def replied(self, link, kind, error):
        self.replies.append((kind, error and error.error))

    def actions(self, link=None):
        return [m.get("action") for l, m in self.sent if link is None or l is link]


def worker(concurrency=1, daemons=("a:1",), job_type="t"):
    wire = WorkerWire()
    worker = core.WorkerCore(job_type, concurrency, list(daemons), wire.send, wire.run, wire.report,
                             wire.replied)
    return worker, wire


def job_frame(job_id):
    return {"action": "job", "id": job_id, "type": "t", "body": job_id}


def confirm(cores, links=None):
    """The daemons reply ok to everything the links await a reply to."""
    for link in links or cores.links:
        while link.up and link.replies:
            cores.received(link, {"ok": True})


class WorkerCoreTests(unittest.TestCase):
    def test_one_daemon_joins_runs_and_answers(self):
        cores, wire = worker(2)
        for link in cores.links:
            cores.link_up(link)
        self.assertEqual(wire.actions(), ["join", "join"])
        first = cores.links[0]
        cores.received(first, {"ok": True})
        cores.received(first, job_frame("j1"))
        self.assertEqual(cores.in_hand, 1)
        link, job = wire.started[0]
        cores.finished(link, job, "done")
        self.assertEqual(wire.sent[-1][1], {"action": "respond", "id": "j1", "body": "done"})
        self.assertEqual(cores.in_hand, 0)
        # One daemon never needs a leave: each connection asks again by itself.
        self.assertNotIn("leave", wire.actions())

    def test_never_more_asks_than_free_places_across_daemons(self):
        cores, wire = worker(2, ["a:1", "b:1", "c:1"])
        for link in cores.links:
            cores.link_up(link)
            self.assertLessEqual(cores.asking, 2)
        confirm(cores)  # an ask moved from a once its leave was confirmed
        asking = [link for link in cores.links if link.wants]
        self.assertEqual(len({link.daemon for link in asking}), 2)  # spread, one each
        leaves = wire.actions().count("leave")
        first = asking[0]
        cores.received(first, job_frame("j1"))
        self.assertEqual((cores.in_hand, cores.asking), (1, 1))
        second = next(link for link in cores.links if link.wants and link.job is None)
        cores.received(second, job_frame("j2"))
        self.assertEqual((cores.in_hand, cores.asking), (2, 0))
        self.assertEqual(wire.actions().count("leave"), leaves)  # nothing was over-asked
        # An answer makes room for one ask, which takes its turn elsewhere
        # once the daemon has read the answer.
        cores.finished(first, wire.started[0][1], 1)
        self.assertEqual((cores.in_hand, cores.asking), (1, 0))
        confirm(cores, [first])
        self.assertEqual((cores.in_hand, cores.asking), (1, 1))
        asker = next(link for link in cores.links if link.wants and link.job is None)
        self.assertNotEqual(asker.daemon, first.daemon)
        self.assertEqual(wire.actions(first)[-2:], ["leave", "respond"])

    def test_a_job_crossing_a_leave_is_released(self):
        cores, wire = worker(1, ["a:1", "b:1"])
        for link in cores.links:
            cores.link_up(link)
        asker = next(link for link in cores.links if link.wants)
        cores.rotate()
        cores.rotate()
        cores.rotate()  # the ask brought nothing: it moved to the other daemon
        self.assertFalse(asker.wants)
        self.assertEqual(wire.actions(asker)[-1], "leave")
        cores.received(asker, job_frame("crossed"))
        self.assertEqual(wire.sent[-1], (asker, {"action": "release", "id": "crossed"}))
        self.assertEqual((cores.in_hand, cores.released), (0, 1))
        self.assertEqual(wire.started, [])

    def test_a_place_is_asked_for_elsewhere_only_once_its_daemon_confirmed(self):
        """Until a daemon has read the answer, leave or release that ended a
        connection's use, it still counts a job there: the place it frees
        is asked for on another daemon only after the daemon's reply."""
        cores, wire = worker(1, ["a:1", "b:1"])
        for link in cores.links:
            cores.link_up(link)
        a, b = cores.links
        confirm(cores)
        cores.received(a, job_frame("j1"))
        cores.finished(a, a.job, 1)  # a's turn is over: the next ask is b's
        self.assertEqual(wire.actions(a)[-2:], ["leave", "respond"])
        self.assertEqual((cores.asking, cores.free, wire.actions(b)), (0, 0, []))
        cores.received(a, {"ok": True})  # the leave
        self.assertEqual(wire.actions(b), [])
        cores.received(a, {"ok": True})  # the answer: a counts no job on us now
        self.assertEqual((wire.actions(b), cores.asking), (["join"], 1))
        # A rotated ask whose leave crosses a job waits for the release too.
        confirm(cores)
        for _ in range(3):
            cores.rotate()
        self.assertEqual(wire.actions(b)[-1], "leave")
        cores.received(b, job_frame("crossed"))
        self.assertEqual(wire.actions(b)[-1], "release")
        cores.received(b, {"ok": True})  # the leave
        self.assertEqual((cores.asking, wire.actions(a).count("join")), (0, 1))
        cores.received(b, {"ok": True})  # the release
        self.assertEqual((cores.asking, wire.actions(a).count("join"), cores.released), (1, 2, 1))

    def test_idle_asks_visit_every_daemon(self):
        daemons = ["a:1", "b:1", "c:1"]
        cores, wire = worker(1, daemons)
        for link in cores.links:
            cores.link_up(link)
        visited = set()
        for _ in range(12):
            cores.rotate()
            confirm(cores)
            self.assertEqual(cores.asking, 1)
            visited.update(link.daemon for link in cores.links if link.wants)
        self.assertEqual(visited, set(daemons))

    def test_asks_stay_where_the_work_is(self):
        cores, wire = worker(2, ["a:1", "b:1", "c:1"])
        for link in cores.links:
            cores.link_up(link)
        a = [link for link in cores.links if link.daemon == "a:1"]
        # Only a has work: each ask elsewhere goes dry, and the asks gather on a.
        for n in range(40):
            cores.rotate()
            for link in a:
                if link.wants and link.job is None:
                    cores.received(link, job_frame(f"a{n}-{link.index}"))
            for link in a:
                if link.job is not None:
                    cores.finished(link, link.job, 1)
            confirm(cores)
        self.assertEqual({link.daemon for link in cores.links if link.wants}, {"a:1"})
        ran = len(wire.started)
        self.assertGreater(ran, 40)

    def test_one_daemon_keeps_asking_without_leaves(self):
        cores, wire = worker(3)
        for link in cores.links:
            cores.link_up(link)
        for n in range(30):
            link = cores.links[n % 3]
            cores.received(link, job_frame(f"j{n}"))
            cores.finished(link, link.job, n)
            cores.rotate()
        self.assertEqual(set(wire.actions()), {"join", "respond"})
        self.assertEqual(wire.actions().count("join"), 3)

    def test_stop_takes_no_new_job(self):
        cores, wire = worker(2, ["a:1", "b:1"])
        for link in cores.links:
            cores.link_up(link)
        link = cores.links[0]
        cores.received(link, job_frame("j1"))
        cores.stop()
        self.assertFalse(any(l.wants and l.job is None for l in cores.links))
        other = cores.links[2]
        cores.received(other, job_frame("late"))
        self.assertEqual(wire.sent[-1], (other, {"action": "release", "id": "late"}))
        self.assertEqual([job.id for _, job in wire.started], ["j1"])
        # The job in hand is answered, after a leave so no job follows it.
        cores.finished(link, wire.started[0][1], "ok")
        self.assertEqual([m["action"] for l, m in wire.sent if l is link][-2:], ["leave", "respond"])
        self.assertEqual(cores.in_hand, 0)

    def test_failure_and_unencodable_answer_fail_the_job(self):
        cores, wire = worker()
        link = cores.links[0]
        cores.link_up(link)
        cores.received(link, job_frame("j1"))
        cores.finished(link, wire.started[-1][1], failure="it broke")
        self.assertEqual(wire.sent[-1][1], {"action": "fail", "id": "j1", "reason": "it broke"})
        cores.received(link, job_frame("j2"))
        cores.finished(link, wire.started[-1][1], float("nan"))
        self.assertEqual(wire.sent[-1][1]["action"], "fail")
        self.assertIn("JSON", wire.sent[-1][1]["reason"])

    def test_refused_join_is_fatal_and_replies_are_reported(self):
        cores, wire = worker()
        link = cores.links[0]
        cores.link_up(link)
        cores.received(link, {"error": "wrong_port", "reason": "join belongs on the slave port"})
        self.assertTrue(wire.reports[-1][1])
        self.assertIn("refused to serve", wire.reports[-1][0])
        self.assertEqual(wire.replies, [("join", "wrong_port")])

    def test_timed_out_answer_is_reported_not_fatal(self):
        cores, wire = worker()
        link = cores.links[0]
        cores.link_up(link)
        cores.received(link, {"ok": True})
        cores.received(link, job_frame("j1"))
        cores.finished(link, wire.started[-1][1], 1)
        cores.received(link, {"error": "timed_out", "reason": "late", "id": "j1"})
        self.assertEqual(wire.replies[-1], ("respond", "timed_out"))
        self.assertFalse(wire.reports[-1][1])

    def test_lost_link_keeps_its_place_until_the_handler_ends(self):
        cores, wire = worker(1, ["a:1", "b:1"])
        for link in cores.links:
            cores.link_up(link)
        a, b = cores.links
        confirm(cores)
        cores.received(a, job_frame("j1"))
        self.assertEqual(cores.link_down(a).id, "j1")
        # Its handler still runs: no other daemon may hand the worker a job.
        self.assertEqual((cores.in_hand, cores.free, cores.asking), (1, 0, 0))
        cores.link_up(a)  # back, while the handler runs on
        self.assertEqual((cores.free, cores.asking), (0, 0))
        sent = len(wire.sent)
        cores.finished(a, wire.started[-1][1], 1)  # its outcome goes nowhere
        self.assertNotIn("respond", [m["action"] for _, m in wire.sent[sent:]])
        self.assertEqual((cores.in_hand, cores.free, cores.asking), (0, 1, 1))
        cores.finished(a, wire.started[-1][1], 1)  # a second call changes nothing
        self.assertEqual((cores.in_hand, cores.asking), (0, 1))

    def test_abandoned_job_frees_its_place(self):
        cores, wire = worker(2)
        for link in cores.links:
            cores.link_up(link)
        a, b = cores.links
        cores.received(a, job_frame("j1"))
        job = cores.link_down(a)
        self.assertEqual(cores.free, 1)
        cores.abandon(job)
        cores.abandon(job)
        self.assertEqual((cores.in_hand, cores.free), (0, 2))

    def test_join_later_and_switch_type(self):
        cores, wire = worker(1, job_type=None)
        link = cores.links[0]
        cores.link_up(link)
        self.assertEqual(wire.sent, [])
        cores.join("a")
        self.assertEqual(wire.sent[-1][1], {"action": "join", "type": "a"})
        cores.join("b")
        self.assertEqual(wire.sent[-1][1], {"action": "join", "type": "b"})
        with self.assertRaises(ValueError):
            cores.join("")


class SumStatsTests(unittest.TestCase):
    def test_adds_up_daemons(self):
        one = {"masters": 1, "slaves": 2, "uptime": 10, "version": "1",
               "totals": {"submitted": 5}, "types": {"t": {"queued": 1, "running": 2}}}
        two = {"masters": 3, "slaves": 0, "uptime": 5, "version": "1",
               "totals": {"submitted": 7}, "types": {"t": {"queued": 4, "running": 0},
                                                     "u": {"queued": 1, "running": 0}}}
        total = core.sum_stats({"a": one, "b": two})
        self.assertEqual(total["masters"], 4)
        self.assertEqual(total["totals"], {"submitted": 12})
        self.assertEqual(total["types"]["t"], {"queued": 5, "running": 2})
        self.assertEqual(total["types"]["u"]["queued"], 1)
        self.assertEqual(total["uptime"], 5)
        self.assertEqual(total["daemons"], {"a": one, "b": two})


if __name__ == "__main__":
    unittest.main()


class SeparationTests(unittest.TestCase):
    def test_the_clients_limits_are_the_daemons(self):
        from gloom import wire

        self.assertEqual((core.MAX_TIMEOUT, core.MAX_DELAY, core.MAX_RETRIES),
                         (wire.MAX_TIMEOUT, wire.MAX_DELAY, wire.MAX_RETRIES))

    def test_no_client_module_imports_a_daemon_module(self):
        import subprocess
        import sys

        daemon = ["gloom.wire", "gloom.rawjson", "gloom.protocol", "gloom.scheduler", "gloom.master",
                  "gloom.slave", "gloom.tap", "gloom.http", "gloom.transport", "gloom.tls"]
        for client in ("gloom.core", "gloom.client", "gloom.legacy", "gloom.aio", "gloom.txclient",
                       "gloom.bench", "gloom.cli"):
            code = (f"import sys, {client}; "
                    f"print(sorted(m for m in {daemon!r} if m in sys.modules))")
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            self.assertEqual(out.stdout.strip(), "[]", client)
