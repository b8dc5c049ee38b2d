"""The warm-up at start-up (``--warm-up``): synthetic jobs through the
daemon's own classes over loopback, before its ports open, leaving nothing
behind and touching nothing of the real daemon."""

import json
import platform
import shutil
import signal
import subprocess
import sys
import tempfile

from twisted.internet.base import ReactorBase
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from gloom import tap
from tests.support import ANY_PORT, BlockingClient, TwistdDaemon
from tests.test_twistd import run_a_job


def stats(port: int) -> dict:
    """The daemon's stats, asked on its master port."""
    client = BlockingClient(port)
    try:
        client.send({"action": "stats"})
        reply = client.receive()
    finally:
        client.close()
    return reply["stats"]


class TwistdWarmUpTests(SynchronousTestCase):
    """``twistd -n gloom --warm-up N`` in a subprocess."""

    def test_warms_up_before_listening_and_leaves_the_daemon_untouched(self):
        daemon = TwistdDaemon(self, "-n", "gloom", "--warm-up", "3000", *ANY_PORT)
        master_port, slave_port = daemon.ports()
        text = daemon.output.decode(errors="replace")
        self.assertIn("Warmed up: 3000 jobs in ", text)
        before_listening = text.split("Listening for", 1)[0]
        self.assertIn("Warmed up: 3000 jobs", before_listening)
        self.assertNotIn("connected from", before_listening)  # warm-up connections are quiet
        self.assertNotIn("disconnected", before_listening)
        self.assertNotIn("warm-up skipped", text)
        figures = stats(master_port)
        self.assertEqual(figures["totals"]["submitted"], 0, figures)
        self.assertEqual(figures["totals"]["completed"], 0, figures)
        self.assertEqual(figures["types"], {}, figures)
        run_a_job(self, master_port, slave_port)
        figures = stats(master_port)
        self.assertEqual((figures["totals"]["submitted"], figures["totals"]["completed"]), (1, 1))
        daemon.process.send_signal(signal.SIGTERM)
        status, output = daemon.finish()
        self.assertEqual(status, -signal.SIGTERM, output)
        self.assertNotIn("Traceback", output)

    def test_no_warm_up_with_zero(self):
        daemon = TwistdDaemon(self, "-n", "gloom", "--warm-up", "0", *ANY_PORT)
        master_port, slave_port = daemon.ports()
        run_a_job(self, master_port, slave_port)
        daemon.process.send_signal(signal.SIGTERM)
        status, output = daemon.finish()
        self.assertEqual(status, -signal.SIGTERM, output)
        self.assertNotIn("Warmed up", output)
        self.assertNotIn("warm-up", output)

    def test_a_bad_count_is_refused_clearly(self):
        status, output = TwistdDaemon(self, "-n", "gloom", "--warm-up", "-1", *ANY_PORT).finish()
        self.assertIn("--warm-up must not be negative, not -1", output)
        self.assertNotIn("Traceback", output)
        self.assertNotIn("Listening for", output)


class OptionTests(SynchronousTestCase):
    def test_refusals(self):
        for value, message in [("-1", "--warm-up must not be negative, not -1"),
                               ("x", "--warm-up takes a whole number, not 'x'"),
                               ("1.5", "--warm-up takes a whole number, not '1.5'")]:
            error = self.assertRaises(UsageError, tap.Options().parseOptions, ["--warm-up", value])
            self.assertIn(message, str(error))

    def test_counts(self):
        for value, count in [("0", 0), ("20000", 20000)]:
            options = tap.Options()
            options.parseOptions(["--warm-up", value])
            self.assertEqual(options["warm-up"], count)

    def test_default_depends_on_the_implementation(self):
        self.assertEqual(tap.default_warm_up("PyPy"), tap.DEFAULT_WARM_UP_PYPY)
        self.assertEqual(tap.default_warm_up("CPython"), 0)
        options = tap.Options()
        options.parseOptions([])
        self.assertIsNone(options["warm-up"])
        reactor = MemoryReactorClock()
        service = tap.makeService(options, reactor)
        self.assertEqual(service.warm_up, tap.default_warm_up(platform.python_implementation()))

    def test_a_mapping_without_the_key_gets_none(self):
        """A caller from before the option (a mapping without its key)
        starts as it did: without a warm-up."""
        service = tap.makeService({"master": "tcp:9998", "slave": "tcp:9999", "max-frame": 1024,
                                   "retries": 3}, MemoryReactorClock())
        self.assertEqual(service.warm_up, 0)


class Refusing(MemoryReactorClock):
    """A reactor on which listening on an ephemeral port fails."""

    def listenTCP(self, port, factory, backlog=50, interface=""):
        if port == 0:
            raise OSError(99, "Cannot assign requested address")
        return super().listenTCP(port, factory, backlog, interface)


class HandsOff(MemoryReactorClock):
    """A reactor that runs only inside its own loop (as the asyncio one):
    no second instance of it may be made."""

    doIteration = ReactorBase.doIteration
    made = 0

    def __init__(self):
        super().__init__()
        HandsOff.made += 1


class FailingWarmUpTests(SynchronousTestCase):
    def start(self, reactor) -> list:
        """Start a daemon asking for a warm-up on ``reactor``; return what
        Gloom logged, having checked that its real ports were opened."""
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        service = tap.makeService({"master": "tcp:9998", "slave": "tcp:9999", "max-frame": 1024,
                                   "retries": 3, "warm-up": 100}, reactor)
        service.privilegedStartService()
        self.assertEqual([port[0] for port in reactor.tcpServers], [9998, 9999])
        return [e for e in events if e.get("log_namespace", "").startswith("gloom")]

    def test_a_reactor_that_cannot_be_driven_by_hand_gets_no_warm_up(self):
        reactor = HandsOff()
        made = HandsOff.made
        skipped = [e for e in self.start(reactor) if "warm-up skipped" in e["log_format"]]
        self.assertEqual(HandsOff.made, made)  # no second instance was made
        self.assertEqual(len(skipped), 1)
        self.assertIn("cannot be driven by hand", skipped[0]["error"])

    def test_a_failing_warm_up_is_logged_and_start_up_goes_on(self):
        ours = self.start(Refusing())
        skipped = [e for e in ours if "warm-up skipped" in e["log_format"]]
        self.assertEqual(len(skipped), 1, ours)
        self.assertEqual(skipped[0]["log_level"], LogLevel.warn)
        self.assertIn("Cannot assign requested address", skipped[0]["error"])
        self.assertFalse(any("Warmed up" in e["log_format"] for e in ours))


SCRIPT = r"""
import json, sys
from twisted.internet import reactor
from twisted.logger import globalLogBeginner, globalLogPublisher
events = []
globalLogBeginner.beginLoggingTo([events.append], redirectStandardIO=False)
from gloom import warmup
from gloom.protocol import GloomProtocol
readers, writers = set(reactor.getReaders()), set(reactor.getWriters())
ran = []
foreign = reactor.callLater(0, ran.append, "run")  # the daemon's own: not the warm-up's
outcome = {}
try:
    result = warmup.warm_up(reactor, int(sys.argv[1]), float(sys.argv[2]),
                            max_frame=int(sys.argv[3]))
    outcome["jobs"], outcome["wanted"] = result.jobs, result.wanted
    outcome["complete"] = result.complete
except Exception as e:
    outcome["error"] = f"{type(e).__name__}: {e}"
outcome["foreign_untouched"] = foreign.active() and not ran
foreign.cancel()
outcome["delayed"] = len(reactor.getDelayedCalls())
outcome["readers"] = len(set(reactor.getReaders()) - readers)
outcome["writers"] = len(set(reactor.getWriters()) - writers)
outcome["observer_restored"] = GloomProtocol.__dict__["log"].observer is globalLogPublisher
outcome["connection_lines"] = sum(1 for e in events if "connected" in (e.get("log_format") or ""))
print(json.dumps(outcome))
"""


class WarmUpFunctionTests(SynchronousTestCase):
    """`gloom.warmup.warm_up` against the global reactor, in a subprocess
    (the reactor is driven by hand, which trial's running reactor is not)."""

    def run_warm_up(self, jobs, seconds_limit=10.0, max_frame=64 * 1024 * 1024) -> dict:
        cwd = tempfile.mkdtemp()  # where only the installed package can be imported
        self.addCleanup(shutil.rmtree, cwd, True)
        ran = subprocess.run([sys.executable, "-c", SCRIPT, str(jobs), str(seconds_limit),
                              str(max_frame)], cwd=cwd, capture_output=True, text=True, timeout=120)
        self.assertEqual(ran.returncode, 0, ran.stderr)
        outcome = json.loads(ran.stdout.strip().splitlines()[-1])
        # Nothing of its own is left behind, whatever happened.
        self.assertEqual((outcome["delayed"], outcome["readers"], outcome["writers"]), (0, 0, 0),
                         outcome)
        self.assertTrue(outcome["observer_restored"])
        self.assertTrue(outcome["foreign_untouched"], "the warm-up ran the reactor's own calls")
        self.assertEqual(outcome["connection_lines"], 0)
        return outcome

    def test_runs_every_job(self):
        outcome = self.run_warm_up(2000)
        self.assertEqual((outcome["jobs"], outcome["wanted"], outcome["complete"]),
                         (2000, 2000, True))

    def test_stops_at_the_time_limit(self):
        outcome = self.run_warm_up(10 ** 9, seconds_limit=0.3)
        self.assertNotIn("error", outcome)
        self.assertFalse(outcome["complete"])
        self.assertLess(outcome["jobs"], outcome["wanted"])

    def test_a_refused_request_raises_and_cleans_up(self):
        outcome = self.run_warm_up(1000, max_frame=32)  # every submit is too large
        self.assertIn("WarmUpError", outcome["error"])
        self.assertIn("size_error", outcome["error"])

    def test_none(self):
        outcome = self.run_warm_up(0)
        self.assertEqual((outcome["jobs"], outcome["complete"]), (0, True))
