"""The ``gloom`` command's progress bar, ``--unique``, the admin commands
and the worker's progress descriptor: the pieces by unit tests, then the
commands as real processes against a real daemon."""

from __future__ import annotations

import io
import os
import shutil
import sys
import tempfile

from twisted.internet import defer, reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from gloom import cli, core
from tests.support import reserved_port
from tests.test_cli import CLITestCase, gloom_command


class ParseProgressLineTests(SynchronousTestCase):
    def test_the_forms_a_command_may_write(self):
        parse = cli.parse_progress_line
        self.assertEqual(parse(b"progress 3 10"), {"done": 3, "total": 10})
        self.assertEqual(parse(b"progress 2.5"), {"done": 2.5})
        self.assertEqual(parse(b"  progress   4   8  \r"), {"done": 4, "total": 8})
        self.assertEqual(parse(b"touch"), {})
        self.assertEqual(parse(b'{"done": 1, "total": 2, "data": {"file": "a.png"}}'),
                         {"done": 1, "total": 2, "data": {"file": "a.png"}})
        self.assertEqual(parse(b'{"data": "uploading"}'), {"data": "uploading"})
        self.assertIsNone(parse(b""))
        self.assertIsNone(parse(b"   "))

    def test_anything_else_is_refused_with_why(self):
        for line in (b"progress", b"progress x", b"progress 1 2 3", b"progress -1", b"progress nan",
                     b"progress inf", b"touch me", b"50%", b"{not json", b"[1, 2]", b'{"done": 1, "eta": 3}',
                     b'{"done": true}', b'{"data": null}', b"{}", b'{"done": NaN}', b"\xff\xfe"):
            with self.assertRaises(ValueError, msg=line):
                cli.parse_progress_line(line)
        with self.assertRaises(ValueError) as caught:
            cli.parse_progress_line(b"halfway")
        self.assertIn('not "progress N [M]", "touch" or a JSON object', str(caught.exception))


class FormatProgressTests(SynchronousTestCase):
    def test_a_bar_with_a_total(self):
        self.assertEqual(cli.format_progress({"done": 3, "total": 10, "data": "a.png"}, 80, "resize"),
                         "resize [######..............]  30% 3/10 a.png")
        self.assertEqual(cli.format_progress({"done": 10, "total": 10}, 80),
                         "[####################] 100% 10/10")
        self.assertEqual(cli.format_progress({"done": 12, "total": 10}, 80),
                         "[####################] 100% 12/10")

    def test_without_a_total_or_without_numbers(self):
        self.assertEqual(cli.format_progress({"done": 7}, 80), "7 done")
        self.assertEqual(cli.format_progress({"total": 7}, 80), "0/7")
        self.assertEqual(cli.format_progress({"done": 0, "total": 0}, 80), "0/0")
        self.assertEqual(cli.format_progress({"data": {"step": "b"}}, 80), '{"step":"b"}')
        self.assertEqual(cli.format_progress({"done": 1 / 3}, 80), "0.3333 done")
        self.assertEqual(cli.format_progress({"data": "two\nlines"}, 80), "two lines")

    def test_never_wider_than_the_terminal(self):
        line = cli.format_progress({"done": 1, "total": 2, "data": "x" * 500}, 40, "t")
        self.assertEqual(len(line), 40)
        self.assertTrue(line.endswith("..."))


class ProgressBarTests(SynchronousTestCase):
    def setUp(self):
        self.now = 100.0
        self.calls = []
        self.stream = io.StringIO()

    def later(self, seconds, function):
        from twisted.internet.task import Clock

        clock = getattr(self, "clock", None) or Clock()
        self.clock = clock
        return clock.callLater(seconds, function)

    def test_draws_in_place_then_wipes(self):
        bar = cli.ProgressBar(self.stream, "t", clock=lambda: self.now)
        bar.update({"done": 1, "total": 4})
        bar.update({"done": 2, "total": 4})
        bar.clear()
        bar.clear()
        self.assertEqual(self.stream.getvalue(),
                         "\r\x1b[Kt [#####...............]  25% 1/4"
                         "\r\x1b[Kt [##########..........]  50% 2/4"
                         "\r\x1b[K")

    def test_redraws_at_most_every_interval_and_shows_the_last(self):
        bar = cli.ProgressBar(self.stream, clock=lambda: self.now, later=self.later, interval=0.1)
        bar.update({"done": 1})
        for done in range(2, 50):
            bar.update({"done": done})
        self.assertEqual(self.stream.getvalue(), "\r\x1b[K1 done")
        self.now += 0.1
        self.clock.advance(0.1)
        self.assertEqual(self.stream.getvalue(), "\r\x1b[K1 done\r\x1b[K49 done")
        bar.update({"done": 50})  # too soon: waits
        bar.clear()  # the job ended: nothing more is drawn
        self.now += 1
        self.clock.advance(1)
        self.assertEqual(self.stream.getvalue(), "\r\x1b[K1 done\r\x1b[K49 done\r\x1b[K")

    def test_messages_wipe_the_bar_first(self):
        bar = cli.ProgressBar(self.stream, clock=lambda: self.now)
        err = io.StringIO()
        self.patch(cli, "_BAR", bar)
        self.patch(sys, "stderr", err)
        bar.update({"done": 1})
        cli._say("something happened")
        self.assertEqual(self.stream.getvalue(), "\r\x1b[K1 done\r\x1b[K")
        self.assertEqual(err.getvalue(), "gloom: something happened\n")


class StatusTests(SynchronousTestCase):
    def stats(self, paused=(), draining=False):
        return {"types": {"t": {"queued": 1, "running": 0, "idle_slaves": 0, "busy_slaves": 0,
                                "paused": "t" in paused}},
                "totals": {"submitted": 1, "coalesced": 0}, "masters": 1, "slaves": 0, "uptime": 5,
                "version": "x", "paused": list(paused), "draining": draining}

    def test_one_daemon_says_paused_types_and_draining(self):
        text = cli.format_status(self.stats(["t", "u"], True))
        self.assertIn("\npaused: t, u\n", text)
        self.assertIn("\ndraining: taking no new jobs; exiting once the jobs are done\n", text)
        text = cli.format_status(self.stats())
        self.assertNotIn("paused", text)
        self.assertNotIn("draining", text)

    def test_several_daemons_say_where(self):
        total = core.sum_stats({"a:1": self.stats(["t"], True), "b:2": self.stats(["t", "u"])})
        self.assertEqual(total["paused"], ["t", "u"])
        self.assertIs(total["draining"], True)
        self.assertIs(total["types"]["t"]["paused"], True)
        text = cli.format_status(total)
        self.assertIn("\npaused: t, u (t on a:1, b:2; u on b:2)\n", text)
        self.assertIn("\ndraining: a:1 (taking no new jobs; exiting once the jobs are done)\n", text)
        both = cli.format_status(core.sum_stats({"a:1": self.stats(["t"]), "b:2": self.stats(["t"])}))
        self.assertIn("\npaused: t\n", both)


class RecordingJob(core.Job):
    """A job whose progress and touch are recorded."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []
        self.bind(lambda done, total, data: self.calls.append(("progress", done, total, data)) or True,
                  lambda: self.calls.append(("touch",)) or True)


class CommandProgressTests(TestCase):
    """The worker's command reports on descriptor 3, as a real process."""

    def run_command(self, script, job=None):
        args = type("Args", (), {"raw": False, "kill_after": None, "argv": ["sh"]})()
        commands = cli._Commands(reactor, args, ["sh", "-c", script])
        job = job or RecordingJob(id="j1", type="t", body="b")
        said = []
        self.patch(cli, "_say", said.append)
        return commands.run(job).addCallback(lambda answer: (answer, job.calls, said))

    @inlineCallbacks
    def test_each_line_becomes_a_progress_or_touch(self):
        answer, calls, said = yield self.run_command(
            'echo "progress 1 3" >&3; echo touch >&3; echo >&3; '
            'printf \'{"done": 2, "total": 3, "data": {"f": "a"}}\\nprogress 2.5\\n\' >&3; '
            'printf "progress 3 3" >&3; echo "$GLOOM_PROGRESS_FD"')
        self.assertEqual(answer, 3)  # the output, as JSON
        self.assertEqual(calls, [("progress", 1, 3, None), ("touch",), ("progress", 2, 3, {"f": "a"}),
                                 ("progress", 2.5, None, None), ("progress", 3, 3, None)])
        self.assertEqual(said, [])

    @inlineCallbacks
    def test_malformed_lines_are_reported_and_ignored(self):
        answer, calls, said = yield self.run_command(
            'echo "half way" >&3; echo "progress -1" >&3; echo "progress 1" >&3; '
            'head -c 70000 /dev/zero | tr "\\0" x >&3; echo "tail of the long line" >&3; '
            'echo "progress 2" >&3; echo ok')
        self.assertEqual(answer, "ok")
        self.assertEqual(calls, [("progress", 1, None, None), ("progress", 2, None, None)])
        self.assertEqual(len(said), 3, said)
        self.assertIn("job j1 (t): ignored a line on fd 3: 'half way': not \"progress N [M]\"", said[0])
        self.assertIn("'progress -1': progress done must be a number, 0 or more", said[1])
        self.assertIn("longer than 65536 bytes", said[2])

    @inlineCallbacks
    def test_a_command_that_ignores_descriptor_3_is_unaffected(self):
        answer, calls, said = yield self.run_command("cat")
        self.assertEqual((answer, calls, said), ("b", [], []))


class UsageTests(CLITestCase):
    @inlineCallbacks
    def test_usage_errors(self):
        cases = [
            (["submit", "t", "1", "--unique", "", *self.master_arg()], "--unique must be a non-empty string"),
            (["submit", "t", "--unique", "k", "--lines", *self.master_arg()], "--unique names one job"),
            (["submit", "t", "1", "--unique", "k", "--detach", *self.master_arg()],
             "--unique is not for detached jobs"),
            (["submit", "t", "1", "--unique", "k" * 1025, *self.master_arg()], "at most 1024 bytes"),
            (["pause", "", *self.master_arg()], "TYPE must not be empty"),
            (["clear", *self.master_arg()], "the following arguments are required: type"),
            (["drain", "t", *self.master_arg()], "unrecognized arguments: t"),
        ]
        results = yield defer.gatherResults([self.gloom(*args) for args, _ in cases])
        for (args, message), (out, err, status) in zip(cases, results):
            self.assertEqual(status, 2, (args, err))
            self.assertIn(message, err)
            self.assertNotIn("Traceback", err)

    @inlineCallbacks
    def test_help_has_examples(self):
        commands = ("pause", "resume", "clear", "drain")
        results = yield defer.gatherResults([self.gloom(command, "--help") for command in commands])
        for command, (out, err, status) in zip(commands, results):
            self.assertEqual(status, 0)
            self.assertIn("examples:", out)
            self.assertIn("--master", out)
        out, err, status = yield self.gloom("worker", "--help")
        self.assertIn("File descriptor 3 (GLOOM_PROGRESS_FD) takes progress", out)
        self.assertIn('echo "progress 3 10" >&3', out)
        out, err, status = yield self.gloom("submit", "--help")
        self.assertIn("--unique KEY", out)
        self.assertIn("--no-progress", out)

    @inlineCallbacks
    def test_admin_commands_on_a_daemon_that_cannot_be_reached(self):
        port = reserved_port(self)
        out, err, status = yield self.gloom("pause", "t", "--master", f"127.0.0.1:{port}")
        self.assertEqual(status, 3, err)
        self.assertEqual(err, f"gloom: cannot connect to 127.0.0.1:{port}: Connection refused\n")


class DaemonTests(CLITestCase):
    """The commands against a real daemon started with ``--admin``."""

    options = {"admin": True}

    STEPS = ('cat > /dev/null; echo "progress 1 4" >&3; sleep 0.3; '
             'echo \'{"done": 2, "total": 4, "data": "half"}\' >&3; sleep 0.3; echo touch >&3; echo \'"done"\'')

    @inlineCallbacks
    def test_worker_progress_lines_reach_a_master(self):
        from twisted.internet.threads import deferToThread

        from gloom.client import Master

        yield self.worker("steps", "sh", "-c", self.STEPS)

        def run():
            seen = []
            with Master(f"127.0.0.1:{self.port('master')}") as master:
                answer = master.run("steps", None, wait=10, on_progress=seen.append)
                totals = master.stats()["totals"]
            return answer, seen, totals

        answer, seen, totals = yield deferToThread(run)
        self.assertEqual(answer, "done")
        self.assertEqual(seen, [{"done": 1, "total": 4}, {"done": 2, "total": 4, "data": "half"}])
        self.assertEqual((totals["progress"], totals["touched"]), (2, 1))

    @inlineCallbacks
    def test_submit_draws_a_progress_bar_when_asked(self):
        yield self.worker("steps", "sh", "-c", self.STEPS)
        out, err, status = yield self.gloom("submit", "steps", "--progress", *self.master_arg())
        self.assertEqual((out, status), ('"done"\n', 0), err)
        self.assertIn("\r\x1b[Ksteps [#####...............]  25% 1/4", err)
        self.assertIn("\r\x1b[Ksteps [##########..........]  50% 2/4 half", err)
        self.assertTrue(err.endswith("\r\x1b[K"), repr(err))  # wiped before the answer
        out, err, status = yield self.gloom("submit", "steps", "--no-progress", *self.master_arg())
        self.assertEqual((out, err, status), ('"done"\n', "", 0))
        out, err, status = yield self.gloom("submit", "steps", *self.master_arg())  # not a terminal
        self.assertEqual((out, err, status), ('"done"\n', "", 0))

    @inlineCallbacks
    def test_the_bar_is_on_by_itself_on_a_terminal(self):
        from twisted.internet.threads import deferToThread

        yield self.worker("steps", "sh", "-c", self.STEPS)
        argv = gloom_command() + ["submit", "steps", *self.master_arg()]

        def run(extra):
            import subprocess

            controller, terminal = os.openpty()
            try:
                process = subprocess.Popen(argv + extra, stdout=subprocess.PIPE, stderr=terminal,
                                           stdin=subprocess.DEVNULL)
            finally:
                os.close(terminal)
            seen = b""
            while True:
                try:
                    chunk = os.read(controller, 4096)
                except OSError:  # EIO: every end of the terminal is closed
                    break
                if not chunk:
                    break
                seen += chunk
            os.close(controller)
            out = process.stdout.read()
            process.stdout.close()
            return out, seen.decode(), process.wait(30)

        out, err, status = yield deferToThread(run, [])
        self.assertEqual((out, status), (b'"done"\n', 0), err)
        self.assertIn("steps [#####...............]  25% 1/4", err)
        self.assertTrue(err.endswith("\r\x1b[K"), repr(err))
        out, err, status = yield deferToThread(run, ["--no-progress"])
        self.assertEqual((out, err, status), (b'"done"\n', "", 0))

    @inlineCallbacks
    def test_unique_submits_share_one_job(self):
        first = self.start("submit", "report", '"day 1"', "--unique", "day-1", *self.master_arg())
        yield self.until(lambda: len(self.scheduler) == 1)
        second = self.start("submit", "report", '"other"', "--unique", "day-1", *self.master_arg())
        yield self.until(lambda: self.scheduler.totals["coalesced"] == 1)
        self.assertEqual(len(self.scheduler), 1)  # the second joined the first
        scratch = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, scratch, True)
        ran = os.path.join(scratch, "runs")
        yield self.worker("report", "sh", "-c", 'cat; echo ran >> "$0"', ran)
        (out1, err1, status1), (out2, err2, status2) = yield defer.gatherResults([first.ended, second.ended])
        self.assertEqual((out1, status1), ('"day 1"\n', 0), err1)
        self.assertEqual((out2, status2), ('"day 1"\n', 0), err2)
        with open(ran) as runs:
            self.assertEqual(runs.read(), "ran\n")

    @inlineCallbacks
    def test_pause_resume_clear_and_status(self):
        yield self.worker("t", "cat")
        out, err, status = yield self.gloom("pause", "t", *self.master_arg())
        self.assertEqual((out, err, status), ("", "gloom: paused 't'\n", 0))
        out, err, status = yield self.gloom("status", *self.master_arg())
        self.assertIn("\npaused: t\n", out)
        held = self.start("submit", "t", '"held"', *self.master_arg())
        yield self.until(lambda: len(self.scheduler) == 1)
        out, err, status = yield self.gloom("resume", "t", *self.master_arg())
        self.assertEqual((out, err, status), ("", "gloom: resumed 't'\n", 0))
        out, err, status = yield held.ended
        self.assertEqual((out, status), ('"held"\n', 0), err)

        yield self.gloom("pause", "t", *self.master_arg())
        waiting = [self.start("submit", "t", str(n), *self.master_arg()) for n in range(2)]
        yield self.until(lambda: len(self.scheduler) == 2)
        out, err, status = yield self.gloom("clear", "t", *self.master_arg())
        self.assertEqual((out, err, status), ("cleared 2 jobs of type 't'\n", "", 0))
        for run in waiting:
            out, err, status = yield run.ended
            self.assertEqual(status, 1)
            self.assertIn("gloom: cleared: ", err)
        out, err, status = yield self.gloom("clear", "t", *self.master_arg())
        self.assertEqual(out, "cleared 0 jobs of type 't'\n")

    @inlineCallbacks
    def test_a_daemon_that_cannot_be_reached_among_several(self):
        up = f"127.0.0.1:{self.port('master')}"
        down = f"127.0.0.1:{reserved_port(self)}"
        held = self.start("submit", "t", "1", *self.master_arg())
        yield self.until(lambda: len(self.scheduler) == 1)
        out, err, status = yield self.gloom("clear", "t", "--master", f"{up},{down}")
        self.assertEqual(out, f"cleared 1 job of type 't' ({up}: 1)\n")
        self.assertEqual(err, f"gloom: cannot connect to {down}: Connection refused\n")
        self.assertEqual(status, 3)
        yield held.ended
        out, err, status = yield self.gloom("pause", "t", "--master", f"{up},{down}")
        self.assertEqual(err, f"gloom: cannot connect to {down}: Connection refused\n"
                              f"gloom: paused 't' on {up}\n")
        self.assertEqual(status, 3)

    @inlineCallbacks
    def test_drain(self):
        stopped = []
        self.service.stop_reactor = lambda: stopped.append(True)  # a real daemon exits 0 here
        out, err, status = yield self.gloom("drain", *self.master_arg())
        self.assertEqual((out, err, status), ("", "gloom: draining; it exits once its jobs are done\n", 0))
        out, err, status = yield self.gloom("status", *self.master_arg())
        self.assertIn("\ndraining: taking no new jobs; exiting once the jobs are done\n", out)
        out, err, status = yield self.gloom("submit", "t", "1", *self.master_arg())
        self.assertEqual(status, 1)
        self.assertIn("gloom: shutdown: ", err)
        yield self.until(lambda: stopped == [True])


class ForbiddenTests(CLITestCase):
    @inlineCallbacks
    def test_admin_commands_need_a_daemon_with_admin(self):
        commands = (["pause", "t"], ["resume", "t"], ["clear", "t"], ["drain"])
        results = yield defer.gatherResults([self.gloom(*command, *self.master_arg()) for command in commands])
        name = f"127.0.0.1:{self.port('master')}"
        for command, (out, err, status) in zip(commands, results):
            self.assertEqual((out, status), ("", 1), err)
            self.assertEqual(err, f"gloom: {name} refused {command[0]}: admin actions are off there; "
                                  "start the daemon with --admin to allow them\n")
