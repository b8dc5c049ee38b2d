"""The Gloom wire format: JSON objects in 4-byte length-prefixed frames.

This module turns frames into validated messages and messages into frames.
It knows nothing about sockets or scheduling.  Bodies are carried as
*encoded* JSON (``bytes``) from the moment they are received, so a body is
serialised exactly once per hop and a body that cannot be re-encoded is
refused when it arrives rather than when it is delivered.

Numbers are carried exactly: integers too long for Python's safe
string-to-int conversion and floats beyond the range of a double are kept as
their original text (`RawNumber`) instead of being rounded or refused.
"""

from __future__ import annotations

import json
import math
from typing import Any, Iterator, Optional

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
)

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
_fast_dumps = json.JSONEncoder(
    separators=(",", ":"), allow_nan=False, check_circular=False
).encode


def decode(frame: bytes) -> dict:
    """Parse one frame into a JSON object, or raise `MessageError`."""
    try:
        text = frame.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MessageError(
            INVALID_JSON, f"frame is not valid UTF-8 (bad byte at offset {e.start})"
        ) from None
    try:
        message = _loads(text)
    except RecursionError:
        raise MessageError(INVALID_JSON, "frame nests too deeply") from None
    except ValueError as e:
        raise MessageError(INVALID_JSON, f"frame is not valid JSON: {e}") from None
    if type(message) is not dict:
        raise MessageError(INVALID_MESSAGE, "message must be a JSON object")
    return message


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


def action_of(message: dict) -> str:
    """The message's "action", which must be a string."""
    if "action" not in message:
        raise MessageError(INVALID_MESSAGE, "missing field 'action'")
    action = message["action"]
    if type(action) is not str:
        raise MessageError(INVALID_MESSAGE, "field 'action' must be a string")
    return action


def required_string(
    message: dict, field: str, job_id: Optional[str] = None, allow_empty: bool = False
) -> str:
    """A field that must be present and a string, non-empty unless allowed."""
    if field not in message:
        raise MessageError(INVALID_MESSAGE, f"missing field {field!r}", job_id)
    value = message[field]
    if type(value) is not str:
        raise MessageError(INVALID_MESSAGE, f"field {field!r} must be a string", job_id)
    if not value and not allow_empty:
        raise MessageError(INVALID_MESSAGE, f"field {field!r} must not be empty", job_id)
    return value


def required_body(message: dict, job_id: Optional[str] = None) -> bytes:
    """The message's "body" (any JSON value, null included), encoded."""
    if "body" not in message:
        raise MessageError(INVALID_MESSAGE, "missing field 'body'", job_id)
    return encode_body(message["body"], job_id)


def optional_priority(message: dict, job_id: Optional[str] = None) -> int:
    """The message's "priority": a JSON integer (not a bool or float), default 0."""
    priority = message.get("priority", 0)
    if type(priority) is not int:
        if type(priority) is RawNumber and priority.text.lstrip("-").isdigit():
            raise MessageError(
                INVALID_MESSAGE, "field 'priority' is out of range", job_id
            )
        raise MessageError(
            INVALID_MESSAGE, "field 'priority' must be an integer", job_id
        )
    return priority


def optional_timeout(message: dict, job_id: Optional[str] = None) -> Optional[float]:
    """The message's "timeout": seconds, a positive JSON number, or None if absent."""
    if "timeout" not in message:
        return None
    timeout = message["timeout"]
    if type(timeout) not in (int, float) or not 0 < timeout < math.inf:
        raise MessageError(
            INVALID_MESSAGE, "field 'timeout' must be a positive number of seconds", job_id
        )
    return timeout


# --- writing frames -------------------------------------------------------

OK = b'{"ok":true}'


def ack(job_id: str) -> bytes:
    """Accepted a submit or a cancel."""
    return b'{"ok":true,"id":' + encode_value(job_id) + b"}"


def stats(figures: dict) -> bytes:
    """The daemon's figures, for the stats action."""
    return encode_value({"ok": True, "stats": figures})


def job(job_id: str, job_type: str, body: bytes) -> bytes:
    """Hand a job to a slave."""
    return (
        b'{"action":"job","id":'
        + encode_value(job_id)
        + b',"type":'
        + encode_value(job_type)
        + b',"body":'
        + body
        + b"}"
    )


def answer(job_id: str, body: bytes) -> bytes:
    """Deliver a slave's answer to the master."""
    return b'{"id":' + encode_value(job_id) + b',"body":' + body + b"}"


def error(code: str, reason: str, job_id: Optional[str] = None) -> bytes:
    """An error frame, naming the job when the error concerns one."""
    frame = {"error": code, "reason": reason}
    if job_id is not None:
        frame["id"] = job_id
    return encode_value(frame)
