"""The ``gloom`` command line, run as a real process against a real daemon
(served in this process's reactor, so the commands run asynchronously)."""

import json
import os
import shutil
import signal
import sys

from twisted.internet import defer, protocol, reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase

from gloom.core import FrameBuffer, frame
from tests.support import reserved_port
from tests.test_integration import DaemonTestCase, wait_until


def gloom_command():
    script = shutil.which("gloom", path=os.path.dirname(sys.executable))
    return [script] if script else [sys.executable, "-m", "gloom.cli"]


class _Run(protocol.ProcessProtocol):
    def __init__(self, stdin, keep_open=False):
        self.stdin = stdin
        self.keep_open = keep_open
        self.out, self.err = [], []
        self.ended = defer.Deferred()
        self._watches = []

    def connectionMade(self):
        if self.stdin is None:
            return  # standard input is a file
        self.transport.write(self.stdin)
        if not self.keep_open:
            self.transport.closeStdin()

    def outReceived(self, data):
        self.out.append(data)
        self._check()

    def errReceived(self, data):
        self.err.append(data)
        self._check()

    def printed(self, predicate, timeout=30):
        """A Deferred that fires once ``predicate(stdout, stderr)`` (the
        bytes so far) holds, checked as output arrives; it fails if the
        process ends first."""
        watch = defer.Deferred(lambda d: self._watches.remove(entry))
        entry = (predicate, watch)
        self._watches.append(entry)
        self._check()
        return watch.addTimeout(timeout, reactor)

    def _check(self):
        out, err = b"".join(self.out), b"".join(self.err)
        for entry in list(self._watches):
            if entry[0](out, err):
                self._watches.remove(entry)
                entry[1].callback(None)

    def processEnded(self, reason):
        out, err = b"".join(self.out).decode(), b"".join(self.err).decode()
        for _, watch in self._watches:
            watch.errback(AssertionError(f"the process ended without printing that:\n{out}\n{err}"))
        self._watches = []
        self.ended.callback((out, err, reason.value.exitCode))


class CLITestCase(DaemonTestCase):
    def start(self, *args, stdin=b"", keep_open=False, env=None, stdin_path=None):
        """Start ``gloom ARGS``; its ProcessProtocol, whose ``ended`` fires
        with (out, err, status).  ``keep_open``: standard input stays open
        for the test to write to; ``env``: more environment variables;
        ``stdin_path``: a file to read standard input from instead."""
        run = _Run(None if stdin_path else stdin, keep_open)
        argv = gloom_command() + list(args)
        environment = {name: value for name, value in os.environ.items() if not name.startswith("GLOOM_")}
        environment.update(env or {})
        fds = None
        if stdin_path:
            with open(stdin_path, "rb") as source:
                fds = {0: os.dup(source.fileno()), 1: "r", 2: "r"}
            self.addCleanup(os.close, fds[0])
        self.processes = getattr(self, "processes", [])
        self.processes.append(reactor.spawnProcess(run, argv[0], argv, env=environment, childFDs=fds))
        self.addCleanup(self._reap, run)
        return run

    def _reap(self, run):
        if not run.ended.called:
            try:
                run.transport.signalProcess("KILL")
            except ProcessExitedAlready:
                pass  # its end is on the way
        return run.ended

    def gloom(self, *args, stdin=b"", env=None):
        """Run ``gloom ARGS`` to the end: a Deferred of (stdout, stderr, status)."""
        return self.start(*args, stdin=stdin, env=env).ended

    def master_arg(self):
        return ["--master", f"127.0.0.1:{self.port('master')}"]

    def slave_arg(self):
        return ["--slave", f"127.0.0.1:{self.port('slave')}"]

    @inlineCallbacks
    def worker(self, job_type, *command, options=(), count=1):
        run = self.start("worker", job_type, *options, *self.slave_arg(), "--", *command)
        yield self.until(lambda: self.scheduler.idle_slaves(job_type) == count)
        return run


class SubmitTests(CLITestCase):
    @inlineCallbacks
    def test_submit_one_job_to_a_command_worker(self):
        yield self.worker("upper", "tr", "a-z", "A-Z")
        out, err, status = yield self.gloom("submit", "upper", '"hello"', *self.master_arg())
        self.assertEqual((out, status), ('"HELLO"\n', 0), err)
        out, err, status = yield self.gloom("submit", "upper", "-", *self.master_arg(), stdin=b'{"k": "v"}')
        self.assertEqual((json.loads(out), status), ({"K": "V"}, 0), err)

    @inlineCallbacks
    def test_lines_stream_in_input_order(self):
        yield self.worker("maybe", "sh", "-c", 'read b; case "$b" in 3) echo no >&2; exit 4;; esac;'
                          ' sleep 0.0$((5 - b)); echo "[$b]"', options=["-c", "3"], count=3)
        lines = b"1\n2\n\n3\n4\n"
        out, err, status = yield self.gloom("submit", "maybe", "--lines", "--window", "3",
                                            *self.master_arg(), stdin=lines)
        self.assertEqual(status, 1)
        self.assertEqual([json.loads(line) for line in out.splitlines()],
                         [[1], [2], {"error": "job_failed", "reason": "exit status 4: no"}, [4]])
        self.assertIn("gloom: line 4: job_failed: exit status 4: no", err)

    @inlineCallbacks
    def test_priority_and_timeout_are_sent(self):
        job = yield self.gloom("submit", "nobody", "1", "--timeout", "0", *self.master_arg())
        self.assertEqual(job[2], 2)
        running = self.start("submit", "nobody", "7", "--priority", "9", "--timeout", "30", *self.master_arg())
        yield self.until(lambda: len(self.scheduler) == 1)
        (queued,) = self.scheduler.jobs()
        self.assertEqual((queued.priority, queued.timeout), (9, 30.0))
        running.transport.signalProcess("KILL")

    @inlineCallbacks
    def test_clear_errors_without_tracebacks(self):
        cases = [
            (["submit", "upper", "not json", *self.master_arg()], 2, "BODY is not valid JSON"),
            (["submit", "upper", "1", "--master", "nonsense"], 2, "neither host:port nor"),
            (["submit", "upper", "1", "--lines", *self.master_arg()], 2, "give no BODY"),
            (["worker", "upper", *self.slave_arg()], 2, "give the command to run after --"),
            (["worker", "upper", "cat", *self.slave_arg()], 2,
             "usage: gloom worker [-h] [-c N] [--raw] [--kill-after SECONDS] [-v] [--slave ADDRESS] "
             "TYPE -- CMD [ARGS ...]\ngloom worker: error: put the command after --, as in: "
             "gloom worker upper -- cat\n"),
            (["worker", "upper", *self.slave_arg(), "--", "/nonexistent/program"], 2,
             "gloom: cannot run /nonexistent/program: no such program\n"),
            (["submit", "echo", "NaN", *self.master_arg()], 2,
             "gloom: BODY is not JSON the daemon takes: NaN is not JSON\n"),
            (["submit", "echo", "--wait", "0", *self.master_arg()], 2, "--wait must be a positive number of seconds, not 0"),
            (["bench", "--jobs", "0", *self.master_arg()], 2, "--jobs must be positive"),
            (["submit"], 2, "the following arguments are required: type"),
        ]
        port = reserved_port(self)  # bound, never listening: connections are refused
        refused = f"gloom: cannot connect to 127.0.0.1:{port}: Connection refused\n"
        cases += [(command + ["--master", f"127.0.0.1:{port}"], 3, refused)
                  for command in (["submit", "upper", "1"], ["status"])]
        # At once: each is a process of its own.
        results = yield defer.gatherResults([self.gloom(*args) for args, _, _ in cases])
        for (args, expected_status, message), (out, err, status) in zip(cases, results):
            self.assertEqual(status, expected_status, (args, err))
            self.assertIn(message, err)
            self.assertNotIn("Traceback", err)
        for (_, _, message), (out, err, status) in zip(cases[-2:], results[-2:]):
            self.assertEqual(err, message)

    @inlineCallbacks
    def test_help_has_examples(self):
        commands = ("submit", "worker", "status", "cancel", "bench")
        results = yield defer.gatherResults([self.gloom(command, "--help") for command in commands])
        for command, (out, err, status) in zip(commands, results):
            self.assertEqual(status, 0)
            self.assertIn("examples:", out)
            self.assertIn("--master" if command != "worker" else "--slave", out)


class WorkerTests(CLITestCase):
    @inlineCallbacks
    def test_raw_bodies_env_and_plain_text_answers(self):
        yield self.worker("env", "sh", "-c", 'cat; echo " $GLOOM_JOB_TYPE"', options=["--raw"])
        out, err, status = yield self.gloom("submit", "env", '"plain text"', *self.master_arg())
        self.assertEqual(json.loads(out), "plain text env")

    @inlineCallbacks
    def test_failures_and_kill_after(self):
        self.scheduler.max_retries = 0
        yield self.worker("bad", "sh", "-c", "cat > /dev/null; echo 'disk on fire' >&2; exit 3")
        out, err, status = yield self.gloom("submit", "bad", "1", *self.master_arg())
        self.assertEqual((out, status), ("", 1))
        self.assertEqual(err, "gloom: job_failed: exit status 3: disk on fire\n")
        yield self.worker("slow", "sleep", "30", options=["--kill-after", "0.2"])
        out, err, status = yield self.gloom("submit", "slow", "1", *self.master_arg())
        self.assertEqual(err, "gloom: job_failed: killed after 0.2 s\n")
        yield self.worker("missing", "sh", "-c", "exec /nonexistent/program")
        out, err, status = yield self.gloom("submit", "missing", "1", *self.master_arg())
        self.assertIn("gloom: job_failed: exit status 127: ", err)
        self.assertEqual(status, 1)

    @inlineCallbacks
    def test_sigterm_finishes_the_job_in_hand(self):
        import tempfile

        scratch = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, scratch, True)
        started, release = (os.path.join(scratch, name) for name in ("started", "release"))
        # Two connections: one runs the job, the other idles.  The command
        # runs until the test releases it.
        worker = yield self.worker("slow", "sh", "-c",
                                   f"touch {started}; until [ -e {release} ]; do sleep 0.01; done; cat",
                                   options=["-c", "2"], count=2)
        answer = self.gloom("submit", "slow", '{"a": 1}', *self.master_arg())
        # Only once its command runs does the worker hold the job: a SIGTERM
        # before that rightly leaves the job to the daemon to queue again.
        yield wait_until(lambda: os.path.exists(started))
        worker.transport.signalProcess("TERM")
        # The worker has taken the signal once its idle connection is gone;
        # the job in hand is still running.
        yield self.until(lambda: self.scheduler.idle_slaves("slow") == 0)
        self.assertFalse(answer.called)
        with open(release, "w"):
            pass
        out, err, status = yield answer
        self.assertEqual((json.loads(out), status), ({"a": 1}, 0), err)
        _, worker_err, worker_status = yield worker.ended
        self.assertEqual(worker_status, 0, worker_err)
        yield self.until(lambda: "slow" not in self.scheduler.types())

    @inlineCallbacks
    def test_reconnects_when_the_daemon_restarts(self):
        yield self.worker("upper", "tr", "a-z", "A-Z")
        yield self.service.stopService()
        self.start_daemon()  # on the same ports, reserved meanwhile
        yield self.until(lambda: self.scheduler.idle_slaves("upper") == 1)
        out, err, status = yield self.gloom("submit", "upper", '"again"', *self.master_arg())
        self.assertEqual(out, '"AGAIN"\n', err)


    @inlineCallbacks
    def test_a_command_running_on_through_a_restart_keeps_its_place(self):
        import tempfile

        scratch = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, scratch, True)
        log, go = os.path.join(scratch, "log"), os.path.join(scratch, "go")
        self.addCleanup(lambda: open(go, "w").close())  # the command ends, whatever the test did
        script = (f'echo start >> {log}; for i in $(seq 1500); do [ -e {go} ] && break; sleep 0.02; done; '
                  f'echo end >> {log}; cat')  # at most 30 s, should the test end first
        yield self.worker("slow", "sh", "-c", script)
        first = self.start("submit", "slow", "1", *self.master_arg())
        yield wait_until(lambda: os.path.exists(log))
        yield self.service.stopService()  # the command runs on; its answer has nowhere to go
        self.start_daemon()
        yield self.until(lambda: len(self.service.factories[1].connections) == 1)  # reconnected
        second = self.start("submit", "slow", "2", *self.master_arg())
        yield self.until(lambda: len(self.scheduler) == 1)
        yield deferLater(reactor, 0.5, lambda: None)  # time for a join that must not come
        self.assertEqual(self.scheduler.idle_slaves("slow"), 0)
        with open(log) as lines:
            self.assertEqual(lines.read().split(), ["start"])  # -c 1: one command at a time
        open(go, "w").close()
        out, err, status = yield second.ended
        self.assertEqual((out, status), ("2\n", 0), err)
        with open(log) as lines:
            self.assertEqual(lines.read().split(), ["start", "end", "start", "end"])
        _, _, status = yield first.ended
        self.assertNotEqual(status, 0)  # its daemon went away


class StatusAndBenchTests(CLITestCase):
    @inlineCallbacks
    def test_status_table_and_json(self):
        submitter = self.start("submit", "queued-type", "1", *self.master_arg())
        yield self.until(lambda: len(self.scheduler) == 1)
        out, err, status = yield self.gloom("status", *self.master_arg())
        self.assertEqual(status, 0, err)
        lines = out.splitlines()
        self.assertEqual(lines[0].split(), ["TYPE", "QUEUED", "RUNNING", "IDLE", "SLAVES", "BUSY", "SLAVES"])
        self.assertEqual(lines[1].split(), ["queued-type", "1", "0", "0", "0"])
        self.assertIn("masters 1 ", out)  # the submitter: not gloom status itself
        self.assertIn("submitted 1", out)
        out, err, status = yield self.gloom("status", "--json", *self.master_arg())
        figures = json.loads(out)
        self.assertEqual(figures["types"]["queued-type"]["queued"], 1)
        self.assertEqual(figures["masters"], 1)
        self.assertEqual(list(figures["daemons"]), [f"127.0.0.1:{self.port('master')}"])
        submitter.transport.signalProcess("KILL")

    @inlineCallbacks
    def test_status_watch_refreshes(self):
        watcher = self.start("status", "--watch", "0.1", *self.master_arg())
        yield watcher.printed(lambda out, err: out.count(b"TYPE") >= 3)
        watcher.transport.signalProcess(signal.SIGINT)
        out, err, status = yield watcher.ended
        self.assertEqual((err, status), ("", 0))

    @inlineCallbacks
    def test_bench(self):
        out, err, status = yield self.gloom("bench", "--jobs", "600", "--masters", "2", "--slaves", "2",
                                            "--window", "8", "--body-size", "10", "--progress",
                                            *self.master_arg(), *self.slave_arg())
        self.assertEqual(status, 0, err)
        self.assertRegex(out, r"^600 jobs in [0-9.]+ s: [0-9,]+ jobs/s\n")
        self.assertRegex(out, r"latency ms: p50 [0-9.]+  p90 [0-9.]+  p99 [0-9.]+  max [0-9.]+")
        self.assertIn("2 masters x 8 in flight, 2 slaves, 10-byte bodies; 0 errors", out)
        self.assertIn("600/600", err)
        self.assertEqual(self.scheduler.totals["completed"], 600)

    @inlineCallbacks
    def test_bench_with_progress_reports(self):
        out, err, status = yield self.gloom("bench", "--jobs", "300", "--masters", "2", "--slaves", "2",
                                            "--reports", "2", "--no-progress",
                                            *self.master_arg(), *self.slave_arg())
        self.assertEqual(status, 0, err)
        self.assertIn("2 slaves, 64-byte bodies, 2 progress reports per job; 0 errors", out)
        self.assertEqual((self.scheduler.totals["completed"], self.scheduler.totals["progress"]),
                         (300, 600))


class TLSTests(CLITestCase):
    def setUp(self):
        import tempfile

        from tests.certs import Authority

        self.certs = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.certs, True)
        self.trust = os.path.join(self.certs, "trust")
        os.mkdir(self.trust)
        self.ca = Authority(self.certs)
        shutil.copy(self.ca.path, os.path.join(self.trust, "ca.pem"))
        key, cert = self.ca.issue("localhost", server=True)
        self.client_key, self.client_cert = self.ca.issue("worker-1", server=False)
        self.options = {
            "master": f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}",
            "slave": f"mtls:0:interface=127.0.0.1:privateKey={key}:certKey={cert}:caCerts={self.ca.path}",
        }
        return super().setUp()

    @inlineCallbacks
    def test_worker_and_submit_over_tls_endpoint_strings(self):
        slave = (f"tls:localhost:{self.port('slave')}:trustRoots={self.trust}:"
                 f"certificate={self.client_cert}:privateKey={self.client_key}")
        self.start("worker", "upper", "--slave", slave, "--", "tr", "a-z", "A-Z")
        yield self.until(lambda: self.scheduler.idle_slaves("upper") == 1)
        master = f"tls:localhost:{self.port('master')}:trustRoots={self.trust}"
        out, err, status = yield self.gloom("submit", "upper", '"secret"', "--master", master)
        self.assertEqual((out, status), ('"SECRET"\n', 0), err)

    @inlineCallbacks
    def test_worker_stops_on_a_certificate_it_cannot_verify(self):
        untrusted = self.ca.issue("localhost-elsewhere", server=True)[1]
        shutil.copy(untrusted, os.path.join(self.trust, "ca.pem"))
        slave = f"tls:localhost:{self.port('slave')}:trustRoots={self.trust}"
        out, err, status = yield self.gloom("worker", "upper", "--slave", slave, "--", "cat")
        self.assertEqual(status, 1, err)
        first, *rest = err.splitlines()
        self.assertEqual(first, f"gloom: serving 'upper' with 1 x cat (from tls:localhost:{self.port('slave')}); "
                                "Ctrl-C or SIGTERM finishes the jobs in hand and exits")
        self.assertTrue(rest and all(line.startswith("gloom: ") for line in rest), err)
        self.assertIn("TLS", rest[-1])
        self.assertIn("certificate verify failed", rest[-1])
        for noise in ("trustRoots", "VerificationError(", "SSL routines'", "Traceback", self.trust):
            self.assertNotIn(noise, err)

    @inlineCallbacks
    def submit_fails(self, master):
        """``gloom submit`` to ``master`` fails with one line (returned) and status 3."""
        out, err, status = yield self.gloom("submit", "upper", '"x"', "--master", master)
        self.assertEqual((out, status, len(err.splitlines())), ("", 3, 1), err)
        return err

    @inlineCallbacks
    def test_a_tls_client_without_trust_roots_says_why(self):
        err = yield self.submit_fails(f"tls:localhost:{self.port('master')}")  # the system's roots
        self.assertEqual(err, f"gloom: TLS handshake with tls:localhost:{self.port('master')} failed: "
                              "certificate verify failed\n")

    @inlineCallbacks
    def test_a_plain_client_on_a_tls_port_says_tls(self):
        err = yield self.submit_fails(f"127.0.0.1:{self.port('master')}")
        self.assertIn("TLS", err)


class BenchDrainTests(CLITestCase):
    @inlineCallbacks
    def test_drain_mode_as_json(self):
        out, err, status = yield self.gloom("bench", "--drain", "--jobs", "400", "--slaves", "3", "--json",
                                            *self.master_arg(), *self.slave_arg())
        self.assertEqual(status, 0, err)
        figures = json.loads(out)
        self.assertEqual((figures["jobs"], figures["errors"], figures["slaves"]), (400, 0, 3))
        self.assertGreater(figures["queue_per_s"], 0)
        self.assertGreater(figures["jobs_per_s"], 0)
        self.assertEqual(self.scheduler.totals["completed"], 400)


class BenchRefusedTests(CLITestCase):
    options = {"max-queued": 50}

    @inlineCallbacks
    def test_drain_beyond_the_queue_limit_reports_the_refusals(self):
        out, err, status = yield self.gloom("bench", "--drain", "--jobs", "80", "--slaves", "2", "--json",
                                            *self.master_arg(), *self.slave_arg())
        figures = json.loads(out)
        self.assertEqual((status, figures["jobs"], figures["errors"]), (1, 80, 30))


class FormatStatusTests(SynchronousTestCase):
    def test_says_how_many_types_were_left_out(self):
        from gloom.cli import format_status

        stats = {"types": {"t": {"queued": 1, "running": 0, "idle_slaves": 0, "busy_slaves": 0}},
                 "types_omitted": 3000, "totals": {"submitted": 1}, "masters": 1, "slaves": 0,
                 "uptime": 5, "version": "x"}
        self.assertIn("(and 3000 less busy types)", format_status(stats))
        del stats["types_omitted"]
        self.assertNotIn("less busy", format_status(stats))

    def test_a_row_per_daemon_then_the_sums(self):
        from gloom.cli import format_status
        from gloom.core import sum_stats

        def daemon(queued, slaves, uptime):
            return {"types": {"t": {"queued": queued, "running": 0, "idle_slaves": slaves, "busy_slaves": 0}},
                    "totals": {"submitted": queued}, "masters": 1, "slaves": slaves, "uptime": uptime,
                    "version": "0.1.0"}

        text = format_status(sum_stats({"a:1": daemon(2, 0, 90), "b:22": daemon(3, 4, 30)}),
                             {"c:333": "cannot connect to c:333: Connection refused"})
        self.assertEqual(text.splitlines(), [
            "DAEMON  MASTERS  SLAVES  QUEUED  RUNNING     UP  VERSION",
            "a:1           1       0       2        0  1m30s    0.1.0",
            "b:22          1       4       3        0  0m30s    0.1.0",
            "c:333   unreachable: cannot connect to c:333: Connection refused",
            "",
            "TYPE  QUEUED  RUNNING  IDLE SLAVES  BUSY SLAVES",
            "t          5        0            4            0",
            "",
            "2 daemons: masters 2   slaves 4   up 0m30s   version 0.1.0",
            "jobs: submitted 5",
        ])


class _Silent(protocol.Protocol):
    """A peer that takes the connection, reads, and never says a word (a
    stopped daemon, or a port that is not a Gloom master port)."""

    def connectionMade(self):
        self.factory.connections.append(self)


class SilentDaemonTests(CLITestCase):
    """F2: every request that expects a prompt reply is bounded (lowered to
    1 s here through GLOOM_REPLY_TIMEOUT); the silent daemon counts as
    unreachable, the others are served, and the command exits 3."""

    timeout = 60
    env = {"GLOOM_REPLY_TIMEOUT": "1"}

    def setUp(self):
        super().setUp()
        factory = protocol.ServerFactory.forProtocol(_Silent)
        factory.connections = []
        listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.silent = f"127.0.0.1:{listening.getHost().port}"
        self.addCleanup(listening.stopListening)
        self.addCleanup(lambda: [c.transport.abortConnection() for c in factory.connections])
        self.line = f"gloom: {self.silent}: no reply within 1 s (is it a Gloom master port?)"

    @inlineCallbacks
    def test_status_shows_the_daemons_that_answer(self):
        real = f"127.0.0.1:{self.port('master')}"
        out, err, status = yield self.gloom("status", "--master", f"{real},{self.silent}", env=self.env)
        self.assertEqual(status, 3, err)
        self.assertIn(real, out)
        self.assertIn(f"{self.silent}  unreachable: no reply within 1 s", out)
        self.assertIn(self.line, err.splitlines())
        out, err, status = yield self.gloom("status", "--json", "--master", f"{real},{self.silent}",
                                            env=self.env)
        self.assertEqual(status, 3, err)
        self.assertEqual(list(json.loads(out)["unreachable"]), [self.silent])

    @inlineCallbacks
    def test_cancel_job_dead_and_admin_are_bounded(self):
        real = f"127.0.0.1:{self.port('master')}"
        for args in (["cancel", "abc"], ["job", "abc"], ["dead", "list"], ["dead", "retry", "abc"],
                     ["pause", "x"], ["drain"]):
            out, err, status = yield self.gloom(*args, "--master", self.silent, env=self.env)
            self.assertEqual(status, 3, (args, out, err))
            self.assertIn(self.line, err.splitlines(), args)
        # With a daemon that answers too, job and dead list go on with it.
        out, err, status = yield self.gloom("job", "abc", "--master", f"{real},{self.silent}", env=self.env)
        self.assertEqual((out, status), ("abc  unknown\n", 3), err)
        self.assertIn(self.line, err.splitlines())
        out, err, status = yield self.gloom("dead", "list", "--master", f"{real},{self.silent}", env=self.env)
        self.assertEqual((out, status), ("(no dead jobs)\n", 3), err)
        self.assertIn(self.line, err.splitlines())

    @inlineCallbacks
    def test_submit_leaves_a_silent_daemon_out(self):
        for extra in (["--detach"], [], ["--wait", "30"]):
            out, err, status = yield self.gloom("submit", "x", '"x"', *extra, "--master", self.silent,
                                                env=self.env)
            self.assertEqual((out, status), ("", 3), (extra, err))
            self.assertIn(self.line, err.splitlines(), extra)
        # With a daemon that answers too, every job goes there.
        yield self.worker("upper", "tr", "a-z", "A-Z")
        real = f"127.0.0.1:{self.port('master')}"
        out, err, status = yield self.gloom("submit", "upper", "--lines", "--master", f"{self.silent},{real}",
                                            stdin=b"".join(b'"job %d"\n' % n for n in range(20)), env=self.env)
        self.assertEqual((out.splitlines(), status), ([f'"JOB {n}"' for n in range(20)], 0), err)
        self.assertEqual(err.splitlines(), [self.line])

    @inlineCallbacks
    def test_a_shorter_wait_ends_the_look_for_silent_daemons(self):
        out, err, status = yield self.gloom("submit", "x", '"x"', "--wait", "0.5", "--master", self.silent)
        self.assertEqual((out, status), ("", 1), err)
        self.assertEqual(err, "gloom: no answer within 0.5 s (no daemon had replied to a first request yet)\n")

    @inlineCallbacks
    def test_an_ack_is_waited_for_as_long_as_it_takes(self):
        """A daemon that answers at once but acks a job late (a big body on
        a slow link, a busy client): the job is not given up on."""
        factory = protocol.ServerFactory.forProtocol(_SlowAcks)
        listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        out, err, status = yield self.gloom("submit", "x", '"late"', "--master",
                                            f"127.0.0.1:{listening.getHost().port}", env=self.env)
        self.assertEqual((out, err, status), ('"late"\n', "", 0))


class _SlowAcks(protocol.Protocol):
    """A daemon that answers a stats request at once, but acks a submit
    (and answers it) only after 1.5 s, longer than the tests' reply limit."""

    def connectionMade(self):
        self.frames = FrameBuffer()

    def dataReceived(self, data):
        for payload in self.frames.feed(data):
            request = json.loads(payload)
            if request.get("action") == "stats":
                self.transport.write(frame({"stats": {}, "ref": request["ref"]}))
            elif request.get("action") == "submit":
                replies = [{"ok": True, "id": request["id"], "ref": request["ref"]},
                           {"id": request["id"], "body": request["body"]}]
                reactor.callLater(1.5, self.transport.write, b"".join(frame(reply) for reply in replies))


class PipeTests(CLITestCase):
    """F1: SIGPIPE stays ignored: a daemon closing its socket under a
    write is a lost connection, and a closed standard output ends the run
    quietly with 141."""

    timeout = 60

    @inlineCallbacks
    def test_a_reader_gone_with_jobs_in_flight_ends_it_quietly(self):
        yield self.worker("slow", "sh", "-c", "sleep 0.2; cat", options=["-c", "2"], count=2)
        run = self.start("submit", "slow", "--lines", *self.master_arg(),
                         stdin=b"".join(b"%d\n" % n for n in range(20)))
        yield run.printed(lambda out, err: b"\n" in out)
        run.transport.closeStdout()  # as "| head -1" does once it has its line
        out, err, status = yield run.ended
        self.assertEqual((err, status), ("", 141))

    @inlineCallbacks
    def test_a_closed_standard_output_ends_quietly(self):
        read, write = os.pipe()
        os.close(read)  # as "| head -c1" does once it has its byte
        run = _Run(b"")
        argv = gloom_command() + ["status", "--json", *self.master_arg()]
        environment = {name: value for name, value in os.environ.items() if not name.startswith("GLOOM_")}
        reactor.spawnProcess(run, argv[0], argv, env=environment, childFDs={0: "w", 1: write, 2: "r"})
        os.close(write)
        self.addCleanup(self._reap, run)
        out, err, status = yield run.ended
        self.assertEqual((err, status), ("", 141))

    @inlineCallbacks
    def test_a_frame_the_daemon_refuses_mid_send(self):
        # The daemon (max_frame 64 KiB) says size_error and closes while the
        # client still writes the 2 MB frame: each line still gets its line.
        big = json.dumps("a" * 2000000).encode()
        for options, stdin in ((["--lines"], big + b'\n"small"\n'), (["-"], big)):
            out, err, status = yield self.gloom("submit", "echo", *options, *self.master_arg(), stdin=stdin)
            self.assertIn(status, (1, 3), err)
            self.assertIn("size_error", err)
            if options == ["--lines"]:
                lines = [json.loads(line) for line in out.splitlines()]
                self.assertEqual(len(lines), 2, out)
                self.assertEqual(lines[0]["error"], "size_error")
                self.assertIn("error", lines[1])


class OptionTests(SynchronousTestCase):
    """F3, F4 and the usage nits, through the installed command (no daemon
    is needed: each is refused before connecting)."""

    def gloom(self, *args):
        import subprocess
        environment = {name: value for name, value in os.environ.items() if not name.startswith("GLOOM_")}
        done = subprocess.run(gloom_command() + list(args), capture_output=True, text=True,
                              env=environment, timeout=30, stdin=subprocess.DEVNULL)
        return done.stdout, done.stderr, done.returncode

    def test_nan_and_inf_are_refused_naming_the_option(self):
        for args, option in ((["submit", "x", '"x"', "--wait", "nan"], "--wait"),
                             (["submit", "x", '"x"', "--wait", "inf"], "--wait"),
                             (["submit", "x", '"x"', "--timeout", "nan"], "--timeout"),
                             (["submit", "x", '"x"', "--timeout", "inf"], "--timeout"),
                             (["submit", "x", '"x"', "--delay", "nan"], "--delay"),
                             (["submit", "x", '"x"', "--delay", "inf"], "--delay"),
                             (["worker", "x", "--kill-after", "nan", "--", "cat"], "--kill-after"),
                             (["status", "--watch", "inf"], "--watch")):
            out, err, status = self.gloom(*args, "--master" if args[0] != "worker" else "--slave",
                                          "127.0.0.1:1")
            self.assertEqual((out, status), ("", 2), args)
            self.assertEqual(len(err.splitlines()), 1, err)
            self.assertTrue(err.startswith(f"gloom: {option} must be"), err)
        out, err, status = self.gloom("submit", "x", '"x"', "--timeout", "nan")
        self.assertEqual(err, "gloom: --timeout must be a positive number of seconds up to 2592000, not nan\n")

    def test_worker_without_arguments_names_type_and_command(self):
        out, err, status = self.gloom("worker")
        self.assertEqual(status, 2)
        self.assertIn("TYPE", err.splitlines()[-1])
        self.assertIn("after --", err.splitlines()[-1])
        self.assertNotIn("stray", err)

    def test_resubmit_is_listed_and_not_with_detach(self):
        out, err, status = self.gloom("submit", "--help")
        self.assertIn("--resubmit", out)
        out, err, status = self.gloom("submit", "x", '"x"', "--detach", "--resubmit", "--master", "127.0.0.1:1")
        self.assertEqual((out, status), ("", 2))
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertIn("--resubmit", err)

    def test_bench_without_answers_prints_dashes(self):
        from gloom.bench import BenchResult
        result = BenchResult(0, 0.0, [], [], {"masters": 1, "window": 1, "slaves": 1, "body_size": 1},
                             interrupted=True, planned=10)
        table = result.table()
        self.assertIn("latency ms: p50 -  p90 -  p99 -  max -", table)
        self.assertNotIn("None", table)


class ResubmitTests(CLITestCase):
    """``gloom submit --resubmit`` with two daemons: when the one holding
    the queued job dies, the job is submitted again to the other, whose
    worker answers it."""

    timeout = 60

    def setUp(self):
        super().setUp()
        self.other_ports = {role: reserved_port(self) for role in ("master", "slave")}
        from gloom.tap import makeService
        self.other = makeService({"master": f"tcp:{self.other_ports['master']}:interface=127.0.0.1",
                                  "slave": f"tcp:{self.other_ports['slave']}:interface=127.0.0.1",
                                  "max-frame": self.max_frame, "retries": self.retries}, reactor)
        self.other.startService()
        self.addCleanup(lambda: self.other.stopService() if self.other.running else None)

    @inlineCallbacks
    def test_the_job_moves_to_the_daemon_up(self):
        both = f"127.0.0.1:{self.port('master')},127.0.0.1:{self.other_ports['master']}"
        run = self.start("submit", "upper", '"moved"', "--resubmit", "--master", both)
        schedulers = [self.scheduler, self.other.scheduler]
        yield wait_until(lambda: any(len(s) == 1 for s in schedulers))
        holder = 0 if len(self.scheduler) == 1 else 1
        services = [self.service, self.other]
        slave_ports = [self.port("slave"), self.other_ports["slave"]]
        # It dies (a crash: its connections are aborted, no "shutdown" said).
        service = services[holder]
        for role in ("master", "slave"):
            yield service.getServiceNamed(role).disownServiceParent()
        for factory in service.factories:
            for connection in list(factory.connections):
                connection.transport.abortConnection()
        self.start("worker", "upper", "--slave", f"127.0.0.1:{slave_ports[1 - holder]}", "--", "tr", "a-z", "A-Z")
        out, err, status = yield run.ended
        self.assertEqual((out, status), ('"MOVED"\n', 0), err)
