"""The wire codec: parsing frames, carrying bodies exactly, building frames."""

import json

from twisted.trial.unittest import SynchronousTestCase

from gloom import wire


class DecodeTests(SynchronousTestCase):
    def assertRefused(self, frame, code, reason_part):
        error = self.assertRaises(wire.MessageError, wire.decode, frame)
        self.assertEqual(error.code, code)
        self.assertIn(reason_part, error.reason)
        return error

    def test_object(self):
        message = wire.decode(b'{"action":"join","type":"echo","extra":[1]}')
        self.assertEqual((message.action, message.type, message.id), ("join", "echo", wire.MISSING))

    def test_invalid_utf8(self):
        self.assertRefused(b'{"a":"\xff"}', wire.INVALID_JSON, "UTF-8")

    def test_utf16_is_not_guessed(self):
        self.assertRefused('{"a":1}'.encode("utf-16"), wire.INVALID_JSON, "UTF-8")

    def test_invalid_json(self):
        self.assertRefused(b'{"action":', wire.INVALID_JSON, "not valid JSON")

    def test_empty_frame(self):
        self.assertRefused(b"", wire.INVALID_JSON, "not valid JSON")

    def test_non_standard_constants(self):
        for text in (b'{"a":NaN}', b'{"a":Infinity}', b'{"a":-Infinity}'):
            self.assertRefused(text, wire.INVALID_JSON, "not valid JSON")

    def test_not_an_object(self):
        for text in (b"[1,2]", b'"submit"', b"3", b"null"):
            self.assertRefused(text, wire.INVALID_MESSAGE, "JSON object")

    def test_too_deep(self):
        self.assertRefused(b"[" * 100000 + b"]" * 100000, wire.INVALID_JSON, "nests too deeply")


class ExactBodyTests(SynchronousTestCase):
    """A body comes out exactly as it went in."""

    def roundtrip(self, text: str) -> str:
        """The body as the daemon would carry it, through whichever path decodes it."""
        return bytes(wire.decode(('{"body":' + text + "}").encode()).body).decode()

    def test_plain_values(self):
        for value in (None, True, False, 0, -7, 1.5, "text", [], {}, [1, {"a": [None]}]):
            text = json.dumps(value, separators=(",", ":"))
            self.assertEqual(self.roundtrip(text), text)

    def test_big_integers_stay_integers(self):
        for digits in (20, 400, 4000, 5000, 100000):
            text = "9" * digits
            self.assertEqual(self.roundtrip(text), text)
            self.assertEqual(self.roundtrip("-" + text), "-" + text)
            self.assertEqual(self.roundtrip(f"[1,{{\"n\":{text}}}]"), f"[1,{{\"n\":{text}}}]")

    def test_floats_keep_their_value(self):
        for text in ("0.1", "1e300", "-2.5e-300", "123456789.123456789", "5e-324"):
            self.assertEqual(float(self.roundtrip(text)), float(text))
            self.assertIsInstance(json.loads(self.roundtrip(text)), float)

    def test_floats_beyond_a_double_are_kept_as_text(self):
        for text in ("1e400", "-1e400", "1" * 400 + ".5"):
            self.assertEqual(self.roundtrip(text), text)

    def test_strings_unicode_and_escapes(self):
        value = "h\u00e9llo \u2603 \U0001f600 \"quoted\" \\ \n \x00"
        out = self.roundtrip(json.dumps(value, ensure_ascii=False))
        self.assertEqual(json.loads(out), value)

    def test_lone_surrogate_survives(self):
        self.assertEqual(self.roundtrip('"\\ud800"'), '"\\ud800"')

    def test_non_ascii_frames(self):
        self.assertEqual(json.loads(self.roundtrip('"\u00e9\u2603"')), "\u00e9\u2603")
        frame = '{"action":"submit","id":"caf\u00e9","body":"\u2603"}'.encode("utf-8")
        message = wire.decode(frame)
        self.assertEqual((message.id, json.loads(bytes(message.body))), ("caf\u00e9", "\u2603"))

    def test_invalid_utf8_inside_a_body_is_refused(self):
        error = self.assertRaises(wire.MessageError, wire.decode, b'{"body":"\xff"}')
        self.assertEqual(error.code, wire.INVALID_JSON)

    def test_key_order_kept(self):
        self.assertEqual(self.roundtrip('{"b":1,"a":2,"c":3}'), '{"b":1,"a":2,"c":3}')

    def test_body_nesting_too_deep_to_carry(self):
        deep = []
        for _ in range(100000):
            deep = [deep]
        error = self.assertRaises(wire.MessageError, wire.encode_body, deep, "job-1")
        self.assertEqual((error.code, error.job_id), (wire.INVALID_MESSAGE, "job-1"))
        self.assertIn("'body'", error.reason)


class ExactBodyStandardLibraryTests(ExactBodyTests):
    """The same, with the fast decoder (msgspec) out of the way, as on PyPy."""

    def setUp(self):
        self.patch(wire, "_fast_decode", None)


class DecodeStandardLibraryTests(DecodeTests):
    def setUp(self):
        self.patch(wire, "_fast_decode", None)


class FieldTests(SynchronousTestCase):
    def refused(self, function, *args):
        error = self.assertRaises(wire.MessageError, function, *args)
        self.assertEqual(error.code, wire.INVALID_MESSAGE)
        return error

    def test_action(self):
        self.assertEqual(wire.action_of(wire.message(**{"action": "join"})), "join")
        self.assertIn("missing field 'action'", self.refused(wire.action_of, wire.message()).reason)
        self.assertIn("'action' must be a string",
                      self.refused(wire.action_of, wire.message(action=1)).reason)

    def test_required_string(self):
        m = wire.message
        self.assertEqual(wire.required_string(m(id="a"), "id"), "a")
        self.assertIn("missing field 'id'", self.refused(wire.required_string, m(), "id").reason)
        self.assertIn("'id' must be a string", self.refused(wire.required_string, m(id=3), "id").reason)
        self.assertIn("'id' must not be empty", self.refused(wire.required_string, m(id=""), "id").reason)
        self.assertEqual(wire.required_string(m(reason=""), "reason", allow_empty=True), "")

    def test_errors_name_the_job(self):
        error = self.refused(wire.required_string, wire.message(), "type", "job-7")
        self.assertEqual(error.job_id, "job-7")

    def test_body_may_be_null_but_not_missing(self):
        self.assertEqual(bytes(wire.required_body(wire.message(body=None))), b"null")
        self.assertEqual(bytes(wire.required_body(wire.decode(b'{"body":null}'))), b"null")
        self.assertIn("missing field 'body'", self.refused(wire.required_body, wire.message()).reason)

    def test_priority(self):
        m = wire.message
        self.assertEqual(wire.optional_priority(m()), 0)
        self.assertEqual(wire.optional_priority(m(priority=-12)), -12)
        self.assertEqual(wire.optional_priority(m(priority=10**30)), 10**30)
        self.assertEqual(wire.optional_priority(wire.decode(b'{"priority":' + b"9" * 40 + b"}")), 10**40 - 1)
        for bad in (True, False, 1.0, 2.5, "1", None, [1]):
            error = self.refused(wire.optional_priority, m(priority=bad))
            self.assertIn("'priority' must be an integer", error.reason)
        huge = wire.decode(b'{"priority":' + b"9" * 5000 + b"}")
        self.assertIn("out of range", self.refused(wire.optional_priority, huge).reason)
        beyond_double = wire.decode(b'{"priority":1e400}')
        self.assertIn("must be an integer", self.refused(wire.optional_priority, beyond_double).reason)


class DocumentationTests(SynchronousTestCase):
    def test_readme_lists_every_error_code(self):
        import os
        import re

        readme = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.rst")
        with open(readme) as f:
            table = f.read().split("code                   when", 1)[1].split("\n\n", 1)[0]
        self.assertEqual(sorted(re.findall(r"^``([a-z_]+)``", table, re.MULTILINE)), sorted(wire.ERROR_CODES))


class FrameTests(SynchronousTestCase):
    def test_ack(self):
        self.assertEqual(json.loads(wire.ack(wire.encode_id("j\u00e9"))), {"ok": True, "id": "j\u00e9"})

    def test_job(self):
        self.assertEqual(json.loads(wire.job(wire.encode_id("1"), wire.encode_id("echo"), b'{"x":[1]}')),
                         {"action": "job", "id": "1", "type": "echo", "body": {"x": [1]}})

    def test_answer(self):
        self.assertEqual(json.loads(wire.answer(wire.encode_id("1"), b"null")), {"id": "1", "body": None})

    def test_error(self):
        self.assertEqual(json.loads(wire.error(wire.ID_EXISTS, "taken", "1")),
                         {"error": "id_exists", "reason": "taken", "id": "1"})
        self.assertEqual(json.loads(wire.error(wire.SIZE_ERROR, "big")),
                         {"error": "size_error", "reason": "big"})

    def test_frames_are_utf8(self):
        """Characters are written in UTF-8, not as \\u escapes (up to three
        times longer); a lone surrogate, which UTF-8 cannot hold, as its escape."""
        self.assertEqual(wire.ack(wire.encode_id("\u2603")), '{"ok":true,"id":"\u2603"}'.encode("utf-8"))
        self.assertEqual(wire.encode_id("plain-id"), b'"plain-id"')
        self.assertEqual(wire.encode_id('q"uote\\'), b'"q\\"uote\\\\"')
        self.assertEqual(wire.encode_id("caf\u00e9\x01"), '"caf\u00e9\\u0001"'.encode("utf-8"))
        self.assertEqual(wire.encode_id("a\ud800"), b'"a\\ud800"')
        self.assertEqual(json.loads(wire.encode_id("a\ud800")), "a\ud800")
        self.assertEqual(wire.error(wire.JOB_FAILED, "caf\u00e9 \U0001f600", "\u00e9"),
                         '{"error":"job_failed","reason":"caf\u00e9 \U0001f600","id":"\u00e9"}'.encode("utf-8"))
        encoded = wire.encode_value({"\u00e9": ["\u20ac" * 1000, "\udc80", wire.RawNumber("1e400")]})
        self.assertEqual(encoded, ('{"\u00e9":["' + "\u20ac" * 1000 + '","\\udc80",1e400]}').encode("utf-8"))
