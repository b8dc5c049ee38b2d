"""The ``gloom`` command's rough edges, run as real processes against real
daemons: several daemons at once, refusals that must not hang, Ctrl-C and
the exit status, the reasons a daemon gives, Unicode bodies, ``--wait``
and ``gloom cancel``."""

import json
import os
import re
import shutil
import signal
import sys
import tempfile

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks

from gloom.tap import makeService
from tests.support import reserved_port
from tests.test_cli import CLITestCase
from tests.test_integration import wait_until

JOB_ID = "[0-9a-f]{32}"


class ManyDaemonsTests(CLITestCase):
    def setUp(self):
        result = super().setUp()
        self.other = makeService({
            "master": f"tcp:{reserved_port(self)}:interface=127.0.0.1",
            "slave": f"tcp:{reserved_port(self)}:interface=127.0.0.1",
            "max-frame": self.max_frame, "retries": self.retries}, reactor)
        for factory in self.other.factories:
            factory.buildProtocol = self._watched(factory.buildProtocol)
        self.other.startService()
        self.addCleanup(lambda: self.other.running and self.other.stopService())
        return result

    def addresses(self, role):
        port = self.other.getServiceNamed(role).port.getHost().port
        return f"127.0.0.1:{self.port(role)}", f"127.0.0.1:{port}"

    @inlineCallbacks
    def test_status_shows_each_daemon_then_the_sums(self):
        first, second = self.addresses("master")
        submitter = self.start("submit", "queued-type", "1", "--master", first)
        yield self.until(lambda: len(self.scheduler) == 1)
        yield self.start("worker", "upper", "--slave", self.addresses("slave")[1], "--", "cat")
        yield self.until(lambda: self.other.scheduler.idle_slaves("upper") == 1)
        out, err, status = yield self.gloom("status", "--master", f"{first},{second}")
        self.assertEqual((err, status), ("", 0))
        lines = out.splitlines()
        self.assertEqual(lines[0].split(), ["DAEMON", "MASTERS", "SLAVES", "QUEUED", "RUNNING", "UP", "VERSION"])
        self.assertEqual(lines[1].split()[:5], [first, "1", "0", "1", "0"])
        self.assertEqual(lines[2].split()[:5], [second, "0", "1", "0", "0"])
        self.assertIn("2 daemons: masters 1   slaves 1 ", out)
        # The environment's addresses, and the sums in one daemon's shape.
        out, err, status = yield self.gloom("status", "--json", env={"GLOOM_MASTERS": f"{first}, {second}"})
        figures = json.loads(out)
        self.assertEqual(list(figures["daemons"]), [first, second])
        self.assertEqual((figures["masters"], figures["slaves"]), (1, 1))
        self.assertEqual(figures["types"]["queued-type"]["queued"], 1)
        self.assertEqual(figures["types"]["upper"]["idle_slaves"], 1)
        submitter.transport.signalProcess("KILL")

    @inlineCallbacks
    def test_jobs_spread_over_two_daemons(self):
        masters, slaves = self.addresses("master"), self.addresses("slave")
        yield self.start("worker", "upper", "--slave", slaves[0], "--slave", slaves[1], "--", "tr", "a-z", "A-Z")
        yield self.until(lambda: self.scheduler.idle_slaves("upper") + self.other.scheduler.idle_slaves("upper"))
        words = [f"word{n}" for n in range(20)]
        run = self.start("submit", "upper", "--lines", "--master", ",".join(masters), keep_open=True)
        # Jobs go to the first daemon up until the other is: write once both are.
        yield self.until(lambda: all(daemon.factories[0].connections for daemon in (self.service, self.other)))
        run.transport.write("".join(f'"{w}"\n' for w in words).encode())
        run.transport.closeStdin()
        out, err, status = yield run.ended
        self.assertEqual((status, [json.loads(line) for line in out.splitlines()]),
                         (0, [w.upper() for w in words]), err)
        self.assertGreater(self.scheduler.totals["completed"], 0)
        self.assertGreater(self.other.scheduler.totals["completed"], 0)

    @inlineCallbacks
    def test_status_names_a_daemon_that_is_down(self):
        first, second = self.addresses("master")
        yield self.other.stopService()
        out, err, status = yield self.gloom("status", "--master", first, "--master", second)
        self.assertEqual(status, 3)
        self.assertIn(f"\n{second}  unreachable: cannot connect to {second}: Connection refused\n", out)
        self.assertEqual(err, f"gloom: cannot connect to {second}: Connection refused\n")


class RefusalTests(CLITestCase):
    @inlineCallbacks
    def test_submit_to_the_slave_port_is_refused_at_once(self):
        out, err, status = yield self.gloom("submit", "upper", '"x"', "--master", f"127.0.0.1:{self.port('slave')}")
        self.assertEqual((out, err, status),
                         ("", "gloom: wrong_port: action 'submit' belongs on the master port, "
                              "not the slave port\n", 1))

    @inlineCallbacks
    def test_worker_on_the_master_port_stops(self):
        out, err, status = yield self.gloom("worker", "upper", "--slave", f"127.0.0.1:{self.port('master')}",
                                            "--", "cat")
        self.assertEqual(status, 1, err)
        self.assertIn("wrong_port: action 'join' belongs on the slave port", err.splitlines()[-1])
        self.assertNotIn("Traceback", err)

    @inlineCallbacks
    def test_a_body_over_the_daemons_frame_limit(self):
        body = json.dumps("x" * 70_000).encode()  # the test daemon takes 64 KiB frames
        out, err, status = yield self.gloom("submit", "big", "-", *self.master_arg(), stdin=body)
        self.assertEqual((out, status), ("", 1), err)
        self.assertRegex(err, r"^gloom: size_error: frame of 70\d\d\d bytes is over the limit of 65536 bytes\n$")

    @inlineCallbacks
    def test_a_body_over_any_frame_limit(self):
        scratch = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, scratch, True)
        path = os.path.join(scratch, "body.json")
        with open(path, "wb") as body:
            body.write(b'"' + b"x" * (70 * 1024 * 1024) + b'"')
        out, err, status = yield self.start("submit", "big", "-", *self.master_arg(), stdin_path=path).ended
        self.assertEqual((out, status), ("", 2), err)
        self.assertRegex(err, r"^gloom: cannot send standard input: the request is \d+ bytes of JSON; "
                              r"a frame may be at most 67108864\n$")
        self.assertEqual(self.scheduler.totals["submitted"], 0)


class StreamTests(CLITestCase):
    @inlineCallbacks
    def test_lines_are_sent_as_they_are_read(self):
        yield self.worker("echo", "cat")
        run = self.start("submit", "echo", "--lines", *self.master_arg(), keep_open=True)
        run.transport.write(b'"one"\n')
        yield run.printed(lambda out, err: out == b'"one"\n', timeout=5)
        run.transport.write(b'"two"\n')
        run.transport.closeStdin()
        out, err, status = yield run.ended
        self.assertEqual((out, err, status), ('"one"\n"two"\n', "", 0))

    @inlineCallbacks
    def test_ctrl_c_names_the_jobs_left_unanswered(self):
        run = self.start("submit", "nobody", "--lines", "--window", "2", *self.master_arg(), keep_open=True)
        run.transport.write(b"1\n2\n3\n")
        yield self.until(lambda: len(self.scheduler) == 2)
        ids = sorted(job.id for job in self.scheduler.jobs())
        run.transport.signalProcess(signal.SIGINT)
        out, err, status = yield run.ended
        self.assertEqual((out, status), ("", 130))
        match = re.fullmatch(rf"gloom: interrupted; 2 jobs \(nobody\) were not answered: ({JOB_ID}), ({JOB_ID})\n",
                             err)
        self.assertIsNotNone(match, err)
        self.assertEqual(sorted(match.groups()), ids)
        yield self.until(lambda: len(self.scheduler) == 0)


class SignalTests(CLITestCase):
    @inlineCallbacks
    def test_ctrl_c_on_a_waiting_submit(self):
        run = self.start("submit", "nobody", "1", *self.master_arg())
        yield self.until(lambda: len(self.scheduler) == 1)
        (job,) = self.scheduler.jobs()
        run.transport.signalProcess(signal.SIGINT)
        out, err, status = yield run.ended
        self.assertEqual((out, err, status), ("", f"gloom: interrupted; job {job.id} (nobody) was not answered\n", 130))
        yield self.until(lambda: len(self.scheduler) == 0)

    @inlineCallbacks
    def test_ctrl_c_on_bench(self):
        run = self.start("bench", "--jobs", "100000000", "--masters", "1", "--slaves", "1", "--no-progress",
                         *self.master_arg(), *self.slave_arg())
        yield self.until(lambda: self.scheduler.totals["completed"] > 10)
        run.transport.signalProcess(signal.SIGINT)
        out, err, status = yield run.ended
        self.assertEqual((err, status), ("gloom: interrupted\n", 130))
        self.assertRegex(out, r"^interrupted after \d+ of 100000000 jobs in ")

    @inlineCallbacks
    def test_ctrl_c_on_a_worker_finishes_the_job_in_hand_and_twice_stops_at_once(self):
        scratch = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, scratch, True)
        started, release = (os.path.join(scratch, name) for name in ("started", "release"))
        command = ("sh", "-c", f"touch {started}; until [ -e {release} ]; do sleep 0.01; done; cat")
        worker = yield self.worker("slow", *command, options=["-v"])
        answer = self.gloom("submit", "slow", '"a"', *self.master_arg())
        yield wait_until(lambda: os.path.exists(started))
        worker.transport.signalProcess(signal.SIGINT)
        yield worker.printed(lambda out, err: b"interrupted: finishing 1 job(s) in hand" in err)
        self.assertFalse(answer.called)
        with open(release, "w"):
            pass
        out, err, status = yield answer
        self.assertEqual((out, status), ('"a"\n', 0), err)
        _, worker_err, worker_status = yield worker.ended
        self.assertEqual(worker_status, 0, worker_err)
        self.assertRegex(worker_err, rf"\ngloom: job {JOB_ID} \(slow\) \d+\.\d\d\d s answered\n")
        # Twice: the command is killed, and its job is not failed but queued again.
        os.remove(started)
        os.remove(release)
        worker = yield self.worker("slow", *command)
        submitter = self.start("submit", "slow", '"b"', *self.master_arg())
        yield wait_until(lambda: os.path.exists(started))
        worker.transport.signalProcess(signal.SIGINT)
        yield worker.printed(lambda out, err: b"finishing 1 job(s)" in err)
        worker.transport.signalProcess(signal.SIGINT)
        _, worker_err, worker_status = yield worker.ended
        self.assertEqual(worker_status, 130, worker_err)
        yield self.until(lambda: self.scheduler.queued("slow") == 1)
        self.assertEqual(self.scheduler.totals["failed"], 0)
        submitter.transport.signalProcess("KILL")

    @inlineCallbacks
    def test_help_lists_the_exit_statuses(self):
        out, err, status = yield self.gloom("--help")
        self.assertIn("exit status:\n  0    success\n", out)
        self.assertIn("\n  130  interrupted by Ctrl-C", out)


class WaitAndCancelTests(CLITestCase):
    @inlineCallbacks
    def test_wait_gives_up_and_cancels(self):
        out, err, status = yield self.gloom("submit", "nobody", "1", "--wait", "0.3", *self.master_arg())
        self.assertEqual((out, err, status), ("", "gloom: no answer within 0.3 s; no slave serves 'nobody'\n", 1))
        self.assertEqual((len(self.scheduler), self.scheduler.totals["cancelled"]), (0, 1))
        out, err, status = yield self.gloom("submit", "nobody", "--lines", "--wait", "0.3", *self.master_arg(),
                                            stdin=b"1\n2\n")
        no_answer = {"error": "no_answer", "reason": "no answer within 0.3 s; no slave serves 'nobody'"}
        self.assertEqual(([json.loads(line) for line in out.splitlines()], status), ([no_answer] * 2, 1))
        self.assertEqual(err, "gloom: line 1: no answer within 0.3 s; no slave serves 'nobody'\n"
                              "gloom: line 2: no answer within 0.3 s; no slave serves 'nobody'\n")

    @inlineCallbacks
    def test_cancel_reports_what_the_daemon_says(self):
        out, err, status = yield self.gloom("cancel", "abc", *self.master_arg())
        self.assertEqual((out, err, status),
                         ("", "gloom: unknown_job: this master has no unfinished job 'abc', and no detached job "
                              "has that id (a job that is not detached can be "
                              "cancelled only over the connection that submitted it)\n", 1))


class UnicodeTests(CLITestCase):
    @inlineCallbacks
    def test_bodies_reach_the_command_as_utf8(self):
        yield self.worker("upper", "tr", "a-z", "A-Z")
        out, err, status = yield self.gloom("submit", "upper", '"héllo"', *self.master_arg())
        self.assertEqual((out, status), ('"HéLLO"\n', 0), err)
        # What the command reads, byte for byte: no \u escapes.
        yield self.worker("bytes", sys.executable, "-c", "import sys; print(list(sys.stdin.buffer.read()))")
        out, err, status = yield self.gloom("submit", "bytes", '{"w": "héllo ☃"}', *self.master_arg())
        self.assertEqual(bytes(json.loads(out)).decode(), '{"w": "héllo ☃"}', err)
