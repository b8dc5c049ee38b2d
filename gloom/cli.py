"""The ``gloom`` command: submit jobs (attached, detached or delayed),
turn any program into a worker, watch the daemons, ask where jobs are,
cancel a job, handle dead jobs, pause, resume, clear or drain the
daemons, and measure them.

Every subcommand takes several daemons (``--master a:9998,b:9998``, or
the option repeated); the defaults come from the environment as
`gloom.core.addresses` reads it.

Exit status: 0 success; 1 a job failed, a daemon refused a request, no
answer came within ``--wait``, or a worker stopped on an error retrying
cannot fix; 2 bad usage (a body that is not JSON the daemon takes
included); 3 a daemon could not be reached, a connection was lost, or a
daemon did not reply to a request within `REPLY_TIMEOUT`; 130
interrupted (Ctrl-C), 143 terminated (SIGTERM), 141 standard output
closed, except where a
subcommand's help says otherwise (``gloom worker`` exits 0 once it has
finished its jobs in hand; ``gloom status --watch`` exits 0; ``gloom job``
exits 1 when a job is unknown).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import sys
import threading
import time
import unicodedata
import uuid
from collections import OrderedDict, deque
from datetime import datetime, timezone
from typing import Any, Callable, Dict, List, Optional

from twisted.internet import defer, protocol, task
from twisted.internet.error import ProcessDone, ProcessTerminated, ReactorNotRunning
from twisted.python.failure import Failure

from gloom import __version__, core
from gloom.core import (EncodeError, GloomError, InOrder, Job, ServerError, TransportError,
                        WorkerError)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_PIPE = 128 + signal.SIGPIPE
"""The status when standard output's reader went away (``gloom ... | head``),
as a shell reports a process SIGPIPE ended."""

REPLY_TIMEOUT = float(os.environ.get("GLOOM_REPLY_TIMEOUT") or 10.0)
"""Seconds a daemon has to answer a request that expects a prompt reply (a
stats, status, cancel, dead-list or admin request, and the stats request
``gloom submit`` opens with); after that it counts as unreachable, so that
a stopped daemon, or a port that is not a Gloom master port (the --http
one), never hangs the command.  A submit's ack and a job's answer are not
bounded by it (a big body takes as long to send as the link needs; --wait
bounds them).  The undocumented GLOOM_REPLY_TIMEOUT environment variable
lowers it, for the tests only."""

EXIT_STATUS = """exit status:
  0    success
  1    a job failed, a daemon refused a request, no answer came within --wait,
       or gloom worker stopped on an error retrying cannot fix
  2    bad usage, including a body that is not JSON the daemon takes
  3    a daemon could not be reached, a connection to one was lost, or a
       daemon did not reply to a request within 10 s
  130  interrupted by Ctrl-C (143 by SIGTERM), except that gloom worker
       finishes its jobs in hand and exits 0, and gloom status --watch exits 0
  141  standard output was closed (gloom ... | head)
(gloom job: 1 also when a job is unknown to every daemon up.)
"""

EPILOG = {
    "submit": """examples:
  gloom submit upper '"hello"'                 run one job, print its answer
  echo '{"n": 2}' | gloom submit square -      the body from standard input
  gloom submit resize --lines < bodies.jsonl   one job per line, answers in order
  gloom submit upper '"hi"' --wait 10          give up after 10 s without an answer
  gloom submit --master tls:gloom.example.com:9998:trustRoots=ca/ upper '"hi"'
  gloom submit --detach report '{"day": 1}'   hand the job to the daemon; print its id
  gloom submit --detach --id nightly report '{}' --at 2026-01-02T03:00:00Z
  gloom submit upper '"hi"' --delay 30 --retries 0   queue it in 30 s; no retry
  gloom submit report '{"day": 1}' --unique day-1   join the day-1 report if it is there already

With --lines every line read gets one line of output, in input order: its
answer, or {"error": CODE, "reason": TEXT} (codes beyond the daemon's own:
no_answer for --wait, connection_error). Ctrl-C ends the command with
status 130 and names the jobs left unanswered; the daemon drops them.

--unique KEY joins the job of this type with that key that is queued,
delayed or running, if there is one, instead of queueing another; its
answer is printed all the same (the first submit's body and options hold).
On a terminal or with -v, joining such a job is said on standard error. On
a terminal, a progress bar on standard error shows the progress the worker
reports (--no-progress: none; --progress: even when standard error is not a
terminal).

Nothing is submitted before every daemon given was tried once. --wait
counts from the start; the message says why no answer came when the daemon
can tell: the job was running, its type is paused, or no slave is free.

--detach hands each job to the daemon: it outlives this command, gets no
answer here, and instead of its answer the command prints its id (plain
text) once the daemon has taken it. "gloom job ID" says how it went; after
its retries (--retries, else the daemon's) it goes to the dead list
("gloom dead"). --at takes seconds since the epoch or an ISO 8601 time (one
without a zone is local time); a past time means now.
""",
    "worker": """examples:
  gloom worker upper -- tr a-z A-Z             body on stdin, answer from stdout
  gloom worker thumb -c 4 --kill-after 30 -- ./make-thumbnail
  gloom worker upper --raw -- tr a-z A-Z       a string body as plain text
  gloom worker upper --slave a:9999,b:9999 -- tr a-z A-Z

The command gets the job's body as UTF-8 JSON on standard input (with
--raw, a string body as plain text), and the job's id and type in
GLOOM_JOB_ID and GLOOM_JOB_TYPE. Its standard output, read as UTF-8, is the
answer: JSON if it parses, else a string (one trailing newline removed). A
non-zero exit status, or running longer than --kill-after, fails the job
with the status and the end of its standard error.

File descriptor 3 (GLOOM_PROGRESS_FD) takes progress, one line at a time:
  progress N M          N of M done        (echo "progress 3 10" >&3)
  progress N            N done
  touch                 still alive: restart the job's timeout
  {"done": N, "total": M, "data": ANY}   any of the three
Each line goes to the masters waiting for the job (and restarts its
timeout). A line that is none of these is reported and ignored; other keys
of the JSON object are ignored, and null counts as not given. Once the
command has exited, descriptor 3 is read without waiting and closed: a
background child holding it does not hold the job.

--kill-after, and a job the daemon says was cancelled or timed out (in
reply to a line on descriptor 3), stop the command: SIGTERM, then SIGKILL
5 s later (to its process group under setsid). -v then says "cancelled" or
"timed out", not "answered".

Ctrl-C or SIGTERM: take no new job, finish and answer the jobs in hand,
exit 0. A second one kills the commands and exits at once (130 or 143);
the daemon then queues their jobs again. A refused join or a TLS setup the
daemon rejects stops the worker with status 1.
""",
    "status": """examples:
  gloom status                                 a table of types and totals
  gloom status --master a:9998,b:9998          every daemon, then the sums
  gloom status --json                          the stats JSON, for scripts
  gloom status --watch 1                       refresh every second

The figures are the daemons' own, except that "masters" leaves out this
command's own connections. --json prints the sums in the shape of one
daemon's stats, each daemon's figures under "daemons" (by address), and
"unreachable" (address: reason) when a daemon did not answer.
--watch runs until Ctrl-C, and then exits 0.
""",
    "cancel": """examples:
  gloom cancel 3f2a9c...                       ask the daemons to cancel a job

A detached job (gloom submit --detach) can be cancelled by anyone: it ends
"failed". Any other job belongs to the master connection that submitted it,
so a daemon answers unknown_job to any other connection: to withdraw such a
job, interrupt the gloom submit that waits for it (Ctrl-C), or give that
command --wait.
""",
    "job": """examples:
  gloom job 3f2a9c...                          where a job is, and how it went
  gloom job nightly weekly --json              one JSON object per job, per line

A daemon knows its detached jobs (those in the dead list, and those that
ended within its --keep-results), not another master's attached ones. With
several daemons, they are asked in turn (in the id's rendezvous order)
until one knows the job. Exit status: 0 if every job was found, 1 if one is
unknown to every daemon up (3 if one is and a daemon could not be reached:
the job may be there).
""",
    "dead": """examples:
  gloom dead list                              the oldest 100 dead jobs
  gloom dead list --offset 100 --limit 50 --json
  gloom dead retry 3f2a9c... nightly           queue them again, fresh retries
  gloom dead discard 3f2a9c...                 forget it

Dead jobs are detached jobs whose retries ran out. With several daemons,
"list" merges their dead lists, oldest first, and pages through that
(a DAEMON column says where each is; the total is the sum), and "retry"
and "discard" ask the daemons in turn until one has the job. "retry" and
"discard" exit 1 if a job was in no dead list.
""",
    "pause": """examples:
  gloom pause resize                           hand out no resize job for now
  gloom pause resize --master a:9998,b:9998    on every daemon given

Submits of the type are still taken, and queue. Admin commands (pause,
resume, clear, drain) need daemons started with --admin; a daemon without
it refuses them (forbidden), and the command exits 1.
""",
    "resume": """examples:
  gloom resume resize                          hand out resize jobs again
""",
    "clear": """examples:
  gloom clear resize                           end every queued and delayed resize job

Prints how many jobs were cleared (over every daemon given) on standard
output: a result, where pause, resume and drain say what they did on
standard error. Each master waiting for one gets the error "cleared";
detached ones go to the dead list. Running jobs go on.
""",
    "drain": """examples:
  gloom drain                                  finish the queued jobs, then exit
  gloom drain --master a:9998,b:9998           every daemon given

Each daemon refuses new submits (shutdown: draining), finishes its queued
and running jobs, then exits with status 0 (as SIGUSR1 does).
""",
    "bench": """examples:
  gloom bench                                  4 masters x 64 in flight, 8 slaves
  gloom bench --jobs 100000 --body-size 1024 --slaves 16
  gloom bench --drain --jobs 100000            queue them all, then drain
""",
}


class UsageError(Exception):
    """A mistake on the command line, reported with exit status 2."""


class _NoAnswer(GloomError):
    """No answer came within ``--wait``."""


class _BadBody(EncodeError):
    """A body read from the input is not JSON the daemon takes."""


def _no_reply(name: Optional[str] = None, seconds: float = REPLY_TIMEOUT) -> str:
    """Why a daemon that took the connection but said nothing within
    ``seconds`` counts as unreachable (prefixed with its name, if given)."""
    why = f"no reply within {seconds:g} s (is it a Gloom master port?)"
    return f"{name}: {why}" if name else why


def _replied(deferred: defer.Deferred, reactor, name: str) -> defer.Deferred:
    """``deferred`` (a request expecting a prompt reply from daemon
    ``name``), failed with a `TransportError` saying so if no reply came
    within `REPLY_TIMEOUT`."""
    def timed_out(failure):
        failure.trap(defer.TimeoutError)
        raise TransportError(_no_reply(name))

    return deferred.addTimeout(REPLY_TIMEOUT, reactor).addErrback(timed_out)


# --- output -------------------------------------------------------------------------


_STDOUT_GONE = False
"""Whether standard output's reader went away (``gloom ... | head``)."""

_SESSION: Optional["_Session"] = None
"""The run under way, if any: ended with `EXIT_PIPE` when standard output
is closed under it."""


def _out(text: str) -> None:
    """A line on standard output, as UTF-8 whatever the locale says.

    SIGPIPE stays ignored (Python's default), so that a daemon's socket
    closing under a write is a lost connection, never the end of the
    process; a reader of standard output that went away (``gloom status
    --json | head -c1``) ends the run quietly with `EXIT_PIPE` instead.
    """
    _clear_bar()
    try:
        stream = getattr(sys.stdout, "buffer", None)
        if stream is None:
            print(text, flush=True)
            return
        sys.stdout.flush()
        stream.write(text.encode("utf-8", "backslashreplace") + b"\n")
        stream.flush()
    except BrokenPipeError:
        _stdout_gone()


def _stdout_gone() -> None:
    """Standard output's reader went away: point standard output at
    /dev/null, so that nothing written later (nor the flush at exit) fails
    again, and end the run with `EXIT_PIPE`, quietly (as the Python
    documentation on SIGPIPE recommends): the jobs still in flight end
    with the connections, unremarked."""
    global _STDOUT_GONE
    _STDOUT_GONE = True
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
    if _SESSION is not None:
        _SESSION.end(EXIT_PIPE)
    else:
        raise SystemExit(EXIT_PIPE)


def _say(message: str) -> None:
    """A ``gloom:`` line on standard error (none once standard output's
    reader went away: the run ends quietly, see `_stdout_gone`)."""
    if _STDOUT_GONE:
        return
    _clear_bar()
    stream = getattr(sys.stderr, "buffer", None)
    line = f"gloom: {message}"
    if stream is None:
        print(line, file=sys.stderr, flush=True)
        return
    sys.stderr.flush()
    stream.write(line.encode("utf-8", "backslashreplace") + b"\n")
    stream.flush()


def _fail(message: str, status: int) -> int:
    _say(message)
    return status


def _dump(value) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


# --- the progress bar --------------------------------------------------------------


def _number(value: Any) -> str:
    """A progress figure, short: 3, 2.5, 0.333."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# Characters a terminal would take as commands or that reorder the text
# around them: the bidirectional formatting characters.
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")

# Whitespace that str.split() splits on, beyond the ASCII one.
_SPACES = frozenset("\t\n\v\f\r\x1c\x1d\x1e\x1f\x85\u2028\u2029")


def printable(text: str) -> str:
    """``text`` made safe to write to a terminal: line breaks and tabs
    become spaces; every other control character (C0, DEL, C1, ESC among
    them), a bidirectional formatting character or a lone surrogate is
    written as an escape (``\\x1b``, ``\\u202e``), so that what a worker
    sent can neither move the cursor, change colours, nor reorder the
    line.

    :param text: any text, such as a progress's data.
    """
    out = []
    for char in text:
        code = ord(char)
        if char in _SPACES:
            out.append(" ")
        elif code < 0x20 or 0x7F <= code < 0xA0:
            out.append(f"\\x{code:02x}")
        elif char in _BIDI or 0xD800 <= code < 0xE000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(char)
    return "".join(out)


def _char_width(char: str) -> int:
    """The columns a (printable) character takes on a terminal: 0 for a
    combining mark or a format character, 2 for a wide or full-width one
    (``unicodedata.east_asian_width`` W or F), else 1."""
    if char < "\u0300":
        return 1
    if unicodedata.combining(char) or unicodedata.category(char) in ("Mn", "Me", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def display_width(text: str) -> int:
    """How many terminal columns ``text`` (made `printable`) takes.

    :param text: text without control characters.
    """
    if text.isascii():
        return len(text)
    return sum(_char_width(char) for char in text)


def fit(text: str, width: int) -> str:
    """``text`` if it takes at most ``width`` columns, else cut so that it
    and a ``...`` take at most ``width`` (counted by `display_width`).

    :param text: text without control characters.
    :param width: the most columns.
    """
    if display_width(text) <= width:
        return text
    room = max(0, width - 3)
    used, end = 0, 0
    for index, char in enumerate(text):
        columns = _char_width(char)
        if used + columns > room:
            break
        used += columns
        end = index + 1
    return text[:end] + "..." if width >= 3 else text[:end]


def format_progress(progress: dict, width: int = 80, label: str = "", bar: bool = True) -> str:
    """One line showing a job's progress, at most ``width`` terminal
    columns (wide characters count two, combining marks none): a bar and
    a percentage when there is a ``total``, ``done/total``, and the
    ``data`` (a string as it is, anything else as JSON), on one line with
    its control characters escaped (see `printable`).

    :param progress: a progress dict (``done``, ``total``, ``data``: those
        the worker sent).
    :param width: the most columns the line may take.
    :param label: what comes first (the job's type, say).
    :param bar: draw the bar (else only the percentage).
    """
    done, total, data = progress.get("done"), progress.get("total"), progress.get("data")
    number = (int, float)
    done = done if isinstance(done, number) and not isinstance(done, bool) else None
    total = total if isinstance(total, number) and not isinstance(total, bool) else None
    parts = [_one_line(label)] if label else []
    if total is not None and total > 0 and done is not None:
        share = max(0.0, min(1.0, done / total))
        if bar:
            cells = 20 if width >= 60 else max(5, width // 4)
            filled = int(round(share * cells))
            parts.append("[" + "#" * filled + "." * (cells - filled) + "]")
            parts.append(f"{int(share * 100):3d}%")
        else:
            parts.append(f"{int(share * 100)}%")
        parts.append(f"{_number(done)}/{_number(total)}")
    elif done is not None and total is not None:
        parts.append(f"{_number(done)}/{_number(total)}")
    elif done is not None:
        parts.append(f"{_number(done)} done")
    elif total is not None:
        parts.append(f"0/{_number(total)}")
    if data is not None:
        parts.append(_one_line(data if isinstance(data, str) else _dump(data), width))
    return fit(" ".join(parts), width)


class ProgressBar:
    """A progress line on a terminal, redrawn in place (at most every
    ``interval`` seconds: a later one waits its turn, so the last state
    is always shown), and wiped before anything else is printed.

    :param stream: where to draw (standard error).
    :param label: what each line starts with.
    :param clock: what gives the time, in seconds.
    :param later: ``later(seconds, f)`` calls ``f`` that much later (the
        reactor's ``callLater``); None to draw every update at once.
    :param interval: the least time between two redraws.
    """

    def __init__(self, stream, label: str = "", clock: Callable[[], float] = time.monotonic,
                 later: Optional[Callable[[float, Callable[[], None]], Any]] = None, interval: float = 0.1):
        self.stream = stream
        self.label = label
        self.clock = clock
        self.later = later
        self.interval = interval
        self.shown = False
        self.drawn: Optional[str] = None
        self._pending: Optional[dict] = None
        self._last = None
        self._timer = None

    def update(self, progress: dict) -> None:
        """Show a new progress (at once, or once the interval is over)."""
        now = self.clock()
        if self.later is None or self._last is None or now - self._last >= self.interval:
            self._draw(progress, now)
            return
        self._pending = progress
        if self._timer is None:
            self._timer = self.later(self.interval - (now - self._last), self._draw_pending)

    def _draw_pending(self) -> None:
        self._timer = None
        if self._pending is not None:
            progress, self._pending = self._pending, None
            self._draw(progress, self.clock())

    def _draw(self, progress: dict, now: float) -> None:
        self._last = now
        width = max(20, shutil.get_terminal_size((80, 24)).columns - 1)
        line = format_progress(progress, width, self.label)
        if line == self.drawn and self.shown:
            return
        self.drawn = line
        self._write("\r\x1b[K" + line)
        self.shown = True

    def clear(self) -> None:
        """Wipe the line (and draw no pending state)."""
        self._pending = None
        if self._timer is not None:
            try:
                self._timer.cancel()
            except Exception:
                pass
            self._timer = None
        if self.shown:
            self._write("\r\x1b[K")
            self.shown = False

    def _write(self, text: str) -> None:
        stream = getattr(self.stream, "buffer", None)
        try:
            if stream is None:
                self.stream.write(text)
                self.stream.flush()
            else:
                self.stream.flush()
                stream.write(text.encode("utf-8", "backslashreplace"))
                stream.flush()
        except (OSError, ValueError):
            pass


_BAR: Optional[ProgressBar] = None
"""The progress bar on the screen, if any: wiped before a line is printed."""


def _clear_bar() -> None:
    if _BAR is not None:
        _BAR.clear()


def _describe(error: BaseException) -> str:
    """One line for an error, as the command prints it."""
    if isinstance(error, ServerError):
        return f"{error.error}: {error.reason}" if error.reason else error.error
    return str(error) or error.__class__.__name__


def _status_of(error: BaseException) -> int:
    """The exit status an error calls for."""
    if isinstance(error, TransportError):
        return EXIT_UNREACHABLE
    if isinstance(error, (UsageError, EncodeError)):
        return EXIT_USAGE
    return EXIT_FAILED


# --- the command line -----------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gloom", description="Command-line tools for the Gloom job daemon.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Addresses are host:port or Twisted client endpoint strings (tls:... for TLS);\n"
               "give several as a,b or by repeating the option.\n\n" + EXIT_STATUS)
    parser.add_argument("--version", action="version", version=f"gloom {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    parser.subparsers = {}

    def command(name, help_text):
        sub = commands.add_parser(name, help=help_text, description=help_text, epilog=EPILOG[name],
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.subparsers[name] = sub
        return sub

    def master_option(sub):
        sub.add_argument("--master", action="append", metavar="ADDRESS",
                         help="the daemons' master ports, comma-separated or repeated (default "
                              f"${core.MASTERS_ENV[0]}, else ${core.MASTERS_ENV[1]}, "
                              f"else {core.DEFAULT_MASTER})")

    def slave_option(sub):
        sub.add_argument("--slave", action="append", metavar="ADDRESS",
                         help="the daemons' slave ports, comma-separated or repeated (default "
                              f"${core.SLAVES_ENV[0]}, else ${core.SLAVES_ENV[1]}, "
                              f"else {core.DEFAULT_SLAVE})")

    submit = command("submit", "Submit jobs and print their answers as JSON.")
    submit.add_argument("type", help="the job type")
    submit.add_argument("body", nargs="?", default=None,
                        help="the body as JSON, or - to read it from standard input (default null)")
    submit.add_argument("--lines", action="store_true",
                        help="one JSON body per line of standard input, sent as each line is read; "
                             "answers as JSON lines, in order")
    submit.add_argument("--window", type=int, default=32, help="jobs in flight with --lines (default 32)")
    submit.add_argument("--priority", type=int, default=0, help="the jobs' priority (default 0)")
    submit.add_argument("--timeout", type=float, metavar="SECONDS",
                        help="seconds one attempt may run on a slave (the daemon's limit)")
    submit.add_argument("--wait", type=float, metavar="SECONDS",
                        help="give up on a job (and cancel it) with no answer after SECONDS")
    submit.add_argument("--detach", action="store_true",
                        help="hand the job to the daemon (it outlives this command); print its id, "
                             "not its answer")
    submit.add_argument("--delay", metavar="SECONDS",
                        help="queue the job SECONDS from now (at most 31536000: 365 days)")
    submit.add_argument("--at", metavar="TIME",
                        help="queue the job at TIME: seconds since the epoch, or ISO 8601 "
                             "(2026-01-02T03:00:00Z; without a zone, local time)")
    submit.add_argument("--retries", metavar="N",
                        help="times a lost attempt is queued again, 0 to 1000 (default: the daemon's)")
    submit.add_argument("--backoff", action="store_true",
                        help="retry lost attempts after a growing delay (detached jobs always do)")
    submit.add_argument("--resubmit", action="store_true",
                        help="when a daemon's connection drops, submit its unanswered jobs again to "
                             "the daemons up (a job may then run twice); not with --detach")
    submit.add_argument("--id", help="the job's id (default: a fresh one); not with --lines")
    submit.add_argument("--unique", metavar="KEY",
                        help="join the job of this type with this key if one is queued, delayed or "
                             "running, rather than queue another (not with --lines or --detach)")
    submit.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="show the job's progress as a bar on standard error (default: when "
                             "standard error is a terminal)")
    submit.add_argument("-v", "--verbose", action="store_true",
                        help="say on standard error when a --unique submit joins a job already there "
                             "(said anyway when standard error is a terminal)")
    master_option(submit)

    worker = command("worker", "Answer jobs by running a command once per job.")
    worker.usage = ("gloom worker [-h] [-c N] [--raw] [--kill-after SECONDS] [-v] [--slave ADDRESS] "
                    "TYPE -- CMD [ARGS ...]")
    # Both optional here, so that a missing one is said by _check in words
    # (TYPE, the command after --), not as argparse's internal names.
    worker.add_argument("type", nargs="?", metavar="TYPE", help="the job type to serve")
    worker.add_argument("stray", nargs="*", default=[], help=argparse.SUPPRESS)
    worker.add_argument("-c", "--concurrency", type=int, default=1, metavar="N",
                        help="jobs run at once (default 1)")
    worker.add_argument("--raw", action="store_true",
                        help="give a string body to the command as plain text, not JSON")
    worker.add_argument("--kill-after", type=float, metavar="SECONDS",
                        help="stop the command (SIGTERM, then SIGKILL) and fail the job after this long")
    worker.add_argument("-v", "--verbose", action="store_true",
                        help="log each job: its id, how long it took, its outcome")
    slave_option(worker)

    status = command("status", "Show what the daemons are doing.")
    status.add_argument("--json", action="store_true", help="print the stats JSON")
    status.add_argument("--watch", type=float, nargs="?", const=2.0, metavar="SECONDS",
                        help="refresh every SECONDS (default 2) until Ctrl-C")
    master_option(status)

    cancel = command("cancel", "Ask the daemons to cancel a job.")
    cancel.add_argument("id", help="the job's id")
    master_option(cancel)

    job = command("job", "Say where jobs are and how they went.")
    job.add_argument("ids", nargs="+", metavar="ID", help="a job's id")
    job.add_argument("--json", action="store_true", help="one JSON object per job, one per line")
    master_option(job)

    dead = command("dead", "List, retry or discard dead jobs (detached jobs whose retries ran out).")
    actions = dead.add_subparsers(dest="dead_action", metavar="ACTION")
    actions.required = True
    listing = actions.add_parser("list", help="list dead jobs, oldest first",
                                 description="List dead jobs, oldest first.")
    listing.add_argument("--offset", type=int, default=0, help="skip this many of the oldest (default 0)")
    listing.add_argument("--limit", type=int, default=100, help="list at most this many, 1 to 1000 (default 100)")
    listing.add_argument("--json", action="store_true",
                         help='print {"total": N, "offset": N, "dead": [...]} as JSON')
    master_option(listing)
    for name, text in (("retry", "queue dead jobs again, with fresh retries"), ("discard", "forget dead jobs")):
        sub = actions.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        sub.add_argument("ids", nargs="+", metavar="ID", help="a dead job's id")
        master_option(sub)

    for name, text in (("pause", "Hand out no job of a type (submits still queue); needs --admin daemons."),
                       ("resume", "Hand out jobs of a paused type again; needs --admin daemons."),
                       ("clear", "End every queued and delayed job of a type; needs --admin daemons.")):
        sub = command(name, text)
        sub.add_argument("type", help="the job type")
        master_option(sub)
    drain = command("drain", "Have the daemons finish their jobs, taking no new ones, then exit; "
                             "needs --admin daemons.")
    master_option(drain)

    bench = command("bench", "Measure a running daemon's throughput and latency.")
    bench.add_argument("--masters", type=int, default=4, help="master connections (default 4)")
    bench.add_argument("--slaves", type=int, default=8, help="echo slave connections (default 8)")
    bench.add_argument("--window", type=int, default=64, help="jobs in flight per master (default 64)")
    bench.add_argument("--body-size", type=int, default=64, help="bytes of body per job (default 64)")
    bench.add_argument("--jobs", type=int, default=20000, help="jobs in all (default 20000)")
    bench.add_argument("--drain", action="store_true",
                       help="queue every job first (random priorities), then let the slaves drain them")
    bench.add_argument("--reports", type=int, default=0,
                       help="progress reports each echo slave sends per job before answering "
                            "(default 0)")
    bench.add_argument("--json", action="store_true", help="print the figures as JSON")
    bench.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="show a progress bar (default: when standard error is a terminal)")
    master_option(bench)
    slave_option(bench)
    return parser


def _masters(args) -> List[str]:
    return _addresses(args.master, core.MASTERS_ENV, core.DEFAULT_MASTER)


def _slaves(args) -> List[str]:
    return _addresses(args.slave, core.SLAVES_ENV, core.DEFAULT_SLAVE)


def _addresses(given: Optional[List[str]], env, default: str) -> List[str]:
    """The addresses of a repeatable option (each may list several), else
    the environment's, else the default."""
    try:
        return core.addresses(None if given is None else ",".join(given), env, default)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _names(addresses: List[str]) -> str:
    return ", ".join(core.display_name(address) for address in addresses)


class _NotJSON(ValueError):
    """A constant Python's json reads but JSON has not (NaN, Infinity)."""


def _reject_constant(name: str):
    raise _NotJSON(f"{name} is not JSON")


def _parse_body(text, where: str):
    """A body from text, refusing what the daemon refuses (NaN, Infinity)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(f"{where} is not UTF-8 ({e})") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise UsageError(f"{where} is not JSON the daemon takes: it nests too deeply") from None
    except _NotJSON as e:
        raise UsageError(f"{where} is not JSON the daemon takes: {e}") from None
    except ValueError as e:
        raise UsageError(f"{where} is not valid JSON ({e}); a string needs quotes, e.g. '\"text\"'") from None


def _positive(value, name: str, most: Optional[float] = None):
    """Refuse an option's value unless it is a positive number (not NaN,
    not infinite: ``float`` reads both), and at most ``most`` if given."""
    if value is None:
        return
    if isinstance(value, float) and not 0 < value < float("inf") or value <= 0 \
            or (most is not None and value > most):
        what = "a positive number of seconds" if isinstance(value, float) else "positive"
        limit = f" up to {most}" if most is not None else ""
        raise UsageError(f"{name} must be {what}{limit}, not {value:g}")


def _bounded(deferred: defer.Deferred, reactor, seconds: float = 2.0) -> defer.Deferred:
    """``deferred``, given up (quietly) after ``seconds``."""
    return deferred.addTimeout(seconds, reactor).addErrback(lambda failure: None)


# --- how a run ends: the status, signals -----------------------------------------------


class _Session:
    """One run of the command: its reactor, and what a signal (Ctrl-C,
    SIGTERM) does to it.

    A subcommand sets ``on_signal(signum, count)``: it returns an exit
    status (or a Deferred of one) to end the run with, or None to let the
    subcommand end it.  Without one, a signal prints ``interrupted`` and
    ends the run with 128 + the signal's number.
    """

    def __init__(self, reactor):
        self.reactor = reactor
        self.signals = 0
        self.on_signal: Optional[Callable[[int, int], Any]] = None
        self.ended = defer.Deferred()

    def end(self, outcome) -> None:
        """End the run with a status or a Failure (the first one wins)."""
        if not self.ended.called:
            self.ended.callback(outcome)

    def signalled(self, signum: int) -> None:
        self.signals += 1
        if self.ended.called:
            return
        handler = self.on_signal or _interrupted
        try:
            result = handler(signum, self.signals)
        except Exception:
            result = Failure()
        if result is not None:
            defer.maybeDeferred(lambda: result).addBoth(self.end)


def _signal_word(signum: int) -> str:
    return "interrupted" if signum == signal.SIGINT else "terminated"


def _interrupted(signum: int, count: int) -> int:
    _say(_signal_word(signum))
    return 128 + signum


# --- submit -----------------------------------------------------------------------


class _StdinReader:
    """Reads standard input on a thread of its own, so a slow pipe never
    holds up the reactor, and hands the reactor each line (or, whole, the
    entire input) as it arrives.  At most ``ahead`` lines wait for the
    reactor to take them (`taken`).

    :param line: called in the reactor with each line (bytes, without its
        newline) and its number.
    :param end: called in the reactor at the end of input, with None or
        the OSError that ended it.
    """

    CHUNK = 1 << 20

    def __init__(self, reactor, line: Callable[[bytes, int], None], end: Callable[[Any], None],
                 ahead: int, whole: bool = False, fd: int = 0):
        self.reactor = reactor
        self.line = line
        self.end = end
        self.whole = whole
        self.fd = fd
        self.stopped = False
        self._room = threading.Semaphore(ahead)

    def start(self) -> None:
        threading.Thread(target=self._read, name="gloom-stdin", daemon=True).start()

    def taken(self) -> None:
        """The reactor took a line: room for one more."""
        self._room.release()

    def stop(self) -> None:
        """Read no further (the thread may stay blocked in a read until the
        process exits)."""
        self.stopped = True
        self._room.release()

    def _hand(self, data: bytes, number: int) -> bool:
        self._room.acquire()
        if self.stopped:
            return False
        self.reactor.callFromThread(self.line, data, number)
        return True

    def _read(self) -> None:
        pieces: List[bytes] = []
        number = 0
        error = None
        try:
            while not self.stopped:
                chunk = os.read(self.fd, self.CHUNK)
                if not chunk:
                    break
                if self.whole:
                    pieces.append(chunk)
                    continue
                start = 0
                while True:
                    newline = chunk.find(b"\n", start)
                    if newline < 0:
                        break
                    pieces.append(chunk[start:newline])
                    start = newline + 1
                    number += 1
                    data, pieces = b"".join(pieces), []
                    if not self._hand(data, number):
                        return
                if start < len(chunk):
                    pieces.append(chunk[start:])
        except OSError as e:
            error = e
        if self.stopped:
            return
        if error is None and (pieces or self.whole):
            if not self._hand(b"".join(pieces), number + 1):
                return
        self.reactor.callFromThread(self.end, error)


class _Slot:
    """One line of ``gloom submit``'s output: a job (or a bad body) and,
    once it ended, its outcome.  `core.InOrder` keeps them in input order."""

    __slots__ = ("number", "id", "done", "value", "error", "deferred", "timer", "expired", "status")

    def __init__(self, number: int, job_id: Optional[str] = None):
        self.number = number
        self.id = job_id
        self.done = False
        self.value: Any = None
        self.error: Optional[BaseException] = None
        self.deferred: Optional[defer.Deferred] = None
        self.timer = None
        self.expired = False
        self.status: Optional[defer.Deferred] = None
        """Once given up on (``--wait``): the job's status, asked just before its cancel."""


class _Submitter:
    """``gloom submit``: bodies in, answers out in input order, with up to
    ``window`` jobs in flight; ``finished`` fires with the exit status."""

    def __init__(self, session: _Session, master, args):
        self.session = session
        self.reactor = session.reactor
        self.master = master
        self.args = args
        self.lines = args.lines
        self.window = InOrder(args.window if args.lines else 1)
        self.open: deque = deque()  # the window's slots, oldest first
        self.pending: deque = deque()
        self.reader: Optional[_StdinReader] = None
        self.at_end = False
        self.stopped_reading = False
        self.last_number = 0
        """The number of the last line (or input) submitted."""
        self.status = EXIT_OK
        self.finished = defer.Deferred()
        self._stats_waiters: Dict[Optional[str], List[defer.Deferred]] = {}
        self._pumping = False
        self.bar: Optional[ProgressBar] = None
        """The progress bar of the job, when one is shown."""
        self.say_joined = False
        """Whether to say on standard error that a ``--unique`` submit joined a job already there."""
        self.began = self.reactor.seconds()

    # --- input ----------------------------------------------------------------------

    def start(self) -> None:
        args = self.args
        if args.lines or args.body == "-":
            self.reader = _StdinReader(self.reactor, self.line, self.end_of_input,
                                       args.window if args.lines else 1, whole=not args.lines)
            self.reader.start()
        else:
            self.line(args.body, 0)
            self.end_of_input(None)

    def line(self, data, number: int) -> None:
        if self.finished.called:
            return
        self.pending.append((data, number))
        self.pump()

    def end_of_input(self, error) -> None:
        if self.finished.called:
            return
        if error is not None:
            _say(f"cannot read standard input: {error.strerror or error}")
            self.status = max(self.status, EXIT_USAGE)
        self.at_end = True
        self.pump()

    def stop_reading(self) -> None:
        self.stopped_reading = True
        self.pending.clear()
        if self.reader is not None:
            self.reader.stop()

    # --- jobs -----------------------------------------------------------------------

    def pump(self) -> None:
        """Submit what waits while the window has room; end when all is done."""
        if self._pumping:
            return  # a bad body ends at once, and its flush calls back here
        self._pumping = True
        try:
            self._submit_waiting()
        finally:
            self._pumping = False
        if self.at_end and not self.pending and not len(self.window) and not self.finished.called:
            self.finish(self.status)

    def _submit_waiting(self) -> None:
        args = self.args
        while self.pending and self.window.room and not self.stopped_reading:
            data, number = self.pending.popleft()
            if self.reader is not None:
                self.reader.taken()
            if self.lines and not data.strip():
                continue
            slot = _Slot(number, args.id or uuid.uuid4().hex)
            self.last_number = number
            self.window.add(slot)
            self.open.append(slot)
            where = f"line {number}" if self.lines else ("standard input" if args.body == "-" else "BODY")
            try:
                body = None if data is None else _parse_body(data, where)
                extra = {}
                if args.unique is not None:
                    extra["unique"] = args.unique
                    extra["on_ack"] = self._acked
                if self.bar is not None:
                    extra["on_progress"] = self.bar.update
                deferred = self.master.submit(args.type, body, args.priority, id=slot.id,
                                              timeout=args.timeout, **args.options, **extra)
            except UsageError as e:
                slot.id = None
                self._ended(Failure(_BadBody(str(e))), slot)
                continue
            except EncodeError as e:
                slot.id = None
                self._ended(Failure(_BadBody(f"cannot send {where}: {e}")), slot)
                continue
            except Exception as e:  # whatever it is, it ends this job, not the command
                slot.id = None
                self._ended(Failure(e), slot)
                continue
            slot.deferred = deferred
            if args.wait:
                wait = args.wait
                if not self.lines:  # the one job's --wait counts from the start, connecting included
                    wait = max(0.0, wait - (self.reactor.seconds() - self.began))
                slot.timer = self.reactor.callLater(wait, self._expire, slot)
            deferred.addBoth(self._ended, slot)

    def _acked(self, joined: bool) -> None:
        if joined and self.say_joined:
            _say(f"joined the {self.args.type!r} job already queued or running with unique key "
                 f"{_quoted(self.args.unique)}: its answer is this one's (this submit's body and "
                 "options are not used)")

    def _expire(self, slot: _Slot) -> None:
        slot.timer = None
        if slot.done:
            return
        slot.expired = True
        # Asked before the cancel, on the same connection: the daemon says
        # where the job was (running, or still queued) before it drops it.
        slot.status = _bounded(defer.maybeDeferred(self.master.status, slot.id), self.reactor, 2.0)
        slot.deferred.cancel()

    def _ended(self, result, slot: _Slot) -> None:
        if slot.timer is not None and slot.timer.active():
            slot.timer.cancel()
        slot.timer = None
        if isinstance(result, Failure):
            if slot.expired:
                self._no_answer(slot).addCallback(self._settle, slot, None)
                return None
            return self._settle(None, slot, result.value)
        return self._settle(None, slot, None, result)

    def _settle(self, hint, slot: _Slot, error: Optional[BaseException], value: Any = None) -> None:
        if slot.expired:
            error = _NoAnswer(f"no answer within {self.args.wait:g} s{hint or ''}")
        slot.done = True
        slot.value, slot.error = value, error
        if not self.finished.called:
            self.flush()

    def _no_answer(self, slot: _Slot) -> defer.Deferred:
        """A hint for a job given up on: whether it was running (and its
        last progress), else whether its type is paused on its daemon or
        any slave serves it there (one stats request per daemon for the
        jobs given up on together)."""
        job_type = self.args.type
        status = slot.status if slot.status is not None else defer.succeed(None)

        def with_status(found):
            found = found if isinstance(found, dict) else {}
            daemon = found.get("daemon") if isinstance(found.get("daemon"), str) else None
            return self._stats(daemon).addCallback(lambda stats: no_answer_hint(job_type, found, stats))

        return status.addCallback(with_status)

    def _stats(self, daemon: Optional[str]) -> defer.Deferred:
        """The stats of ``daemon`` (None: as `MasterClient.stats` gives
        them), or None if they did not come within 2 s; one request for
        the callers that ask meanwhile."""
        waiter = defer.Deferred()
        waiters = self._stats_waiters.setdefault(daemon, [])
        waiters.append(waiter)
        if len(waiters) == 1:
            def told(stats):
                for each in self._stats_waiters.pop(daemon, []):
                    each.callback(stats)

            asked = defer.maybeDeferred(self.master.stats, daemon) if daemon else \
                defer.maybeDeferred(self.master.stats)
            _bounded(asked, self.reactor, 2.0).addCallback(told)
        return waiter

    def flush(self) -> None:
        """Print the outcomes at the head of the window, in input order."""
        for slot in self.window.ready():
            self.open.popleft()
            error = slot.error
            if error is None:
                _out(slot.value if self.args.detach else _dump(slot.value))  # a detached job: its id
                continue
            status = _status_of(error)
            self.status = max(self.status, status)
            where = f"line {slot.number}: " if self.lines else ""
            _say(where + _describe(error))
            if self.lines:
                _out(_dump(_error_object(error)))
            if isinstance(error, TransportError) and not self.stopped_reading and not self.master.connected:
                # Every connection is gone: the jobs' outcomes are unknown, and
                # every line after these would wait for a reconnection.  (With
                # another daemon up, the next lines go there.)
                if self.lines and (self.pending or not self.at_end):
                    _say(f"no daemon is connected: stopped reading input after line {self.last_number}")
                self.stop_reading()
                self.at_end = True
        self.pump()

    def unanswered(self) -> List[_Slot]:
        return [slot for slot in self.open if slot.id and not slot.done]

    def interrupt(self, signum: int, count: int) -> int:
        """Ctrl-C: name the jobs left unanswered and end with 128 + the
        signal (the daemons drop the jobs of a connection that closes)."""
        self.stop_reading()
        waiting = self.unanswered()
        word = _signal_word(signum)
        job_type = self.args.type
        what = "taken (gloom job ID says whether it was)" if self.args.detach else "answered"
        if len(waiting) == 1:
            _say(f"{word}; job {waiting[0].id} ({job_type}) was not {what}")
        elif waiting:
            ids = ", ".join(slot.id for slot in waiting[:5])
            more = f" and {len(waiting) - 5} more" if len(waiting) > 5 else ""
            _say(f"{word}; {len(waiting)} jobs ({job_type}) were not {what}: {ids}{more}")
        else:
            _say(word)
        self.finish(128 + signum)
        return 128 + signum

    def finish(self, status: int) -> None:
        if self.finished.called:
            return
        self.stop_reading()
        for slot in self.open:
            if slot.timer is not None and slot.timer.active():
                slot.timer.cancel()
        self.finished.callback(status)


def no_answer_hint(job_type: str, status: dict, stats: Optional[dict]) -> str:
    """What ``gloom submit --wait`` adds to "no answer within N s": the
    job was running (with its last progress), else its type is paused, or
    no slave serves it, or every slave serving it is busy; or nothing.

    :param job_type: the job's type.
    :param status: the job's status, asked just before it was cancelled
        (``{}`` if none came).
    :param stats: the stats of the job's daemon (None if none came).
    """
    if status.get("state") == "running":
        progress = status.get("progress")
        last = (f" (last progress: {format_progress(progress, 60, bar=False)})"
                if isinstance(progress, dict) and progress else "")
        return f"; the job was running on a slave{last}"
    if not isinstance(stats, dict):
        return ""
    types = stats.get("types") if isinstance(stats.get("types"), dict) else {}
    figures = types.get(job_type)
    paused = stats.get("paused")
    if (isinstance(paused, list) and job_type in paused) \
            or (isinstance(figures, dict) and figures.get("paused") is True):
        return f"; type {job_type!r} is paused (gloom resume {shlex.quote(job_type)})"
    if not isinstance(figures, dict):
        return "" if stats.get("types_omitted") else f"; no slave serves {job_type!r}"
    idle, busy = figures.get("idle_slaves", 0), figures.get("busy_slaves", 0)
    if not idle + busy:
        return f"; no slave serves {job_type!r}"
    if not idle:
        return f"; the {busy} slave(s) serving {job_type!r} are all busy"
    return ""


def _error_object(error: BaseException) -> dict:
    """The JSON line ``--lines`` prints for a line that got no answer."""
    if isinstance(error, ServerError):
        return {"error": error.error, "reason": error.reason}
    if isinstance(error, _NoAnswer):
        return {"error": "no_answer", "reason": str(error)}
    if isinstance(error, EncodeError):
        code = "size_error" if "frame may be at most" in str(error) else "invalid_json"
        return {"error": code, "reason": str(error)}
    if isinstance(error, TransportError):
        return {"error": "connection_error", "reason": str(error)}
    return {"error": error.__class__.__name__, "reason": str(error)}


@defer.inlineCallbacks
def _submit(session: _Session, args):
    from gloom.txclient import MasterClient

    # A daemon that takes the connection and says nothing (a stopped
    # process, the --http port) is found out first and left out, rather
    # than given jobs whose acks never come.  (An ack is not timed: a big
    # body takes as long to send as the link needs.)
    began = session.reactor.seconds()
    # The one job's --wait counts from the start: this look included.
    limit = min(REPLY_TIMEOUT, args.wait) if args.wait and not args.lines else REPLY_TIMEOUT
    try:
        silent = yield _silent_daemons(session, args.masters_at, limit)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if len(silent) == len(args.masters_at):
        if limit < REPLY_TIMEOUT:  # --wait ran out first: not the daemons' fault, maybe
            _say(f"no answer within {args.wait:g} s (no daemon had replied to a first request yet)")
            return EXIT_FAILED
        raise TransportError("; ".join(silent.values()))
    for why in silent.values():
        _say(why)
    try:
        master = MasterClient([address for address in args.masters_at if address not in silent],
                              session.reactor, fail_after=1, resubmit=args.resubmit)
    except ValueError as e:
        raise UsageError(str(e)) from None
    global _BAR
    submitter = _Submitter(session, master, args)
    submitter.began = began  # --wait counts from the start, the look for silent daemons included
    terminal = _is_terminal(sys.stderr)
    shown = args.progress if args.progress is not None else terminal
    if shown and not args.lines and not args.detach:
        submitter.bar = _BAR = ProgressBar(sys.stderr, args.type, later=session.reactor.callLater)
    submitter.say_joined = args.verbose or terminal
    session.on_signal = submitter.interrupt
    try:
        # Every daemon is tried before anything is submitted, so that a job
        # goes where the daemons up send it (a --unique one, by its key).
        started = master.start()
        if args.wait and not args.lines:
            started = _bounded(started, session.reactor, args.wait)
        yield started
        if not master.up:
            raise TransportError("; ".join(master.unreachable.values()) or "no daemon could be reached"
                                 + (f" within {args.wait:g} s" if args.wait and not args.lines else ""))
        submitter.start()
        status = yield submitter.finished
    finally:
        _clear_bar()
        _BAR = None
        yield _bounded(defer.maybeDeferred(master.stop), session.reactor, 1.0)
    return status


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


# --- worker -------------------------------------------------------------------------

_STDERR_TAIL = 2000


PROGRESS_FD = 3
"""The file descriptor on which the worker's command reports progress."""

_PROGRESS_LINE_MAX = 64 * 1024
_PROGRESS_USAGE = 'not "progress N [M]", "touch" or a JSON object of done, total and data'
_PROGRESS_EMPTY = 'a progress needs "done", "total" or "data" (null counts as not given)'


def parse_progress_line(line: bytes) -> Optional[Dict[str, Any]]:
    """What one line a worker's command wrote on its progress descriptor
    asks for: ``progress N M``, ``progress N``, ``touch``, or a JSON
    object with any of ``done``, ``total`` and ``data``.  In the object,
    other keys are ignored (as the daemon ignores them in a progress
    frame), and a null value counts as not given: ``"data": null`` sends
    no data.

    :param line: the line, without its newline.
    :returns: the progress fields (``done``, ``total``, ``data``) to
        send, ``{}`` for a touch, or None for a blank line.
    :raises ValueError: for any other line (with why).
    """
    try:
        text = line.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError("not UTF-8") from None
    if not text:
        return None
    if text.startswith("{"):
        try:
            fields = json.loads(text, parse_constant=_reject_constant)
        except (ValueError, RecursionError):
            raise ValueError("not JSON") from None
        if not isinstance(fields, dict):
            raise ValueError(_PROGRESS_USAGE)
        fields = {name: fields[name] for name in ("done", "total", "data") if fields.get(name) is not None}
        if not fields:
            raise ValueError(_PROGRESS_EMPTY)
        core.progress_fields(fields.get("done"), fields.get("total"), fields.get("data"))
        return fields
    words = text.split()
    if words == ["touch"]:
        return {}
    if words[0] == "progress" and len(words) in (2, 3):
        numbers = []
        for word in words[1:]:
            try:
                number = float(word)
            except ValueError:
                raise ValueError(f"{word!r} is not a number") from None
            numbers.append(int(number) if number.is_integer() and abs(number) < 2 ** 53 else number)
        fields = dict(zip(("done", "total"), numbers))
        core.progress_fields(fields.get("done"), fields.get("total"))
        return fields
    raise ValueError(_PROGRESS_USAGE)


KILL_GRACE = 5.0
"""Seconds ``gloom worker`` waits, after sending a command SIGTERM (past
``--kill-after``, or for a job cancelled or given up), before SIGKILL."""

_DROPPED = {"cancelled": "cancelled by every master that submitted it",
            "timed_out": "given up by the daemon (it ran past its timeout)"}


class _Command(protocol.ProcessProtocol):
    """One run of the worker's command for one job: what it writes on
    `PROGRESS_FD` goes to the job's masters as it comes.

    Once the command itself has exited, what it left on `PROGRESS_FD` is
    read without waiting and the descriptor closed: a background child
    that inherited it does not hold the job up.  `stop` ends the command:
    SIGTERM, then SIGKILL `KILL_GRACE` seconds later (to its process
    group when it runs in a session of its own)."""

    def __init__(self, stdin: bytes, job: Optional[Job] = None, reactor=None):
        self.stdin = stdin
        self.job = job
        self.reactor = reactor
        self.stdout: List[bytes] = []
        self.stderr = b""
        self.done = defer.Deferred()
        self.exited = False
        self.stopped: Optional[str] = None
        """Why `stop` was called: ``kill_after``, ``cancelled`` or ``timed_out``."""
        self._timers: List[Any] = []
        self._progress = b""
        self._skipping = False

    @property
    def killed_after(self) -> bool:
        """Whether it was stopped for running past ``--kill-after``."""
        return self.stopped == "kill_after"

    def connectionMade(self):
        self.transport.write(self.stdin)
        self.transport.closeStdin()

    def outReceived(self, data):
        self.stdout.append(data)

    def errReceived(self, data):
        self.stderr = (self.stderr + data)[-_STDERR_TAIL:]

    def childDataReceived(self, childFD, data):
        if childFD != PROGRESS_FD:
            super().childDataReceived(childFD, data)
            return
        lines = (self._progress + data).split(b"\n")
        self._progress = lines.pop()
        for line in lines:
            if self._skipping:
                self._skipping = False  # the end of a line too long, said already
            elif len(line) > _PROGRESS_LINE_MAX:
                self._too_long(line)
            else:
                self._progress_line(line)
        if len(self._progress) > _PROGRESS_LINE_MAX:
            if not self._skipping:
                self._too_long(self._progress)
            self._skipping = True
            self._progress = b""

    def childConnectionLost(self, childFD):
        if childFD != PROGRESS_FD:
            super().childConnectionLost(childFD)
            return
        rest, self._progress = self._progress, b""
        if rest and not self._skipping:
            self._progress_line(rest)

    def _progress_line(self, line: bytes) -> None:
        try:
            fields = parse_progress_line(line)
        except ValueError as e:
            self._ignored(line, str(e))
            return
        if fields is None or self.job is None:
            return
        try:
            if fields:
                self.job.progress(fields.get("done"), fields.get("total"), fields.get("data"))
            else:
                self.job.touch()
        except (ValueError, RuntimeError) as e:
            self._ignored(line, str(e))

    def _too_long(self, line: bytes) -> None:
        self._ignored(line[:60] + b"...", f"longer than {_PROGRESS_LINE_MAX} bytes")

    def _ignored(self, line: bytes, why: str) -> None:
        text = line.decode("utf-8", "backslashreplace")
        if len(text) > 200:
            text = text[:197] + "..."
        job = f"job {self.job.id} ({self.job.type})" if self.job is not None else "a job"
        _say(f"{job}: ignored a line on fd {PROGRESS_FD}: {text!r}: {why}")

    # --- ending it ---------------------------------------------------------------------

    def later(self, seconds: float, function: Callable[[], Any]) -> None:
        """Call ``function`` in ``seconds``, unless the command has exited by then."""
        self._timers.append(self.reactor.callLater(seconds, function))

    def stop(self, why: str) -> None:
        """End the command (unless it has exited, or is being stopped):
        SIGTERM now, SIGKILL `KILL_GRACE` seconds later if it is still
        there.

        :param why: ``kill_after``, ``cancelled`` or ``timed_out``.
        """
        if self.exited or self.stopped is not None:
            return
        self.stopped = why
        self.signal(signal.SIGTERM)
        self.later(KILL_GRACE, lambda: self.signal(signal.SIGKILL))

    def dropped(self, code: str) -> None:
        """The daemon said the job's answer will be dropped (``cancelled``
        or ``timed_out``): stop the command, if it still runs."""
        self.stop(code)

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the command, unless it has exited: to its
        process group when it leads one (it runs under ``setsid``), so
        that its children get it too."""
        pid = getattr(self.transport, "pid", None)
        if self.exited or pid is None:
            return
        try:
            if os.getpgid(pid) == pid:
                os.killpg(pid, signum)
            else:
                os.kill(pid, signum)
        except OSError:
            pass

    def processExited(self, reason):
        """The command exited (its children may live on): no signal goes
        to it any more, and what it wrote on `PROGRESS_FD` is read without
        waiting, then the descriptor is closed, so a child that inherited
        it does not hold the job up."""
        self.exited = True
        self._cancel_timers()
        pipes = getattr(self.transport, "pipes", {})
        reader = pipes.get(PROGRESS_FD)
        if reader is None:
            return
        while True:
            try:
                data = os.read(reader.fileno(), 65536)
            except InterruptedError:
                continue
            except OSError:  # EAGAIN: nothing more for now; or it is gone
                break
            if not data:
                break
            self.childDataReceived(PROGRESS_FD, data)
        self.transport.closeChildFD(PROGRESS_FD)

    def processEnded(self, reason):
        self.exited = True
        self._cancel_timers()
        self.done.callback(reason.value)

    def _cancel_timers(self) -> None:
        timers, self._timers = self._timers, []
        for timer in timers:
            if timer.active():
                timer.cancel()


class CommandFailed(Exception):
    """The worker's command exited badly; the text is the job's failure reason."""


class _Stopped(CommandFailed):
    """The worker stopped the command because its job was cancelled or
    given up."""


def _answer_from(output: bytes):
    text = output.decode("utf-8", errors="replace")
    try:
        return json.loads(text)
    except ValueError:
        return text[:-1] if text.endswith("\n") else text


def _command_input(body, raw: bool) -> bytes:
    """What the command reads: the body as UTF-8 JSON, characters written
    as themselves (a lone surrogate, which UTF-8 cannot hold, escaped);
    with ``raw``, a string body as UTF-8 text."""
    if raw and isinstance(body, str):
        return body.encode("utf-8", errors="replace")
    text = json.dumps(body, ensure_ascii=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(body).encode("ascii")


class _Commands:
    """Runs the worker's command once per job, and keeps track of the
    runs, so a second Ctrl-C can kill them without answering their jobs."""

    def __init__(self, reactor, args, argv: List[str]):
        self.reactor = reactor
        self.args = args
        self.argv = argv
        self.running: Dict[str, _Command] = {}
        self.abandoned = False

    def run(self, job: Job) -> defer.Deferred:
        args = self.args
        command = _Command(_command_input(job.body, args.raw), job, self.reactor)
        env = dict(os.environ, GLOOM_JOB_ID=str(job.id), GLOOM_JOB_TYPE=str(job.type),
                   GLOOM_PROGRESS_FD=str(PROGRESS_FD))
        try:
            self.reactor.spawnProcess(command, self.argv[0], self.argv, env=env,
                                      childFDs={0: "w", 1: "r", 2: "r", PROGRESS_FD: "r"})
        except OSError as e:
            return defer.fail(CommandFailed(f"cannot run {self.args.argv[0]}: {e.strerror or e}"))
        key = uuid.uuid4().hex
        self.running[key] = command
        if args.kill_after:
            command.later(args.kill_after, lambda: command.stop("kill_after"))
        on_dropped = getattr(job, "on_dropped", None)
        if on_dropped is not None:
            on_dropped(command.dropped)

        def ended(reason):
            self.running.pop(key, None)
            if self.abandoned:
                return defer.Deferred()  # never answered: the daemon queues the job again
            tail = command.stderr.decode("utf-8", errors="replace").strip()
            tail = f": {tail}" if tail else ""
            if command.killed_after:
                raise CommandFailed(f"killed after {args.kill_after:g} s{tail}")
            if command.stopped is not None:
                raise _Stopped(f"stopped: the job was {_DROPPED.get(command.stopped, command.stopped)}")
            if isinstance(reason, ProcessDone):
                return _answer_from(b"".join(command.stdout))
            if isinstance(reason, ProcessTerminated) and reason.signal is not None:
                raise CommandFailed(f"killed by signal {reason.signal}{tail}")
            code = reason.exitCode if isinstance(reason, ProcessTerminated) else "unknown"
            raise CommandFailed(f"exit status {code}{tail}")

        return command.done.addCallback(ended)

    def abandon(self) -> None:
        """Kill every run; their jobs get no answer."""
        self.abandoned = True
        for command in list(self.running.values()):
            command.signal(signal.SIGKILL)


_SETSID = shutil.which("setsid")
"""util-linux's setsid, when there is one: each command runs in a session
of its own, so that Ctrl-C in a terminal reaches the worker, which finishes
the jobs in hand, and not the commands running them."""


def _job_logger(job, seconds: float, error) -> None:
    """``gloom worker -v``: a line per job.  A job whose answer the daemon
    said it drops (cancelled, or given up past its timeout) is not called
    answered."""
    error = getattr(error, "value", error)  # a Failure's exception
    dropped = getattr(job, "dropped", None)
    if dropped is not None:
        word = "cancelled" if dropped == "cancelled" else "timed out"
        how = "; its command was stopped" if isinstance(error, _Stopped) else ""
        outcome = f"{word}{how}; the daemon drops its answer"
    else:
        outcome = "answered" if error is None else f"failed: {_describe(error)}"
    _say(f"job {job.id} ({job.type}) {seconds:.3f} s {outcome}")


@defer.inlineCallbacks
def _worker(session: _Session, args):
    from gloom.txclient import Worker

    argv = args.argv
    slaves = args.slaves_at
    commands = _Commands(session.reactor, args, [_SETSID, argv[0], *argv[1:]] if _SETSID else argv)
    reported = []

    def report(text):
        reported.append(text)
        _say(text)

    try:
        worker = Worker(args.type, commands.run, concurrency=args.concurrency, slaves=slaves,
                        reactor=session.reactor, report=report,
                        on_job=_job_logger if args.verbose else None)
    except ValueError as e:
        raise UsageError(str(e)) from None
    _say(f"serving {args.type!r} with {args.concurrency} x {' '.join(argv)} (from {_names(slaves)}); "
         "Ctrl-C or SIGTERM finishes the jobs in hand and exits")

    def signalled(signum, count):
        if count == 1:
            busy = worker.busy
            _say(f"{_signal_word(signum)}: finishing {busy} job(s) in hand, then exiting (again to stop at once)"
                 if busy else f"{_signal_word(signum)}: exiting")
            defer.maybeDeferred(worker.stop).addErrback(lambda failure: None)
            return None
        commands.abandon()
        _say(f"{_signal_word(signum)} again: stopping now; the daemon queues the unfinished jobs again")
        return 128 + signum

    session.on_signal = signalled
    worker.start()
    try:
        yield worker.done
    except WorkerError as e:
        message = str(e)
        if not reported or reported[-1] != message:
            _say(message)
        return EXIT_FAILED
    return EXIT_OK


# --- status ----------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s"


def _table(headings, rows) -> List[str]:
    """Columns: the first left-aligned, the rest right-aligned."""
    widths = [max(len(row[i]) for row in [headings] + rows) for i in range(len(headings))]
    return ["  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i])
                      for i, cell in enumerate(row)).rstrip() for row in [headings] + rows]


def format_status(stats: dict, unreachable: Optional[Dict[str, str]] = None) -> str:
    """The stats as a readable table.

    :param stats: one daemon's figures, as the stats action returns them,
        or several daemons' sums as `gloom.core.sum_stats` makes them.
    :param unreachable: the daemons that did not answer, with why.
    :returns: a row per daemon (when there are several), a table of the
        types, then the connections, the uptime and the job totals.
    """
    unreachable = unreachable or {}
    daemons = stats.get("daemons") or {}
    lines = []
    if len(daemons) > 1 or unreachable:
        width = max(len(name) for name in ["DAEMON", *daemons, *unreachable])
        rows = [(name.ljust(width), str(each.get("masters", 0)), str(each.get("slaves", 0)),
                 str(sum(t.get("queued", 0) for t in each.get("types", {}).values())),
                 str(sum(t.get("running", 0) for t in each.get("types", {}).values())),
                 _duration(each.get("uptime", 0)), str(each.get("version", "?")))
                for name, each in daemons.items()]
        lines += _table(("DAEMON".ljust(width), "MASTERS", "SLAVES", "QUEUED", "RUNNING", "UP", "VERSION"),
                        rows)
        lines += [f"{name.ljust(width)}  unreachable: {why}" for name, why in unreachable.items()]
        if not daemons:
            return "\n".join(lines)
        lines.append("")
    headings = ("TYPE", "QUEUED", "RUNNING", "IDLE SLAVES", "BUSY SLAVES")
    rows = [(name, str(t.get("queued", 0)), str(t.get("running", 0)), str(t.get("idle_slaves", 0)),
             str(t.get("busy_slaves", 0))) for name, t in sorted(stats["types"].items())]
    lines += _table(headings, rows)
    if not rows:
        lines.append("(no jobs and no slaves)")
    if stats.get("types_omitted"):
        lines.append(f"(and {stats['types_omitted']} less busy types)")
    paused = [str(name) for name in stats.get("paused") or []]
    if paused:
        where = ""
        if len(daemons) > 1:
            on = {name: [daemon for daemon, each in daemons.items() if name in (each.get("paused") or [])]
                  for name in paused}
            where = "" if all(len(each) == len(daemons) for each in on.values()) else " (" + "; ".join(
                f"{name} on {', '.join(each)}" for name, each in on.items()) + ")"
        lines.append(f"paused: {', '.join(paused)}{where}")
    if stats.get("draining"):
        if len(daemons) > 1:
            lines.append("draining: " + ", ".join(name for name, each in daemons.items() if each.get("draining"))
                         + " (taking no new jobs; exiting once the jobs are done)")
        else:
            lines.append("draining: taking no new jobs; exiting once the jobs are done")
    totals = stats["totals"]
    scope = f"{len(daemons)} daemons: " if len(daemons) > 1 else ""
    lines += [
        "",
        f"{scope}masters {stats['masters']}   slaves {stats['slaves']}   "
        f"up {_duration(stats['uptime'])}   version {stats['version']}",
        "jobs: " + "   ".join(f"{name.replace('_', ' ')} {totals[name]}" for name in totals),
    ]
    return "\n".join(lines)


@defer.inlineCallbacks
def _status(session: _Session, args):
    from gloom.txclient import MasterClient

    reactor = session.reactor
    watch = args.watch
    # One client per daemon: each daemon's figures (or why it did not
    # answer) on their own, and this command's own connection to it known.
    def policy(attempt, cap=max(watch or 0, 0.5)):  # with --watch, retry at least once a refresh
        return min(cap, 0.5 * 2 ** attempt)
    try:
        clients = OrderedDict((core.display_name(address),
                               MasterClient([address], reactor, fail_after=1,
                                            retry_policy=policy if watch else None))
                              for address in args.masters_at)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if watch:
        session.on_signal = lambda signum, count: EXIT_OK
    for client in clients.values():
        client.start()
    try:
        while True:
            # Each bounded (REPLY_TIMEOUT; with --watch, also by the refresh),
            # so that a silent daemon is a row of its own, not a hang.
            bound = min(REPLY_TIMEOUT, max(2.0, watch)) if watch else REPLY_TIMEOUT
            asked = [client.stats().addTimeout(bound, reactor) for client in clients.values()]
            answers = yield defer.DeferredList(asked, consumeErrors=True)
            by_daemon, unreachable = OrderedDict(), OrderedDict()
            for name, (ok, value) in zip(clients, answers):
                if ok:
                    own = dict(value)
                    own["masters"] = max(0, own.get("masters", 0) - 1)  # not this command's
                    by_daemon[name] = own
                elif value.check(defer.TimeoutError, defer.CancelledError):
                    unreachable[name] = (_no_reply() if bound == REPLY_TIMEOUT else
                                         f"no reply within {bound:g} s (is it a Gloom master port?)")
                elif value.check(GloomError):
                    unreachable[name] = str(value.value)
                else:
                    value.raiseException()
            if not by_daemon and not watch:
                for name, why in unreachable.items():
                    _say(why if name in why else f"{name}: {why}")
                return EXIT_UNREACHABLE
            total = core.sum_stats(by_daemon)
            if args.json:
                if unreachable:
                    total["unreachable"] = dict(unreachable)
                _out(json.dumps(total, indent=2, ensure_ascii=False))
            else:
                if watch and sys.stdout.isatty():
                    sys.stdout.write("\x1b[H\x1b[2J")
                _out(format_status(total, unreachable))
            if not watch:
                for name, why in unreachable.items():
                    _say(why if name in why else f"{name}: {why}")
                return EXIT_UNREACHABLE if unreachable else EXIT_OK
            if not sys.stdout.isatty():
                _out("")
            yield task.deferLater(reactor, watch, lambda: None)
    finally:
        yield defer.DeferredList([_bounded(defer.maybeDeferred(client.stop), reactor, 1.0)
                                  for client in clients.values()])


# --- cancel ------------------------------------------------------------------------------


@defer.inlineCallbacks
def _cancel(session: _Session, args):
    from gloom.txclient import MasterClient

    reactor = session.reactor
    try:
        clients = [MasterClient([address], reactor, fail_after=1) for address in args.masters_at]
    except ValueError as e:
        raise UsageError(str(e)) from None
    for client in clients:
        client.start()

    @defer.inlineCallbacks
    def ask(client):
        yield client.stats()  # once connected: the daemon itself answers the cancel
        result = yield client.cancel(args.id)
        return result

    try:
        answers = yield defer.DeferredList([_replied(ask(client), reactor, core.display_name(address))
                                            for client, address in zip(clients, args.masters_at)],
                                           consumeErrors=True)
    finally:
        yield defer.DeferredList([_bounded(defer.maybeDeferred(client.stop), reactor, 1.0)
                                  for client in clients])
    if any(ok for ok, _ in answers):
        _say(f"job {args.id} cancelled")
        return EXIT_OK
    errors = [failure.value for _, failure in answers]
    refusals = [e for e in errors if isinstance(e, ServerError)]
    if refusals:
        error = refusals[0]
        hint = (" (a job that is not detached can be cancelled only over the connection that submitted it)"
                if error.error == "unknown_job" else "")
        _say(_describe(error) + hint)
        lost = [e for e in errors if isinstance(e, TransportError)]
        for each in lost:  # the job may be on a daemon that did not answer
            _say(_describe(each))
        return EXIT_UNREACHABLE if lost else EXIT_FAILED
    for error in errors:
        if not isinstance(error, GloomError):
            raise error
        _say(_describe(error))
    return _status_of(errors[0])


# --- pause, resume, clear, drain ------------------------------------------------------------

_ADMIN_DONE = {"pause": "paused", "resume": "resumed", "drain": "draining"}


@defer.inlineCallbacks
def _admin(session: _Session, args):
    """``gloom pause|resume|clear TYPE`` and ``gloom drain``: each daemon
    given is asked on a connection of its own, so each one's outcome is
    known (and said) on its own."""
    from gloom.txclient import MasterClient

    reactor = session.reactor
    action = args.command
    try:
        clients = OrderedDict((core.display_name(address), MasterClient([address], reactor, fail_after=1))
                              for address in args.masters_at)
    except ValueError as e:
        raise UsageError(str(e)) from None

    def ask(client):
        if not client.up:
            why = "; ".join(client.unreachable.values()) or f"cannot connect to {client.daemons[0]}"
            raise TransportError(why)
        if action == "drain":
            return client.drain()
        return getattr(client, action)(args.type)

    try:
        yield defer.DeferredList([client.start() for client in clients.values()])
        answers = yield defer.DeferredList([_replied(defer.maybeDeferred(ask, client), reactor, name)
                                            for name, client in clients.items()], consumeErrors=True)
    finally:
        yield defer.DeferredList([_bounded(defer.maybeDeferred(client.stop), reactor, 1.0)
                                  for client in clients.values()])
    status, done, said = EXIT_OK, OrderedDict(), set()
    for name, (ok, value) in zip(clients, answers):
        if ok:
            done[name] = value
            continue
        error = value.value
        if not isinstance(error, GloomError):
            value.raiseException()
        status = max(status, _status_of(error))
        if isinstance(error, ServerError) and error.error == "forbidden":
            line = (f"{name} refused {action}: admin actions are off there; start the daemon with --admin "
                    "to allow them")
        elif isinstance(error, TransportError):
            line = _describe(error)
        else:
            line = f"{name} refused {action}: {_describe(error)}"
        if line not in said:
            said.add(line)
            _say(line)
    where = f" on {', '.join(done)}" if len(clients) > 1 else ""
    if action == "clear":
        if done:
            counts = {name: int(value or 0) for name, value in done.items()}
            total = sum(counts.values())
            each = (" (" + ", ".join(f"{name}: {count}" for name, count in counts.items()) + ")"
                    if len(clients) > 1 else "")
            _out(f"cleared {total} job{'' if total == 1 else 's'} of type {args.type!r}{each}")
    elif done:
        what = f" {args.type!r}" if action != "drain" else ""
        tail = "; it exits once its jobs are done" if action == "drain" and len(clients) == 1 else (
            "; each exits once its jobs are done" if action == "drain" else "")
        _say(f"{_ADMIN_DONE[action]}{what}{where}{tail}")
    return status


# --- job and dead ------------------------------------------------------------------------


def _when(seconds: Any) -> str:
    """A unix time as ISO 8601 in UTC, to the second."""
    try:
        return datetime.fromtimestamp(float(seconds), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (TypeError, ValueError, OverflowError, OSError):
        return str(seconds)


def _one_line(text: Any, width: int = 0) -> str:
    """Text on one line (runs of whitespace as one space), `printable`,
    and cut to ``width`` columns if given."""
    text = str(text)
    if width and len(text) > 8 * width + 64:
        text = text[:8 * width + 64]  # more than can be shown: no need to read it all
    line = printable(" ".join(text.split()))
    return fit(line, width) if width else line


def format_job(status: dict, now: Optional[float] = None) -> str:
    """A job's status, for people: a line with its id and state (and the
    daemon that has it, when the client asked several), then what applies
    of its kind, type, priority and attempts, its unique key, its last
    progress (``done/total`` and the start of its data, made `printable`),
    when it runs or ended, and its result or the reason it failed.

    :param status: the dict `gloom.txclient.MasterClient.status` fires with.
    :param now: the time to count a delayed job's wait from; by default, now.
    """
    head = f"{status.get('id')}  {status.get('state')}"
    if status.get("daemon"):
        head += f"  (on {status['daemon']})"
    lines = [head]
    if status.get("state") == "unknown":
        return head
    facts = []
    if "detached" in status:
        facts.append("detached" if status["detached"] else "attached")
    if "type" in status:
        facts.append(f"type {status['type']}")
    if "priority" in status:
        facts.append(f"priority {status['priority']}")
    if "attempts" in status:
        attempts = status["attempts"]
        facts.append(f"{attempts} attempt" + ("" if attempts == 1 else "s"))
    if facts:
        lines.append("  " + ", ".join(facts))
    if isinstance(status.get("unique"), str):
        lines.append(f"  unique key: {_quoted(status['unique'])}")
    if isinstance(status.get("progress"), dict) and status["progress"]:
        lines.append("  progress: " + format_progress(status["progress"], 68, bar=False))
    if "run_at" in status:
        wait = float(status["run_at"]) - (time.time() if now is None else now)
        lines.append(f"  runs at {_when(status['run_at'])}" + (f" (in {_duration(wait)})" if wait >= 1 else ""))
    if "ended_at" in status:
        lines.append(f"  ended at {_when(status['ended_at'])}")
    if "result" in status:
        lines.append(f"  result: {printable(_dump(status['result']))}")
    if "reason" in status:
        lines.append(f"  reason: {_one_line(status['reason'])}")
    return "\n".join(lines)


def _quoted(text: str, width: int = 100) -> str:
    """A string quoted as Python writes it (control characters escaped),
    cut to about ``width`` characters."""
    if len(text) > width:
        return repr(text[:width]) + "..."
    return repr(text)


def format_dead(dead: "core.DeadList") -> str:
    """A page of dead jobs as a table (a DAEMON column when the entries
    name theirs), each reason on one line of at most 80 characters, then
    which part of the whole list it is.

    :param dead: what `gloom.txclient.MasterClient.dead_list` fires with.
    """
    offset, total = dead.offset, dead.total
    if not dead:
        return "(no dead jobs)" if not total else f"(no dead jobs from number {offset + 1}; {total} in all)"
    several = any("daemon" in entry for entry in dead)
    headings = ["ID", "TYPE", "PRIORITY", "ATTEMPTS", "ENDED"] + (["DAEMON"] if several else []) + ["REASON"]
    rows = [[str(entry.get("id")), str(entry.get("type", "")), str(entry.get("priority", "")),
             str(entry.get("attempts", "")), _when(entry.get("ended_at"))]
            + ([str(entry.get("daemon", ""))] if several else []) + [_one_line(entry.get("reason", ""), 80)]
            for entry in dead]
    widths = [max(len(row[i]) for row in [headings] + rows) for i in range(len(headings))]
    numbers = {2, 3}
    lines = ["  ".join(cell.rjust(widths[i]) if i in numbers else cell.ljust(widths[i])
                       for i, cell in enumerate(row)).rstrip() for row in [headings] + rows]
    last = offset + len(dead)
    footer = f"dead jobs {offset + 1}-{last} of {total}"
    if last < total:
        footer += f"; next: --offset {last}"
    return "\n".join(lines + ["", footer])


def _say_unreachable(unreachable: Dict[str, str], said: Optional[set] = None) -> None:
    """Say why each daemon could not be reached (each line once)."""
    said = set() if said is None else said
    for name, why in unreachable.items():
        line = why if name in why else f"{name}: {why}"
        if line not in said:
            said.add(line)
            _say(line)


@defer.inlineCallbacks
def _silent_daemons(session: _Session, addresses: List[str], seconds: float = REPLY_TIMEOUT):
    """The daemons among ``addresses`` that take a connection but do not
    answer a stats request within `REPLY_TIMEOUT` (a stopped daemon, the
    --http port), by address, with why: each is asked on a connection of
    its own, all at once, so that a request over several daemons can leave
    those out rather than wait for them for ever.  One that cannot be
    reached at all is not in it (the client says why on its own)."""
    from gloom.txclient import MasterClient

    reactor = session.reactor
    clients = [MasterClient([address], reactor, fail_after=1) for address in addresses]
    try:
        for client in clients:
            client.start()
        answers = yield defer.DeferredList(
            [defer.maybeDeferred(client.stats).addTimeout(seconds, reactor) for client in clients],
            consumeErrors=True)
    finally:
        yield defer.DeferredList([_stop(client, reactor) for client in clients])
    return OrderedDict((address, _no_reply(core.display_name(address), seconds))
                       for address, (ok, value) in zip(addresses, answers)
                       if not ok and value.check(defer.TimeoutError))


@defer.inlineCallbacks
def _connected_master(session: _Session, args):
    """A MasterClient over every daemon given that answers (see
    `_silent_daemons`), once each was tried; and the silent ones, by
    display name, with why.

    :raises TransportError: if none could be reached.
    """
    from gloom.txclient import MasterClient

    try:
        silent = yield _silent_daemons(session, args.masters_at)
        master = MasterClient([a for a in args.masters_at if a not in silent] or args.masters_at,
                              session.reactor, fail_after=1)
    except ValueError as e:
        raise UsageError(str(e)) from None
    silent = OrderedDict((core.display_name(address), why) for address, why in silent.items())
    if len(silent) == len(args.masters_at):
        yield _stop(master, session.reactor)
        raise TransportError("; ".join(silent.values()))
    yield master.start()
    if not master.up:
        why = "; ".join(list(silent.values()) + list(master.unreachable.values())) or "no daemon could be reached"
        yield _stop(master, session.reactor)
        raise TransportError(why)
    return master, silent


def _stop(master, reactor) -> defer.Deferred:
    return _bounded(defer.maybeDeferred(master.stop), reactor, 1.0)


@defer.inlineCallbacks
def _job(session: _Session, args):
    master, silent = yield _connected_master(session, args)
    reactor = session.reactor
    try:
        answers = yield defer.DeferredList([_replied(master.status(job_id), reactor, _names(master.up))
                                            for job_id in args.ids], consumeErrors=True)
        unreachable = dict(silent, **master.unreachable)
    finally:
        yield _stop(master, session.reactor)
    status, said = EXIT_OK, set()
    unknown = False
    for job_id, (ok, value) in zip(args.ids, answers):
        if ok:
            unknown = unknown or value.get("state") == "unknown"
            _out(_dump(value) if args.json else format_job(value))
            continue
        error = value.value
        if not isinstance(error, GloomError):
            value.raiseException()
        status = max(status, _status_of(error))
        if args.json:
            _out(_dump(dict(id=job_id, **_error_object(error))))
        line = _describe(error) if isinstance(error, TransportError) else f"{job_id}: {_describe(error)}"
        if line not in said:
            said.add(line)
            _say(line)
    _say_unreachable(unreachable, said)
    if unknown:
        status = max(status, EXIT_UNREACHABLE if unreachable else EXIT_FAILED)
    return status


@defer.inlineCallbacks
def _dead(session: _Session, args):
    master, silent = yield _connected_master(session, args)
    reactor = session.reactor
    try:
        if args.dead_action == "list":
            try:
                dead = yield _replied(master.dead_list(args.offset, args.limit), reactor, _names(master.up))
            finally:
                unreachable = dict(silent, **master.unreachable)
        else:
            ask = master.dead_retry if args.dead_action == "retry" else master.dead_discard
            answers = yield defer.DeferredList([_replied(ask(job_id), reactor, _names(master.up))
                                                for job_id in args.ids], consumeErrors=True)
            unreachable = dict(silent, **master.unreachable)
    finally:
        yield _stop(master, session.reactor)
    if args.dead_action == "list":
        unreachable.update(dead.unreachable)
        if args.json:
            figures = {"total": dead.total, "offset": dead.offset, "dead": list(dead)}
            if unreachable:
                figures["unreachable"] = dict(unreachable)
            _out(_dump(figures))
        else:
            _out(format_dead(dead))
        _say_unreachable(unreachable)
        return EXIT_UNREACHABLE if unreachable else EXIT_OK
    done = "queued again" if args.dead_action == "retry" else "discarded"
    status, said = EXIT_OK, set()
    for job_id, (ok, value) in zip(args.ids, answers):
        if ok:
            _say(f"job {job_id} {done}")
            continue
        error = value.value
        if not isinstance(error, GloomError):
            value.raiseException()
        if isinstance(error, ServerError) and error.error == "unknown_job" and unreachable:
            status = max(status, EXIT_UNREACHABLE)  # it may be on a daemon that did not answer
        status = max(status, _status_of(error))
        line = _describe(error)
        if line not in said:
            said.add(line)
            _say(line)
    if status != EXIT_OK:
        _say_unreachable(unreachable, said)
    return status


# --- bench -------------------------------------------------------------------------------


@defer.inlineCallbacks
def _bench(session: _Session, args):
    from gloom.bench import Bench

    progress = args.progress if args.progress is not None else sys.stderr.isatty()
    bench = Bench(session.reactor, args.masters_at, args.slaves_at, masters=args.masters, slaves=args.slaves,
                  window=args.window, body_size=args.body_size, jobs=args.jobs,
                  progress=sys.stderr if progress else None, drain=args.drain,
                  reports=args.reports)

    signals: List[int] = []

    def signalled(signum, count):
        if count > 1:
            return _interrupted(signum, count)
        signals.append(signum)
        bench.stop()  # the run ends with the figures so far
        return None

    session.on_signal = signalled
    result = yield bench.run()
    _out(json.dumps(result.figures()) if args.json else result.table())
    if signals:
        return _interrupted(signals[0], 1)
    return EXIT_OK if not result.errors else EXIT_FAILED


# --- main -------------------------------------------------------------------------------------

_COMMANDS = {"submit": _submit, "worker": _worker, "status": _status, "cancel": _cancel, "job": _job,
             "dead": _dead, "pause": _admin, "resume": _admin, "clear": _admin, "drain": _admin,
             "bench": _bench}


def _check(args, parser: argparse.ArgumentParser) -> None:
    """Refuse bad usage before connecting anywhere.

    :raises UsageError: for most mistakes; a mistake in ``gloom worker``'s
        own arguments shows that subcommand's usage and exits.
    """
    for name in ("window", "timeout", "wait", "concurrency", "kill_after", "watch", "jobs"):
        _positive(getattr(args, name, None), "--" + name.replace("_", "-"),
                  core.MAX_TIMEOUT if name == "timeout" else None)
    if getattr(args, "master", False) is not False:
        args.masters_at = _masters(args)
    if getattr(args, "slave", False) is not False:
        args.slaves_at = _slaves(args)
    if args.command == "submit":
        if not args.type:
            raise UsageError("TYPE must not be empty")
        if args.lines and args.body is not None:
            raise UsageError("--lines reads bodies from standard input; give no BODY")
        if args.id is not None and (args.lines or not args.id):
            raise UsageError("--id names one job: not with --lines" if args.id else "--id must not be empty")
        if args.detach and args.wait:
            raise UsageError("--wait waits for an answer, and a detached job gets none")
        if args.detach and args.resubmit:
            raise UsageError("--resubmit is not for detached jobs: a daemon that dropped the "
                             "connection may have taken one (gloom job ID says)")
        if args.unique is not None:
            if args.lines:
                raise UsageError("--unique names one job: not with --lines")
            if args.detach:
                raise UsageError("--unique is not for detached jobs: their ids are unique on the daemon "
                                 "already (give the key as --id)")
            try:
                core.unique_key(args.unique, spell=lambda name: "--" + name)
            except ValueError as e:
                raise UsageError(str(e)) from None
        args.options = _job_options(args)
        if not args.lines and args.body not in (None, "-"):
            _parse_body(args.body, "BODY")
    elif args.command == "dead" and args.dead_action == "list":
        if args.offset < 0:
            raise UsageError(f"--offset must not be negative, not {args.offset}")
        if not 1 <= args.limit <= core.MAX_PAGE:
            raise UsageError(f"--limit must be from 1 to {core.MAX_PAGE}, not {args.limit}")
    elif args.command in ("pause", "resume", "clear"):
        if not args.type:
            raise UsageError("TYPE must not be empty")
    elif args.command in ("job", "dead"):
        for job_id in args.ids:
            if not job_id:
                raise UsageError("a job id must not be empty")
    elif args.command == "worker":
        usage = parser.subparsers["worker"]
        if not args.type:
            usage.error("give the job TYPE and the command to run after --, e.g. gloom worker upper "
                        "-- tr a-z A-Z")
        if args.stray:
            usage.error(f"put the command after --, as in: gloom worker {args.type} -- "
                        f"{' '.join(args.stray)}")
        if not args.argv:
            usage.error(f"give the command to run after --, e.g. gloom worker {args.type} -- tr a-z A-Z")
        if shutil.which(args.argv[0]) is None:
            raise UsageError(f"cannot run {args.argv[0]}: no such program")
    elif args.command == "bench":
        for name in ("masters", "slaves"):
            _positive(getattr(args, name), f"--{name}")
        if args.body_size < 0:
            raise UsageError("--body-size must not be negative")
        if not 0 <= args.reports <= 1000:
            raise UsageError("--reports must be from 0 to 1000")


def _job_options(args) -> Dict[str, Any]:
    """``gloom submit``'s --detach, --delay, --at, --retries and --backoff,
    as `gloom.core.job_options` checks them."""
    delay = at = retries = None
    if args.delay is not None:
        try:
            delay = float(args.delay)
        except ValueError:
            raise UsageError(f"--delay must be a number of seconds, not {args.delay!r}") from None
        if not -float("inf") < delay < float("inf"):  # NaN fails too
            raise UsageError(f"--delay must be a number of seconds up to {core.MAX_DELAY}, not {args.delay}")
    if args.at is not None:
        at = parse_time(args.at)
        if at > time.time() + core.MAX_DELAY:
            raise UsageError(f"--at must be at most {core.MAX_DELAY} seconds (365 days) from now, "
                             f"not {args.at}")
    if args.retries is not None:
        try:
            retries = int(args.retries)
        except ValueError:
            raise UsageError(f"--retries must be a whole number from 0 to {core.MAX_RETRIES}, "
                             f"not {args.retries!r}") from None
    options = dict(detach=args.detach, delay=delay, at=at, retries=retries, backoff=args.backoff)
    try:
        core.job_options(**options, spell=lambda name: "--" + name)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return options


def parse_time(text: str) -> float:
    """A time given on the command line, as seconds since the epoch: a
    number of seconds, or an ISO 8601 date and time (``Z`` or an offset
    for its zone; without one, local time), not before 1970.

    :raises UsageError: if it is neither.
    """
    seconds = None
    try:
        seconds = float(text)
    except ValueError:
        iso = text.strip()
        if iso[-1:] in ("Z", "z"):
            iso = iso[:-1] + "+00:00"
        try:
            seconds = datetime.fromisoformat(iso).timestamp()
        except (ValueError, OverflowError, OSError):
            pass
    if seconds is not None and seconds < 0:
        raise UsageError(f"--at must not be before 1970, not {text!r}")
    if seconds is None or not 0 <= seconds < float("inf"):  # NaN fails too
        raise UsageError(f"--at must be seconds since the epoch or an ISO 8601 time such as "
                         f"2026-01-02T03:00:00Z, not {text!r}")
    return seconds


def _split_command(argv: List[str]):
    """``gloom worker ... -- CMD ARGS``: the part after ``--`` is the command."""
    if "worker" in argv and "--" in argv and argv.index("worker") < argv.index("--"):
        split = argv.index("--")
        return argv[:split], argv[split + 1:]
    return argv, []


def main(argv: Optional[List[str]] = None) -> int:
    """Run the ``gloom`` command: parse the arguments, run the reactor until
    the subcommand is done, and report any error on standard error.

    :param argv: the arguments, without the program name; by default,
        ``sys.argv[1:]``.
    :returns: the exit status (see the module's documentation).
    """
    own, command = _split_command(list(sys.argv[1:] if argv is None else argv))
    parser = _parser()
    args = parser.parse_args(own)
    args.argv = command
    try:
        _check(args, parser)
    except UsageError as e:
        return _fail(str(e), EXIT_USAGE)
    outcome = {}

    from twisted.internet import reactor

    global _SESSION
    session = _SESSION = _Session(reactor)

    def finished(result):
        outcome["result"] = result
        try:
            reactor.stop()
        except ReactorNotRunning:
            pass

    def on_signal(signum, frame):
        reactor.callFromThread(session.signalled, signum)

    def run():
        # Twisted's own handlers stop the reactor at once; these let each
        # subcommand decide (name the unanswered jobs, finish the jobs in hand).
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        session.ended.addBoth(finished)
        defer.maybeDeferred(_COMMANDS[args.command], session, args).addBoth(session.end)

    reactor.callWhenRunning(run)
    try:
        reactor.run()
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED)
    result = outcome.get("result", EXIT_INTERRUPTED)
    if not isinstance(result, Failure):
        return result or 0
    error = result.value
    if isinstance(error, (UsageError, EncodeError)):
        return _fail(str(error), EXIT_USAGE)
    if isinstance(error, GloomError):
        return _fail(_describe(error), _status_of(error))
    if isinstance(error, ValueError):
        return _fail(str(error), EXIT_USAGE)
    result.printTraceback(file=sys.stderr)
    return EXIT_FAILED


def entry_point() -> None:
    """The ``gloom`` console script.  SIGPIPE stays ignored (see `_out`)."""
    try:
        status = main()
    except KeyboardInterrupt:  # before the reactor took over Ctrl-C
        status = _fail("interrupted", EXIT_INTERRUPTED)
    sys.exit(status)


if __name__ == "__main__":
    entry_point()
