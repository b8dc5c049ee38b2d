"""Both protocols over StringTransport: every rule of the wire protocol."""

import struct

from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from gloom.protocol import ABORT_AFTER_ERROR
from gloom.transport import TransportWriter
from tests.support import Daemon, frame, live_ids, unframe


class RoundTripTests(SynchronousTestCase):
    def setUp(self):
        self.daemon = Daemon()
        self.master = self.daemon.master()

    def test_job_through_one_slave(self):
        slave = self.daemon.slave("echo")
        self.assertEqual(self.master.send({"action": "submit", "id": "1", "type": "echo", "body": {"n": 1}}),
                         [{"ok": True, "id": "1"}])
        self.assertEqual(slave.received(), [{"action": "job", "id": "1", "type": "echo", "body": {"n": 1}}])
        self.assertEqual(slave.send({"action": "respond", "body": [2, None]}), [{"ok": True}])
        self.assertEqual(self.master.received(), [{"id": "1", "body": [2, None]}])

    def test_job_waits_for_a_slave(self):
        self.master.send({"action": "submit", "id": "1", "type": "echo", "body": None})
        slave = self.daemon.slave()
        self.assertEqual(slave.send({"action": "join", "type": "echo"}),
                         [{"ok": True}, {"action": "job", "id": "1", "type": "echo", "body": None}])

    def test_slave_holds_one_job_at_a_time(self):
        for i in range(3):
            self.master.send({"action": "submit", "id": str(i), "type": "t", "body": i})
        slave = self.daemon.slave()
        self.assertEqual([m.get("id") for m in slave.send({"action": "join", "type": "t"})], [None, "0"])
        self.assertEqual([m.get("id") for m in slave.send({"action": "respond", "body": 0})], [None, "1"])
        self.assertEqual(self.daemon.scheduler.queued("t"), 1)

    def test_priority_order(self):
        self.master.send(
            {"action": "submit", "id": "low", "type": "t", "body": None, "priority": -1},
            {"action": "submit", "id": "mid", "type": "t", "body": None},
            {"action": "submit", "id": "high", "type": "t", "body": None, "priority": 9},
            {"action": "submit", "id": "mid2", "type": "t", "body": None, "priority": 0},
        )
        slave = self.daemon.slave("t")
        order = [slave.received()[0]["id"]]
        for _ in range(3):
            order.append(slave.send({"action": "respond", "body": None})[1]["id"])
        self.assertEqual(order, ["high", "mid", "mid2", "low"])

    def test_answers_in_any_order_each_after_its_ack(self):
        slaves = [self.daemon.slave("t"), self.daemon.slave("t")]
        self.assertEqual(self.master.send({"action": "submit", "id": "a", "type": "t", "body": 1},
                                          {"action": "submit", "id": "b", "type": "t", "body": 2}),
                         [{"ok": True, "id": "a"}, {"ok": True, "id": "b"}])
        slaves[1].received()
        slaves[1].send({"action": "respond", "body": "B"})
        slaves[0].send({"action": "respond", "body": "A"})
        self.assertEqual(self.master.received(), [{"id": "b", "body": "B"}, {"id": "a", "body": "A"}])

    def test_answers_go_to_the_submitting_master(self):
        other = self.daemon.master()
        slave = self.daemon.slave("t")
        other.send({"action": "submit", "id": "o", "type": "t", "body": None})
        slave.send({"action": "respond", "body": "for other"})
        self.assertEqual(other.received(), [{"id": "o", "body": "for other"}])
        self.assertEqual(self.master.received(), [])

    def test_big_integer_body_exact(self):
        slave = self.daemon.slave("t")
        body = {"n": 3**5000, "f": 0.1, "g": 1e300}
        self.master.send({"action": "submit", "id": "1", "type": "t", "body": body})
        self.assertEqual(slave.received()[0]["body"], body)
        slave.send({"action": "respond", "body": body})
        self.assertEqual(self.master.received(), [{"id": "1", "body": body}])

    def test_id_free_again_after_answer(self):
        slave = self.daemon.slave("t")
        submit = {"action": "submit", "id": "1", "type": "t", "body": None}
        self.master.send(submit)
        slave.send({"action": "respond", "body": None})
        self.master.received()
        self.assertEqual(self.master.send(submit), [{"ok": True, "id": "1"}])

    def test_slave_fail(self):
        slave = self.daemon.slave("t")
        self.master.send({"action": "submit", "id": "1", "type": "t", "body": None})
        slave.received()
        self.assertEqual(slave.send({"action": "fail", "reason": "disk full"}), [{"ok": True}])
        self.assertEqual(self.master.received(),
                         [{"error": "job_failed", "reason": "disk full", "id": "1"}])
        self.assertEqual(self.daemon.scheduler.queued("t"), 0)
        self.assertNotIn("1", live_ids(self.daemon.scheduler))

    def test_frames_split_across_reads(self):
        data = frame({"action": "submit", "id": "1", "type": "t", "body": "x" * 100}) * 1
        data += frame({"action": "submit", "id": "2", "type": "t", "body": None})
        for byte in range(len(data)):
            self.master.protocol.dataReceived(data[byte : byte + 1])
        self.assertEqual(self.master.received(), [{"ok": True, "id": "1"}, {"ok": True, "id": "2"}])

    def test_large_frames_gathered_across_reads(self):
        """A frame of LARGE_FRAME bytes or more is gathered from its reads;
        what follows it in the read that ends it is framed as usual."""
        from gloom.protocol import LARGE_FRAME

        daemon = Daemon(max_frame=8 * LARGE_FRAME)
        master, slave = daemon.master(), daemon.slave("t")
        body = "é" * LARGE_FRAME
        data = (frame({"action": "submit", "id": "big", "type": "t", "body": body})
                + frame({"action": "submit", "id": "next", "type": "t", "body": 2}))
        for start in range(0, len(data), 65536 - 3):
            master.protocol.dataReceived(data[start : start + 65536 - 3])
        self.assertEqual(master.received(), [{"ok": True, "id": "big"}, {"ok": True, "id": "next"}])
        self.assertEqual(slave.received()[0]["body"], body)
        self.assertFalse(master.protocol.inside_a_frame())

    def test_whole_frames_and_a_part_in_one_read(self):
        """A read of whole frames and the start of the next: the whole ones
        are handled at once, the rest when it is complete."""
        data = b"".join(frame({"action": "submit", "id": str(i), "type": "t", "body": i})
                        for i in range(4))
        cut = len(data) - 5
        self.master.protocol.dataReceived(data[:cut])
        self.assertEqual([m["id"] for m in self.master.received()], ["0", "1", "2"])
        self.assertTrue(self.master.protocol.inside_a_frame())
        self.master.protocol.dataReceived(data[cut:])
        self.assertEqual([m["id"] for m in self.master.received()], ["3"])
        self.assertFalse(self.master.protocol.inside_a_frame())

    def test_a_read_paused_part_way_keeps_the_rest_in_order(self):
        """A handler that pauses the connection (its peer's buffer is full)
        stops the frames of the same read; they follow, in order, once it
        resumes, ahead of what is read later."""
        protocol = self.master.protocol
        handle = protocol.stringReceived
        seen = []

        def pausing(frame_bytes):
            seen.append(frame_bytes)
            handle(frame_bytes)
            if len(seen) == 2:
                protocol.pauseProducing()

        protocol.stringReceived = pausing
        first = b"".join(frame({"action": "submit", "id": str(i), "type": "t", "body": i})
                         for i in range(5))
        protocol.dataReceived(first)
        self.assertEqual([m["id"] for m in self.master.received()], ["0", "1"])
        protocol.dataReceived(frame({"action": "submit", "id": "5", "type": "t", "body": 5}))
        self.assertEqual(self.master.received(), [])
        protocol.resumeProducing()
        self.assertEqual([m["id"] for m in self.master.received()], ["2", "3", "4", "5"])

    def test_a_handler_that_raises_loses_nothing_after_it(self):
        """Should a frame's handling raise out of the protocol, the frames
        after it in the same read are kept, in order, for the next read."""
        protocol = self.master.protocol
        handle = protocol.stringReceived
        seen = []

        def raising(frame_bytes):
            seen.append(frame_bytes)
            if len(seen) == 2:
                raise RuntimeError("boom")
            handle(frame_bytes)

        protocol.stringReceived = raising
        data = b"".join(frame({"action": "submit", "id": str(i), "type": "t", "body": i})
                        for i in range(4))
        cut = len(data) - 3
        self.assertRaises(RuntimeError, protocol.dataReceived, data[:cut])
        protocol.dataReceived(data[cut:])
        self.assertEqual([m["id"] for m in self.master.received()], ["0", "2", "3"])

    def test_an_oversized_frame_after_whole_ones_is_refused(self):
        daemon = Daemon(max_frame=100)
        master = daemon.master()
        data = (frame({"action": "submit", "id": "1", "type": "t", "body": 1})
                + struct.pack("!I", 101) + b"x" * 101)
        master.protocol.dataReceived(data)
        received = master.received()
        self.assertEqual(received[0], {"ok": True, "id": "1"})
        self.assertEqual(received[1]["error"], "size_error")

    def test_job_frames_name_their_type_as_wire_does(self):
        """The part of a job frame naming its type is built once per type
        and reused: the frame is the one wire.job builds, for any type."""
        from gloom import wire

        for job_type in ("t", 'q"uote\\', "tÿpe", "\u2028"):
            slave = self.daemon.slave(job_type)
            self.master.send({"action": "submit", "id": job_type, "type": job_type, "body": [1]})
            self.master.send({"action": "submit", "id": job_type + "2", "type": job_type,
                              "body": [2]})
            expected = wire.job(wire.encode_id(job_type), wire.encode_id(job_type), b"[1]")
            self.assertEqual(slave.transport.value()[4:], expected)
            self.assertEqual(slave.received()[0]["type"], job_type)

    def test_the_type_part_cache_is_bounded(self):
        from gloom import master

        self.patch(master, "_TYPE_PARTS_MOST", 10)
        self.patch(master, "_TYPE_PARTS", {})
        for index in range(25):
            self.master.send({"action": "submit", "id": str(index), "type": f"type{index}",
                              "body": None})
            self.assertLessEqual(len(master._TYPE_PARTS), 10)
        slave = self.daemon.slave("type24")
        self.assertEqual(slave.received()[0]["type"], "type24")

    def test_tcp_nodelay_is_set(self):
        class Transport(StringTransport):
            nodelay = None

            def setTcpNoDelay(self, enabled):
                self.nodelay = enabled

        transport = Transport()
        self.daemon.masters.buildProtocol(None).makeConnection(transport)
        self.assertTrue(transport.nodelay)

    def test_paused_protocol_parses_nothing_until_resumed(self):
        self.master.protocol.pauseProducing()
        self.master.protocol.dataReceived(frame({"action": "submit", "id": "1", "type": "t", "body": None}))
        self.assertEqual(self.master.received(), [])
        self.master.protocol.resumeProducing()
        self.assertEqual(self.master.received(), [{"ok": True, "id": "1"}])


class JoinTests(SynchronousTestCase):
    def setUp(self):
        self.daemon = Daemon()
        self.master = self.daemon.master()

    def test_join_again_switches_type(self):
        slave = self.daemon.slave("a")
        self.assertEqual(slave.send({"action": "join", "type": "b"}), [{"ok": True}])
        self.assertEqual(self.daemon.scheduler.idle_slaves("a"), 0)
        self.assertEqual(self.daemon.scheduler.idle_slaves("b"), 1)
        self.master.send({"action": "submit", "id": "1", "type": "b", "body": None})
        self.assertEqual(slave.received()[0]["id"], "1")

    def test_join_same_type_keeps_its_place(self):
        first = self.daemon.slave("a")
        self.daemon.slave("a")
        first.send({"action": "join", "type": "a"})
        self.master.send({"action": "submit", "id": "1", "type": "a", "body": None})
        self.assertEqual(first.received()[0]["id"], "1")

    def test_join_while_holding_a_job_waits_for_its_answer(self):
        slave = self.daemon.slave("a")
        self.master.send({"action": "submit", "id": "1", "type": "a", "body": None},
                         {"action": "submit", "id": "2", "type": "a", "body": None},
                         {"action": "submit", "id": "3", "type": "b", "body": None})
        slave.received()
        self.assertEqual(slave.send({"action": "join", "type": "b"}), [{"ok": True}])
        self.assertIn("1", live_ids(self.daemon.scheduler))
        self.assertEqual(slave.send({"action": "respond", "body": "one"}),
                         [{"ok": True}, {"action": "job", "id": "3", "type": "b", "body": None}])
        self.assertEqual(self.master.received()[-1], {"id": "1", "body": "one"})
        self.assertEqual(self.daemon.scheduler.queued("a"), 1)


class DisconnectTests(SynchronousTestCase):
    def setUp(self):
        self.daemon = Daemon(max_retries=3)
        self.master = self.daemon.master()

    def test_master_leaving_drops_queued_jobs(self):
        self.master.send({"action": "submit", "id": "1", "type": "t", "body": None})
        self.master.disconnect()
        self.assertEqual(self.daemon.scheduler.queued("t"), 0)
        self.assertNotIn("1", live_ids(self.daemon.scheduler))
        slave = self.daemon.slave("t")
        self.assertEqual(slave.received(), [])

    def test_master_leaving_lets_running_jobs_finish(self):
        slave = self.daemon.slave("t")
        self.master.send({"action": "submit", "id": "1", "type": "t", "body": None})
        self.master.disconnect()
        slave.received()
        self.assertIn("1", live_ids(self.daemon.scheduler))
        other = self.daemon.master()
        self.assertEqual(other.send({"action": "submit", "id": "1", "type": "t", "body": "mine"}),
                         [{"ok": True, "id": "1"}])
        self.assertEqual(slave.send({"action": "respond", "body": "late"}),
                         [{"ok": True}, {"action": "job", "id": "1", "type": "t", "body": "mine"}])
        self.assertEqual(other.received(), [])
        slave.send({"action": "respond", "body": "for the other master"})
        self.assertEqual(other.received(), [{"id": "1", "body": "for the other master"}])
        self.assertEqual(len(self.daemon.scheduler), 0)

    def test_slave_leaving_requeues_its_job(self):
        slave = self.daemon.slave("t")
        self.master.send({"action": "submit", "id": "1", "type": "t", "body": "b"})
        slave.disconnect()
        self.assertEqual(self.daemon.scheduler.queued("t"), 1)
        second = self.daemon.slave()
        self.assertEqual(second.send({"action": "join", "type": "t"})[1],
                         {"action": "job", "id": "1", "type": "t", "body": "b"})
        second.send({"action": "respond", "body": "done"})
        self.assertEqual(self.master.received()[-1], {"id": "1", "body": "done"})

    def test_retry_limit(self):
        self.master.send({"action": "submit", "id": "1", "type": "t", "body": None})
        self.master.received()
        for attempt in range(4):
            slave = self.daemon.slave("t")
            self.assertEqual(slave.received()[0]["id"], "1")
            self.assertEqual(self.master.received(), [])
            slave.disconnect()
        (error,) = self.master.received()
        self.assertEqual((error["error"], error["id"]), ("job_failed", "1"))
        self.assertIn("4 attempts", error["reason"])
        self.assertNotIn("1", live_ids(self.daemon.scheduler))

    def test_idle_slave_leaving(self):
        slave = self.daemon.slave("t")
        slave.disconnect()
        self.assertEqual(self.daemon.scheduler.idle_slaves("t"), 0)
        self.assertNotIn(slave.protocol, self.daemon.slaves.connections)


class ErrorFrameTests(SynchronousTestCase):
    """Every bad input gets its error frame and changes nothing else."""

    def setUp(self):
        self.daemon = Daemon(max_frame=1000)
        self.master = self.daemon.master()
        self.slave = self.daemon.slave("t")

    def assertError(self, peer, message, code, reason_part, job_id=None):
        (reply,) = peer.send(message)
        expected = {"error": code}
        if job_id is not None:
            expected["id"] = job_id
        self.assertEqual({k: v for k, v in reply.items() if k != "reason"}, expected)
        self.assertIn(reason_part, reply["reason"])
        self.assertFalse(peer.transport.disconnecting)

    def assertUnchanged(self):
        scheduler = self.daemon.scheduler
        self.assertEqual((scheduler.queued("t"), scheduler.idle_slaves("t"), len(scheduler._jobs)), (0, 1, 0))

    def test_invalid_json(self):
        self.assertError(self.master, b'{"action": "submit", ', "invalid_json", "not valid JSON")
        self.assertError(self.slave, b"\x00", "invalid_json", "not valid JSON")
        self.assertUnchanged()

    def test_invalid_utf8(self):
        self.assertError(self.master, b'{"action":"submit","id":"\xc3\x28"}', "invalid_json", "UTF-8")
        self.assertUnchanged()

    def test_not_an_object(self):
        self.assertError(self.master, [1, 2], "invalid_message", "JSON object")
        self.assertError(self.slave, "join", "invalid_message", "JSON object")

    def test_missing_or_mistyped_action(self):
        self.assertError(self.master, {"id": "1"}, "invalid_message", "'action'")
        self.assertError(self.slave, {"action": ["join"]}, "invalid_message", "'action'")

    def test_unknown_action(self):
        self.assertError(self.master, {"action": "dance"}, "unknown_action", "'dance'")
        self.assertError(self.slave, {"action": "dance"}, "unknown_action", "'dance'")

    def test_wrong_port(self):
        for action in ("join", "respond", "fail"):
            self.assertError(self.master, {"action": action, "type": "t"}, "wrong_port", "slave port")
        self.assertError(self.slave, {"action": "submit", "id": "1", "type": "t", "body": None},
                         "wrong_port", "master port")
        self.assertUnchanged()

    def test_submit_fields(self):
        cases = [
            ({}, "missing field 'id'", None),
            ({"id": 7}, "'id' must be a string", None),
            ({"id": ""}, "'id' must not be empty", None),
            ({"id": "1"}, "missing field 'type'", "1"),
            ({"id": "1", "type": None}, "'type' must be a string", "1"),
            ({"id": "1", "type": ""}, "'type' must not be empty", "1"),
            ({"id": "1", "type": "t"}, "missing field 'body'", "1"),
            ({"id": "1", "type": "t", "body": 1, "priority": 1.5}, "'priority' must be an integer", "1"),
            ({"id": "1", "type": "t", "body": 1, "priority": True}, "'priority' must be an integer", "1"),
            ({"id": "1", "type": "t", "body": 1, "priority": "9"}, "'priority' must be an integer", "1"),
        ]
        for fields, reason, job_id in cases:
            self.assertError(self.master, dict(fields, action="submit"), "invalid_message", reason, job_id)
        self.assertUnchanged()

    def test_id_exists(self):
        self.master.send({"action": "submit", "id": "1", "type": "u", "body": None})
        self.assertError(self.master, {"action": "submit", "id": "1", "type": "v", "body": 2},
                         "id_exists", "'1'", "1")
        self.assertEqual((self.daemon.scheduler.queued("u"), self.daemon.scheduler.queued("v")), (1, 0))

    def test_not_processing(self):
        self.assertError(self.slave, {"action": "respond", "body": 1}, "not_processing", "holds none")
        self.assertError(self.slave, {"action": "fail", "reason": "x"}, "not_processing", "holds none")
        self.assertUnchanged()

    def test_respond_and_fail_fields(self):
        self.master.send({"action": "submit", "id": "1", "type": "t", "body": None})
        self.slave.received()
        self.assertError(self.slave, {"action": "respond"}, "invalid_message", "missing field 'body'", "1")
        self.assertError(self.slave, {"action": "fail"}, "invalid_message", "missing field 'reason'", "1")
        self.assertError(self.slave, {"action": "fail", "reason": 5}, "invalid_message", "'reason' must be a string", "1")
        self.assertError(self.slave, {"action": "join", "type": 5}, "invalid_message", "'type' must be a string")
        self.assertEqual(self.slave.send({"action": "respond", "body": "still mine"}), [{"ok": True}])
        self.assertEqual(self.master.received()[-1], {"id": "1", "body": "still mine"})

    def test_size_error_closes_after_saying_why(self):
        self.master.send({"action": "submit", "id": "1", "type": "t", "body": None})
        self.master.protocol.dataReceived(struct.pack("!I", 1001) + b"{" * 10)
        (error,) = self.master.received()
        self.assertEqual(error["error"], "size_error")
        self.assertIn("1001 bytes", error["reason"])
        self.assertTrue(self.master.transport.disconnecting)
        self.master.protocol.dataReceived(frame({"action": "submit", "id": "2", "type": "t", "body": None}))
        self.assertEqual(self.master.received(), [])
        self.assertNotIn("2", live_ids(self.daemon.scheduler))

    def test_size_limit_is_inclusive(self):
        body = "x" * (1000 - len('{"action":"respond","body":""}'))
        self.master.send({"action": "submit", "id": "1", "type": "t", "body": None})
        self.slave.received()
        data = frame(b'{"action":"respond","body":"' + body.encode() + b'"}')
        self.assertEqual(len(data), 1004)
        self.slave.protocol.dataReceived(data)
        self.assertEqual(self.slave.received(), [{"ok": True}])

    def test_size_error_aborts_a_peer_that_will_not_read(self):
        self.master.protocol.dataReceived(struct.pack("!I", 5000))
        self.assertFalse(self.master.transport.disconnected)
        self.daemon.clock.advance(ABORT_AFTER_ERROR)
        self.assertTrue(self.master.transport.disconnected)

    def test_bad_frames_leave_other_connections_alone(self):
        other = self.daemon.master()
        self.master.send(b"garbage", [1], {"action": "nope"})
        self.master.protocol.dataReceived(struct.pack("!I", 10**6))
        self.assertEqual(other.send({"action": "submit", "id": "1", "type": "t", "body": None}),
                         [{"ok": True, "id": "1"}])
        self.assertEqual(self.slave.received()[0]["id"], "1")


class ShutdownTests(SynchronousTestCase):
    def test_stop_sends_shutdown_for_each_unfinished_job(self):
        daemon = Daemon()
        daemon.scheduler.startService()
        master = daemon.master()
        slave = daemon.slave("t")
        master.send({"action": "submit", "id": "run", "type": "t", "body": None},
                    {"action": "submit", "id": "wait", "type": "t", "body": None})
        slave.received()
        daemon.scheduler.stopService()
        errors = master.received()
        self.assertEqual(sorted((e["error"], e["id"]) for e in errors), [("shutdown", "run"), ("shutdown", "wait")])
        self.assertEqual(master.send({"action": "submit", "id": "n", "type": "t", "body": None})[0]["error"],
                         "shutdown")
        self.assertEqual(slave.send({"action": "respond", "body": None}), [{"ok": True}])
        self.assertEqual(master.received(), [])


class CancelTests(SynchronousTestCase):
    def setUp(self):
        self.daemon = Daemon()
        self.master = self.daemon.master()

    def test_cancel_queued_job(self):
        self.master.send({"action": "submit", "id": "1", "type": "t", "body": None})
        self.assertEqual(self.master.send({"action": "cancel", "id": "1"}), [{"ok": True, "id": "1"}])
        self.assertEqual(self.daemon.scheduler.queued("t"), 0)
        self.assertNotIn("1", live_ids(self.daemon.scheduler))
        self.assertEqual(self.daemon.slave("t").received(), [])
        self.assertEqual(self.master.received(), [])

    def test_cancel_running_job_drops_its_answer(self):
        slave = self.daemon.slave("t")
        self.master.send({"action": "submit", "id": "1", "type": "t", "body": None})
        slave.received()
        self.assertEqual(self.master.send({"action": "cancel", "id": "1"}), [{"ok": True, "id": "1"}])
        self.assertIn("1", live_ids(self.daemon.scheduler))
        self.assertEqual(slave.send({"action": "respond", "body": "late"}), [{"ok": True}])
        self.assertEqual(self.master.received(), [])
        self.assertNotIn("1", live_ids(self.daemon.scheduler))
        self.assertEqual(self.daemon.scheduler.totals["cancelled"], 1)

    def test_cancel_unknown_or_anothers_job(self):
        other = self.daemon.master()
        other.send({"action": "submit", "id": "theirs", "type": "t", "body": None})
        for job_id in ("theirs", "never"):
            (reply,) = self.master.send({"action": "cancel", "id": job_id})
            self.assertEqual((reply["error"], reply["id"]), ("unknown_job", job_id))
        self.assertEqual(self.daemon.scheduler.queued("t"), 1)

    def test_cancel_after_the_answer(self):
        slave = self.daemon.slave("t")
        self.master.send({"action": "submit", "id": "1", "type": "t", "body": None})
        slave.received()
        slave.send({"action": "respond", "body": 1})
        self.master.received()
        self.assertEqual(self.master.send({"action": "cancel", "id": "1"})[0]["error"], "unknown_job")

    def test_cancel_needs_an_id(self):
        (reply,) = self.master.send({"action": "cancel"})
        self.assertEqual(reply["error"], "invalid_message")
        self.assertIn("'id'", reply["reason"])


class LimitTests(SynchronousTestCase):
    def test_queue_full(self):
        daemon = Daemon(max_queued=2)
        master = daemon.master()
        replies = master.send(*({"action": "submit", "id": str(i), "type": "t", "body": None} for i in range(3)))
        self.assertEqual(replies[:2], [{"ok": True, "id": "0"}, {"ok": True, "id": "1"}])
        self.assertEqual((replies[2]["error"], replies[2]["id"]), ("queue_full", "2"))
        self.assertEqual(daemon.master().send({"action": "submit", "id": "x", "type": "t", "body": None}),
                         [{"ok": True, "id": "x"}])
        master.send({"action": "cancel", "id": "0"})
        self.assertEqual(master.send({"action": "submit", "id": "2", "type": "t", "body": None}),
                         [{"ok": True, "id": "2"}])

    def test_timeout_field(self):
        master = Daemon().master()
        for bad in (0, -1, True, "5", None, [1]):
            (reply,) = master.send({"action": "submit", "id": "1", "type": "t", "body": None, "timeout": bad})
            self.assertEqual((reply["error"], reply["id"]), ("invalid_message", "1"))
            self.assertIn("'timeout'", reply["reason"])
        (reply,) = master.send(b'{"action":"submit","id":"1","type":"t","body":null,"timeout":1e400}')
        self.assertEqual(reply["error"], "invalid_message")
        self.assertEqual(master.send({"action": "submit", "id": "1", "type": "t", "body": None, "timeout": 0.5}),
                         [{"ok": True, "id": "1"}])


class TimeoutTests(SynchronousTestCase):
    def test_slow_slave_is_told_and_gets_new_work(self):
        daemon = Daemon(max_retries=1)
        master = daemon.master()
        slow, fast = daemon.slave("t"), daemon.slave("t")
        master.send({"action": "submit", "id": "1", "type": "t", "body": "x", "timeout": 2})
        self.assertEqual(slow.received()[0]["id"], "1")
        daemon.clock.advance(2)
        self.assertEqual(fast.received()[0]["id"], "1")
        master.send({"action": "submit", "id": "2", "type": "t", "body": "y"})
        refusal, next_job = slow.send({"action": "respond", "body": "late"})
        self.assertEqual((refusal["error"], refusal["id"]), ("timed_out", "1"))
        self.assertIn("discarded", refusal["reason"])
        self.assertEqual(next_job["id"], "2")
        master.received()
        self.assertEqual(fast.send({"action": "respond", "body": "on time"}), [{"ok": True}])
        self.assertEqual(master.received(), [{"id": "1", "body": "on time"}])
        self.assertEqual(daemon.scheduler.idle_slaves("t"), 1)

    def test_slow_slave_idle_again_after_late_answer(self):
        daemon = Daemon(max_retries=0)
        master = daemon.master()
        slave = daemon.slave("t")
        master.send({"action": "submit", "id": "1", "type": "t", "body": None, "timeout": 1})
        slave.received()
        daemon.clock.advance(1)
        (failure,) = master.received()
        self.assertEqual((failure["error"], failure["id"]), ("job_failed", "1"))
        self.assertTrue(failure["reason"].startswith("timeout"))
        self.assertEqual(slave.send({"action": "fail", "reason": "late"})[0]["error"], "timed_out")
        master.send({"action": "submit", "id": "1", "type": "t", "body": "again"})
        self.assertEqual(slave.received()[0]["body"], "again")


class StatsTests(SynchronousTestCase):
    def test_stats_action_reports_the_factory_figures(self):
        daemon = Daemon()
        daemon.masters.stats = lambda: {"masters": 1, "big": 2**70}
        self.assertEqual(daemon.master().send({"action": "stats"}),
                         [{"ok": True, "stats": {"masters": 1, "big": 2**70}}])

    def test_stats_is_master_only(self):
        (reply,) = Daemon().slave().send({"action": "stats"})
        self.assertEqual(reply["error"], "wrong_port")


class BackpressureTests(SynchronousTestCase):
    def test_protocol_is_its_transports_streaming_producer(self):
        daemon = Daemon()
        for peer in (daemon.master(), daemon.slave()):
            self.assertIs(peer.transport.producer, peer.protocol)
            self.assertTrue(peer.transport.streaming)

    def test_full_outgoing_buffer_stops_reading_submissions(self):
        daemon = Daemon()
        master = daemon.master()
        master.protocol.pauseProducing()
        self.assertEqual(master.transport.producerState, "paused")
        master.protocol.dataReceived(b"".join(
            frame({"action": "submit", "id": str(i), "type": "t", "body": None}) for i in range(3)))
        self.assertEqual(len(daemon.scheduler), 0)
        master.protocol.resumeProducing()
        self.assertEqual(master.transport.producerState, "producing")
        self.assertEqual(len(daemon.scheduler), 3)
        self.assertEqual([r["id"] for r in master.received()], ["0", "1", "2"])

    def test_keepalive_is_set(self):
        class Transport(StringTransport):
            settings = {}

            def setTcpNoDelay(self, enabled):
                self.settings["nodelay"] = enabled

            def setTcpKeepAlive(self, enabled):
                self.settings["keepalive"] = enabled

        transport = Transport()
        Daemon().slaves.buildProtocol(None).makeConnection(transport)
        self.assertEqual(transport.settings, {"nodelay": True, "keepalive": True})


class RecordingWriter(TransportWriter):
    """A writer that sends at once, as a `DirectTCPWriter` does with an
    empty transport buffer: ``sends`` lists what each send put on the wire."""

    direct = True

    def __init__(self, transport):
        super().__init__(transport)
        self.sends = []

    def send(self, data):
        self.sends.append(bytes(data))
        self.transport.write(data)

    def send_all(self, pieces):
        self.send(b"".join(pieces))


class SendTests(SynchronousTestCase):
    """How a connection that may send at once groups its frames by
    reactor turn (the writer itself is tested on real TCP in test_transport)."""

    def setUp(self):
        self.daemon = Daemon()
        self.daemon.masters.writer_for = RecordingWriter
        self.master = self.daemon.masters.buildProtocol(None)
        self.transport = StringTransport()
        self.master.makeConnection(self.transport)
        self.writer = self.master._writer

    def turn_ends(self):
        self.daemon.clock.advance(0)

    def sent(self):
        return [unframe(s) for s in self.writer.sends]

    def test_other_transports_are_written_through_their_interface(self):
        protocol = Daemon().masters.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        self.assertIs(type(protocol._writer), TransportWriter)

    def test_one_send_per_connection_per_turn(self):
        for n in (1, 2, 3):
            self.master.sendString(b'{"n":%d}' % n)
        self.assertEqual(self.sent(), [[{"n": 1}]])
        self.turn_ends()
        self.assertEqual(self.sent(), [[{"n": 1}], [{"n": 2}, {"n": 3}]])
        self.master.sendString(b'{"n":4}')
        self.assertEqual(self.sent()[-1], [{"n": 4}])
        self.assertEqual(unframe(self.transport.value()), [{"n": n} for n in (1, 2, 3, 4)])

    def test_answers_of_one_turn_go_out_together_after_the_acks(self):
        slaves = [self.daemon.slave("t") for _ in range(3)]
        self.master.dataReceived(b"".join(
            frame({"action": "submit", "id": str(i), "type": "t", "body": i}) for i in range(3)))
        for slave in slaves:
            (job,) = slave.received()
            slave.send({"action": "respond", "body": job["id"]})
        self.turn_ends()
        self.assertEqual(self.sent(), [
            [{"ok": True, "id": "0"}, {"ok": True, "id": "1"}, {"ok": True, "id": "2"}],
            [{"id": "0", "body": "0"}, {"id": "1", "body": "1"}, {"id": "2", "body": "2"}],
        ])

    def test_nothing_is_sent_on_a_connection_lost_before_the_turn_ends(self):
        self.master.sendString(b'{"n":1}')
        self.master.sendString(b'{"n":2}')
        self.master.connectionLost(None)
        self.turn_ends()
        self.assertEqual(self.sent(), [[{"n": 1}]])

    def test_close_sends_what_was_held(self):
        self.master.sendString(b'{"n":1}')
        self.master.sendString(b'{"n":2}')
        self.master.close()
        self.assertEqual(self.sent(), [[{"n": 1}], [{"n": 2}]])
        self.assertTrue(self.transport.disconnecting)


class TLSLogTests(SynchronousTestCase):
    """What is logged of a TLS connection: "connected" once the handshake
    is done; a failed or stalled handshake once, and nothing more."""

    def setUp(self):
        from twisted.logger import formatEvent, globalLogPublisher

        self.lines = []

        def observe(event):
            if event.get("log_namespace", "").startswith("gloom"):
                self.lines.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        self.daemon = Daemon()

    def connect(self):
        from twisted.internet.address import IPv4Address
        from twisted.internet.interfaces import ISSLTransport
        from zope.interface import directlyProvides

        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.2", 5555))
        directlyProvides(transport, ISSLTransport)
        transport.getPeerCertificate = lambda: None
        protocol = self.daemon.slaves.buildProtocol(None)
        protocol.makeConnection(transport)
        return protocol

    def test_failed_handshake(self):
        from OpenSSL import SSL
        from twisted.python.failure import Failure

        reason = "peer did not return a certificate"
        self.connect().connectionLost(Failure(SSL.Error([("SSL routines", "", reason)])))
        self.assertEqual(self.lines, [f"slave 10.0.0.2:5555: TLS handshake failed: {reason}"])

    def test_connection_closed_during_the_handshake(self):
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        self.connect().connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.lines, ["slave 10.0.0.2:5555: TLS handshake failed: the connection closed "
                                      "before the handshake completed"])

    def test_connected_once_the_handshake_is_done(self):
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        protocol = self.connect()
        self.assertEqual(self.lines, [])
        protocol.handshakeCompleted()
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.lines, [
            "slave connected from 10.0.0.2:5555 (TLS established, no client certificate)",
            "slave 10.0.0.2:5555 disconnected",
        ])

    def test_stalled_handshake_is_logged_once(self):
        from twisted.internet.error import ConnectionLost
        from twisted.python.failure import Failure

        from gloom.protocol import DEFAULT_FRAME_TIMEOUT

        protocol = self.connect()
        self.daemon.clock.advance(DEFAULT_FRAME_TIMEOUT)
        protocol.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(len(self.lines), 1, self.lines)
        self.assertIn("no progress in its TLS handshake", self.lines[0])
