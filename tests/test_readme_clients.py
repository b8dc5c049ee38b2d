"""The Python examples of README.rst's client sections, of "Many daemons"
and of "Detached and delayed jobs" run as printed, against real daemons on
this test's ports.

Each example is taken from its section by title (every ``.. code-block::
python`` in it), and the default ports in it (9998 and 9999, and 10998 and
10999 for the second daemon of "Many daemons") are replaced by the ports of
daemons served from makeService in this process's reactor.  Blocking
examples run in a thread while the reactor serves the daemons, with their
``print`` captured; the Twisted ones, which run a reactor of their own, run
as programs in a subprocess (from a scratch directory, so the installed
package is what they import), and the application file under ``twistd``.
Where an example needs a worker for ``upper``, or a master to send its
worker jobs, the test provides one.  The asyncio client section's example
is run by tests/test_aio.py (``ReadmeExampleTests``); the asyncio example
of "Detached and delayed jobs" is run here, as the blocking ones are.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile

from twisted.internet import reactor
from twisted.internet.defer import DeferredList, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from gloom.core import ServerError, TransportError
from gloom.legacy import TransportError as LegacyTransportError
from gloom.tap import makeService
from gloom.txclient import MasterClient, Worker
from tests.support import TwistdDaemon, reserved_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.rst")

BLOCKING = "Python client (blocking): ``gloom.client``"
LEGACY = "Python client for 2009 code: ``gloom.legacy``"
TWISTED = "Twisted client: ``gloom.txclient``"
ASYNCIO = "asyncio client: ``gloom.aio``"
MANY = "Many daemons"
DETACHED = "Detached and delayed jobs"

# How many Python examples each section has, and so how many the tests here
# (or, for asyncio, tests/test_aio.py) run: a new example needs a test.
EXAMPLES = {BLOCKING: 4, LEGACY: 2, TWISTED: 3, ASYNCIO: 2, MANY: 1, DETACHED: 3}

DEFAULT_PORTS = re.compile(r"(?<![\d.])(9998|9999|10998|10999)(?!\d)")
FAST_RETRY = lambda attempt: 0.05  # noqa: E731


def section(title: str) -> str:
    """The text of the top-level section titled ``title``."""
    with open(README) as readme:
        text = readme.read()
    heading = f"\n{title}\n{'=' * len(title)}\n"
    assert heading in text, f"README.rst has no section {title!r}"
    body = text.split(heading, 1)[1]
    return re.split(r"\n[^\n]+\n===+\n", body, maxsplit=1)[0]


def examples(title: str) -> list:
    """The section's Python blocks, as programs."""
    blocks = re.findall(r"\.\. code-block:: python\n\n((?:    .*\n|\n)+)", section(title))
    return ["\n".join(line[4:] for line in block.splitlines()) + "\n" for block in blocks]


def example(title: str, index: int, *daemons: "Daemon") -> str:
    """Example ``index`` of a section, pointed at ``daemons`` instead of the
    default ports (the first daemon for 9998/9999, the second for
    10998/10999)."""
    code = examples(title)[index]
    ports = {}
    for daemon, (master, slave) in zip(daemons, [("9998", "9999"), ("10998", "10999")]):
        ports[master], ports[slave] = str(daemon.master_port), str(daemon.slave_port)
    used = set(DEFAULT_PORTS.findall(code))
    assert used, f"example {index} of {title!r} names no default port:\n{code}"
    assert used <= set(ports), f"example {index} of {title!r} uses {sorted(used - set(ports))}"
    return DEFAULT_PORTS.sub(lambda match: ports[match.group(1)], code)


class Daemon:
    """A Gloom daemon from makeService in this reactor, on loopback ports
    reserved for the test."""

    def __init__(self, test):
        self.master_port, self.slave_port = reserved_port(test), reserved_port(test)
        self.master = f"127.0.0.1:{self.master_port}"
        self.slave = f"127.0.0.1:{self.slave_port}"
        self.service = makeService({"master": f"tcp:{self.master_port}:interface=127.0.0.1",
                                    "slave": f"tcp:{self.slave_port}:interface=127.0.0.1",
                                    "max-frame": 1024 * 1024, "retries": 3}, reactor)
        self.service.startService()
        test.addCleanup(self.stop)

    def stop(self):
        if self.service.running:
            return self.service.stopService()

    def drop_slaves(self):
        """Close every slave connection, as a daemon going away does."""
        for connection in list(self.service.factories[1].connections):
            connection.transport.abortConnection()


class ExampleTestCase(TestCase):
    timeout = 30

    def daemon(self) -> Daemon:
        return Daemon(self)

    def worker(self, *daemons: Daemon) -> Worker:
        """A worker for ``upper`` on every daemon given."""
        worker = Worker("upper", lambda job: job.body.upper(), concurrency=2,
                        slaves=[daemon.slave for daemon in daemons], retry_policy=FAST_RETRY)
        worker.start()
        self.addCleanup(worker.stop)
        return worker

    def master(self, daemon: Daemon) -> MasterClient:
        master = MasterClient(daemon.master, retry_policy=FAST_RETRY)
        master.start()
        self.addCleanup(master.stop)
        return master

    def run_blocking(self, code: str):
        """Run ``code`` in a thread.  Returns the list its ``print`` calls
        fill (one string per call), its namespace, and a Deferred that fires
        when it is done."""
        printed = []
        namespace = {"__name__": "__main__",
                     "print": lambda *args: printed.append(" ".join(map(str, args)))}
        done = deferToThread(exec, compile(code, "README.rst", "exec"), namespace)
        return printed, namespace, done

    def run_program(self, code: str):
        """Run ``code`` as a program with the installed package, in a
        thread; a Deferred for the ``CompletedProcess``."""
        scratch = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, scratch, True)
        path = os.path.join(scratch, "example.py")
        with open(path, "w") as f:
            f.write(code)
        return deferToThread(subprocess.run, [sys.executable, path], cwd=scratch, capture_output=True,
                             text=True, timeout=25)


class BlockingClientTests(ExampleTestCase):
    @inlineCallbacks
    def test_progress(self):
        daemon = self.daemon()
        printed, _, done = self.run_blocking(example(BLOCKING, 3, daemon))
        yield done
        self.assertEqual(printed, ["cat.png: 1/3", "cat.png: 2/3", "cat.png: 3/3",
                                   "resized cat.png"])

    @inlineCallbacks
    def test_master(self):
        daemon = self.daemon()
        self.worker(daemon)
        printed, _, done = self.run_blocking(example(BLOCKING, 0, daemon))
        yield done
        self.assertEqual(printed[:5], ["HELLO", "A", "B", "C", "True LATER"])
        totals = ast.literal_eval(printed[5])
        self.assertEqual({key: totals[key] for key in ("submitted", "completed", "failed", "cancelled")},
                         {"submitted": 6, "completed": 5, "failed": 0, "cancelled": 1})
        self.assertEqual(len(printed), 6)

    @inlineCallbacks
    def test_serving_worker(self):
        daemon = self.daemon()
        printed, _, done = self.run_blocking(example(BLOCKING, 1, daemon))
        master = self.master(daemon)
        self.assertEqual((yield master.submit("upper", "served")), "SERVED")
        daemon.drop_slaves()
        yield done  # serve returns once its daemon has gone away
        self.assertEqual(printed, [])

    @inlineCallbacks
    def test_worker_one_call_at_a_time(self):
        daemon = self.daemon()
        printed, _, done = self.run_blocking(example(BLOCKING, 2, daemon))
        master = self.master(daemon)
        self.assertEqual((yield master.submit("upper", "abc")), "ABC")
        with self.assertRaises(ServerError) as caught:
            yield master.submit("upper", 5)
        self.assertEqual((caught.exception.error, caught.exception.reason),
                         ("job_failed", "cannot upper-case 5"))
        daemon.drop_slaves()
        with self.assertRaises(TransportError):
            yield done  # its loop ends when slave.job() finds the daemon gone
        self.assertEqual(printed, [])


class LegacyClientTests(ExampleTestCase):
    @inlineCallbacks
    def test_master(self):
        daemon = self.daemon()
        self.worker(daemon)
        printed, _, done = self.run_blocking(example(LEGACY, 0, daemon))
        yield done
        self.assertEqual(printed[0], "True HELLO")
        self.assertEqual(sorted(printed[1:]), ["A", "B"])

    @inlineCallbacks
    def test_worker(self):
        daemon = self.daemon()
        printed, _, done = self.run_blocking(example(LEGACY, 1, daemon))
        master = self.master(daemon)
        self.assertEqual((yield master.submit("upper", "from 2009")), "FROM 2009")
        self.assertEqual((yield master.submit("upper", "again")), "AGAIN")
        daemon.drop_slaves()
        with self.assertRaises(LegacyTransportError):
            yield done  # iterating over the slave ends when the daemon goes away
        self.assertEqual(printed, [])


class TwistedClientTests(ExampleTestCase):
    @inlineCallbacks
    def test_react_program(self):
        daemon = self.daemon()
        ran = yield self.run_program(example(TWISTED, 0, daemon))
        self.assertEqual(ran.returncode, 0, ran.stderr)
        self.assertEqual(ran.stdout.splitlines(), ["HELLO", "['X', 'Y', 'Z']"])

    @inlineCallbacks
    def test_application_file(self):
        daemon = self.daemon()
        scratch = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, scratch, True)
        tac = os.path.join(scratch, "upper.tac")
        with open(tac, "w") as f:
            f.write(example(TWISTED, 1, daemon))
        twistd = TwistdDaemon(self, "-ny", tac)
        master = self.master(daemon)
        answers = yield DeferredList([master.submit("upper", word) for word in ("one", "two", "three")],
                                     fireOnOneErrback=True, consumeErrors=True)
        self.assertEqual([answer for _, answer in answers], ["ONE", "TWO", "THREE"])
        twistd.process.send_signal(signal.SIGTERM)
        status, output = yield deferToThread(twistd.finish)
        self.assertIn(status, (0, -signal.SIGTERM), output)
        self.assertIn("Server Shut Down", output)
        self.assertNotIn("Traceback", output)

    @inlineCallbacks
    def test_progress_program(self):
        daemon = self.daemon()
        ran = yield self.run_program(example(TWISTED, 2, daemon))
        self.assertEqual(ran.returncode, 0, ran.stderr)
        self.assertEqual(ran.stdout.splitlines(), ["1/3", "2/3", "3/3", "resized cat.png"])


class AsyncioClientTests(ExampleTestCase):
    @inlineCallbacks
    def test_progress_example(self):
        daemon = self.daemon()
        printed, _, done = self.run_blocking(example(ASYNCIO, 1, daemon))
        yield done
        self.assertEqual(printed, ["cat.png: 1/3", "cat.png: 2/3", "cat.png: 3/3", "resized cat.png"])


class ManyDaemonsTests(ExampleTestCase):
    @inlineCallbacks
    def test_master_over_two_daemons(self):
        first, second = self.daemon(), self.daemon()
        self.worker(first, second)
        printed, _, done = self.run_blocking(example(MANY, 0, first, second))
        yield done
        self.assertEqual(printed, [
            str([first.master, second.master]),
            "['A', 'B', 'C', 'D']",
            str(sorted([first.master, second.master])),
        ])


class DetachedJobsTests(ExampleTestCase):
    """The examples of "Detached and delayed jobs": 0 for the blocking
    client, 1 for the Twisted one (a program), 2 for the asyncio one, each
    against a fresh daemon with a worker for ``upper`` that fails a body
    that is not a string."""

    @inlineCallbacks
    def test_blocking_client(self):
        daemon = self.daemon()
        self.worker(daemon)
        printed, _, done = self.run_blocking(example(DETACHED, 0, daemon))
        yield done
        self.assertEqual(printed, ["HELLO", "delayed", "cancelled by a master", "SOON", "1 [True]", "unknown"])

    @inlineCallbacks
    def test_twisted_client_program(self):
        daemon = self.daemon()
        self.worker(daemon)
        ran = yield self.run_program(example(DETACHED, 1, daemon))
        self.assertEqual(ran.returncode, 0, ran.stderr)
        self.assertEqual(ran.stdout.splitlines(), ["HELLO", "delayed", "dead", "1"])

    @inlineCallbacks
    def test_asyncio_client(self):
        daemon = self.daemon()
        self.worker(daemon)
        printed, _, done = self.run_blocking(example(DETACHED, 2, daemon))
        yield done
        self.assertEqual(printed, ["delayed", "HELLO", "1 True", "0"])


class CoverageTests(TestCase):
    def test_every_example_has_a_test(self):
        """Each client section (and "Many daemons", and "Detached and
        delayed jobs") has the examples the tests run, so a new one is not
        left untested."""
        self.assertEqual({title: len(examples(title)) for title in EXAMPLES}, EXAMPLES)
