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
from gloom.tap import makeService
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
                     b"progress inf", b"touch me", b"50%", b"{not json", b"[1, 2]", b'{"eta": 3}',
                     b'{"done": true}', b'{"data": null}', b"{}", b'{"done": NaN}', b"\xff\xfe"):
            with self.assertRaises(ValueError, msg=line):
                cli.parse_progress_line(line)
        with self.assertRaises(ValueError) as caught:
            cli.parse_progress_line(b"halfway")
        self.assertIn('not "progress N [M]", "touch" or a JSON object', str(caught.exception))

    def test_other_keys_are_ignored_and_null_is_not_given(self):
        parse = cli.parse_progress_line
        self.assertEqual(parse(b'{"done": 1, "eta": 3}'), {"done": 1})
        self.assertEqual(parse(b'{"done": 1, "total": null, "data": null}'), {"done": 1})
        self.assertEqual(parse(b'{"data": {"file": null}}'), {"data": {"file": None}})
        for line in (b"{}", b'{"data": null}', b'{"eta": 3}'):
            with self.assertRaises(ValueError) as caught:
                parse(line)
            self.assertEqual(str(caught.exception),
                             'a progress needs "done", "total" or "data" (null counts as not given)')


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

    def test_control_characters_are_escaped(self):
        data = "esc \x1b[31mRED\x1b[0m nl\nx tab\tend bel\x07 del\x7f csi\x9b2J rlo\u202eab\u2028z"
        line = cli.format_progress({"done": 1, "total": 2, "data": data}, 200, "p\x1b3")
        self.assertEqual(line, "p\\x1b3 [##########..........]  50% 1/2 esc \\x1b[31mRED\\x1b[0m nl x tab end "
                               "bel\\x07 del\\x7f csi\\x9b2J rlo\\u202eab z")
        for code in list(range(0x20)) + list(range(0x7F, 0xA0)):
            self.assertFalse(any(ord(char) == code for char in line), hex(code))
        self.assertEqual(cli.format_progress({"data": {"k": "\x1b]0;title\x07"}}, 80),
                         '{"k":"\\u001b]0;title\\u0007"}')  # JSON escapes C0 itself
        self.assertEqual(cli.format_progress({"data": {"k": "\x9b"}}, 80), '{"k":"\\x9b"}')

    def test_width_counts_terminal_columns(self):
        self.assertEqual(cli.display_width("漢字"), 4)
        self.assertEqual(cli.display_width("ｈ"), 2)  # full-width
        self.assertEqual(cli.display_width("e\u0301"), 1)  # a combining accent takes no column
        self.assertEqual(cli.display_width("a\u200db"), 2)
        for width in (20, 40, 79, 80):
            line = cli.format_progress({"done": 1, "total": 2, "data": "漢字かな" * 100}, width, "t")
            self.assertLessEqual(cli.display_width(line), width)
            self.assertGreaterEqual(cli.display_width(line), width - 1)  # a wide character may not fit the last
            self.assertTrue(line.endswith("..."))
        line = cli.format_progress({"data": "e\u0301" * 100}, 30)
        self.assertEqual(cli.display_width(line), 30)
        self.assertEqual(line, "e\u0301" * 27 + "...")
        self.assertEqual(cli.fit("漢字", 4), "漢字")
        self.assertEqual(cli.fit("漢字漢", 5), "漢...")


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

    def test_a_wide_line_never_wraps(self):
        import shutil as shutil_module

        self.patch(shutil_module, "get_terminal_size", lambda fallback=None: os.terminal_size((40, 24)))
        bar = cli.ProgressBar(self.stream, "t", clock=lambda: self.now)
        bar.update({"done": 1, "total": 2, "data": "漢字\x1b[2J" * 50})
        drawn = self.stream.getvalue()
        self.assertTrue(drawn.startswith("\r\x1b[K"))
        self.assertNotIn("\x1b", drawn[4:])
        self.assertLessEqual(cli.display_width(drawn[4:]), 39)

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

    def run_command(self, script, job=None, kill_after=None, started=None):
        args = type("Args", (), {"raw": False, "kill_after": kill_after, "argv": ["sh"]})()
        commands = cli._Commands(reactor, args, ["sh", "-c", script])
        job = job or RecordingJob(id="j1", type="t", body="b")
        said = []
        self.patch(cli, "_say", said.append)
        self.began = reactor.seconds()
        running = commands.run(job)
        if started is not None:
            started(commands, job)
        return running.addCallback(lambda answer: (answer, job.calls, said))

    def seconds(self):
        return reactor.seconds() - self.began

    @inlineCallbacks
    def test_a_background_child_holding_descriptor_3_does_not_hold_the_job(self):
        answer, calls, said = yield self.run_command(
            'sleep 5 >/dev/null 2>&1 </dev/null & echo "progress 1 2" >&3; printf "progress 2 2" >&3; echo 1')
        self.assertLess(self.seconds(), 3)  # not the 5 s of the child
        self.assertEqual(answer, 1)
        self.assertEqual(calls, [("progress", 1, 2, None), ("progress", 2, 2, None)])  # the last line too
        self.assertEqual(said, [])

    @inlineCallbacks
    def test_kill_after_never_fires_for_a_command_that_exited(self):
        answer, calls, said = yield self.run_command('sleep 5 >/dev/null 2>&1 </dev/null & echo 1', kill_after=0.5)
        self.assertEqual(answer, 1)  # not "killed after 0.5 s"
        self.assertLess(self.seconds(), 3)
        # A command that runs past it is stopped: SIGTERM first.
        failure = yield self.assertFailure(self.run_command("exec sleep 30", kill_after=0.2), cli.CommandFailed)
        self.assertEqual(str(failure), "killed after 0.2 s")
        self.assertLess(self.seconds(), 3)

    @inlineCallbacks
    def test_kill_after_sends_sigkill_once_the_grace_is_over(self):
        self.patch(cli, "KILL_GRACE", 0.3)
        failure = yield self.assertFailure(
            self.run_command("trap '' TERM; exec sleep 30", kill_after=0.2), cli.CommandFailed)
        self.assertEqual(str(failure), "killed after 0.2 s")
        self.assertLess(self.seconds(), 3)

    @inlineCallbacks
    def test_a_cancelled_job_stops_its_command(self):
        def cancel(commands, job):
            reactor.callLater(0.3, job._drop, "cancelled")

        failure = yield self.assertFailure(
            self.run_command('echo "progress 1" >&3; exec sleep 30', started=cancel), cli.CommandFailed)
        self.assertLess(self.seconds(), 3)
        self.assertIsInstance(failure, cli._Stopped)
        self.assertEqual(str(failure), "stopped: the job was cancelled by every master that submitted it")

    @inlineCallbacks
    def test_a_timed_out_job_stops_its_command_sigkill_if_it_must(self):
        self.patch(cli, "KILL_GRACE", 0.3)
        job = RecordingJob(id="j2", type="t", body="b")

        def give_up(commands, job):
            reactor.callLater(0.3, job._drop, "timed_out")

        failure = yield self.assertFailure(
            self.run_command("trap '' TERM; exec sleep 30", job=job, started=give_up), cli._Stopped)
        self.assertLess(self.seconds(), 3)
        self.assertIn("given up by the daemon", str(failure))
        said = []
        self.patch(cli, "_say", said.append)
        cli._job_logger(job, 0.6, failure)
        self.assertEqual(said, ["job j2 (t) 0.600 s timed out; its command was stopped; the daemon drops its answer"])

    @inlineCallbacks
    def test_news_after_the_command_exited_stops_nothing(self):
        job = RecordingJob(id="j3", type="t", body="b")
        answer, calls, said = yield self.run_command("echo 5", job=job)
        job._drop("cancelled")
        self.assertEqual(answer, 5)
        said = []
        self.patch(cli, "_say", said.append)
        cli._job_logger(job, 0.1, None)
        self.assertEqual(said, ["job j3 (t) 0.100 s cancelled; the daemon drops its answer"])

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


class FormatJobTests(SynchronousTestCase):
    def test_progress_and_unique_key(self):
        text = cli.format_job({"id": "j", "state": "running", "detached": False, "type": "report",
                               "priority": 0, "attempts": 1, "unique": "day-\x1b[2J1",
                               "progress": {"done": 1, "total": 4, "data": {"file": "a\x9b.png"}}})
        self.assertEqual(text, "j  running\n"
                               "  attached, type report, priority 0, 1 attempt\n"
                               "  unique key: 'day-\\x1b[2J1'\n"
                               '  progress: 25% 1/4 {"file":"a\\x9b.png"}')
        text = cli.format_job({"id": "j", "state": "running", "progress": {"data": "\u202e" + "漢" * 200}})
        (line,) = [line for line in text.splitlines() if line.startswith("  progress: ")]
        self.assertTrue(line.startswith("  progress: \\u202e漢漢"))
        self.assertLessEqual(cli.display_width(line), 80)
        self.assertEqual(cli.format_job({"id": "j", "state": "queued", "progress": {"done": 3}}),
                         "j  queued\n  progress: 3 done")

    def test_result_and_reason_are_printable(self):
        text = cli.format_job({"id": "d", "state": "failed", "reason": "bad\x1b]0;x\x07", "result": "\x9b"})
        self.assertNotIn("\x1b", text)
        self.assertNotIn("\x9b", text)
        self.assertIn("  reason: bad\\x1b]0;x\\x07", text)


class NoAnswerHintTests(SynchronousTestCase):
    def stats(self, paused=(), idle=1, busy=0):
        return {"types": {"t": {"idle_slaves": idle, "busy_slaves": busy, "paused": "t" in paused}},
                "paused": list(paused)}

    def test_hints(self):
        hint = cli.no_answer_hint
        self.assertEqual(hint("t", {"state": "running", "progress": {"done": 1.5, "total": 3}}, self.stats(busy=1)),
                         "; the job was running on a slave (last progress: 50% 1.5/3)")
        self.assertEqual(hint("t", {"state": "running"}, None), "; the job was running on a slave")
        self.assertEqual(hint("t", {"state": "queued"}, self.stats(["t"])), "; type 't' is paused (gloom resume t)")
        self.assertEqual(hint("a b", {}, {"paused": ["a b"], "types": {}}),
                         "; type 'a b' is paused (gloom resume 'a b')")
        self.assertEqual(hint("t", {"state": "queued"}, self.stats(idle=0, busy=2)),
                         "; the 2 slave(s) serving 't' are all busy")
        self.assertEqual(hint("t", {}, self.stats(idle=0, busy=0)), "; no slave serves 't'")
        self.assertEqual(hint("u", {}, self.stats()), "; no slave serves 'u'")
        self.assertEqual(hint("t", {}, self.stats()), "")
        self.assertEqual(hint("t", {}, None), "")


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


class WorkerNewsTests(CLITestCase):
    """``gloom worker`` stops a command whose job was cancelled or given up;
    ``gloom submit --wait`` says where the job was; ``--unique -v`` says
    when it joined a job; ``gloom job`` shows progress."""

    options = {"admin": True}

    @inlineCallbacks
    def test_a_cancelled_job_stops_its_command(self):
        worker = yield self.worker("long", "sh", "-c", 'cat >/dev/null; for i in $(seq 50); do '
                                   'echo "progress $i 50" >&3; sleep 0.2; done; echo \'"late"\'', options=["-v"])
        out, err, status = yield self.gloom("submit", "long", "--wait", "1", *self.master_arg())
        self.assertEqual((out, status), ("", 1))
        self.assertTrue(err.startswith("gloom: no answer within 1 s; the job was running on a slave "
                                       "(last progress: "), err)
        self.assertNotIn("busy", err)
        yield worker.printed(lambda out, err: b"cancelled; its command was stopped" in err, timeout=5)
        self.assertNotIn(b"answered", b"".join(worker.err))

    @inlineCallbacks
    def test_a_job_given_up_past_its_timeout_stops_its_command(self):
        self.scheduler.max_retries = 0
        worker = yield self.worker("late", "sh", "-c", 'cat >/dev/null; sleep 1.5; echo "progress 1" >&3; '
                                   'exec sleep 20', options=["-v"])
        out, err, status = yield self.gloom("submit", "late", "--timeout", "1", *self.master_arg())
        self.assertEqual(status, 1)
        self.assertIn("timeout", err)
        yield worker.printed(lambda out, err: b"timed out; its command was stopped" in err, timeout=8)
        yield self.until(lambda: self.scheduler.idle_slaves("late") == 1)  # free for the next job

    @inlineCallbacks
    def test_wait_says_the_type_is_paused(self):
        yield self.gloom("pause", "t", *self.master_arg())
        out, err, status = yield self.gloom("submit", "t", "1", "--wait", "0.5", *self.master_arg())
        self.assertEqual((out, err, status), ("", "gloom: no answer within 0.5 s; type 't' is paused "
                                                  "(gloom resume t)\n", 1))

    @inlineCallbacks
    def test_joining_a_unique_job_is_said_with_v(self):
        first = self.start("submit", "report", '"a"', "--unique", "k", *self.master_arg())
        yield self.until(lambda: len(self.scheduler) == 1)
        second = self.start("submit", "report", '"b"', "--unique", "k", "-v", *self.master_arg())
        yield second.printed(lambda out, err: b"joined" in err)
        yield self.worker("report", "cat")
        out, err, status = yield first.ended
        self.assertEqual((out, err, status), ('"a"\n', "", 0))  # not a terminal, no -v: nothing said
        out, err, status = yield second.ended
        self.assertEqual((out, status), ('"a"\n', 0))
        self.assertEqual(err, "gloom: joined the 'report' job already queued or running with unique key 'k': "
                              "its answer is this one's (this submit's body and options are not used)\n")

    @inlineCallbacks
    def test_job_shows_the_last_progress(self):
        yield self.worker("p", "sh", "-c", "cat >/dev/null; printf '%s\\n' "
                          "'{\"done\": 1, \"total\": 2, \"data\": \"half\\u001b[31m\", \"eta\": 9}' >&3; exec sleep 20")
        out, err, status = yield self.gloom("submit", "p", "--detach", "--id", "det-p", *self.master_arg())
        self.assertEqual((out, status), ("det-p\n", 0), err)
        yield self.until(lambda: self.scheduler.totals["progress"] == 1)
        out, err, status = yield self.gloom("job", "det-p", *self.master_arg())
        self.assertEqual(status, 0, err)
        self.assertIn("\n  progress: 50% 1/2 half\\x1b[31m\n", out + "\n")


class TwoDaemonsTests(CLITestCase):
    """A second daemon, on Unix sockets (which a client reaches sooner than
    a TCP daemon it names by host and port)."""

    def setUp(self):
        super().setUp()
        scratch = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, scratch, True)
        self.sockets = {role: os.path.join(scratch, f"{role}.sock") for role in ("master", "slave")}
        self.other = makeService({"master": f"unix:{self.sockets['master']}",
                                  "slave": f"unix:{self.sockets['slave']}",
                                  "max-frame": self.max_frame, "retries": self.retries}, reactor)
        for factory in self.other.factories:
            factory.buildProtocol = self._watched(factory.buildProtocol)
        self.other.startService()
        self.addCleanup(lambda: self.other.stopService() if self.other.running else None)

    @inlineCallbacks
    def test_unique_submits_meet_on_the_keys_daemon_from_the_start(self):
        tcp, unix = f"127.0.0.1:{self.port('master')}", f"unix:{self.sockets['master']}"
        keys = [key for key in (f"day-{n}" for n in range(200)) if core.rendezvous(key, [tcp, unix])[0] == tcp][:3]
        both = ["--master", f"{tcp},{unix}"]
        for key in keys:
            self.start("submit", "report", '"x"', "--unique", key, *both)
        # And one with the other order of the daemons: the key decides, not the order.
        self.start("submit", "report", '"y"', "--unique", keys[0], "--master", f"{unix},{tcp}")
        placed = lambda: len(self.scheduler) + len(self.other.scheduler)  # noqa: E731
        yield self.until(lambda: placed() == 3 and self.scheduler.totals["coalesced"]
                         + self.other.scheduler.totals["coalesced"] == 1)
        self.assertEqual((len(self.scheduler), len(self.other.scheduler)), (3, 0))
        self.assertEqual(self.scheduler.totals["coalesced"], 1)

    @inlineCallbacks
    def test_submit_with_one_daemon_down_goes_to_the_other(self):
        down = f"127.0.0.1:{reserved_port(self)}"
        unix = f"unix:{self.sockets['master']}"
        key = next(key for key in (f"k{n}" for n in range(200)) if core.rendezvous(key, [down, unix])[0] == down)
        run = self.start("submit", "report", '"z"', "--unique", key, "--master", f"{down},{unix}")
        yield self.until(lambda: len(self.other.scheduler) == 1)
        run.transport.signalProcess("KILL")


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
