"""Validating JSON text without turning it into Python objects.

`scan_object` checks that some bytes are one JSON object in UTF-8, exactly as
strictly as the standard library's ``json`` reads JSON (but refusing ``NaN``
and ``Infinity``, which are not JSON), and finds where the value of each
top-level member starts and ends, without building any value: a 60 MB body
of ``[{},{},...]`` costs no memory beyond its bytes.  It is a plain loop over
the bytes: PyPy's JIT runs it at 100-600 MB/s (60 MB of the worst shapes,
``[0,0,...]`` after the JIT has been trained on ordinary frames, in about
0.6 s), CPython at 6-16 MB/s.  `gloom.wire` uses it for every frame on PyPy,
and on CPython only for what msgspec cannot decide in small frames (or for
everything, slowly, where msgspec is missing).

`first_invalid_utf8` finds the first byte that is not valid UTF-8, in 1 MiB
pieces, so that checking a large frame never holds more than a few
megabytes of decoded text.

Nesting is limited to `MAX_DEPTH` arrays and objects (the top-level object
counts as one), the same everywhere, so that every interpreter accepts and
refuses the same texts.  The limit is well inside what msgspec and the
standard library can decode.
"""

from __future__ import annotations

import codecs
import json
from typing import Dict, Optional, Tuple

MAX_DEPTH = 512
"""Most arrays and objects one JSON text may nest (the outermost counts)."""

_UTF8_CHUNK = 1 << 20

_WS = bytes(1 if chr(c) in " \t\n\r" else 0 for c in range(256))
_HEX = bytes(1 if chr(c) in "0123456789abcdefABCDEF" else 0 for c in range(256))
# The characters that may follow a backslash, other than "u".
_ESCAPES = bytes(1 if chr(c) in '"\\/bfnrt' else 0 for c in range(256))
_DIGIT = bytes(1 if 48 <= c <= 57 else 0 for c in range(256))
# Every byte except the UTF-8 continuation bytes (0x80-0xBF).
_NOT_CONTINUATION = bytes(c for c in range(256) if not 0x80 <= c <= 0xBF)


class JSONError(ValueError):
    """Not JSON; reads like the standard library's ``json.JSONDecodeError``,
    with the position counted in characters.

    :param msg: what is wrong, without the position.
    :param data: the whole text, to count lines and characters in when the
        error is shown.
    :param pos: where in ``data`` it is wrong, in bytes (None for nowhere
        in particular).
    """

    def __init__(self, msg: str, data: bytes, pos: int):
        self.msg = msg
        self.pos = pos  # in bytes
        self._data = data
        super().__init__(msg, pos)

    def __str__(self) -> str:
        data, pos = self._data, self.pos
        if pos is None:
            return self.msg
        line_start = data.rfind(b"\n", 0, pos) + 1
        lineno = data.count(b"\n", 0, pos) + 1
        colno = _characters(data, line_start, pos) + 1
        return f"{self.msg}: line {lineno} column {colno} (char {_characters(data, 0, pos)})"


_BAD_UTF8 = "Invalid UTF-8"


class NestsTooDeeply(ValueError):
    """Arrays and objects nested more than `MAX_DEPTH` deep."""


class NotAnObject(ValueError):
    """Valid JSON, but not an object."""


def _characters(data: bytes, start: int, end: int) -> int:
    """How many characters the valid UTF-8 in ``data[start:end]`` holds."""
    return end - start - len(data[start:end].translate(None, _NOT_CONTINUATION))


def first_invalid_utf8(data: bytes) -> Optional[int]:
    """The offset of the first byte of ``data`` that is not valid UTF-8
    (a lone surrogate encoded in UTF-8 is not), or None.

    :param data: the bytes to check (bytes or a bytes-like object).
    """
    size = len(data)
    if size <= _UTF8_CHUNK:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            return e.start
        return None
    decode = codecs.utf_8_decode
    view = memoryview(data)
    start = 0
    while start < size:
        end = min(start + _UTF8_CHUNK, size)
        try:
            _, consumed = decode(view[start:end], "strict", end == size)
        except UnicodeDecodeError as e:
            return start + e.start
        start += consumed
    return None


def scan_object(data: bytes, wanted: Dict[bytes, str],
                max_depth: int = MAX_DEPTH) -> Dict[str, Tuple[int, int]]:
    """Check that ``data`` is exactly one JSON object in UTF-8, and
    return where the value of each top-level member whose key ``wanted``
    names starts and ends (the last, when a key is repeated, as
    ``json.loads`` keeps the last).

    What is not valid UTF-8 is refused too, but not necessarily as such, nor
    where it starts: when ``data`` is refused and is not ASCII, see
    `first_invalid_utf8` first.

    :param data: the JSON text.
    :param wanted: maps the keys to look for, as bytes (unescaped, ASCII),
        to the names to return them under.
    :param max_depth: how many arrays and objects may nest, the top-level
        object included.
    :returns: ``{name: (start, end)}``, the slice of ``data`` that holds
        each wanted member's value; members not in ``wanted`` are checked
        and skipped.
    :raises JSONError: if ``data`` is not JSON.
    :raises NestsTooDeeply: if it nests more than ``max_depth`` deep.
    :raises NotAnObject: if it is valid JSON but not an object (checked
        after the whole text).
    """
    n = len(data)
    ws = _WS
    i = 0
    while i < n and ws[data[i]]:
        i += 1
    if i >= n or data[i] != 123:
        i = skip_value(data, i, max_depth)
        while i < n and ws[data[i]]:
            i += 1
        if i != n:
            raise JSONError("Extra data", data, i)
        raise NotAnObject("not a JSON object")
    if max_depth < 1:
        raise NestsTooDeeply(f"more than {max_depth} arrays and objects nested")
    # The members of the top-level object.  Their values are skipped by
    # skip_value, but for strings (ids, types, actions), read here: PyPy's
    # JIT runs a loop in a called function slowly when it runs only a few
    # times per call, and each trace then stays fit for what it does.
    found: Dict[str, Tuple[int, int]] = {}
    member = None  # the name of the wanted member whose value is being read
    start = 0  # where that value starts
    i += 1
    while i < n and ws[data[i]]:
        i += 1
    if i < n and data[i] == 125:  # {}
        i += 1
    else:
        want_key = True
        while True:
            if i >= n or data[i] != 34:
                if want_key:
                    raise JSONError("Expecting property name enclosed in double quotes", data, i)
                i = skip_value(data, i, max_depth - 1)
            else:
                # The string loop is written out here and in skip_value:
                # as a function it made scanning a typical request twice as
                # slow on PyPy, whose JIT does not inline a call holding a loop.
                begin = i
                i += 1
                while True:
                    if i >= n:
                        raise JSONError("Unterminated string starting at", data, begin)
                    c = data[i]
                    if c == 34:
                        break
                    if c == 92:
                        i += _escape_size(data, i, n)
                    elif c < 128:
                        if c < 32:
                            raise JSONError("Invalid control character at", data, i)
                        i += 1
                    else:
                        i += _utf8_size(data, i, n)
                i += 1
                if want_key:
                    want_key = False
                    member = _member(data, begin, i, wanted)
                    while i < n and ws[data[i]]:
                        i += 1
                    if i >= n or data[i] != 58:
                        raise JSONError("Expecting ':' delimiter", data, i)
                    i += 1
                    while i < n and ws[data[i]]:
                        i += 1
                    start = i
                    continue
            # A member's value ended at i.
            if member is not None:
                found[member] = (start, i)
                member = None
            while i < n and ws[data[i]]:
                i += 1
            if i < n and data[i] == 44:
                want_key = True
                i += 1
                while i < n and ws[data[i]]:
                    i += 1
                continue
            if i < n and data[i] == 125:
                i += 1
                break
            raise JSONError("Expecting ',' delimiter", data, i)
    while i < n and ws[data[i]]:
        i += 1
    if i != n:
        raise JSONError("Extra data", data, i)
    return found


def skip_value(data: bytes, i: int, max_depth: int = MAX_DEPTH) -> int:
    """The index just past the JSON value that starts at ``data[i]``,
    checked as `scan_object` checks its text.

    :param data: the JSON text.
    :param i: where the value starts (whitespace before it is skipped).
    :param max_depth: how many arrays and objects the value may nest.
    :raises JSONError: if no valid JSON value starts there.
    :raises NestsTooDeeply: if it nests more than ``max_depth`` deep.
    """
    n = len(data)
    ws, digit = _WS, _DIGIT
    stack = bytearray(max_depth + 2)  # the opening byte of each open container
    depth = 0
    want_key = False  # a key (after "{" or "," in an object) rather than a value
    while True:
        # A value starts at i, after any whitespace; or a key, if want_key.
        while i < n and ws[data[i]]:
            i += 1
        if i >= n:
            if want_key:
                raise JSONError("Expecting property name enclosed in double quotes", data, i)
            raise JSONError("Expecting value", data, i)
        c = data[i]
        if c == 34:  # a string (the loop as in scan_object, inline for PyPy)
            begin = i
            i += 1
            while True:
                if i >= n:
                    raise JSONError("Unterminated string starting at", data, begin)
                c = data[i]
                if c == 34:
                    break
                if c == 92:
                    i += _escape_size(data, i, n)
                elif c < 128:
                    if c < 32:
                        raise JSONError("Invalid control character at", data, i)
                    i += 1
                else:
                    i += _utf8_size(data, i, n)
            i += 1
            if want_key:
                want_key = False
                while i < n and ws[data[i]]:
                    i += 1
                if i >= n or data[i] != 58:
                    raise JSONError("Expecting ':' delimiter", data, i)
                i += 1
                continue
        elif want_key:
            raise JSONError("Expecting property name enclosed in double quotes", data, i)
        elif c == 123 or c == 91:  # { or [
            depth += 1
            if depth > max_depth:
                raise NestsTooDeeply(f"more than {max_depth} arrays and objects nested")
            stack[depth] = c
            i += 1
            while i < n and ws[data[i]]:
                i += 1
            if i < n and data[i] == c + 2:  # {} or []
                depth -= 1
                i += 1
            else:
                want_key = c == 123
                continue
        elif c == 45 or digit[c]:  # a number, read as the standard library reads one
            if c == 45:
                i += 1
                if i >= n or not digit[data[i]]:
                    if data.startswith(b"Infinity", i):
                        raise JSONError("-Infinity is not valid JSON", data, None)
                    raise JSONError("Expecting value", data, i - 1)
            if data[i] == 48:
                i += 1
            else:
                i += 1
                while i < n and digit[data[i]]:
                    i += 1
            if i + 1 < n and data[i] == 46 and digit[data[i + 1]]:
                i += 2
                while i < n and digit[data[i]]:
                    i += 1
            if i < n and (data[i] == 101 or data[i] == 69):
                k = i + 1
                if k < n and (data[k] == 43 or data[k] == 45):
                    k += 1
                if k < n and digit[data[k]]:
                    i = k + 1
                    while i < n and digit[data[i]]:
                        i += 1
        elif c == 116 and data.startswith(b"true", i):
            i += 4
        elif c == 102 and data.startswith(b"false", i):
            i += 5
        elif c == 110 and data.startswith(b"null", i):
            i += 4
        else:
            _bad_value(data, i)
        # A value ended at i: close what it ends, up to the next value.
        while True:
            if depth == 0:
                return i
            while i < n and ws[data[i]]:
                i += 1
            if i >= n:
                raise JSONError("Expecting ',' delimiter", data, i)
            c = data[i]
            opener = stack[depth]
            if c == 44:  # ,
                want_key = opener == 123
                i += 1
                break
            if c == opener + 2:  # } closes {, ] closes [
                depth -= 1
                i += 1
                continue
            raise JSONError("Expecting ',' delimiter", data, i)


def _escape_size(data: bytes, i: int, n: int) -> int:
    """The length of the escape sequence at ``data[i]`` (a backslash)."""
    if i + 1 < n:
        e = data[i + 1]
        if e == 117:
            if (i + 5 < n and _HEX[data[i + 2]] and _HEX[data[i + 3]]
                    and _HEX[data[i + 4]] and _HEX[data[i + 5]]):
                return 6
            raise JSONError("Invalid \\uXXXX escape", data, i + 1)
        if _ESCAPES[e]:
            return 2
        raise JSONError("Invalid \\escape", data, i)
    raise JSONError("Unterminated string starting at", data, data.rfind(b'"', 0, i))


def _utf8_size(data: bytes, i: int, n: int) -> int:
    """The length of the UTF-8 sequence that starts at ``data[i]`` (not
    ASCII), taken as Python's strict decoder takes it: no overlong forms,
    no surrogates, nothing beyond U+10FFFF."""
    c = data[i]
    low, high = 0x80, 0xBF  # the range of the second byte
    if c < 0xE0:
        if c < 0xC2:
            raise JSONError(_BAD_UTF8, data, i)
        size = 2
    elif c < 0xF0:
        size = 3
        if c == 0xE0:
            low = 0xA0
        elif c == 0xED:
            high = 0x9F
    else:
        if c > 0xF4:
            raise JSONError(_BAD_UTF8, data, i)
        size = 4
        if c == 0xF0:
            low = 0x90
        elif c == 0xF4:
            high = 0x8F
    if (i + size >= n or not low <= data[i + 1] <= high
            or (size > 2 and not 0x80 <= data[i + 2] <= 0xBF)
            or (size > 3 and not 0x80 <= data[i + 3] <= 0xBF)):
        raise JSONError(_BAD_UTF8, data, i)
    return size


def _member(data: bytes, begin: int, end: int, wanted: Dict[bytes, str]) -> Optional[str]:
    """The name ``wanted`` gives the top-level key ``data[begin:end]``."""
    if end - begin > 64:  # longer than any spelling of a short ASCII key
        return None
    key = data[begin + 1 : end - 1]
    if 92 in key:
        key = json.loads(data[begin:end].decode("utf-8")).encode("utf-8", "surrogatepass")
    return wanted.get(key)


def _bad_value(data: bytes, i: int) -> None:
    for constant in (b"NaN", b"Infinity"):
        if data.startswith(constant, i):
            raise JSONError(f"{constant.decode()} is not valid JSON", data, None)
    raise JSONError("Expecting value", data, i)
