"""The sans-IO client core's detached, delayed and retried jobs, status
and dead letters, by plain unit tests: frames in, frames out, no sockets."""

from __future__ import annotations

import unittest
from datetime import datetime, timedelta, timezone

from gloom import core
from tests.test_core import master

DAEMONS = ["a:1", "b:1", "c:1"]


def ack(request, **fields):
    return dict({"ok": True, "id": request.id, "ref": request.ref}, **fields)


def unknown_job(request):
    return {"error": "unknown_job", "reason": "no such job", "id": request.id, "ref": request.ref}


def connected(daemons=DAEMONS, up=None, **kwargs):
    """A core whose daemons ``up`` (by default, all) are connected."""
    cores, wire = master(daemons, **kwargs)
    for daemon in daemons if up is None else up:
        cores.connected(daemon)
    return cores, wire


def id_first_on(daemon, daemons=DAEMONS, then=None):
    """A job id whose rendezvous order starts with ``daemon`` (and goes on
    with ``then``, if given)."""
    for n in range(10000):
        order = core.rendezvous(f"job{n}", daemons)
        if order[0] == daemon and (then is None or order[1] == then):
            return f"job{n}"
    raise AssertionError("no such id")


class JobOptionsTests(unittest.TestCase):
    def test_only_the_options_given_are_sent(self):
        self.assertEqual(core.job_options(), {})
        self.assertEqual(core.job_options(detach=False, backoff=False), {})
        self.assertEqual(core.job_options(detach=True, delay=1.5, retries=0, backoff=True),
                         {"detach": True, "delay": 1.5, "retries": 0, "backoff": True})
        self.assertEqual(core.job_options(at=1700000000), {"at": 1700000000})
        self.assertEqual(core.job_options(delay=0), {"delay": 0})
        self.assertEqual(core.job_options(delay=core.MAX_DELAY), {"delay": core.MAX_DELAY})
        self.assertEqual(core.job_options(retries=core.MAX_RETRIES), {"retries": 1000})

    def test_timedelta_and_datetime(self):
        self.assertEqual(core.job_options(delay=timedelta(minutes=2)), {"delay": 120.0})
        when = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
        self.assertEqual(core.job_options(at=when), {"at": when.timestamp()})

    def test_mistakes_are_value_errors_that_name_the_option(self):
        cases = [
            (dict(delay=1, at=2), "give delay or at, not both"),
            (dict(delay=-1), "delay must be a number of seconds from 0 to 31536000 (365 days), not -1"),
            (dict(delay=31536001), "delay must be"),
            (dict(delay=float("nan")), "not nan"),
            (dict(delay="5"), "not '5'"),
            (dict(delay=True), "delay must be"),
            (dict(at=float("inf")), "at must be a time"),
            (dict(at="tomorrow"), "at must be a time"),
            (dict(at=-1), "at must be a time (seconds since the epoch, or a datetime), not -1"),
            (dict(retries=-1), "retries must be a whole number from 0 to 1000, not -1"),
            (dict(retries=1001), "not 1001"),
            (dict(retries=2.0), "not 2"),
            (dict(retries=True), "not True"),
        ]
        for options, message in cases:
            with self.assertRaises(ValueError, msg=options) as caught:
                core.job_options(**options)
            self.assertIn(message, str(caught.exception))

    def test_spelled_for_the_command_line(self):
        with self.assertRaises(ValueError) as caught:
            core.job_options(delay=1, at=2, spell=lambda name: "--" + name)
        self.assertEqual(str(caught.exception), "give --delay or --at, not both")


class SubmitTests(unittest.TestCase):
    def test_options_go_in_the_submit_frame(self):
        cores, wire = connected(["a:1"], ["a:1"])
        request = cores.submit("t", 1, id="j", delay=5, retries=2, backoff=True)
        self.assertEqual(wire.to("a:1"), [{"action": "submit", "id": "j", "type": "t", "body": 1, "delay": 5,
                                           "retries": 2, "backoff": True, "ref": request.ref}])
        self.assertFalse(request.detached)
        plain = cores.submit("t", 2, id="k", detach=False, backoff=False)
        self.assertEqual(wire.to("a:1")[-1], {"action": "submit", "id": "k", "type": "t", "body": 2,
                                              "ref": plain.ref})

    def test_a_bad_option_raises_before_anything_is_sent(self):
        cores, wire = connected(["a:1"], ["a:1"])
        with self.assertRaises(ValueError):
            cores.submit("t", 1, delay=1, at=2)
        with self.assertRaises(ValueError):
            cores.submit("t", 1, retries=-1)
        self.assertEqual((wire.sent, cores.in_flight), ([], 0))

    def test_an_attached_delayed_job_ends_with_its_answer(self):
        cores, wire = connected(["a:1"], ["a:1"])
        request = cores.submit("t", 1, id="j", at=1)
        cores.received("a:1", ack(request))
        self.assertTrue(request.acked)
        self.assertFalse(request.done)
        cores.received("a:1", {"id": "j", "body": 2})
        self.assertEqual(request.result(), 2)

    def test_a_detached_submit_ends_at_its_ack_with_the_id(self):
        cores, wire = connected(["a:1"], ["a:1"])
        request = cores.submit("t", 1, id="d", detach=True)
        self.assertTrue(request.detached)
        self.assertIs(wire.to("a:1")[0]["detach"], True)
        self.assertEqual(cores.in_flight, 1)
        with self.assertRaises(ValueError):
            cores.submit("t", 1, id="d", detach=True)  # its submit is in flight
        cores.received("a:1", ack(request))
        self.assertTrue(request.done)
        self.assertEqual(request.result(), "d")
        self.assertEqual(wire.ended, [request])
        self.assertEqual(cores.in_flight, 0)
        self.assertEqual(cores.daemons["a:1"].jobs, {})
        # The id is free here: an attached job may use it (the daemon keeps
        # detached ids apart from each master's own).
        attached = cores.submit("t", 2, id="d")
        cores.received("a:1", ack(attached))
        cores.received("a:1", {"id": "d", "body": "answer"})
        self.assertEqual(attached.result(), "answer")

    def test_a_journal_error_refuses_the_submit(self):
        cores, wire = connected(["a:1"], ["a:1"])
        request = cores.submit("t", 1, id="d", detach=True)
        cores.received("a:1", {"error": "journal_error", "reason": "disk full", "id": "d", "ref": request.ref})
        with self.assertRaises(core.ServerError) as caught:
            request.result()
        self.assertEqual((caught.exception.error, caught.exception.id, caught.exception.daemon),
                         ("journal_error", "d", "a:1"))
        self.assertEqual(cores.in_flight, 0)
        cores.submit("t", 1, id="d", detach=True)  # free again

    def test_a_detached_ack_after_replies_to_later_requests(self):
        """With a journal, a detached job is acked once it is on disk:
        after the replies to requests sent after it."""
        cores, wire = connected(["a:1"], ["a:1"])
        detached = cores.submit("t", 1, id="d", detach=True)
        attached = cores.submit("t", 2, id="e")
        stats = cores.stats()
        status = cores.status("d")
        cores.received("a:1", ack(attached))
        cores.received("a:1", {"ok": True, "stats": {"masters": 1}, "ref": stats.ref})
        cores.received("a:1", {"ok": True, "id": "d", "state": "queued", "ref": status.ref})
        self.assertFalse(detached.done)
        cores.received("a:1", ack(detached))
        self.assertEqual(detached.result(), "d")
        self.assertEqual(status.result(), {"id": "d", "state": "queued"})
        self.assertEqual(stats.result(), {"masters": 1})
        self.assertFalse(attached.done)

    def test_a_detached_submit_goes_by_rendezvous(self):
        cores, wire = connected(DAEMONS, ["a:1", "c:1"])
        for n in range(30):
            request = cores.submit("t", n, id=f"d{n}", detach=True)
            expected = next(d for d in core.rendezvous(f"d{n}", DAEMONS) if d != "b:1")
            self.assertEqual(request.daemon, expected)

    def test_a_detached_submit_waits_for_a_connection(self):
        cores, wire = master(["a:1"])
        request = cores.submit("t", 1, id="d", detach=True)
        self.assertEqual(wire.sent, [])
        cores.connected("a:1")
        cores.received("a:1", ack(request))
        self.assertEqual(request.result(), "d")

    def test_a_lost_unacked_detached_submit_is_never_resubmitted(self):
        """The daemon may have taken it (and keeps it, connection or not):
        sending it elsewhere could run it twice."""
        cores, wire = connected(["a:1", "b:1"], resubmit=True)
        detached = cores.submit("t", 1, id=id_first_on("a:1", ["a:1", "b:1"]), detach=True)
        attached = cores.submit("t", 2, id=id_first_on("a:1", ["a:1", "b:1"]) + "x")
        attached_daemon = attached.daemon
        cores.lost("a:1", "the connection to a:1 was lost")
        self.assertIsInstance(detached.error, core.TransportError)
        self.assertIn("may or may not have taken detached job", str(detached.error))
        self.assertEqual((detached.error.daemon, detached.error.id), ("a:1", detached.id))
        self.assertEqual(detached.tried, ["a:1"])
        if attached_daemon == "a:1":
            self.assertFalse(attached.done)
            self.assertEqual(attached.daemon, "b:1")

    def test_an_acked_detached_job_is_not_touched_by_a_loss(self):
        cores, wire = connected(["a:1"], ["a:1"])
        request = cores.submit("t", 1, id="d", detach=True)
        cores.received("a:1", ack(request))
        cores.lost("a:1", "lost")
        self.assertEqual(request.result(), "d")
        self.assertEqual(wire.ended, [request])

    def test_cancelling_an_unacked_detached_submit(self):
        cores, wire = connected(["a:1"], ["a:1"])
        request = cores.submit("t", 1, id="d", detach=True)
        cancel = cores.cancel("d")
        self.assertEqual(wire.to("a:1")[-1], {"action": "cancel", "id": "d", "ref": cancel.ref})
        cores.received("a:1", ack(request))
        cores.received("a:1", ack(cancel))
        self.assertEqual((request.result(), cancel.result()), ("d", None))
        # Not yet sent: withdrawn here, nothing goes out.
        cores, wire = master(["a:1"])
        request = cores.submit("t", 1, id="d", detach=True)
        cancel = cores.cancel("d")
        self.assertIsInstance(request.error, core.Cancelled)
        cores.connected("a:1")
        self.assertEqual(wire.sent, [])


class StatusTests(unittest.TestCase):
    def test_one_daemon(self):
        cores, wire = connected(["a:1"], ["a:1"])
        request = cores.status("d")
        self.assertEqual(wire.to("a:1"), [{"action": "status", "id": "d", "ref": request.ref}])
        reply = {"ok": True, "id": "d", "state": "completed", "detached": True, "type": "t", "priority": 0,
                 "attempts": 1, "result": {"big": 2**70}, "ended_at": 1700000000.5, "ref": request.ref}
        cores.received("a:1", reply)
        expected = dict(reply)
        del expected["ok"], expected["ref"]
        self.assertEqual(request.result(), expected)
        self.assertNotIn("daemon", request.result())

    def test_unknown_with_one_daemon(self):
        cores, wire = connected(["a:1"], ["a:1"])
        request = cores.status("d")
        cores.received("a:1", {"ok": True, "id": "d", "state": "unknown", "ref": request.ref})
        self.assertEqual(request.result(), {"id": "d", "state": "unknown"})

    def test_waits_for_a_connection(self):
        cores, wire = master(["a:1"])
        request = cores.status("d")
        self.assertEqual(wire.sent, [])
        cores.connected("a:1")
        self.assertEqual(wire.to("a:1")[0]["action"], "status")
        cores.unreachable("no")
        self.assertFalse(request.done)  # sent: no longer waiting for a connection
        cores, wire = master(["a:1"])
        request = cores.status("d")
        cores.unreachable("cannot connect to a:1")
        self.assertIsInstance(request.error, core.TransportError)

    def test_a_bad_id_raises(self):
        cores, wire = connected(["a:1"], ["a:1"])
        for bad in ("", None, 5):
            with self.assertRaises(ValueError):
                cores.status(bad)
        self.assertEqual(wire.sent, [])

    def test_asks_in_rendezvous_order_until_a_daemon_knows(self):
        job_id = id_first_on("a:1", then="b:1")
        cores, wire = connected()
        request = cores.status(job_id)
        self.assertEqual([d for d, m in wire.sent], ["a:1"])
        cores.received("a:1", {"ok": True, "id": job_id, "state": "unknown", "ref": request.ref})
        self.assertFalse(request.done)
        self.assertEqual([d for d, m in wire.sent], ["a:1", "b:1"])
        self.assertEqual(wire.to("b:1"), [{"action": "status", "id": job_id, "ref": request.ref}])
        cores.received("b:1", {"ok": True, "id": job_id, "state": "dead", "reason": "x", "ref": request.ref})
        self.assertEqual(request.result(), {"id": job_id, "state": "dead", "reason": "x", "daemon": "b:1"})
        self.assertEqual(request.tried, ["a:1", "b:1"])
        self.assertEqual(wire.to("c:1"), [])

    def test_skips_daemons_that_are_down_and_says_unknown_if_none_knows(self):
        job_id = id_first_on("a:1", then="b:1")
        cores, wire = connected(up=["a:1", "c:1"])
        request = cores.status(job_id)
        for daemon in ("a:1", "c:1"):
            self.assertEqual([d for d, m in wire.sent][-1], daemon)
            cores.received(daemon, {"ok": True, "id": job_id, "state": "unknown", "ref": request.ref})
        self.assertEqual(request.result(), {"id": job_id, "state": "unknown"})
        self.assertEqual(wire.to("b:1"), [])

    def test_our_own_job_in_flight_is_asked_of_its_daemon_first(self):
        job_id = id_first_on("a:1", then="b:1")
        cores, wire = connected(up=["b:1", "c:1"])
        job = cores.submit("t", 1, id=job_id)  # a:1 was down: it went to b:1
        self.assertEqual(job.daemon, "b:1")
        cores.connected("a:1")
        request = cores.status(job_id)
        self.assertEqual(request.daemon, "b:1")
        cores.received("b:1", {"ok": True, "id": job_id, "state": "queued", "ref": request.ref})
        self.assertEqual(request.result()["state"], "queued")

    def test_a_daemon_lost_while_asked_passes_the_question_on(self):
        job_id = id_first_on("a:1", then="b:1")
        cores, wire = connected()
        request = cores.status(job_id)
        cores.lost("a:1", "the connection to a:1 was lost")
        self.assertEqual(request.daemon, "b:1")
        cores.received("b:1", {"ok": True, "id": job_id, "state": "unknown", "ref": request.ref})
        cores.lost("c:1", "the connection to c:1 was lost")
        self.assertIsInstance(request.error, core.TransportError)
        self.assertEqual(request.error.daemon, "c:1")

    def test_an_error_ends_it(self):
        cores, wire = connected()
        request = cores.status("d")
        cores.received(request.daemon, {"error": "unknown_action", "reason": "old daemon", "ref": request.ref})
        self.assertEqual(request.error.error, "unknown_action")

    def test_a_reply_without_a_state_is_a_protocol_error(self):
        cores, wire = connected(["a:1"], ["a:1"])
        request = cores.status("d")
        cores.received("a:1", {"ok": True, "id": "d", "ref": request.ref})
        self.assertIsInstance(request.error, core.ProtocolError)


class ByIdTests(unittest.TestCase):
    """cancel (of a job that is not ours), dead_retry and dead_discard ask
    the daemons in turn until one does not answer unknown_job."""

    def each(self):
        return (("cancel", lambda cores, job_id: cores.cancel(job_id)),
                ("dead_retry", lambda cores, job_id: cores.dead_retry(job_id)),
                ("dead_discard", lambda cores, job_id: cores.dead_discard(job_id)))

    def test_the_frames(self):
        for action, ask in self.each():
            cores, wire = connected(["a:1"], ["a:1"])
            request = ask(cores, "d")
            self.assertEqual(wire.to("a:1"), [{"action": action, "id": "d", "ref": request.ref}])
            cores.received("a:1", ack(request))
            self.assertIsNone(request.result())

    def test_asks_on_past_unknown_job(self):
        job_id = id_first_on("c:1", then="a:1")
        for action, ask in self.each():
            cores, wire = connected()
            request = ask(cores, job_id)
            self.assertEqual(request.daemon, "c:1")
            cores.received("c:1", unknown_job(request))
            self.assertEqual(request.daemon, "a:1")
            cores.received("a:1", ack(request))
            self.assertIsNone(request.result(), action)
            self.assertEqual(request.tried, ["c:1", "a:1"])

    def test_unknown_job_if_no_daemon_has_it(self):
        for action, ask in self.each():
            cores, wire = connected(up=["a:1", "b:1"])
            request = ask(cores, "nope")
            while not request.done:
                cores.received(request.daemon, unknown_job(request))
            self.assertEqual(request.error.error, "unknown_job", action)
            self.assertEqual(request.error.id, "nope")
            self.assertEqual(sorted(request.tried), ["a:1", "b:1"])

    def test_another_error_ends_it_at_once(self):
        job_id = id_first_on("a:1")
        cores, wire = connected()
        request = cores.dead_retry(job_id)
        cores.received("a:1", {"error": "shutdown", "reason": "stopping", "id": job_id, "ref": request.ref})
        self.assertEqual(request.error.error, "shutdown")
        self.assertEqual(request.tried, ["a:1"])

    def test_a_bad_id_raises(self):
        cores, wire = connected()
        with self.assertRaises(ValueError):
            cores.dead_retry("")
        with self.assertRaises(ValueError):
            cores.dead_discard(None)

    def test_cancel_of_our_own_job_does_not_ask_further(self):
        """unknown_job for our job means it ended first: its answer crossed."""
        cores, wire = connected()
        job = cores.submit("t", 1, id="j")
        cores.received(job.daemon, ack(job))
        cancel = cores.cancel("j")
        cores.received(job.daemon, {"id": "j", "body": 1})
        cores.received(job.daemon, unknown_job(cancel))
        self.assertEqual(cancel.error.error, "unknown_job")
        self.assertEqual(cancel.tried, [job.daemon])
        self.assertEqual(job.result(), 1)


def dead(job_id, ended_at, **fields):
    return dict({"id": job_id, "type": "t", "priority": 0, "attempts": 4, "reason": "boom",
                 "ended_at": ended_at}, **fields)


class DeadListTests(unittest.TestCase):
    def test_one_daemon(self):
        cores, wire = connected(["a:1"], ["a:1"])
        request = cores.dead_list()
        self.assertEqual(wire.to("a:1"), [{"action": "dead_list", "offset": 0, "limit": 100,
                                           "ref": request.ref}])
        entries = [dead("x", 1.0), dead("y", 2.0)]
        cores.received("a:1", {"ok": True, "total": 7, "offset": 0, "dead": entries, "ref": request.ref})
        result = request.result()
        self.assertIsInstance(result, core.DeadList)
        self.assertEqual(list(result), entries)
        self.assertEqual((result.total, result.offset, result.unreachable), (7, 0, {}))

    def test_offset_and_limit_are_checked(self):
        cores, wire = connected(["a:1"], ["a:1"])
        for offset, limit in ((-1, 10), (0, 0), (0, 1001), (True, 10), (0, 2.5)):
            with self.assertRaises(ValueError):
                cores.dead_list(offset, limit)
        cores.dead_list(5, 1000)
        self.assertEqual(wire.to("a:1")[-1]["offset"], 5)

    def test_a_reply_that_cannot_be_read(self):
        cores, wire = connected(["a:1"], ["a:1"])
        request = cores.dead_list()
        cores.received("a:1", {"ok": True, "dead": "no", "ref": request.ref})
        self.assertIsInstance(request.error, core.ProtocolError)

    def answer(self, cores, wire, lists, start=0):
        """Answer every dead_list frame sent since ``start`` from ``lists``
        (each daemon's whole dead list), until none is left unanswered."""
        while start < len(wire.sent):
            daemon, message = wire.sent[start]
            start += 1
            if message["action"] != "dead_list" or daemon not in lists:
                continue
            entries = lists[daemon]
            page = entries[message["offset"]:message["offset"] + message["limit"]]
            cores.received(daemon, {"ok": True, "total": len(entries), "offset": message["offset"],
                                    "dead": page, "ref": message["ref"]})
        return start

    def test_several_daemons_merged_oldest_first(self):
        cores, wire = connected()
        lists = {"a:1": [dead("a1", 1.0), dead("a2", 4.0)],
                 "b:1": [dead("b1", 2.0), dead("b2", 4.0), dead("b3", 6.0)],
                 "c:1": []}
        request = cores.dead_list()
        self.assertEqual(sorted(d for d, m in wire.sent), DAEMONS)
        self.assertEqual({m["limit"] for d, m in wire.sent}, {100})
        self.answer(cores, wire, lists)
        result = request.result()
        self.assertEqual([(e["id"], e["daemon"]) for e in result],
                         [("a1", "a:1"), ("b1", "b:1"), ("a2", "a:1"), ("b2", "b:1"), ("b3", "b:1")])
        self.assertEqual((result.total, result.offset), (5, 0))

        request = cores.dead_list(offset=1, limit=2)
        start = len(wire.sent)
        self.assertEqual({m["limit"] for d, m in wire.sent[start - 3:]}, {3})  # offset + limit of each
        self.answer(cores, wire, lists, start - 3)
        self.assertEqual([e["id"] for e in request.result()], ["b1", "a2"])
        self.assertEqual((request.result().total, request.result().offset), (5, 1))

    def test_pages_beyond_what_one_request_may_ask(self):
        cores, wire = connected(["a:1", "b:1"])
        lists = {"a:1": [dead(f"a{n}", float(2 * n)) for n in range(1500)],
                 "b:1": [dead(f"b{n}", float(2 * n + 1)) for n in range(1200)]}
        request = cores.dead_list(offset=2000, limit=300)
        self.answer(cores, wire, lists)
        asked = [(d, m["offset"], m["limit"]) for d, m in wire.sent]
        self.assertEqual(sorted(asked), [("a:1", 0, 1000), ("a:1", 1000, 500),
                                         ("b:1", 0, 1000), ("b:1", 1000, 200)])
        merged = sorted(lists["a:1"] + lists["b:1"], key=lambda e: e["ended_at"])
        self.assertEqual([e["id"] for e in request.result()], [e["id"] for e in merged[2000:2300]])
        self.assertEqual(request.result().total, 2700)

    def test_a_page_past_the_end(self):
        cores, wire = connected(["a:1", "b:1"])
        request = cores.dead_list(offset=10, limit=5)
        self.answer(cores, wire, {"a:1": [dead("a", 1.0)], "b:1": []})
        self.assertEqual((list(request.result()), request.result().total), ([], 1))

    def test_only_the_daemons_up_are_asked_and_a_lost_one_is_named(self):
        cores, wire = connected(up=["a:1", "b:1"])
        request = cores.dead_list()
        cores.lost("b:1", "the connection to b:1 was lost")
        self.assertFalse(request.done)
        self.answer(cores, wire, {"a:1": [dead("a", 1.0)]})
        self.assertEqual([e["id"] for e in request.result()], ["a"])
        self.assertEqual(request.result().unreachable, {"b:1": "the connection to b:1 was lost"})
        self.assertEqual(wire.to("c:1"), [])

    def test_every_daemon_lost(self):
        cores, wire = connected(["a:1", "b:1"])
        request = cores.dead_list()
        cores.lost("a:1", "a went")
        cores.lost("b:1", "b went")
        self.assertIsInstance(request.error, core.TransportError)
        self.assertIn("a went", str(request.error))

    def test_a_refusal_ends_it(self):
        cores, wire = connected(["a:1", "b:1"])
        request = cores.dead_list()
        daemon, message = wire.sent[0]
        cores.received(daemon, {"error": "invalid_message", "reason": "no", "ref": message["ref"]})
        self.assertEqual(request.error.error, "invalid_message")
        self.answer(cores, wire, {"a:1": [], "b:1": []}, 1)  # the other reply is ignored
        self.assertEqual(wire.ended, [request])

    def test_waits_for_a_connection_then_asks_the_daemons_up(self):
        cores, wire = master(["a:1", "b:1"])
        request = cores.dead_list()
        self.assertEqual(wire.sent, [])
        cores.connected("b:1")
        self.answer(cores, wire, {"b:1": [dead("b", 1.0)]})
        self.assertEqual([e["daemon"] for e in request.result()], ["b:1"])


class SumStatsTests(unittest.TestCase):
    def test_delayed_and_detached_figures_add_up(self):
        def figures(delayed, live, dead):
            return {"types": {"t": {"queued": 1, "delayed": delayed}}, "totals": {"dead": dead},
                    "masters": 1, "slaves": 0, "uptime": 5, "version": "x", "delayed": delayed,
                    "detached": {"live": live, "results": 0, "results_bytes": 0, "dead": dead},
                    "journal": None}

        total = core.sum_stats({"a:1": figures(2, 3, 1), "b:1": figures(5, 0, 4)})
        self.assertEqual(total["delayed"], 7)
        self.assertEqual(total["detached"], {"live": 3, "results": 0, "results_bytes": 0, "dead": 5})
        self.assertEqual(total["types"]["t"], {"queued": 2, "delayed": 7})
        self.assertEqual(total["totals"]["dead"], 5)
        self.assertNotIn("journal", total)
        self.assertIsNone(total["daemons"]["a:1"]["journal"])
        self.assertNotIn("detached", core.sum_stats({"a:1": {"types": {}, "totals": {}}}))
