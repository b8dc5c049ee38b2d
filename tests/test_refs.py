"""Request references: a request's ``ref`` is echoed, byte for byte, in
the frame that answers that request, on both ports, and nowhere else."""

import json
import struct

from twisted.trial.unittest import SynchronousTestCase

from gloom import wire
from tests.support import Daemon, frame


def raw_frames(data: bytes) -> list:
    """Split a byte stream into its frames, undecoded."""
    frames, offset = [], 0
    while offset < len(data):
        (length,) = struct.unpack_from("!I", data, offset)
        frames.append(data[offset + 4 : offset + 4 + length])
        offset += 4 + length
    return frames


class RawPeer:
    """A peer that sends frames as given bytes and reads the frames back as bytes."""

    def __init__(self, peer):
        self.peer = peer

    def send(self, *payloads: bytes) -> list:
        self.peer.protocol.dataReceived(b"".join(frame(p) for p in payloads))
        return self.received()

    def received(self) -> list:
        data = self.peer.transport.value()
        self.peer.transport.clear()
        return raw_frames(data)


class MasterRefTests(SynchronousTestCase):
    def setUp(self):
        self.daemon = Daemon(max_queued=2)
        self.master = self.daemon.master()
        self.raw = RawPeer(self.master)

    def test_submit_ack_echoes_the_ref_byte_for_byte(self):
        for ref in (b'"r-1"', b'"a\\u00e9\\n"', "\"\u00e9\U0001f600\"".encode(), b'""', b"0", b"-0", b"42",
                    b"-9223372036854775808", b"9223372036854775807"):
            (ack,) = self.raw.send(b'{"action":"submit","id":"j","type":"t","body":null,"ref":' + ref + b"}")
            self.assertEqual(ack, b'{"ok":true,"id":"j","ref":' + ref + b"}")
            self.assertEqual(self.raw.send(b'{"action":"cancel","id":"j"}'), [b'{"ok":true,"id":"j"}'])

    def test_without_a_ref_every_frame_is_as_before(self):
        slave = self.daemon.slave("t")
        self.assertEqual(self.raw.send(b'{"action":"submit","id":"1","type":"t","body":[1]}'),
                         [b'{"ok":true,"id":"1"}'])
        self.assertEqual(RawPeer(slave).received(), [b'{"action":"job","id":"1","type":"t","body":[1]}'])
        self.assertEqual(RawPeer(slave).send(b'{"action":"respond","body":2}'), [b'{"ok":true}'])
        self.assertEqual(self.raw.received(), [b'{"id":"1","body":2}'])
        self.assertEqual(self.raw.send(b'{"action":"cancel","id":"1"}'),
                         [b'{"error":"unknown_job","reason":"this master has no unfinished job \'1\', and no detached job has that id","id":"1"}'])

    def test_answers_and_failures_do_not_carry_it(self):
        slave = self.daemon.slave("t")
        self.master.send({"action": "submit", "id": "1", "type": "t", "body": None, "ref": "s1"},
                         {"action": "submit", "id": "2", "type": "t", "body": None, "ref": "s2"})
        self.assertEqual(slave.received(), [{"action": "job", "id": "1", "type": "t", "body": None}])
        self.assertEqual(slave.send({"action": "respond", "body": "one", "ref": 7}),
                         [{"ok": True, "ref": 7}, {"action": "job", "id": "2", "type": "t", "body": None}])
        self.assertEqual(slave.send({"action": "fail", "reason": "no", "ref": 8}), [{"ok": True, "ref": 8}])
        self.assertEqual(self.master.received(), [{"id": "1", "body": "one"},
                                                  {"error": "job_failed", "reason": "no", "id": "2"}])

    def test_cancel_echoes_it(self):
        self.master.send({"action": "submit", "id": "1", "type": "t", "body": None})
        self.assertEqual(self.master.send({"action": "cancel", "id": "1", "ref": "c"}),
                         [{"ok": True, "id": "1", "ref": "c"}])
        (refusal,) = self.master.send({"action": "cancel", "id": "1", "ref": "c2"})
        self.assertEqual((refusal["error"], refusal["id"], refusal["ref"]), ("unknown_job", "1", "c2"))

    def test_every_refusal_echoes_it(self):
        self.master.send({"action": "submit", "id": "1", "type": "t", "body": None},
                         {"action": "submit", "id": "2", "type": "t", "body": None})
        cases = [
            ({"action": "submit", "id": "1", "type": "t", "body": None}, "id_exists", "1"),
            ({"action": "submit", "id": "3", "type": "t", "body": None}, "queue_full", "3"),
            ({"action": "submit", "id": "3", "type": "t"}, "invalid_message", "3"),
            ({"action": "submit"}, "invalid_message", None),
            ({"action": "cancel"}, "invalid_message", None),
            ({"action": "dance"}, "unknown_action", None),
            ({"action": "join", "type": "t"}, "wrong_port", None),
            ({"action": ["stats"]}, "invalid_message", None),
            ({"id": "x"}, "invalid_message", None),
        ]
        for number, (request, code, job_id) in enumerate(cases):
            (reply,) = self.master.send(dict(request, ref=number))
            expected = {"error": code, "ref": number}
            if job_id is not None:
                expected["id"] = job_id
            self.assertEqual({k: v for k, v in reply.items() if k != "reason"}, expected, request)
            self.assertEqual(list(reply)[-1], "ref")

    def test_internal_error_echoes_it(self):
        def broken(*args):
            raise RuntimeError("bug")

        self.patch(self.daemon.scheduler, "submit", broken)
        (reply,) = self.master.send({"action": "submit", "id": "1", "type": "t", "body": None, "ref": "r"})
        self.assertEqual((reply["error"], reply["ref"]), ("internal_error", "r"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_shutdown_refusal_echoes_it(self):
        self.daemon.scheduler.startService()
        self.daemon.scheduler.stopService()
        (reply,) = self.master.send({"action": "submit", "id": "1", "type": "t", "body": None, "ref": "late"})
        self.assertEqual((reply["error"], reply["id"], reply["ref"]), ("shutdown", "1", "late"))

    def test_stats_reply_is_built_once_per_turn_and_the_ref_appended(self):
        calls = []

        def stats():
            calls.append(1)
            return {"n": len(calls)}

        self.daemon.masters.stats = stats
        plain, with_ref, other = self.raw.send(b'{"action":"stats"}', b'{"action":"stats","ref":"s"}',
                                               b'{"ref":-5,"action":"stats"}')
        self.assertEqual(plain, b'{"ok":true,"stats":{"n":1}}')
        self.assertEqual(with_ref, b'{"ok":true,"stats":{"n":1},"ref":"s"}')
        self.assertEqual(other, b'{"ok":true,"stats":{"n":1},"ref":-5}')
        self.assertEqual(len(calls), 1)
        self.daemon.clock.advance(0)
        self.assertEqual(self.raw.send(b'{"action":"stats","ref":1}'), [b'{"ok":true,"stats":{"n":2},"ref":1}'])


class InvalidRefTests(SynchronousTestCase):
    """A ref of the wrong kind refuses the request, whatever else it holds,
    and is not echoed."""

    def setUp(self):
        self.daemon = Daemon()
        self.master = self.daemon.master()
        self.slave = self.daemon.slave("t")
        self.raw = RawPeer(self.master)

    SUBMIT = b'{"action":"submit","id":"1","type":"t","body":1,"ref":%s}'

    def refused(self, peer, ref: bytes, request: bytes = SUBMIT):
        (reply,) = RawPeer(peer).send(request % ref)
        reply = json.loads(reply)
        self.assertEqual(set(reply), {"error", "reason"}, reply)
        self.assertEqual(reply["error"], "invalid_message")
        self.assertIn("'ref'", reply["reason"])
        return reply["reason"]

    def test_wrong_types(self):
        for ref in (b"1.0", b"1e3", b"-0.5", b"true", b"false", b"null", b"[1]", b'{"a":1}', b"[]",
                    b"[" + b"1," * 5000 + b"1]"):
            self.assertIn("must be a string or an integer", self.refused(self.master, ref), ref)
            self.assertIn("must be a string or an integer",
                          self.refused(self.slave, ref, b'{"action":"join","type":"u","ref":%s}'), ref)
        self.assertEqual(len(self.daemon.scheduler), 0)
        self.assertEqual(self.daemon.scheduler.idle_slaves("t"), 1)

    def test_integers_beyond_64_bits(self):
        for ref in (b"9223372036854775808", b"-9223372036854775809", b"1" + b"0" * 30, b"7" * 5000,
                    b"-" + b"9" * 10000):
            self.assertIn("out of range", self.refused(self.master, ref))
        self.assertEqual(len(self.daemon.scheduler), 0)

    def test_strings_like_ids(self):
        self.assertIn("longer than 1024 bytes", self.refused(self.master, b'"' + b"x" * 1025 + b'"'))
        self.assertIn("longer than 1024 bytes", self.refused(self.master, ('"' + "\xe9" * 513 + '"').encode()))
        self.assertIn("longer than 1024 bytes", self.refused(self.master, b'"' + b"\\u00e9" * 513 + b'"'))
        self.assertIn("longer than 1024 bytes", self.refused(self.master, b'"' + b"x" * 100000 + b'"'))
        self.assertIn("lone surrogate", self.refused(self.master, b'"\\ud800"'))
        for ref in (b'"' + b"x" * 1024 + b'"', ('"' + "\xe9" * 512 + '"').encode(), b'"\\ud83d\\ude00"'):
            (ack,) = self.raw.send(b'{"action":"submit","id":"%d","type":"t","body":1,"ref":%s}'
                                   % (len(self.daemon.scheduler), ref))
            self.assertTrue(ack.endswith(b',"ref":' + ref + b"}"), ack[:80])

    def test_the_last_of_two_refs_counts(self):
        self.assertEqual(self.raw.send(b'{"ref":1.5,"action":"stats","ref":"x"}')[0][-11:], b',"ref":"x"}')

    def test_the_ref_is_checked_before_anything_else(self):
        for request in (b'{"action":"dance","ref":1.5}', b'{"ref":null}', b'{"action":"join","ref":[]}',
                        b'{"action":"stats","ref":true}'):
            (reply,) = self.raw.send(request)
            self.assertEqual(json.loads(reply)["error"], "invalid_message", request)
            self.assertIn(b"'ref'", reply)


class ScannedMasterRefTests(MasterRefTests):
    """The same without msgspec, as on PyPy."""

    def setUp(self):
        self.patch(wire, "_fast_decode", None)
        super().setUp()


class ScannedInvalidRefTests(InvalidRefTests):
    def setUp(self):
        self.patch(wire, "_fast_decode", None)
        super().setUp()


class LargeFrameRefTests(SynchronousTestCase):
    """Frames too large for msgspec's typed decoding keep the ref as sent too."""

    def test_ref_in_a_large_frame(self):
        daemon = Daemon()
        raw = RawPeer(daemon.master())
        body = b'"' + "\xe9".encode() * 20000 + b'"'
        (ack,) = raw.send(b'{"action":"submit","id":"big","type":"t","body":' + body + b',"ref":"\\u0041"}')
        self.assertEqual(ack, b'{"ok":true,"id":"big","ref":"\\u0041"}')
        (reply,) = raw.send(b'{"action":"submit","id":"big2","type":"t","body":' + body + b',"ref":1e400}')
        self.assertEqual(json.loads(reply)["error"], "invalid_message")


class SlaveRefTests(SynchronousTestCase):
    def setUp(self):
        self.daemon = Daemon()
        self.master = self.daemon.master()
        self.slave = self.daemon.slave()

    def test_join_and_its_refusal(self):
        self.assertEqual(self.slave.send({"action": "join", "type": "t", "ref": "j"}), [{"ok": True, "ref": "j"}])
        (reply,) = self.slave.send({"action": "join", "type": 5, "ref": "bad type"})
        self.assertEqual((reply["error"], reply["ref"]), ("invalid_message", "bad type"))
        (reply,) = self.slave.send({"action": "submit", "ref": 3})
        self.assertEqual((reply["error"], reply["ref"]), ("wrong_port", 3))

    def test_answers_and_their_refusals(self):
        self.slave.send({"action": "join", "type": "t"})
        for action, field in (("respond", "body"), ("fail", "reason")):
            (reply,) = self.slave.send({"action": action, field: "x", "ref": action})
            self.assertEqual((reply["error"], reply["ref"]), ("not_processing", action))
        self.master.send({"action": "submit", "id": "1", "type": "t", "body": None, "timeout": 1})
        self.assertEqual(self.slave.received()[0]["id"], "1")
        (reply,) = self.slave.send({"action": "respond", "id": "2", "body": "x", "ref": "wrong"})
        self.assertEqual((reply["error"], reply["id"], reply["ref"]), ("wrong_job", "2", "wrong"))
        self.daemon.clock.advance(1)
        reply, again = self.slave.send({"action": "respond", "id": "1", "body": "x", "ref": "late"})
        self.assertEqual((reply["error"], reply["id"], reply["ref"]), ("timed_out", "1", "late"))
        self.assertEqual(again, {"action": "job", "id": "1", "type": "t", "body": None})  # its retry

    def test_leave_and_release(self):
        self.slave.send({"action": "join", "type": "t"})
        self.master.send({"action": "submit", "id": "1", "type": "t", "body": None})
        self.slave.received()
        self.assertEqual(self.slave.send({"action": "leave", "ref": 1},
                                         {"action": "release", "id": "1", "ref": 2}),
                         [{"ok": True, "ref": 1}, {"ok": True, "ref": 2}])
        (reply,) = self.slave.send({"action": "release", "id": "1", "ref": 3})
        self.assertEqual((reply["error"], reply["ref"]), ("not_processing", 3))


class WireTests(SynchronousTestCase):
    def test_ref_is_a_message_field(self):
        self.assertIn("ref", wire.MESSAGE_FIELDS)
        message = wire.decode(b'{"action":"stats","ref":"x"}')
        self.assertEqual(bytes(message.ref), b'"x"')
        self.assertIs(wire.decode(b'{"action":"stats"}').ref, wire.MISSING)
        self.assertEqual(bytes(wire.message(action="stats", ref="\xe9").ref), '"\xe9"'.encode())
        self.assertEqual(wire.checked_ref(wire.message(ref=-12)), b"-12")

    def test_with_ref(self):
        self.assertEqual(wire.with_ref(wire.OK, b'"a"'), b'{"ok":true,"ref":"a"}')
        self.assertEqual(wire.error("unknown_job", "why", "1", b"7"),
                         b'{"error":"unknown_job","reason":"why","id":"1","ref":7}')
        self.assertEqual(wire.error("unknown_job", "why", "1"), b'{"error":"unknown_job","reason":"why","id":"1"}')
