"""Quoting what a peer sent, cut short, for error frames and log lines: a
peer must not be able to make Gloom write megabytes back or to its log."""

from __future__ import annotations

from typing import Any

MAX_QUOTED = 200
"""Most characters of a peer's input quoted in an error frame or a log line."""


def quoted(value: Any) -> str:
    """``repr(value)``, cut to about `MAX_QUOTED` characters.

    :param value: anything a peer sent, decoded or not.
    :returns: the ``repr``; a long string is cut before quoting (so the
        quotes stay balanced) and says how long it was.
    """
    if type(value) is str and len(value) > MAX_QUOTED:
        return repr(value[:MAX_QUOTED]) + f"... ({len(value)} characters)"
    text = repr(value)
    if len(text) > MAX_QUOTED:
        return text[:MAX_QUOTED] + "..."
    return text


def shortened(text: str) -> str:
    """``text`` itself when short, else its first `MAX_QUOTED` characters and
    a note of the whole length.

    :param text: a message of Gloom's own, such as an error's reason, which
        may quote a peer's input (quote the peer's values themselves with
        `quoted`).
    """
    if len(text) <= MAX_QUOTED:
        return text
    return text[:MAX_QUOTED] + f"... ({len(text)} characters in all)"
