"""Progress, touch, unique jobs and the admin actions in the sans-IO core:
frames in, frames out."""

from __future__ import annotations

import unittest

from gloom import core
from tests.test_core import confirm, job_frame, master, worker


def running(concurrency=1, daemons=("a:1",)):
    """A worker core holding one job ("j1") on its first link."""
    cores, wire = worker(concurrency, daemons)
    for link in cores.links:
        cores.link_up(link)
    confirm(cores)
    link = cores.links[0]
    cores.received(link, job_frame("j1"))
    (started,) = wire.started
    assert started[0] is link
    wire.sent.clear()
    return cores, wire, link, started[1]


class JobTests(unittest.TestCase):
    def test_a_job_nobody_holds_has_no_progress(self):
        answer = core.Job(id="x", body=1)
        self.assertFalse(answer.cancelled)
        with self.assertRaises(RuntimeError) as caught:
            answer.progress(1, 2)
        self.assertIn("not held by a worker", str(caught.exception))
        with self.assertRaises(RuntimeError):
            answer.touch()

    def test_bind_routes_the_calls_and_returns_what_they_return(self):
        job = core.Job(id="x")
        calls = []
        job.bind(lambda done, total, data: calls.append(("progress", done, total, data)) or "sent",
                 lambda: calls.append(("touch",)) or "touched")
        self.assertEqual(job.progress(3, data={"step": "b"}), "sent")
        self.assertEqual(job.touch(), "touched")
        self.assertEqual(calls, [("progress", 3, None, {"step": "b"}), ("touch",)])
        self.assertEqual(job, {"id": "x"})  # still just the job's fields

    def test_progress_fields_are_checked(self):
        self.assertEqual(core.progress_fields(1, 10), {"done": 1, "total": 10})
        self.assertEqual(core.progress_fields(data=[1]), {"data": [1]})
        self.assertEqual(core.progress_fields(0.5, data="x"), {"done": 0.5, "data": "x"})
        for bad in (dict(), dict(done=-1), dict(total=True), dict(done=float("nan")),
                    dict(total=float("inf")), dict(done="3")):
            with self.assertRaises(ValueError, msg=bad):
                core.progress_fields(**bad)
        with self.assertRaises(core.EncodeError) as caught:
            core.progress_fields(1, data={1, 2})
        self.assertIn("the progress data cannot be sent as JSON", str(caught.exception))
        self.assertNotIn("body", str(caught.exception))

    def test_unique_keys_are_checked(self):
        self.assertEqual(core.unique_key("k"), "k")
        self.assertEqual(core.unique_key("é" * 512), "é" * 512)  # 1024 bytes
        for bad in ("", None, 3, "é" * 513, "\ud800"):
            with self.assertRaises(ValueError, msg=repr(bad)):
                core.unique_key(bad)
        with self.assertRaises(ValueError) as caught:
            core.unique_key("", spell=lambda name: "--" + name)
        self.assertIn("--unique", str(caught.exception))


class WorkerProgressTests(unittest.TestCase):
    def test_a_held_job_sends_progress_and_touch_on_its_connection(self):
        cores, wire, link, job = running()
        self.assertIs(job.progress(1, 10), True)
        self.assertIs(job.progress(data={"file": "a.png"}), True)
        self.assertIs(job.touch(), True)
        self.assertEqual([m for l, m in wire.sent], [
            {"action": "progress", "id": "j1", "done": 1, "total": 10},
            {"action": "progress", "id": "j1", "data": {"file": "a.png"}},
            {"action": "touch", "id": "j1"},
        ])
        self.assertTrue(all(l is link for l, m in wire.sent))
        wire.replies.clear()
        confirm(cores)
        self.assertEqual(wire.replies, [("progress", None), ("progress", None), ("touch", None)])
        self.assertEqual(wire.reports, [])
        self.assertFalse(job.cancelled)
        self.assertEqual(cores.in_hand, 1)  # progress changes nothing of the place

    def test_the_core_methods_name_link_and_job(self):
        cores, wire, link, job = running()
        self.assertTrue(cores.progress(link, job, total=5))
        self.assertTrue(cores.touch(link, job))
        self.assertEqual([m["action"] for l, m in wire.sent], ["progress", "touch"])
        other = core.Job(id="j1")  # the same fields, but not the job held
        self.assertFalse(cores.progress(link, other, 1))
        self.assertFalse(cores.touch(cores.links[0], other))
        self.assertEqual(len(wire.sent), 2)

    def test_bad_progress_raises_before_anything_is_sent(self):
        cores, wire, link, job = running()
        with self.assertRaises(ValueError):
            job.progress()
        with self.assertRaises(ValueError):
            job.progress(-1)
        with self.assertRaises(core.EncodeError):
            job.progress(data=float("nan"))
        self.assertEqual(wire.sent, [])
        self.assertEqual(link.replies, [])

    def test_nothing_is_sent_once_the_job_is_answered_or_its_connection_lost(self):
        cores, wire, link, job = running()
        cores.finished(link, job, "done")
        sent = len(wire.sent)
        self.assertIs(job.progress(1), False)
        self.assertIs(job.touch(), False)
        self.assertEqual(len(wire.sent), sent)

        cores, wire, link, job = running()
        cores.link_down(link)
        self.assertIs(job.progress(1), False)
        self.assertIs(job.touch(), False)
        self.assertEqual(wire.sent, [])

    def test_cancelled_reply_marks_the_job_and_is_reported_once(self):
        cores, wire, link, job = running()
        job.progress(1, 3)
        job.progress(2, 3)
        job.touch()
        cancelled = {"error": "cancelled", "reason": "every master withdrew the job", "id": "j1"}
        cores.received(link, cancelled)
        self.assertTrue(job.cancelled)
        cores.received(link, cancelled)
        cores.received(link, cancelled)
        self.assertEqual(wire.replies[-3:], [("progress", "cancelled")] * 2 + [("touch", "cancelled")])
        self.assertEqual(len(wire.reports), 1)
        text, fatal = wire.reports[0]
        self.assertFalse(fatal)
        self.assertIn("'j1' was cancelled", text)
        # The job is still held, and answered as usual.
        self.assertEqual(cores.in_hand, 1)
        cores.finished(link, job, None, "stopped: cancelled")
        self.assertEqual(wire.sent[-1][1]["action"], "fail")
        cores.received(link, {"ok": True})
        self.assertEqual(wire.replies[-1], ("respond", None))
        self.assertEqual(cores.in_hand, 0)

    def test_replies_stay_matched_in_order_with_the_answer(self):
        cores, wire, link, job = running()
        job.progress(1)
        cores.finished(link, job, "done")  # the answer goes before the progress is confirmed
        self.assertEqual(link.replies, ["progress", "respond"])
        cores.received(link, {"error": "cancelled", "reason": "", "id": "j1"})
        self.assertTrue(job.cancelled)  # the reply concerned that job, though no longer held
        cores.received(link, {"ok": True})
        self.assertEqual(wire.replies[-2:], [("progress", "cancelled"), ("respond", None)])
        self.assertEqual(link.replies, [])

    def test_on_dropped_is_called_once_by_cancelled_or_timed_out(self):
        cores, wire, link, job = running()
        seen = []
        job.on_dropped(seen.append)
        job.on_dropped(lambda code: seen.append(("second", code)))
        job.progress(1)
        job.touch()
        job.touch()
        self.assertIsNone(job.dropped)
        cores.received(link, {"ok": True})
        self.assertEqual(seen, [])
        cores.received(link, {"error": "timed_out", "reason": "too late", "id": "j1"})
        self.assertEqual(seen, ["timed_out", ("second", "timed_out")])
        self.assertEqual((job.timed_out, job.cancelled, job.dropped), (True, False, "timed_out"))
        cores.received(link, {"error": "cancelled", "reason": "", "id": "j1"})
        self.assertTrue(job.cancelled)
        self.assertEqual(len(seen), 2)  # at most once
        job.on_dropped(seen.append)  # after the news: at once
        self.assertEqual(seen[-1], "timed_out")

    def test_an_on_dropped_that_raises_is_reported(self):
        cores, wire, link, job = running()
        seen = []
        job.on_dropped(lambda code: 1 / 0)
        job.on_dropped(seen.append)
        job.touch()
        cores.received(link, {"error": "cancelled", "reason": "", "id": "j1"})
        self.assertEqual(seen, ["cancelled"])
        self.assertTrue(any("on_dropped of job 'j1' raised ZeroDivisionError" in text
                            for text, fatal in wire.reports))
        self.assertEqual(cores.in_hand, 1)  # the job is still held

    def test_timed_out_and_other_refusals_are_reported_not_fatal(self):
        cores, wire, link, job = running()
        job.progress(1)
        job.touch()
        late = {"error": "timed_out", "reason": "the attempt ran past its timeout", "id": "j1"}
        cores.received(link, late)
        cores.received(link, late)
        self.assertFalse(job.cancelled)
        self.assertEqual(len(wire.reports), 1)
        self.assertIn("ran past its timeout", wire.reports[0][0])
        self.assertFalse(wire.reports[0][1])
        job.touch()
        cores.received(link, {"error": "wrong_job", "reason": "this slave holds another job"})
        self.assertIn("refused the touch of job 'j1': wrong_job", wire.reports[-1][0])
        self.assertFalse(wire.reports[-1][1])

    def test_a_job_on_another_link_is_bound_to_that_link(self):
        cores, wire = worker(2, ["a:1", "b:1"])
        for link in cores.links:
            cores.link_up(link)
        confirm(cores)
        asking = [link for link in cores.links if link.wants]
        self.assertEqual(len(asking), 2)
        for number, link in enumerate(asking):
            cores.received(link, job_frame(f"j{number}"))
        wire.sent.clear()
        for (link, job) in wire.started:
            job.progress(data=job.id)
        self.assertEqual([(l, m["id"], m["data"]) for l, m in wire.sent],
                         [(link, job.id, job.id) for link, job in wire.started])


class MasterProgressTests(unittest.TestCase):
    def setUp(self):
        self.seen = []
        self.cores, self.wire = master(progressed=lambda request, progress: self.seen.append(
            (request.id, progress, request.done)))
        self.cores.connected("a:1")

    def test_progress_frames_reach_the_submit_in_order_before_its_answer(self):
        cores = self.cores
        request = cores.submit("t", 1, id="j")
        self.assertIsNone(request.progress)
        cores.received("a:1", {"ok": True, "id": "j", "ref": 1})
        cores.received("a:1", {"id": "j", "progress": {"done": 1, "total": 3}})
        cores.received("a:1", {"id": "j", "progress": {"done": 2, "total": 3, "data": "b"}})
        self.assertEqual(request.progress, {"done": 2, "total": 3, "data": "b"})
        cores.received("a:1", {"id": "j", "body": "answer"})
        self.assertEqual(self.seen, [("j", {"done": 1, "total": 3}, False),
                                     ("j", {"done": 2, "total": 3, "data": "b"}, False)])
        self.assertEqual(request.result(), "answer")
        self.assertEqual(self.wire.ended, [request])

    def test_progress_for_a_job_not_in_flight_is_dropped(self):
        cores = self.cores
        request = cores.submit("t", 1, id="j")
        cores.received("a:1", {"ok": True, "id": "j", "ref": 1})
        cores.cancel("j")
        cores.received("a:1", {"ok": True, "id": "j", "ref": 2})
        self.assertTrue(request.done)
        cores.received("a:1", {"id": "j", "progress": {"done": 1}})  # crossed the cancel
        cores.received("a:1", {"id": "elsewhere", "progress": {"done": 1}})
        cores.received("a:1", {"id": None, "progress": {"done": 1}})
        self.assertEqual(self.seen, [])

    def test_a_progress_that_is_not_an_object_is_a_protocol_error(self):
        self.cores.submit("t", 1, id="j")
        with self.assertRaises(core.ProtocolError):
            self.cores.received("a:1", {"id": "j", "progress": [1, 2]})

    def test_a_status_reply_with_progress_is_a_status(self):
        cores = self.cores
        request = cores.submit("t", 1, id="j")
        cores.received("a:1", {"ok": True, "id": "j", "ref": 1})
        asked = cores.status("j")
        cores.received("a:1", {"ok": True, "ref": 2, "id": "j", "state": "running",
                               "progress": {"done": 4}, "unique": "k"})
        self.assertEqual(asked.result(), {"id": "j", "state": "running", "progress": {"done": 4},
                                          "unique": "k"})
        self.assertEqual(self.seen, [])
        self.assertIsNone(request.progress)

    def test_progress_goes_to_the_right_daemons_job(self):
        seen = []
        cores, wire = master(["a:1", "b:1"], progressed=lambda request, progress: seen.append(
            (request.daemon, request.id)))
        cores.connected("a:1")
        cores.connected("b:1")
        ids = [f"j{n}" for n in range(20)]
        requests = {job_id: cores.submit("t", None, id=job_id) for job_id in ids}
        for job_id, request in requests.items():
            other = "b:1" if request.daemon == "a:1" else "a:1"
            cores.received(other, {"id": job_id, "progress": {"done": 1}})  # not that daemon's job
            cores.received(request.daemon, {"id": job_id, "progress": {"done": 2}})
        self.assertEqual(seen, [(requests[job_id].daemon, job_id) for job_id in ids])
        self.assertTrue(all(request.progress == {"done": 2} for request in requests.values()))


class UniqueTests(unittest.TestCase):
    def test_unique_goes_in_the_submit_and_the_ack_says_coalesced(self):
        cores, wire = master()
        cores.connected("a:1")
        first = cores.submit("t", 1, id="one", unique="report-7")
        second = cores.submit("t", 2, id="two", unique="report-7", priority=5)
        sent = wire.to("a:1")
        self.assertEqual(sent[0], {"action": "submit", "id": "one", "type": "t", "body": 1,
                                   "unique": "report-7", "ref": 1})
        self.assertEqual(sent[1]["unique"], "report-7")
        cores.received("a:1", {"ok": True, "id": "one", "ref": 1})
        cores.received("a:1", {"ok": True, "id": "two", "coalesced": True, "ref": 2})
        self.assertFalse(first.coalesced)
        self.assertTrue(second.coalesced)
        self.assertTrue(second.acked and not second.done)
        cores.received("a:1", {"id": "one", "body": "r"})
        cores.received("a:1", {"id": "two", "body": "r"})
        self.assertEqual((first.result(), second.result()), ("r", "r"))

    def test_bad_unique_raises_before_anything_is_sent(self):
        cores, wire = master()
        cores.connected("a:1")
        for bad in ("", 7, "x" * 1025):
            with self.assertRaises(ValueError):
                cores.submit("t", unique=bad)
        with self.assertRaises(ValueError) as caught:
            cores.submit("t", unique="k", detach=True)
        self.assertIn("use the key as the id", str(caught.exception))
        self.assertEqual(wire.sent, [])
        self.assertEqual(cores.in_flight, 0)

    def test_submits_sharing_a_key_go_to_one_daemon_whatever_their_ids(self):
        daemons = ["a:1", "b:1", "c:1"]
        cores, wire = master(daemons)
        for daemon in daemons:
            cores.connected(daemon)
        for key in ("k1", "k2", "k3", "k4"):
            placed = {cores.submit("t", None, unique=key).daemon for _ in range(12)}
            self.assertEqual(placed, {core.rendezvous(key, daemons)[0]})
        spread = {cores.submit("t", None).daemon for _ in range(60)}
        self.assertEqual(spread, set(daemons))  # without a key, by id as before
        # the job's own daemon is asked first about it
        request = cores.submit("t", None, id="mine", unique="k9")
        cores.status("mine")
        self.assertEqual(wire.to(request.daemon)[-1], {"action": "status", "id": "mine",
                                                       "ref": wire.to(request.daemon)[-1]["ref"]})

    def test_a_coalesced_job_resubmitted_keeps_its_key(self):
        cores, wire = master(["a:1", "b:1"], resubmit=True)
        cores.connected("a:1")
        cores.connected("b:1")
        request = cores.submit("t", 1, id="j", unique="k")
        first = request.daemon
        other = "b:1" if first == "a:1" else "a:1"
        cores.lost(first, "gone")
        self.assertEqual(wire.to(other)[-1]["unique"], "k")


class UniqueRoutingTests(unittest.TestCase):
    """A unique submit waits until every daemon was tried, then goes by its key."""

    daemons = ["a:1", "b:1", "c:1"]

    def key_for(self, first):
        """A key whose rendezvous order starts with ``first``."""
        return next(key for key in (f"k{n}" for n in range(1000))
                    if core.rendezvous(key, self.daemons)[0] == first)

    def test_it_waits_for_the_keys_daemon_to_be_tried(self):
        cores, wire = master(self.daemons)
        cores.connected("a:1")
        key = self.key_for("b:1")
        unique = cores.submit("t", 1, id="u", unique=key)
        plain = cores.submit("t", 2, id="p")
        self.assertFalse(unique.sent)
        self.assertEqual(plain.daemon, "a:1")  # without a key: at once, to a daemon up
        cores.attempt_failed("c:1")
        self.assertFalse(unique.sent)
        self.assertFalse(cores.tried)
        cores.connected("b:1")  # the key's daemon: it goes there
        self.assertTrue(cores.tried)
        self.assertEqual(unique.daemon, "b:1")
        self.assertEqual(wire.to("b:1"), [{"action": "submit", "id": "u", "type": "t", "body": 1,
                                           "unique": key, "ref": 1}])

    def test_once_every_daemon_was_tried_it_goes_to_the_first_up_in_its_order(self):
        cores, wire = master(self.daemons)
        cores.connected("c:1")
        key = self.key_for("b:1")
        order = core.rendezvous(key, self.daemons)
        request = cores.submit("t", None, unique=key)
        cores.attempt_failed("a:1")
        self.assertFalse(request.sent)
        cores.attempt_failed("b:1")
        self.assertEqual(request.daemon, "c:1")  # the only one up
        self.assertEqual(order[0], "b:1")
        cores.attempt_failed("b:1")  # again: nothing changes
        self.assertEqual(len(wire.sent), 1)

    def test_none_up_it_waits_for_a_connection_or_fails_as_unreachable(self):
        cores, wire = master(self.daemons)
        request = cores.submit("t", None, unique="k")
        for daemon in self.daemons:
            cores.attempt_failed(daemon)
        self.assertFalse(request.sent)
        cores.unreachable("no daemon can be reached")
        self.assertIsInstance(request.error, core.TransportError)

    def test_a_restarting_shell_tries_again_the_daemons_not_up(self):
        cores, wire = master(self.daemons)
        cores.connected("a:1")
        cores.attempt_failed("b:1")
        cores.attempt_failed("c:1")
        self.assertTrue(cores.tried)
        cores.restarting()
        self.assertFalse(cores.tried)
        key = self.key_for("a:1")
        request = cores.submit("t", None, unique=key)
        self.assertFalse(request.sent)  # a:1 is up, but b:1 and c:1 are not known yet
        cores.attempt_failed("b:1")
        cores.attempt_failed("c:1")
        self.assertEqual(request.daemon, "a:1")

    def test_one_daemon_does_not_wait(self):
        cores, wire = master()
        cores.connected("a:1")
        self.assertEqual(cores.submit("t", None, unique="k").daemon, "a:1")

    def test_acked_is_called_with_the_request(self):
        acks = []
        cores, wire = master(acked=acks.append)
        cores.connected("a:1")
        first = cores.submit("t", 1, id="one", unique="k")
        second = cores.submit("t", 1, id="two", unique="k")
        cores.received("a:1", {"ok": True, "id": "one", "ref": 1})
        cores.received("a:1", {"ok": True, "id": "two", "coalesced": True, "ref": 2})
        self.assertEqual([(request, request.coalesced) for request in acks], [(first, False), (second, True)])


class AdminTests(unittest.TestCase):
    def test_each_action_and_its_reply(self):
        cores, wire = master()
        cores.connected("a:1")
        paused = cores.admin("pause", "resize")
        resumed = cores.admin("resume", "resize")
        cleared = cores.admin("clear", "resize")
        drained = cores.admin("drain")
        self.assertEqual(wire.to("a:1"), [
            {"action": "pause", "type": "resize", "ref": 1},
            {"action": "resume", "type": "resize", "ref": 2},
            {"action": "clear", "type": "resize", "ref": 3},
            {"action": "drain", "ref": 4},
        ])
        self.assertEqual([r.kind for r in (paused, resumed, cleared, drained)], ["admin"] * 4)
        cores.received("a:1", {"ok": True, "ref": 3, "cleared": 12})
        cores.received("a:1", {"ok": True, "ref": 1})
        cores.received("a:1", {"ok": True, "ref": 2})
        cores.received("a:1", {"ok": True, "ref": 4})
        self.assertEqual(cleared.result(), {"cleared": 12})
        self.assertEqual(paused.result(), {})
        self.assertEqual(resumed.result(), {})
        self.assertEqual(drained.result(), {})

    def test_a_cleared_job_ends_with_cleared(self):
        cores, wire = master()
        cores.connected("a:1")
        request = cores.submit("t", 1, id="j")
        cores.received("a:1", {"ok": True, "id": "j", "ref": 1})
        cores.received("a:1", {"error": "cleared", "reason": "cleared by an admin", "id": "j"})
        self.assertTrue(request.done)
        with self.assertRaises(core.ServerError) as caught:
            request.result()
        self.assertEqual((caught.exception.error, caught.exception.id), ("cleared", "j"))
        self.assertEqual(cores.in_flight, 0)

    def test_forbidden_is_a_server_error(self):
        cores, wire = master()
        cores.connected("a:1")
        request = cores.admin("pause", "t")
        cores.received("a:1", {"error": "forbidden", "reason": "admin actions are off", "ref": 1})
        with self.assertRaises(core.ServerError) as caught:
            request.result()
        self.assertEqual((caught.exception.error, caught.exception.daemon), ("forbidden", "a:1"))

    def test_bad_admin_requests_raise_at_once(self):
        cores, wire = master()
        cores.connected("a:1")
        for action, job_type in (("pause", None), ("clear", ""), ("drain", "t"), ("stop", "t"),
                                 ("resume", 3)):
            with self.assertRaises(ValueError, msg=(action, job_type)):
                cores.admin(action, job_type)
        self.assertEqual(wire.sent, [])

    def test_a_named_daemon_is_asked_or_refuses_at_once(self):
        cores, wire = master(["a:1", "b:1"])
        cores.connected("b:1")
        cores.admin("pause", "t", daemon="b:1")
        self.assertEqual(wire.to("b:1"), [{"action": "pause", "type": "t", "ref": 1}])
        down = cores.admin("pause", "t", daemon="a:1")
        self.assertTrue(down.done)
        self.assertIsInstance(down.error, core.TransportError)
        self.assertEqual(wire.to("a:1"), [])

    def test_waits_for_a_connection_and_fails_with_it(self):
        cores, wire = master()
        request = cores.admin("drain")
        self.assertEqual(wire.sent, [])
        cores.connected("a:1")
        self.assertEqual(wire.to("a:1"), [{"action": "drain", "ref": 1}])
        cores.lost("a:1", "connection refused")
        self.assertIsInstance(request.error, core.TransportError)
