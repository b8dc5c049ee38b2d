"""The ``gloom`` command: submit jobs, turn any program into a worker,
watch the daemon, and measure it.

Exit status: 0 success; 1 a job failed or the daemon refused a request;
2 bad usage; 3 the daemon could not be reached or the connection was lost.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import List, Optional

from twisted.internet import defer, protocol, task
from twisted.internet.error import ProcessDone, ProcessTerminated, ReactorNotRunning
from twisted.python.failure import Failure

from gloom import __version__
from gloom.client import Job, ServerError, TransportError

EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 1, 2, 3

EPILOG = {
    "submit": """examples:
  gloom submit upper '"hello"'                 run one job, print its answer
  echo '{"n": 2}' | gloom submit square -      the body from standard input
  gloom submit resize --lines < bodies.jsonl   one job per line, answers in order
  gloom submit --master tls:gloom.example.com:9998:trustRoots=ca/ upper '"hi"'
""",
    "worker": """examples:
  gloom worker upper -- tr a-z A-Z             body on stdin, answer from stdout
  gloom worker thumb -c 4 --kill-after 30 -- ./make-thumbnail
  gloom worker upper --raw -- tr a-z A-Z       a string body as plain text

The command gets the job's body as JSON on standard input (with --raw, a
string body as plain text), and the job's id and type in GLOOM_JOB_ID and
GLOOM_JOB_TYPE. Its standard output is the answer: JSON if it parses, else
a string (one trailing newline removed). A non-zero exit status, or running
longer than --kill-after, fails the job with the status and the end of its
standard error. SIGTERM lets the jobs in hand finish before exiting.
""",
    "status": """examples:
  gloom status                                 a table of types and totals
  gloom status --json                          the stats JSON, for scripts
  gloom status --watch 1                       refresh every second
""",
    "bench": """examples:
  gloom bench                                  4 masters x 64 in flight, 8 slaves
  gloom bench --jobs 100000 --body-size 1024 --slaves 16
  gloom bench --drain --jobs 100000            queue them all, then drain
""",
}


class UsageError(Exception):
    """A mistake on the command line, reported with exit status 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gloom", description="Command-line tools for the Gloom job daemon.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Addresses are host:port or Twisted client endpoint strings (tls:... for TLS).\n"
               "Exit status: 0 ok, 1 a job failed or was refused, 2 bad usage, 3 daemon unreachable.")
    parser.add_argument("--version", action="version", version=f"gloom {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    def command(name, help_text):
        sub = commands.add_parser(name, help=help_text, description=help_text, epilog=EPILOG[name],
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        return sub

    def master_option(sub):
        sub.add_argument("--master", default="127.0.0.1:9998", metavar="ADDRESS",
                         help="the daemon's master port (default 127.0.0.1:9998)")

    def slave_option(sub):
        sub.add_argument("--slave", default="127.0.0.1:9999", metavar="ADDRESS",
                         help="the daemon's slave port (default 127.0.0.1:9999)")

    submit = command("submit", "Submit jobs and print their answers as JSON.")
    submit.add_argument("type", help="the job type")
    submit.add_argument("body", nargs="?", default=None,
                        help="the body as JSON, or - to read it from standard input (default null)")
    submit.add_argument("--lines", action="store_true",
                        help="one JSON body per line of standard input; answers as JSON lines, in order")
    submit.add_argument("--window", type=int, default=32, help="jobs in flight with --lines (default 32)")
    submit.add_argument("--priority", type=int, default=0, help="the jobs' priority (default 0)")
    submit.add_argument("--timeout", type=float, help="seconds one attempt may run on a slave")
    master_option(submit)

    worker = command("worker", "Answer jobs by running a command once per job.")
    worker.usage = ("gloom worker [-h] [-c N] [--raw] [--kill-after SECONDS] [--slave ADDRESS] "
                    "TYPE -- CMD [ARGS ...]")
    worker.add_argument("type", help="the job type to serve")
    worker.add_argument("-c", "--concurrency", type=int, default=1,
                        help="jobs run at once, one slave connection each (default 1)")
    worker.add_argument("--raw", action="store_true",
                        help="give a string body to the command as plain text, not JSON")
    worker.add_argument("--kill-after", type=float, metavar="SECONDS",
                        help="kill the command and fail the job after this long")
    slave_option(worker)

    status = command("status", "Show what the daemon is doing.")
    status.add_argument("--json", action="store_true", help="print the stats JSON")
    status.add_argument("--watch", type=float, nargs="?", const=2.0, metavar="SECONDS",
                        help="refresh every SECONDS (default 2) until interrupted")
    master_option(status)

    bench = command("bench", "Measure a running daemon's throughput and latency.")
    bench.add_argument("--masters", type=int, default=4, help="master connections (default 4)")
    bench.add_argument("--slaves", type=int, default=8, help="echo slave connections (default 8)")
    bench.add_argument("--window", type=int, default=64, help="jobs in flight per master (default 64)")
    bench.add_argument("--body-size", type=int, default=64, help="bytes of body per job (default 64)")
    bench.add_argument("--jobs", type=int, default=20000, help="jobs in all (default 20000)")
    bench.add_argument("--drain", action="store_true",
                       help="queue every job first (random priorities), then let the slaves drain them")
    bench.add_argument("--json", action="store_true", help="print the figures as JSON")
    bench.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
        help="show a progress bar (default: when standard error is a terminal)")
    master_option(bench)
    slave_option(bench)
    return parser


def _fail(message: str, status: int) -> int:
    print(f"gloom: {message}", file=sys.stderr)
    return status


def _parse_body(text: str, where: str):
    try:
        return json.loads(text)
    except ValueError as e:
        raise UsageError(f"{where} is not valid JSON ({e}); a string needs quotes, e.g. '\"text\"'") from None


def _dump(value) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _positive(value, name: str):
    if value is not None and value <= 0:
        raise UsageError(f"{name} must be positive, not {value}")


# --- submit -----------------------------------------------------------------------


@defer.inlineCallbacks
def _submit(reactor, args):
    from gloom.txclient import MasterClient

    _positive(args.window, "--window")
    _positive(args.timeout, "--timeout")
    if args.lines:
        if args.body is not None:
            raise UsageError("--lines reads bodies from standard input; give no BODY")
        bodies = (_parse_body(line, f"line {number}")
                  for number, line in enumerate(sys.stdin, 1) if line.strip())
    elif args.body == "-":
        bodies = iter([_parse_body(sys.stdin.read(), "standard input")])
    else:
        bodies = iter([None if args.body is None else _parse_body(args.body, "BODY")])
    master = MasterClient(args.master, reactor, fail_after=1)
    master.start()
    try:
        status = yield _run_in_order(master, args, bodies)
    finally:
        yield master.stop()
    return status


@defer.inlineCallbacks
def _run_in_order(master, args, bodies):
    """Submit with up to --window in flight; print answers in input order."""
    in_flight: List[defer.Deferred] = []
    status = 0

    def settle(result):
        return ("ok", result) if not isinstance(result, Failure) else ("failed", result)

    def submit_next():
        try:
            body = next(bodies)
        except StopIteration:
            return False
        in_flight.append(master.submit(args.type, body, args.priority, timeout=args.timeout)
                         .addBoth(settle))
        return True

    while len(in_flight) < args.window and submit_next():
        pass
    while in_flight:
        outcome, value = yield in_flight.pop(0)
        if outcome == "ok":
            print(_dump(value), flush=True)
        else:
            error = value.value
            if isinstance(error, TransportError):
                raise error
            if not isinstance(error, ServerError):
                value.raiseException()
            status = EXIT_FAILED
            print(f"gloom: {error.error}: {error.reason}", file=sys.stderr, flush=True)
            if args.lines:
                print(_dump({"error": error.error, "reason": error.reason}), flush=True)
        submit_next()
    return status


# --- worker -------------------------------------------------------------------------

_STDERR_TAIL = 2000


class _Command(protocol.ProcessProtocol):
    """One run of the worker's command for one job."""

    def __init__(self, stdin: bytes):
        self.stdin = stdin
        self.stdout: List[bytes] = []
        self.stderr = b""
        self.done = defer.Deferred()
        self.killed_after: Optional[float] = None

    def connectionMade(self):
        self.transport.write(self.stdin)
        self.transport.closeStdin()

    def outReceived(self, data):
        self.stdout.append(data)

    def errReceived(self, data):
        self.stderr = (self.stderr + data)[-_STDERR_TAIL:]

    def processEnded(self, reason):
        self.done.callback(reason.value)


class CommandFailed(Exception):
    """The worker's command exited badly; the text is the job's failure reason."""


def _answer_from(output: bytes):
    text = output.decode("utf-8", errors="replace")
    try:
        return json.loads(text)
    except ValueError:
        return text[:-1] if text.endswith("\n") else text


def _run_command(reactor, args, job: Job) -> defer.Deferred:
    if args.raw and isinstance(job.body, str):
        stdin = job.body.encode()
    else:
        stdin = json.dumps(job.body).encode()
    command = _Command(stdin)
    env = dict(os.environ, GLOOM_JOB_ID=str(job.id), GLOOM_JOB_TYPE=str(job.type))
    try:
        reactor.spawnProcess(command, args.argv[0], args.argv, env=env)
    except OSError as e:
        return defer.fail(CommandFailed(f"cannot run {args.argv[0]}: {e.strerror or e}"))
    killer = None
    if args.kill_after:
        def kill():
            command.killed_after = args.kill_after
            try:
                command.transport.signalProcess("KILL")
            except Exception:
                pass
        killer = reactor.callLater(args.kill_after, kill)

    def ended(reason):
        if killer is not None and killer.active():
            killer.cancel()
        tail = command.stderr.decode("utf-8", errors="replace").strip()
        tail = f": {tail}" if tail else ""
        if command.killed_after is not None:
            raise CommandFailed(f"killed after {command.killed_after:g} s{tail}")
        if isinstance(reason, ProcessDone):
            return _answer_from(b"".join(command.stdout))
        if isinstance(reason, ProcessTerminated) and reason.signal is not None:
            raise CommandFailed(f"killed by signal {reason.signal}{tail}")
        code = reason.exitCode if isinstance(reason, ProcessTerminated) else "unknown"
        raise CommandFailed(f"exit status {code}{tail}")

    return command.done.addCallback(ended)


def _worker(reactor, args):
    from gloom.txclient import Worker

    argv = args.argv
    if not argv:
        raise UsageError("give the command to run after --, e.g. gloom worker upper -- tr a-z A-Z")
    _positive(args.concurrency, "--concurrency")
    _positive(args.kill_after, "--kill-after")
    worker = Worker(args.type, lambda job: _run_command(reactor, args, job), args.concurrency,
                    args.slave, reactor, report=lambda message: print(f"gloom: {message}", file=sys.stderr,
                                                                      flush=True))
    print(f"gloom: serving {args.type!r} with {args.concurrency} x {' '.join(argv)} "
          f"(from {args.slave}); SIGTERM finishes the jobs in hand and exits", file=sys.stderr, flush=True)
    worker.start()
    stopped = defer.Deferred()
    reactor.addSystemEventTrigger("before", "shutdown", lambda: worker.stop().addBoth(stopped.callback))
    return stopped.addCallback(lambda _: 0)


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


def format_status(stats: dict) -> str:
    """The stats as a readable table.

    :param stats: the daemon's figures, as the stats action returns them.
    :returns: a table of the types, then the connections, the uptime and
        the job totals, as ``gloom status`` prints them.
    """
    headings = ("TYPE", "QUEUED", "RUNNING", "IDLE SLAVES", "BUSY SLAVES")
    rows = [(name, str(t["queued"]), str(t["running"]), str(t["idle_slaves"]), str(t["busy_slaves"]))
            for name, t in sorted(stats["types"].items())]
    widths = [max(len(row[i]) for row in [headings] + rows) for i in range(len(headings))]
    lines = ["  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i])
                       for i, cell in enumerate(row)) for row in [headings] + rows]
    if not rows:
        lines.append("(no jobs and no slaves)")
    if stats.get("types_omitted"):
        lines.append(f"(and {stats['types_omitted']} less busy types)")
    totals = stats["totals"]
    lines += [
        "",
        f"masters {stats['masters']}   slaves {stats['slaves']}   "
        f"up {_duration(stats['uptime'])}   version {stats['version']}",
        "jobs: " + "   ".join(f"{name.replace('_', ' ')} {totals[name]}" for name in totals),
    ]
    return "\n".join(lines)


@defer.inlineCallbacks
def _status(reactor, args):
    from gloom.txclient import MasterClient

    _positive(args.watch, "--watch")
    master = MasterClient(args.master, reactor, fail_after=1)
    master.start()
    try:
        while True:
            stats = yield master.stats()
            if args.json:
                print(json.dumps(stats, indent=2), flush=True)
            else:
                if args.watch and sys.stdout.isatty():
                    sys.stdout.write("\x1b[H\x1b[2J")
                print(format_status(stats), flush=True)
            if not args.watch:
                return 0
            if not sys.stdout.isatty():
                print(flush=True)
            yield task.deferLater(reactor, args.watch, lambda: None)
    finally:
        yield master.stop()


# --- bench -------------------------------------------------------------------------------


@defer.inlineCallbacks
def _bench(reactor, args):
    from gloom.bench import Bench

    for name in ("masters", "slaves", "window", "jobs"):
        _positive(getattr(args, name), f"--{name.replace('_', '-')}")
    if args.body_size < 0:
        raise UsageError("--body-size must not be negative")
    progress = args.progress if args.progress is not None else sys.stderr.isatty()
    bench = Bench(reactor, args.master, args.slave, masters=args.masters, slaves=args.slaves,
                  window=args.window, body_size=args.body_size, jobs=args.jobs,
                  progress=sys.stderr if progress else None, drain=args.drain)
    result = yield bench.run()
    print(json.dumps(result.figures()) if args.json else result.table())
    return 0 if not result.errors else EXIT_FAILED


# --- main -------------------------------------------------------------------------------------

_COMMANDS = {"submit": _submit, "worker": _worker, "status": _status, "bench": _bench}


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
    args = _parser().parse_args(own)
    args.argv = command
    outcome = {}

    def run(reactor):
        started = defer.maybeDeferred(_COMMANDS[args.command], reactor, args)

        def finished(result):
            if isinstance(result, Failure):
                outcome["failure"] = result
            else:
                outcome["status"] = result
            try:
                reactor.stop()
            except ReactorNotRunning:
                pass

        started.addBoth(finished)

    from twisted.internet import reactor

    reactor.callWhenRunning(run, reactor)
    reactor.run()
    failure = outcome.get("failure")
    if failure is None:
        return outcome.get("status", 0) or 0
    error = failure.value
    if isinstance(error, UsageError):
        return _fail(str(error), EXIT_USAGE)
    if isinstance(error, TransportError):
        return _fail(str(error), EXIT_UNREACHABLE)
    if isinstance(error, ServerError):
        return _fail(f"{error.error}: {error.reason}", EXIT_FAILED)
    if isinstance(error, ValueError):
        return _fail(str(error), EXIT_USAGE)
    failure.printTraceback(file=sys.stderr)
    return EXIT_FAILED


def entry_point() -> None:
    """The ``gloom`` console script."""
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
