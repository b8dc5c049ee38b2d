"""The Gloom wire format: JSON objects in 4-byte length-prefixed frames.

This module turns frames into validated messages and messages into frames.
It knows nothing about sockets or scheduling.  Bodies are carried as
*encoded* JSON (``bytes``) from the moment they are received, so a body is
serialised exactly once per hop and a body that cannot be re-encoded is
refused when it arrives rather than when it is delivered.

Numbers are carried exactly: integers too long for Python's safe
string-to-int conversion and floats beyond the range of a double are kept as
their original text (`RawNumber`) instead of being rounded or refused.

Where msgspec is installed (CPython) a frame is first decoded by it, with the
body kept as raw JSON text that is never turned into Python objects.  Any
frame msgspec refuses, or that is not plain ASCII, goes through the standard
library's decoder instead, which alone decides what is an error and says
why; so both paths accept and refuse exactly the same frames.  PyPy, which
has no msgspec, always uses the standard library.
"""

from __future__ import annotations

import json
import math
from typing import Any, Iterator, Optional

from gloom.quoting import MAX_QUOTED, quoted  # noqa: F401  (part of this module's API)

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
)

MAX_NAME_BYTES = 1024
"""Longest id or type a peer may send, in bytes of UTF-8."""

MAX_TIMEOUT = 30 * 24 * 3600
"""Longest ``timeout`` a submit may ask for, in seconds (30 days)."""


MASTER_ACTIONS = frozenset({"submit", "cancel", "stats"})
SLAVE_ACTIONS = frozenset({"join", "respond", "fail"})

# Longest digit string converted to a Python int; longer ones stay text.
# Python refuses (and would take quadratic time) to convert more than 4300.
_MAX_INT_DIGITS = 4000


class MessageError(Exception):
    """A frame or message that breaks the protocol; becomes an error frame."""

    def __init__(self, code: str, reason: str, job_id: Optional[str] = None):
        super().__init__(code, reason, job_id)
        self.code = code
        self.reason = reason
        self.job_id = job_id


class RawNumber:
    """A JSON number kept as its original text because no Python number
    represents it exactly (a huge integer, or a float beyond a double)."""

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


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


_decoder = json.JSONDecoder(
    parse_int=_parse_int, parse_float=_parse_float, parse_constant=_reject_constant
)
_loads = _decoder.decode
_plain_loads = json.loads
_fast_dumps = json.JSONEncoder(
    separators=(",", ":"), allow_nan=False, check_circular=False
).encode


MESSAGE_FIELDS = ("action", "id", "type", "body", "priority", "timeout", "reason")

if msgspec is not None:
    MISSING = msgspec.UNSET

    class Message(msgspec.Struct):
        """A request's fields; ``MISSING`` where the request has none.  The
        body is its encoded JSON (bytes-like), ready to be carried."""

        action: Any = msgspec.UNSET
        id: Any = msgspec.UNSET
        type: Any = msgspec.UNSET
        body: msgspec.Raw = msgspec.UNSET
        priority: Any = msgspec.UNSET
        timeout: Any = msgspec.UNSET
        reason: Any = msgspec.UNSET

    _fast_decode = msgspec.json.Decoder(Message).decode
    _fast_encode = msgspec.json.encode
else:

    class _Missing:
        def __repr__(self) -> str:
            return "MISSING"

    MISSING = _Missing()

    class Message:
        """A request's fields; ``MISSING`` where the request has none.  The
        body is its encoded JSON (bytes), ready to be carried."""

        __slots__ = MESSAGE_FIELDS

        def __init__(self, **fields):
            for name in MESSAGE_FIELDS:
                setattr(self, name, fields.get(name, MISSING))

    _fast_decode = None
    _fast_encode = None


def message(**fields) -> "Message":
    """A Message from decoded field values (a body is encoded here)."""
    if "body" in fields:
        job_id = fields.get("id")
        fields["body"] = encode_body(fields["body"], job_id if type(job_id) is str else None)
    return Message(**{name: value for name, value in fields.items() if name in MESSAGE_FIELDS})


def decode(frame: bytes) -> "Message":
    """Parse one frame into a `Message`, or raise `MessageError`."""
    if _fast_decode is not None and frame.isascii():
        try:
            return _fast_decode(frame)
        except (msgspec.MsgspecError, RecursionError):
            pass
    try:
        text = frame.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MessageError(
            INVALID_JSON, f"frame is not valid UTF-8 (bad byte at offset {e.start})"
        ) from None
    if "NaN" not in text and "Infinity" not in text:
        # The plain decoder (much the faster on PyPy) is tried first; a
        # frame it refuses, or whose numbers it cannot carry exactly (a
        # float beyond a double fails to re-encode), is decided below.
        try:
            return message(**_json_object(_plain_loads(text)))
        except (ValueError, RecursionError):
            pass
    try:
        decoded = _loads(text)
    except RecursionError:
        raise MessageError(INVALID_JSON, "frame nests too deeply") from None
    except ValueError as e:
        raise MessageError(INVALID_JSON, f"frame is not valid JSON: {e}") from None
    return message(**_json_object(decoded))


def _json_object(decoded: Any) -> dict:
    if type(decoded) is not dict:
        raise MessageError(INVALID_MESSAGE, "message must be a JSON object")
    return decoded


def _slow_parts(value: Any) -> Iterator[str]:
    """Encode a value holding `RawNumber`s; the stdlib encoder cannot."""
    if type(value) is RawNumber:
        yield value.text
    elif type(value) is dict:
        yield "{"
        first = True
        for key, item in value.items():
            if not first:
                yield ","
            first = False
            yield _fast_dumps(key)
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
        yield _fast_dumps(value)


def encode_id(job_id: str) -> bytes:
    """A job id (or type) as ASCII JSON, to be spliced into frames."""
    if _fast_encode is not None and job_id.isascii():
        return _fast_encode(job_id)
    return _fast_dumps(job_id).encode("ascii")


def encode_value(value: Any) -> bytes:
    """Encode a decoded JSON value back to compact ASCII JSON."""
    try:
        return _fast_dumps(value).encode("ascii")
    except TypeError:
        return "".join(_slow_parts(value)).encode("ascii")


def encode_body(value: Any, job_id: Optional[str] = None) -> bytes:
    """Encode a received body for carrying; refuse one that nests too deeply."""
    try:
        return encode_value(value)
    except RecursionError:
        raise MessageError(
            INVALID_MESSAGE, "field 'body' nests too deeply", job_id
        ) from None


# --- reading fields -------------------------------------------------------


def action_of(message: "Message") -> str:
    """The message's "action", which must be a string."""
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
    surrogates), non-empty unless allowed."""
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
    `MAX_NAME_BYTES` bytes long in UTF-8."""
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
    """Like `required_name`, but None when the field is absent."""
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
    """The message's "body" (any JSON value, null included) as encoded JSON."""
    body = message.body
    if body is MISSING:
        raise MessageError(INVALID_MESSAGE, "missing field 'body'", job_id)
    return body


def optional_priority(message: "Message", job_id: Optional[str] = None) -> int:
    """The message's "priority": a JSON integer (not a bool or float), default 0."""
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
    """The message's "timeout": seconds, a positive JSON number, or None if absent."""
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


# --- writing frames -------------------------------------------------------

OK = b'{"ok":true}'


def ack(id_json: bytes) -> bytes:
    """Accepted a submit or a cancel (``id_json`` from `encode_id`)."""
    return b'{"ok":true,"id":' + id_json + b"}"


def stats(figures: dict) -> bytes:
    """The daemon's figures, for the stats action."""
    return encode_value({"ok": True, "stats": figures})


def job(id_json: bytes, type_json: bytes, body) -> bytes:
    """Hand a job to a slave."""
    return b'{"action":"job","id":' + id_json + b',"type":' + type_json + b',"body":' + body + b"}"


def answer(id_json: bytes, body) -> bytes:
    """Deliver a slave's answer to the master."""
    return b'{"id":' + id_json + b',"body":' + body + b"}"


def error(code: str, reason: str, job_id: Optional[str] = None) -> bytes:
    """An error frame, naming the job when the error concerns one."""
    frame = {"error": code, "reason": reason}
    if job_id is not None:
        frame["id"] = job_id
    return encode_value(frame)
