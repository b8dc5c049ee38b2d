"""The Gloom wire format: JSON objects in 4-byte length-prefixed frames.

This module turns frames into validated messages and messages into frames.
It knows nothing about sockets or scheduling.

A body is never decoded.  It is carried as the bytes the peer sent (a slice
of its frame: the spacing, escapes, key order and numbers exactly as they
were), so a frame a slave or a master receives is never longer than the
frame that brought its body, plus the few bytes around it.  Frames Gloom
sends are therefore UTF-8, not ASCII.  A request's ``ref`` is kept as its
text too, and echoed as it was sent.  The other fields of a request are
small scalars and are decoded; integers too long for Python's safe
string-to-int conversion and floats beyond the range of a double are kept
as their original text (`RawNumber`).  An array or object in one of those
fields is decoded when it is short and otherwise stands as `COMPOSITE`; to
the checks below, either is just not the scalar they want.

How a frame is read, and why no frame costs more than a few times its size
in memory, nor more than a fraction of a second:

- Invalid UTF-8 anywhere in a frame is refused before anything else is
  said about it (`gloom.rawjson.first_invalid_utf8` checks in 1 MiB pieces;
  the scanner below checks as it goes, and says where only on the way out).
- Where msgspec is installed (CPython), a frame of at most `_TYPED_LIMIT`
  bytes is decoded by it in one go, the body as raw JSON text (a view of the
  frame, never a copy).  A larger frame is decoded with every field as raw
  text (msgspec validates all of it without building values), and the
  fields other than the body are then decoded on their own.  msgspec refuses
  two things JSON allows: lone surrogate escapes (``"\\ud800"``), which are
  changed to other escapes of the same length in a copy for msgspec to
  check, and changed back in that copy before its fields are read; and
  nesting beyond its recursion limit, which is well above `MAX_DEPTH`.
  Nesting deeper than `MAX_DEPTH` is refused on every path: msgspec is made
  to check it by measuring how deep it can still go at the point of the call
  and decoding the frame again wrapped in enough arrays to leave it
  `MAX_DEPTH` levels (only when the frame holds more than `MAX_DEPTH`
  brackets at all).
- Whatever msgspec refuses in a frame of at most `_SCAN_LIMIT` bytes, and
  every frame where msgspec is missing (PyPy), is decided by
  `gloom.rawjson.scan_object`, a validating scanner that finds where each
  top-level field lies without building any value.  It accepts and refuses
  what the standard library's strict decoder does, and its reasons read like
  the standard library's.  A frame over `_SCAN_LIMIT` that msgspec refuses
  is refused with msgspec's own reason: scanning it could take CPython
  seconds.  Only such reasons differ between CPython and PyPy; what is
  accepted and refused, with which error code, does not.
"""

from __future__ import annotations

import json
import math
import platform
from typing import Any, Iterator, Optional

from gloom import rawjson
from gloom.quoting import MAX_QUOTED, quoted  # noqa: F401  (part of this module's API)
from gloom.rawjson import MAX_DEPTH

try:
    import msgspec
except ImportError:  # PyPy: the standard library does all the work
    msgspec = None

DEFAULT_MAX_FRAME = 64 * 1024 * 1024
"""Largest frame (in bytes, without its 4-byte prefix) a peer may send."""

FRAME_LIMIT = 2**32 - 1
"""Largest length a 4-byte unsigned prefix can carry."""

SIZE_ERROR = "size_error"
INVALID_JSON = "invalid_json"
INVALID_MESSAGE = "invalid_message"
UNKNOWN_ACTION = "unknown_action"
WRONG_PORT = "wrong_port"
ID_EXISTS = "id_exists"
NOT_PROCESSING = "not_processing"
JOB_FAILED = "job_failed"
SHUTDOWN = "shutdown"
UNKNOWN_JOB = "unknown_job"
QUEUE_FULL = "queue_full"
TIMED_OUT = "timed_out"
WRONG_JOB = "wrong_job"
INTERNAL_ERROR = "internal_error"
JOURNAL_ERROR = "journal_error"
CANCELLED = "cancelled"
CLEARED = "cleared"
FORBIDDEN = "forbidden"

ERROR_CODES = (
    SIZE_ERROR,
    INVALID_JSON,
    INVALID_MESSAGE,
    UNKNOWN_ACTION,
    WRONG_PORT,
    ID_EXISTS,
    NOT_PROCESSING,
    JOB_FAILED,
    SHUTDOWN,
    UNKNOWN_JOB,
    QUEUE_FULL,
    TIMED_OUT,
    WRONG_JOB,
    INTERNAL_ERROR,
    JOURNAL_ERROR,
    CANCELLED,
    CLEARED,
    FORBIDDEN,
)
"""Every ``error`` code an error frame may carry."""

MAX_NAME_BYTES = 1024
"""Longest id or type a peer may send, in bytes of UTF-8."""

MAX_TIMEOUT = 30 * 24 * 3600
"""Longest ``timeout`` a submit may ask for, in seconds (30 days)."""

MAX_REF = 2**63 - 1
"""Largest integer ``ref`` a request may carry (the smallest is ``-MAX_REF - 1``):
a 64-bit signed integer, which every JSON decoder reads exactly."""


MAX_DELAY = 365 * 24 * 3600
"""Longest ``delay`` a submit may ask for, in seconds (a year); an ``at``
may be at most this far ahead."""

MAX_RETRIES = 1000
"""Largest ``retries`` a submit may ask for."""

MAX_PAGE = 1000
"""Most dead jobs one ``dead_list`` reply lists."""

ADMIN_ACTIONS = frozenset({"pause", "resume", "clear", "drain"})
"""The master port's administrative actions, refused (`FORBIDDEN`) unless
the daemon runs with ``--admin``."""

MASTER_ACTIONS = frozenset({"submit", "cancel", "stats", "status", "dead_list", "dead_retry",
                            "dead_discard"}) | ADMIN_ACTIONS
"""The actions a master may send (on the master port)."""

SLAVE_ACTIONS = frozenset({"join", "respond", "fail", "leave", "release", "progress", "touch"})
"""The actions a slave may send (on the slave port)."""

# Longest digit string converted to a Python int; longer ones stay text.
# Python refuses (and would take quadratic time) to convert more than 4300.
_MAX_INT_DIGITS = 4000


class MessageError(Exception):
    """A frame or message that breaks the protocol; becomes an error frame.

    :param code: the error code, one of `ERROR_CODES`.
    :param reason: what was wrong, for people to read; anything of the
        peer's it quotes should go through `quoted`.
    :param job_id: the id of the job the error concerns, if any.
    """

    def __init__(self, code: str, reason: str, job_id: Optional[str] = None):
        super().__init__(code, reason, job_id)
        self.code = code
        self.reason = reason
        self.job_id = job_id


class RawNumber:
    """A JSON number kept as its original text because no Python number
    represents it exactly (a huge integer, or a float beyond a double).

    :param text: the number exactly as the peer wrote it.
    """

    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RawNumber) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)

    def __repr__(self) -> str:
        return f"RawNumber({self.text!r})"


def _parse_int(text: str):
    if len(text) > _MAX_INT_DIGITS:
        return RawNumber(text)
    return int(text)


def _parse_float(text: str):
    value = float(text)
    if math.isinf(value):
        return RawNumber(text)
    return value


_plain_loads = json.loads
_fast_dumps = json.JSONEncoder(
    separators=(",", ":"), allow_nan=False, check_circular=False
).encode
_utf8_dumps = json.JSONEncoder(
    separators=(",", ":"), allow_nan=False, check_circular=False, ensure_ascii=False
).encode

_TYPED_LIMIT = _MAX_INT_DIGITS
"""Frames up to this many bytes are decoded by msgspec in one go (they
cannot hold an integer `_parse_int` would keep as text)."""

_SCAN_LIMIT = 64 * 1024
"""Frames up to this many bytes that msgspec refuses are decided by the
scanner (a few milliseconds on CPython at most)."""

_BODY_VIEWS = platform.python_implementation() == "CPython"
"""Whether a body the scanner found is a view of its frame rather than a
copy.  On PyPy a view saves nothing (the copy is made when the body is
spliced into the frame that carries it on) and costs time."""

MESSAGE_FIELDS = ("action", "id", "type", "body", "priority", "timeout", "reason", "ref",
                  "detach", "delay", "at", "retries", "backoff", "offset", "limit", "unique",
                  "done", "total", "data")
"""The fields of a request that Gloom reads; any others are ignored."""
_FIELD_KEYS = {name.encode("ascii"): name for name in MESSAGE_FIELDS}


class _Composite:
    __slots__ = ()

    def __repr__(self) -> str:
        return "COMPOSITE"


COMPOSITE = _Composite()
"""What a field other than the body holds when the peer sent a long array or
object there (a short one is decoded): never a string or a number."""

if msgspec is not None:
    MISSING = msgspec.UNSET

    class Message(msgspec.Struct):
        """A request's fields; ``MISSING`` where the request has none.  The
        body and the ref are their encoded JSON (bytes-like), as sent."""

        action: Any = msgspec.UNSET
        id: Any = msgspec.UNSET
        type: Any = msgspec.UNSET
        body: msgspec.Raw = msgspec.UNSET
        priority: Any = msgspec.UNSET
        timeout: Any = msgspec.UNSET
        reason: Any = msgspec.UNSET
        ref: msgspec.Raw = msgspec.UNSET
        detach: Any = msgspec.UNSET
        delay: Any = msgspec.UNSET
        at: Any = msgspec.UNSET
        retries: Any = msgspec.UNSET
        backoff: Any = msgspec.UNSET
        offset: Any = msgspec.UNSET
        limit: Any = msgspec.UNSET
        unique: Any = msgspec.UNSET
        done: Any = msgspec.UNSET
        total: Any = msgspec.UNSET
        data: msgspec.Raw = msgspec.UNSET

    class _RawFields(msgspec.Struct):
        """A request's fields, each as its raw JSON text."""

        action: msgspec.Raw = msgspec.UNSET
        id: msgspec.Raw = msgspec.UNSET
        type: msgspec.Raw = msgspec.UNSET
        body: msgspec.Raw = msgspec.UNSET
        priority: msgspec.Raw = msgspec.UNSET
        timeout: msgspec.Raw = msgspec.UNSET
        reason: msgspec.Raw = msgspec.UNSET
        ref: msgspec.Raw = msgspec.UNSET
        detach: msgspec.Raw = msgspec.UNSET
        delay: msgspec.Raw = msgspec.UNSET
        at: msgspec.Raw = msgspec.UNSET
        retries: msgspec.Raw = msgspec.UNSET
        backoff: msgspec.Raw = msgspec.UNSET
        offset: msgspec.Raw = msgspec.UNSET
        limit: msgspec.Raw = msgspec.UNSET
        unique: msgspec.Raw = msgspec.UNSET
        done: msgspec.Raw = msgspec.UNSET
        total: msgspec.Raw = msgspec.UNSET
        data: msgspec.Raw = msgspec.UNSET

    _fast_decode = msgspec.json.Decoder(Message).decode
    _raw_fields_decode = msgspec.json.Decoder(_RawFields).decode
    _raw_decode = msgspec.json.Decoder(msgspec.Raw).decode
    _fast_encode = msgspec.json.encode

    def _raw_views_follow_bytearrays() -> bool:
        """Whether msgspec's Raw values decoded from a bytearray see later
        changes to it (they are views, not copies)."""
        data = bytearray(b'{"body":0}')
        fields = _raw_fields_decode(data)
        data[8] = ord("1")
        return bytes(fields.body) == b"1"

    _RAW_VIEWS_FOLLOW_BYTEARRAYS = _raw_views_follow_bytearrays()
else:

    class _Missing:
        def __repr__(self) -> str:
            return "MISSING"

    MISSING = _Missing()

    class Message:
        """A request's fields; ``MISSING`` where the request has none.  The
        body and the ref are their encoded JSON (bytes-like), as sent."""

        __slots__ = MESSAGE_FIELDS

        def __init__(self, action=MISSING, id=MISSING, type=MISSING, body=MISSING,
                     priority=MISSING, timeout=MISSING, reason=MISSING, ref=MISSING,
                     detach=MISSING, delay=MISSING, at=MISSING, retries=MISSING,
                     backoff=MISSING, offset=MISSING, limit=MISSING, unique=MISSING,
                     done=MISSING, total=MISSING, data=MISSING):
            self.action = action
            self.id = id
            self.type = type
            self.body = body
            self.priority = priority
            self.timeout = timeout
            self.reason = reason
            self.ref = ref
            self.detach = detach
            self.delay = delay
            self.at = at
            self.retries = retries
            self.backoff = backoff
            self.offset = offset
            self.limit = limit
            self.unique = unique
            self.done = done
            self.total = total
            self.data = data

    _fast_decode = None
    _fast_encode = None


def message(**fields) -> "Message":
    """A `Message` from decoded field values (a body is encoded here).

    :param fields: the message's fields by name, such as ``action="submit"``;
        names not in `MESSAGE_FIELDS` are left out, ``body`` is any value
        `encode_body` takes (and so is ``data``), and ``ref`` any value
        `encode_value` takes.
    :raises MessageError: if the body nests too deeply.
    """
    job_id = fields.get("id")
    for raw in ("body", "data"):
        if raw in fields:
            fields[raw] = encode_body(fields[raw], job_id if type(job_id) is str else None)
    if "ref" in fields:
        fields["ref"] = encode_value(fields["ref"])
    return Message(**{name: value for name, value in fields.items() if name in MESSAGE_FIELDS})


def decode(frame: bytes) -> "Message":
    """Parse one frame into a `Message`, or raise `MessageError`.

    :param frame: the frame's bytes, without its length prefix (any
        bytes-like object).
    :returns: the request's fields, checked only for being valid JSON in an
        object; the functions below check each field.
    :raises MessageError: with code `INVALID_JSON` or `INVALID_MESSAGE`.
    """
    if _fast_decode is not None and len(frame) <= MAX_DEPTH and frame.isascii():
        # Most frames: too short to nest too deeply, and ASCII, so valid UTF-8.
        try:
            return _fast_decode(frame)
        except (msgspec.MsgspecError, RecursionError):
            return _scanned(bytes(frame))
    return _decode(frame)


def _decode(frame: bytes) -> "Message":
    if type(frame) is not bytes:
        frame = bytes(frame)
    if _fast_decode is None:
        return _scanned(frame)  # which checks UTF-8 as it goes
    if not frame.isascii():
        _check_utf8(frame)
    if len(frame) > _TYPED_LIMIT:
        return _decode_large(frame)
    try:
        decoded = _fast_decode(frame)
    except (msgspec.MsgspecError, RecursionError):
        return _scanned(frame)
    deep = _nests_too_deeply(frame)
    if deep is None:
        return _scanned(frame)
    if deep:
        raise _too_deep()
    return decoded


def _check_utf8(frame: bytes) -> None:
    bad = rawjson.first_invalid_utf8(frame)
    if bad is not None:
        raise MessageError(INVALID_JSON, f"frame is not valid UTF-8 (bad byte at offset {bad})")


def _too_deep() -> MessageError:
    return MessageError(INVALID_JSON, "frame nests too deeply")


def _not_an_object() -> MessageError:
    return MessageError(INVALID_MESSAGE, "message must be a JSON object")


def _scanned(frame: bytes) -> "Message":
    """Decode a frame with the scanner: the body is a view of the frame."""
    try:
        spans = rawjson.scan_object(frame, _FIELD_KEYS)
    except (rawjson.JSONError, rawjson.NestsTooDeeply, rawjson.NotAnObject) as e:
        if not frame.isascii():
            _check_utf8(frame)  # invalid UTF-8 is what is said first
        if type(e) is rawjson.NestsTooDeeply:
            raise _too_deep() from None
        if type(e) is rawjson.NotAnObject:
            raise _not_an_object() from None
        raise MessageError(INVALID_JSON, f"frame is not valid JSON: {e}") from None
    fields = {}
    for name, (start, end) in spans.items():
        if name == "body" or name == "data":
            fields[name] = memoryview(frame)[start:end] if _BODY_VIEWS else frame[start:end]
        elif name == "ref":
            fields[name] = frame[start:end]
        elif frame[start] == 34 and frame.find(b"\\", start, end) < 0:
            fields[name] = frame[start + 1 : end - 1].decode("utf-8")
        else:
            fields[name] = _scalar(frame[start:end])
    return Message(**fields)


def _decode_large(frame: bytes) -> "Message":
    """Decode a frame over `_TYPED_LIMIT` bytes with msgspec, every field
    as raw text, without building any value it holds (CPython)."""
    target = frame
    if b"\\ud" in frame or b"\\uD" in frame:
        # Perhaps a lone surrogate escape, which msgspec refuses: check a copy
        # holding other escapes of the same length in its place.
        if not _RAW_VIEWS_FOLLOW_BYTEARRAYS:
            return _scanned(frame)
        target = bytearray(frame.replace(b"\\ud", b"\\ue").replace(b"\\uD", b"\\uE"))
    try:
        raw = _raw_fields_decode(target)
    except RecursionError:
        return _refused_as_deep(frame, target)
    except msgspec.ValidationError:  # valid or not, it is no object
        if len(frame) <= _SCAN_LIMIT:
            return _scanned(frame)
        try:
            _raw_decode(target)
        except RecursionError:
            return _refused_as_deep(frame, target)
        except msgspec.MsgspecError as e:
            raise MessageError(INVALID_JSON, f"frame is not valid JSON: {e}") from None
        deep = _nests_too_deeply(target)
        if deep is None:
            return _scanned(frame)
        raise _too_deep() if deep else _not_an_object()
    except msgspec.MsgspecError as e:
        if len(frame) <= _SCAN_LIMIT:
            return _scanned(frame)
        raise MessageError(INVALID_JSON, f"frame is not valid JSON: {e}") from None
    deep = _nests_too_deeply(target)
    if deep is None:
        return _scanned(frame)
    if deep:
        raise _too_deep()
    if target is not frame:
        target[:] = frame  # the Raw values are views of target: now of what was sent
    fields = {}
    for name in MESSAGE_FIELDS:
        value = getattr(raw, name)
        if value is not MISSING:
            if name == "body" or name == "data":
                fields[name] = value
            elif name == "ref":
                fields[name] = bytes(value)
            else:
                fields[name] = _scalar(bytes(value))
    return Message(**fields)


def _refused_as_deep(frame: bytes, target) -> "Message":
    """msgspec ran out of recursion: refuse, if the frame really nests
    deeper than `MAX_DEPTH` (msgspec's limit is much higher)."""
    if len(frame) > _SCAN_LIMIT and _nests_too_deeply(target):
        raise _too_deep()
    return _scanned(frame)


def _nests_too_deeply(data) -> Optional[bool]:
    """Whether JSON text msgspec accepted nests deeper than `MAX_DEPTH`
    (None if that cannot be told here).

    msgspec refuses what nests deeper than the recursion it has left at the
    point of the call.  That is measured here, and the text is checked
    wrapped in arrays enough to leave it `MAX_DEPTH` levels; both calls
    happen in this function, so both have the same recursion left.
    """
    if len(data) <= MAX_DEPTH or data.count(b"[") + data.count(b"{") <= MAX_DEPTH:
        return False
    decode = _raw_decode
    good, bad = 0, None  # deepest nesting known to decode, shallowest known not to
    depth = MAX_DEPTH + 1
    while bad is None or bad - good > 1:
        try:
            decode(b"[" * depth + b"]" * depth)
        except RecursionError:
            bad = depth
        else:
            good = depth
        if bad is None:
            if depth >= 1 << 16:
                return None  # no recursion limit to speak of
            depth *= 2
        else:
            depth = (good + bad) // 2
    if good < MAX_DEPTH:
        return None
    pad = good - MAX_DEPTH
    try:
        decode(b"".join((b"[" * pad, data, b"]" * pad)))
    except RecursionError:
        return True
    except msgspec.MsgspecError:
        return None
    return False


def _scalar(raw: bytes) -> Any:
    """The value of a field other than the body, from its JSON text."""
    first = raw[0]
    if first == 34:  # a string
        if 92 in raw:
            return _plain_loads(raw)
        return raw[1:-1].decode("utf-8")
    if first == 123 or first == 91:
        if len(raw) <= _TYPED_LIMIT:
            try:
                return _plain_loads(raw)
            except RecursionError:
                pass
        return COMPOSITE
    if first == 116:
        return True
    if first == 102:
        return False
    if first == 110:
        return None
    text = raw.decode("ascii")
    if 46 in raw or 101 in raw or 69 in raw:
        return _parse_float(text)
    return _parse_int(text)


def _slow_parts(value: Any) -> Iterator[str]:
    """Encode a value holding `RawNumber` values, which the standard
    library's encoder cannot, as pieces of JSON text."""
    if type(value) is RawNumber:
        yield value.text
    elif type(value) is dict:
        yield "{"
        first = True
        for key, item in value.items():
            if not first:
                yield ","
            first = False
            yield _utf8_dumps(key)
            yield ":"
            yield from _slow_parts(item)
        yield "}"
    elif type(value) is list:
        yield "["
        for index, item in enumerate(value):
            if index:
                yield ","
            yield from _slow_parts(item)
        yield "]"
    else:
        yield _utf8_dumps(value)


def encode_id(job_id: str) -> bytes:
    """A job id (or type) as JSON, to be spliced into frames: UTF-8, no
    longer than the id in UTF-8 plus its quotes and escapes.

    :param job_id: the id, as `required_name` returned it.
    :returns: the JSON string, quotes included.
    """
    if job_id.isascii():
        if _fast_encode is not None:
            return _fast_encode(job_id)
        return _fast_dumps(job_id).encode("ascii")
    return _utf8_dumps(job_id).encode("utf-8", "backslashreplace")


def encode_value(value: Any) -> bytes:
    """Encode a decoded JSON value back to compact JSON in UTF-8.

    Characters are written as themselves, not as ``\\uXXXX`` escapes (which
    would make the text up to three times longer); a lone surrogate, which
    UTF-8 cannot hold, is written as its ``\\uXXXX`` escape.

    :param value: a value as ``json.loads`` returns them, which may also
        hold `RawNumber` values.
    :raises RecursionError: if the value nests too deeply to encode.
    """
    try:
        text = _fast_dumps(value)  # the faster on PyPy, and the same for ASCII
        if "\\u" in text:
            text = _utf8_dumps(value)
    except TypeError:
        text = "".join(_slow_parts(value))
    return text.encode("utf-8", "backslashreplace")


def encode_body(value: Any, job_id: Optional[str] = None) -> bytes:
    """Encode a body given as a Python value; refuse one that nests too deeply.

    :param value: the body, as `encode_value` takes it.
    :param job_id: the id of the job it belongs to, named in the error.
    :raises MessageError: with code `INVALID_MESSAGE` if it nests too deeply.
    """
    try:
        return encode_value(value)
    except RecursionError:
        raise MessageError(
            INVALID_MESSAGE, "field 'body' nests too deeply", job_id
        ) from None


# --- reading fields -------------------------------------------------------


def action_of(message: "Message") -> str:
    """The message's ``action``, which must be a string.

    :raises MessageError: if it is missing or not a string.
    """
    action = message.action
    if action is MISSING:
        raise MessageError(INVALID_MESSAGE, "missing field 'action'")
    if type(action) is not str:
        raise MessageError(INVALID_MESSAGE, "field 'action' must be a string")
    return action


def required_string(
    message: "Message", field: str, job_id: Optional[str] = None, allow_empty: bool = False
) -> str:
    """A field that must be present and a string of valid Unicode (no lone
    surrogates), non-empty unless allowed.

    :param message: the request, from `decode`.
    :param field: the field's name, one of `MESSAGE_FIELDS`.
    :param job_id: the id of the job the request concerns, named in the
        error.
    :param allow_empty: whether an empty string will do.
    :raises MessageError: with code `INVALID_MESSAGE` if the field is not
        such a string.
    """
    value = getattr(message, field)
    if type(value) is not str or not value:
        if value is MISSING:
            raise MessageError(INVALID_MESSAGE, f"missing field {field!r}", job_id)
        if type(value) is not str:
            raise MessageError(INVALID_MESSAGE, f"field {field!r} must be a string", job_id)
        if not allow_empty:
            raise MessageError(INVALID_MESSAGE, f"field {field!r} must not be empty", job_id)
    if not value.isascii():
        _utf8_length(value, field, job_id)
    return value


def required_name(message: "Message", field: str, job_id: Optional[str] = None) -> str:
    """An id or a type: a non-empty string of valid Unicode, at most
    `MAX_NAME_BYTES` bytes long in UTF-8.

    :param message: the request, from `decode`.
    :param field: the field's name: ``"id"`` or ``"type"``.
    :param job_id: the id of the job the request concerns, named in the
        error.
    :raises MessageError: with code `INVALID_MESSAGE` if the field is not
        such a string.
    """
    value = getattr(message, field)
    if type(value) is str and value and len(value) <= MAX_NAME_BYTES and value.isascii():
        return value
    value = required_string(message, field, job_id)
    size = len(value) if value.isascii() else _utf8_length(value, field, job_id)
    if size > MAX_NAME_BYTES:
        raise MessageError(
            INVALID_MESSAGE, f"field {field!r} is longer than {MAX_NAME_BYTES} bytes", job_id
        )
    return value


def optional_name(message: "Message", field: str) -> Optional[str]:
    """Like `required_name`, but None when the field is absent.

    :param message: the request, from `decode`.
    :param field: the field's name: ``"id"`` or ``"type"``.
    """
    if getattr(message, field) is MISSING:
        return None
    return required_name(message, field)


def _utf8_length(value: str, field: str, job_id: Optional[str]) -> int:
    try:
        return len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise MessageError(
            INVALID_MESSAGE,
            f"field {field!r} is not valid Unicode (it holds a lone surrogate)",
            job_id,
        ) from None


def required_body(message: "Message", job_id: Optional[str] = None):
    """The message's ``body`` (any JSON value, null included) as encoded JSON
    (bytes-like): the peer's own text, for a request from `decode`.

    :param message: the request, from `decode`.
    :param job_id: the id of the job the request concerns, named in the
        error.
    :raises MessageError: if the request has no body.
    """
    body = message.body
    if body is MISSING:
        raise MessageError(INVALID_MESSAGE, "missing field 'body'", job_id)
    return body


def optional_priority(message: "Message", job_id: Optional[str] = None) -> int:
    """The message's ``priority``: a JSON integer (not a bool or float), default 0.

    :param message: the request, from `decode`.
    :param job_id: the id of the job the request concerns, named in the
        error.
    :raises MessageError: if the priority is not an integer Python holds.
    """
    priority = message.priority
    if type(priority) is not int:
        if priority is MISSING:
            return 0
        if type(priority) is RawNumber and priority.text.lstrip("-").isdigit():
            raise MessageError(
                INVALID_MESSAGE, "field 'priority' is out of range", job_id
            )
        raise MessageError(
            INVALID_MESSAGE, "field 'priority' must be an integer", job_id
        )
    return priority


def optional_timeout(message: "Message", job_id: Optional[str] = None) -> Optional[float]:
    """The message's ``timeout``: seconds, a positive JSON number, or None if absent.

    :param message: the request, from `decode`.
    :param job_id: the id of the job the request concerns, named in the
        error.
    :raises MessageError: if the timeout is not a number of seconds above 0
        and at most `MAX_TIMEOUT`.
    """
    timeout = message.timeout
    if timeout is MISSING:
        return None
    if type(timeout) not in (int, float) or not 0 < timeout <= MAX_TIMEOUT:
        raise MessageError(
            INVALID_MESSAGE,
            f"field 'timeout' must be a positive number of seconds, at most {MAX_TIMEOUT}",
            job_id,
        )
    return timeout


def optional_flag(message: "Message", field: str, job_id: Optional[str] = None) -> bool:
    """A ``true``/``false`` field such as ``detach``; False if absent.

    :param message: the request, from `decode`.
    :param field: the field's name.
    :param job_id: the id of the job the request concerns, named in the error.
    :raises MessageError: if the field is there and not a JSON boolean.
    """
    value = getattr(message, field)
    if value is MISSING:
        return False
    if type(value) is not bool:
        raise MessageError(INVALID_MESSAGE, f"field {field!r} must be true or false", job_id)
    return value


def optional_run_at(message: "Message", now: float, job_id: Optional[str] = None) -> Optional[float]:
    """When a submit's job may first run: ``now`` plus its ``delay``, or its
    ``at`` (a Unix time; one already past means now), or None to run as
    soon as a slave is free.

    :param message: the request, from `decode`.
    :param now: the daemon's clock, in seconds since the epoch.
    :param job_id: the id of the job, named in the error.
    :raises MessageError: if both are given, or either is not a number in range.
    """
    delay, at = message.delay, message.at
    if delay is MISSING and at is MISSING:
        return None
    if delay is not MISSING and at is not MISSING:
        raise MessageError(INVALID_MESSAGE, "give 'delay' or 'at', not both", job_id)
    if delay is not MISSING:
        if type(delay) not in (int, float) or not 0 <= delay <= MAX_DELAY:
            raise MessageError(
                INVALID_MESSAGE,
                f"field 'delay' must be a number of seconds from 0 to {MAX_DELAY}", job_id)
        return now + delay if delay else None
    if type(at) not in (int, float) or not math.isfinite(at) or at < 0:
        raise MessageError(INVALID_MESSAGE,
                           "field 'at' must be a Unix time: seconds since 1970, as a number",
                           job_id)
    if at > now + MAX_DELAY:
        raise MessageError(INVALID_MESSAGE,
                           f"field 'at' is more than {MAX_DELAY} seconds (a year) ahead", job_id)
    return at if at > now else None


def optional_count(message: "Message", field: str, default: Optional[int], least: int,
                   most: int, job_id: Optional[str] = None) -> Optional[int]:
    """A whole-number field such as ``retries`` or ``limit``, or ``default``.

    :param message: the request, from `decode`.
    :param field: the field's name.
    :param default: what an absent field means.
    :param least: the smallest value allowed.
    :param most: the largest value allowed.
    :param job_id: the id of the job the request concerns, named in the error.
    :raises MessageError: if the field is not an integer from ``least`` to ``most``.
    """
    value = getattr(message, field)
    if value is MISSING:
        return default
    if type(value) is not int or not least <= value <= most:
        raise MessageError(
            INVALID_MESSAGE, f"field {field!r} must be an integer from {least} to {most}", job_id)
    return value


def optional_unique(message: "Message", job_id: Optional[str] = None) -> Optional[str]:
    """A submit's ``unique`` key, or None: a string of 1 to `MAX_NAME_BYTES`
    bytes of UTF-8.

    :param message: the request, from `decode`.
    :param job_id: the id of the job, named in the error.
    :raises MessageError: if the key is anything else.
    """
    key = message.unique
    if key is MISSING:
        return None
    if type(key) is not str or not key:
        raise MessageError(INVALID_MESSAGE, "field 'unique' must be a non-empty string", job_id)
    if _utf8_length(key, "unique", job_id) > MAX_NAME_BYTES:
        raise MessageError(
            INVALID_MESSAGE, f"field 'unique' is longer than {MAX_NAME_BYTES} bytes", job_id)
    return key


def progress_report(message: "Message", job_id: Optional[str] = None) -> bytes:
    """A slave's ``progress`` as the JSON object a master receives:
    ``done``, ``total`` (numbers from 0) and ``data`` (any JSON value, as
    sent), whichever the slave sent, at least one.

    :param message: the request, from `decode`.
    :param job_id: the id of the job, named in the error.
    :raises MessageError: if none is there, or a count is not a number from 0.
    """
    parts = []
    for field in ("done", "total"):
        value = getattr(message, field)
        if value is MISSING:
            continue
        if type(value) not in (int, float) or not 0 <= value < math.inf:
            if type(value) is RawNumber:
                raise MessageError(INVALID_MESSAGE, f"field {field!r} is out of range", job_id)
            raise MessageError(
                INVALID_MESSAGE, f"field {field!r} must be a number from 0", job_id)
        parts.append(b'"%s":%s' % (field.encode("ascii"), encode_value(value)))
    data = message.data
    if data is not MISSING:
        parts.append(b'"data":' + bytes(data))
    if not parts:
        raise MessageError(
            INVALID_MESSAGE, "a progress needs 'done', 'total' or 'data'", job_id)
    return b"{" + b",".join(parts) + b"}"


_MAX_REF_TEXT = 6 * MAX_NAME_BYTES + 2
"""The longest JSON text of a string ref that can be valid: a byte of UTF-8
takes at most six characters to write (``\\u00e9``), plus the quotes."""


def checked_ref(message: "Message") -> bytes:
    """The message's ``ref``, checked, as the JSON text the peer sent: what
    the reply to the request echoes.  Only call it when the ref is present.

    A ref is a string of valid Unicode, at most `MAX_NAME_BYTES` bytes
    long in UTF-8 (empty allowed), or an integer (not a bool, not a float)
    from ``-MAX_REF - 1`` to `MAX_REF`.

    :param message: the request, from `decode`, with a ``ref``.
    :raises MessageError: with code `INVALID_MESSAGE` if the ref is
        anything else.
    """
    raw = message.ref
    first = memoryview(raw)[0]
    if first == 34:  # a string
        if len(raw) > _MAX_REF_TEXT:  # too long however it is written; refused without a copy
            raise MessageError(INVALID_MESSAGE, f"field 'ref' is longer than {MAX_NAME_BYTES} bytes")
        raw = bytes(raw)
        if 92 in raw or not raw.isascii():
            size = _utf8_length(_plain_loads(raw), "ref", None)
        else:
            size = len(raw) - 2
        if size > MAX_NAME_BYTES:
            raise MessageError(INVALID_MESSAGE, f"field 'ref' is longer than {MAX_NAME_BYTES} bytes")
        return raw
    if first == 45 or 48 <= first <= 57:  # a number
        raw = bytes(raw)
        if 46 in raw or 101 in raw or 69 in raw:  # ".", "e", "E": not an integer
            raise MessageError(INVALID_MESSAGE, "field 'ref' must be a string or an integer")
        if len(raw) > 20 or not -MAX_REF - 1 <= int(raw) <= MAX_REF:
            raise MessageError(
                INVALID_MESSAGE,
                f"field 'ref' is out of range: an integer ref must be from {-MAX_REF - 1} to {MAX_REF}",
            )
        return raw
    raise MessageError(INVALID_MESSAGE, "field 'ref' must be a string or an integer")


# --- writing frames -------------------------------------------------------

OK = b'{"ok":true}'
"""The reply to a request that succeeded and has nothing more to say."""


def ack(id_json: bytes) -> bytes:
    """Accepted a submit or a cancel.

    :param id_json: the job's id, from `encode_id`.
    """
    return b'{"ok":true,"id":' + id_json + b"}"


def with_ref(frame: bytes, ref) -> bytes:
    """A reply frame with the request's ``ref`` added as its last field.

    :param frame: a frame holding a JSON object (any reply or error frame).
    :param ref: the request's ref as JSON text, from `checked_ref`.
    """
    return b"".join((frame[:-1], b',"ref":', ref, b"}"))


def stats(figures: dict) -> bytes:
    """The daemon's figures, for the stats action.

    :param figures: the figures, a JSON-able dict.
    """
    return encode_value({"ok": True, "stats": figures})


def status(job_id: str, figures: dict) -> bytes:
    """The reply to ``status``: the job's id and its figures; a ``result``
    (an answer) or ``progress`` among them is JSON text, spliced in as it is.

    :param job_id: the job's id.
    :param figures: ``state`` and what else applies.
    """
    raw = [(name, figures.pop(name)) for name in ("progress", "result") if name in figures]
    frame = encode_value({"ok": True, "id": job_id, **figures})
    if not raw:
        return frame
    return b"".join((frame[:-1], *(b',"%s":%s' % (name.encode("ascii"), bytes(value))
                                   for name, value in raw), b"}"))


def job(id_json: bytes, type_json: bytes, body) -> bytes:
    """Hand a job to a slave.

    :param id_json: the job's id, from `encode_id`.
    :param type_json: the job's type, from `encode_id`.
    :param body: the body as encoded JSON (bytes-like), as the master sent
        it.
    """
    return job_from_parts(id_json, job_type_part(type_json), body)


def job_type_part(type_json: bytes) -> bytes:
    """The part of a job frame from its type to its body, which every job
    of the type shares (see `job_from_parts`).

    :param type_json: the job's type, from `encode_id`.
    """
    return b',"type":' + type_json + b',"body":'


def job_from_parts(id_json: bytes, type_part: bytes, body) -> bytes:
    """Hand a job to a slave: the frame `job` builds, from its type's part.

    :param id_json: the job's id, from `encode_id`.
    :param type_part: from `job_type_part`.
    :param body: the body as encoded JSON (bytes-like), as the master sent it.
    """
    return b'{"action":"job","id":' + id_json + type_part + body + b"}"


def progress(id_json: bytes, report: bytes) -> bytes:
    """Relay a slave's progress on a job to its master.

    :param id_json: the job's id (the master's), from `encode_id`.
    :param report: the progress object, from `progress_report`.
    """
    return b'{"id":' + id_json + b',"progress":' + report + b"}"


def coalesced_ack(id_json: bytes) -> bytes:
    """Accepted a submit by attaching it to a running or queued job with
    the same type and ``unique`` key.

    :param id_json: the submitter's id for the job, from `encode_id`.
    """
    return b'{"ok":true,"id":' + id_json + b',"coalesced":true}'


def answer(id_json: bytes, body) -> bytes:
    """Deliver a slave's answer to the master.

    :param id_json: the job's id, from `encode_id`.
    :param body: the answer as encoded JSON (bytes-like), as the slave sent
        it.
    """
    return b'{"id":' + id_json + b',"body":' + body + b"}"


def error(code: str, reason: str, job_id: Optional[str] = None, ref=None) -> bytes:
    """An error frame, naming the job when the error concerns one, and
    echoing the request's ref when it carried one.

    :param code: the error code, one of `ERROR_CODES`.
    :param reason: what was wrong, for people to read.
    :param job_id: the id of the job the error concerns, if any.
    :param ref: the request's ref as JSON text, from `checked_ref`, if any.
    """
    frame = {"error": code, "reason": reason}
    if job_id is not None:
        frame["id"] = job_id
    if ref is None:
        return encode_value(frame)
    return with_ref(encode_value(frame), ref)
