"""The installed package as users run it: the twistd plugin, ``twistd -n
gloom`` in a subprocess, and ``etc/gloom.tac``."""

import importlib.metadata
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

from twisted.application.service import IService, loadApplication
from twisted.plugin import getPlugins
from twisted.python.usage import UsageError
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from gloom import tap
from tests.support import ANY_PORT, BlockingClient, TwistdDaemon, frame, occupied_port, twistd_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAC = os.path.join(ROOT, "etc", "gloom.tac")


def run_a_job(test, master_port, slave_port):
    slave = BlockingClient(slave_port)
    master = BlockingClient(master_port)
    try:
        slave.send({"action": "join", "type": "reverse"})
        test.assertEqual(slave.receive(), {"ok": True})
        master.send({"action": "submit", "id": "r1", "type": "reverse", "body": "gloom"})
        test.assertEqual(master.receive(), {"ok": True, "id": "r1"})
        job = slave.receive()
        test.assertEqual(job, {"action": "job", "id": "r1", "type": "reverse", "body": "gloom"})
        slave.send({"action": "respond", "body": job["body"][::-1]})
        test.assertEqual(slave.receive(), {"ok": True})
        test.assertEqual(master.receive(), {"id": "r1", "body": "moolg"})
    finally:
        slave.close()
        master.close()


class InstalledPluginTests(SynchronousTestCase):
    def test_installed_distribution_ships_the_plugin(self):
        files = [str(f) for f in importlib.metadata.files("gloom") or ()]
        self.assertIn("twisted/plugins/gloom_plugin.py", files)
        self.assertIn("twisted/plugins/gloom_endpoints.py", files)
        self.assertNotIn("twisted/plugins/__init__.py", files)
        self.assertNotIn("twisted/__init__.py", files)
        plugin = importlib.metadata.distribution("gloom").locate_file("twisted/plugins/gloom_plugin.py")
        self.assertTrue(os.path.exists(plugin))

    def test_plugin_is_found(self):
        from twisted.application.service import IServiceMaker
        from twisted import plugins

        makers = {m.tapname: m for m in getPlugins(IServiceMaker, plugins)}
        self.assertIn("gloom", makers)
        self.assertIs(makers["gloom"].options, tap.Options)

    def test_twistd_help_lists_gloom(self):
        cwd = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, cwd, True)
        result = subprocess.run(twistd_command() + ["--help"], cwd=cwd, capture_output=True, text=True, timeout=60)
        self.assertRegex(result.stdout, r"\n\s+gloom\s+A job-distribution daemon")


class TwistdTests(SynchronousTestCase):
    def test_runs_a_job_and_stops_cleanly_on_sigterm(self):
        daemon = TwistdDaemon(self, "-n", "gloom", *ANY_PORT)
        master_port, slave_port = daemon.ports()
        run_a_job(self, master_port, slave_port)
        waiting = BlockingClient(master_port)
        self.addCleanup(waiting.close)
        waiting.send({"action": "submit", "id": "never", "type": "no-slaves", "body": None})
        self.assertEqual(waiting.receive(), {"ok": True, "id": "never"})
        daemon.process.send_signal(signal.SIGTERM)
        reply = waiting.receive()
        self.assertEqual((reply["error"], reply["id"]), ("shutdown", "never"))
        self.assertEqual(waiting.sock.recv(1), b"")
        status, output = daemon.finish()
        self.assertEqual(status, -signal.SIGTERM, output)
        self.assertIn("Main loop terminated", output)
        self.assertIn("Gloom ", output)
        self.assertNotIn("Traceback", output)

    def test_the_admin_endpoint_allows_what_the_master_port_forbids(self):
        daemon = TwistdDaemon(self, "-n", "gloom", *ANY_PORT, "--admin-endpoint", "unix:admin.sock")
        master_port, slave_port = daemon.ports()
        daemon.read_until(lambda text: "Listening for administrators" in text)
        master = BlockingClient(master_port)
        self.addCleanup(master.close)
        master.send({"action": "pause", "type": "reverse", "ref": 1})
        refusal = master.receive()
        self.assertEqual((refusal["error"], refusal["ref"]), ("forbidden", 1))
        admin = socket.socket(socket.AF_UNIX)
        self.addCleanup(admin.close)
        admin.settimeout(10)
        admin.connect(os.path.join(daemon.cwd, "admin.sock"))
        admin.sendall(frame({"action": "pause", "type": "reverse"}) + frame({"action": "stats"}))
        replies = BlockingClient.__new__(BlockingClient)
        replies.sock = admin
        self.assertEqual(replies.receive(), {"ok": True})
        stats = replies.receive()["stats"]
        self.assertEqual((stats["paused"], stats["masters"]), (["reverse"], 2))
        admin.sendall(frame({"action": "resume", "type": "reverse"}))
        self.assertEqual(replies.receive(), {"ok": True})
        run_a_job(self, master_port, slave_port)  # the admin port is a master port too
        admin.sendall(frame({"action": "drain"}))
        self.assertEqual(replies.receive(), {"ok": True})
        status, output = daemon.finish()
        self.assertEqual(status, 0, output)
        self.assertIn("Drained", output)

    def test_port_in_use_exits_with_one_clear_line(self):
        port = occupied_port(self)
        daemon = TwistdDaemon(self, "-n", "gloom", "--master", f"tcp:{port}:interface=127.0.0.1",
                        "--slave", "tcp:0:interface=127.0.0.1")
        status, output = daemon.finish()
        self.assertNotEqual(status, 0)
        lines = [line for line in output.splitlines() if "cannot listen" in line]
        self.assertEqual(len(lines), 1, output)
        self.assertIn(f"gloom: cannot listen for masters on tcp:{port}:interface=127.0.0.1", lines[0])
        self.assertIn("Address already in use", lines[0])
        self.assertNotIn("Traceback", output)

    def test_bad_options_are_refused_clearly(self):
        from twisted import version

        # twistd before 26.10 printed usage errors but exited with status 0.
        status_reports_error = (version.major, version.minor) >= (26, 10)
        for arguments, message in [
            (["--retries", "-1"], "--retries must not be negative"),
            (["--retries", "three"], "--retries takes a whole number"),
            (["--max-frame", "0"], "--max-frame must be between 1 and"),
            (["--master", "carrier-pigeon:9998"], "--master: 'carrier-pigeon:9998' is not a usable endpoint"),
        ]:
            status, output = TwistdDaemon(self, "-n", "gloom", *arguments).finish()
            if status_reports_error:
                self.assertNotEqual(status, 0, arguments)
            self.assertIn(message, output)
            self.assertNotIn("Traceback", output)


class TacTests(SynchronousTestCase):
    def test_tac_builds_the_default_daemon(self):
        application = loadApplication(TAC, "python")
        service = IService(application).getServiceNamed("gloom")
        self.assertIsInstance(service, tap.GloomService)
        self.assertEqual(service.getServiceNamed("master").description, tap.DEFAULT_MASTER)
        self.assertEqual(service.getServiceNamed("slave").description, tap.DEFAULT_SLAVE)
        self.assertEqual(service.scheduler.max_retries, tap.DEFAULT_RETRIES)
        self.assertIsNone(service.scheduler.default_timeout)
        masters, slaves = service.factories
        defaults = tap.Options()
        defaults.parseOptions([])
        self.assertEqual((masters.max_frame, masters.frame_timeout, masters.max_queued, slaves.frame_timeout),
                         (defaults["max-frame"], defaults["frame-timeout"], defaults["max-queued"],
                          defaults["frame-timeout"]))
        self.assertEqual(sorted(child.name for child in service), ["master", "scheduler", "slave"])

    def test_tac_shows_every_option(self):
        with open(TAC) as tac:
            text = tac.read()
        for name, *_ in tap.Options.optParameters + tap.Options.optFlags:
            self.assertIn(f'"--{name}": ', text)

    def test_twistd_runs_the_tac_file(self):
        with open(TAC) as tac:
            text = tac.read()
        text, count = re.subn(r'(?m)^(MASTER|SLAVE) = "[^"]*"', r'\1 = "tcp:0:interface=127.0.0.1"', text)
        self.assertEqual(count, 2)
        text, count = re.subn(r"(?m)^WARM_UP = None", "WARM_UP = 0", text)
        self.assertEqual(count, 1)
        scratch = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, scratch, True)
        path = os.path.join(scratch, "gloom.tac")
        with open(path, "w") as tac:
            tac.write(text)
        daemon = TwistdDaemon(self, "-ny", path)
        run_a_job(self, *daemon.ports())
        daemon.process.send_signal(signal.SIGTERM)
        status, output = daemon.finish()
        self.assertEqual(status, -signal.SIGTERM, output)
        self.assertIn("Main loop terminated", output)


class OptionsTests(SynchronousTestCase):
    def test_help_says_each_option_in_one_sentence_with_its_default(self):
        result = subprocess.run(twistd_command() + ["gloom", "--help"], cwd=tempfile.gettempdir(),
                                capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        entries = re.findall(r"^ +--([a-z-]+)=\s+(.*?)(?=^ +--|^$)", result.stdout, re.M | re.S)
        self.assertEqual(sorted(name for name, _ in entries), sorted(o[0] for o in tap.Options.optParameters))
        for name, text in entries:
            text = " ".join(text.split())
            self.assertRegex(text, r"^[A-Z].* \[default: [^\]]+\]$", name)
            self.assertNotIn(". ", text.replace("e.g. ", ""), name)  # one sentence
            self.assertNotIn("..", text)
        self.assertIn("Display Gloom's version and exit.", result.stdout)
        for name, *_ in tap.Options.optFlags:
            flag = re.search(rf"^ +--{name}\s+(.*?)(?=^ +--|^$)", result.stdout, re.M | re.S)
            self.assertIsNotNone(flag, name)
            text = " ".join(flag.group(1).split())
            self.assertRegex(text, r"^[A-Z].* \[default: [^\]]+\]$", name)

    def test_version_is_glooms(self):
        import gloom

        result = subprocess.run(twistd_command() + ["gloom", "--version"], cwd=tempfile.gettempdir(),
                                capture_output=True, text=True, timeout=60)
        self.assertEqual((result.returncode, result.stdout), (0, f"gloom {gloom.__version__}\n"))

    def test_defaults(self):
        options = tap.Options()
        options.parseOptions([])
        self.assertEqual((options["master"], options["slave"], options["max-frame"], options["retries"]),
                         ("tcp:9998:interface=127.0.0.1", "tcp:9999:interface=127.0.0.1", 64 * 1024 * 1024, 3))

    def test_refusals(self):
        for arguments in (["--retries", "-2"], ["--max-frame", str(2**32)], ["--slave", "nonsense"],
                          ["--job-timeout", "0"], ["--job-timeout", "soon"], ["--max-queued", "0"],
                          ["--http", "nonsense:1"], ["--journal-sync", "sometimes"], ["--journal", ""],
                          ["--dead-max", "-1"], ["--keep-results", "0"], ["--keep-results-max", "x"],
                          ["--retry-backoff", "-1"], ["--retry-backoff-max", "0"],
                          ["--max-detached", "0"], ["--keep-results-bytes", "-5"],
                          ["--slave", "mtls:0:privateKey=/nonexistent.key:caCerts=/nonexistent.crt"],
                          ["--slave", f"mtls:0:privateKey={TAC}"]):
            error = self.assertRaises(UsageError, tap.Options().parseOptions, arguments)
            self.assertNotIn("\n", str(error))

    def test_detached_job_options(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "journal.db")
        options = tap.Options()
        options.parseOptions(["--journal", path, "--journal-sync", "full", "--dead-max", "0",
                              "--keep-results", "30", "--retry-backoff", "0.25"])
        self.assertEqual((options["journal"], options["journal-sync"], options["dead-max"],
                          options["keep-results"], options["retry-backoff"]),
                         (path, "full", 0, 30.0, 0.25))
        service = tap.makeService(options, reactor=MemoryReactorClock())
        self.addCleanup(service.detached.journal.close)
        self.assertEqual((service.detached.dead_max, service.detached.keep_results,
                          service.scheduler.backoff, service.detached.journal.sync),
                         (0, 30.0, 0.25, "full"))

    def test_an_unusable_journal_stops_make_service_with_one_line(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "journal.db")
        with open(path, "wb") as garbage:
            garbage.write(b"not a database at all" * 100)
        options = tap.Options()
        options.parseOptions(["--journal", path])
        error = self.assertRaises(SystemExit, tap.makeService, options, MemoryReactorClock())
        self.assertIn(f"gloom: cannot use journal {path}", str(error))
        self.assertNotIn("\n", str(error))

    def test_new_options(self):
        options = tap.Options()
        options.parseOptions(["--job-timeout", "2.5", "--max-queued", "7", "--http", "tcp:0"])
        self.assertEqual((options["job-timeout"], options["max-queued"], options["http"]), (2.5, 7, "tcp:0"))


class NurseryAdviceTests(SynchronousTestCase):
    def test_only_pypy_without_the_setting_is_advised(self):
        advice = tap.nursery_advice("PyPy", {})
        self.assertIn("PYPY_GC_NURSERY=32MB", advice)
        self.assertIsNone(tap.nursery_advice("PyPy", {"PYPY_GC_NURSERY": "32MB"}))
        self.assertIsNone(tap.nursery_advice("CPython", {}))


class ReadmeExampleTests(SynchronousTestCase):
    """The README's standard-library master and slave work as printed."""

    def example_files(self):
        with open(os.path.join(ROOT, "README.rst")) as readme:
            text = readme.read()
        section = text.split("Example: a master and a slave", 1)[1].split("\nDevelopment\n", 1)[0]
        blocks = re.findall(r"\.\. code-block:: python\n\n((?:    .*\n|\n)+)", section)
        self.assertEqual(len(blocks), 3)
        return {name: "\n".join(line[4:] for line in block.splitlines()) + "\n"
                for name, block in zip(("frames.py", "slave.py", "master.py"), blocks)}

    def test_example_runs_against_twistd(self):
        daemon = TwistdDaemon(self, "-n", "gloom", *ANY_PORT)
        master_port, slave_port = daemon.ports()
        files = self.example_files()
        files["slave.py"] = files["slave.py"].replace("9999", str(slave_port))
        files["master.py"] = files["master.py"].replace("9998", str(master_port))
        for name, code in files.items():
            with open(os.path.join(daemon.cwd, name), "w") as f:
                f.write(code)
        slave = subprocess.Popen([sys.executable, "slave.py"], cwd=daemon.cwd,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.addCleanup(slave.wait)
        self.addCleanup(slave.kill)
        daemon.read_until(lambda output: "slave connected" in output)
        master = subprocess.run([sys.executable, "master.py"], cwd=daemon.cwd,
                                capture_output=True, text=True, timeout=30)
        self.assertEqual(master.returncode, 0, master.stderr)
        lines = sorted(master.stdout.splitlines())
        self.assertEqual(lines, sorted([
            "{'ok': True, 'id': 'greeting'}",
            "{'ok': True, 'id': 'number'}",
            "{'id': 'greeting', 'body': 'HELLO'}",
            "{'error': 'job_failed', 'reason': \"'int' object has no attribute 'upper'\", 'id': 'number'}",
        ]))


class SystemdUnitTests(SynchronousTestCase):
    """etc/gloom.service runs ``twistd -n gloom`` unprivileged, restarts it on
    failure and stops it with SIGTERM."""

    def unit(self):
        with open(os.path.join(ROOT, "etc", "gloom.service")) as f:
            return f.read()

    def settings(self):
        found = {}
        for line in self.unit().splitlines():
            if "=" in line and not line.startswith("#"):
                key, value = line.split("=", 1)
                found[key.strip()] = value.strip()
        return found

    def test_settings(self):
        settings = self.settings()
        command = settings["ExecStart"].split()
        self.assertTrue(command[0].endswith("/twistd"))
        self.assertIn("--nodaemon", command)
        self.assertEqual(command[command.index("gloom") + 1:], ["$GLOOM_OPTIONS"])
        self.assertNotIn(settings.get("User", "root"), ("root", "0"))
        self.assertEqual(settings["Restart"], "on-failure")
        self.assertEqual(settings["KillSignal"], "SIGTERM")

    def test_the_plugin_cache_command_builds_the_cache(self):
        """The unit's comment says how to build Twisted's plugin cache at
        install time; the command works, and leaves a cache twistd need not
        write again (the unprivileged user could not)."""
        (line,) = [line for line in self.unit().splitlines() if "getPlugins" in line]
        command = line.lstrip("# ").split(" ", 1)
        self.assertEqual(command[0], "/opt/gloom/bin/python")
        code = re.fullmatch(r'-c "(.*)"', command[1]).group(1)
        cwd = tempfile.mkdtemp()  # where only the installed package can be imported
        self.addCleanup(shutil.rmtree, cwd, True)
        built = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=60)
        self.assertEqual((built.returncode, built.stderr), (0, ""))
        where = subprocess.run([sys.executable, "-c",
                                "import twisted.plugins.gloom_plugin as p; print(p.__file__)"],
                               cwd=cwd, capture_output=True, text=True, timeout=60)
        plugins = os.path.dirname(where.stdout.strip())
        cache = os.path.join(plugins, "dropin.cache")
        for name in ("gloom_plugin.py", "gloom_endpoints.py"):
            self.assertGreater(os.path.getmtime(cache), os.path.getmtime(os.path.join(plugins, name)))
        check = ("import sys\n"
                 "from twisted.python import log\n"
                 "log.startLogging(sys.stdout)\n"
                 "from twisted.plugin import IPlugin, getPlugins\n"
                 "from twisted.python.filepath import FilePath\n"
                 "FilePath.setContent = lambda *a: sys.exit('the cache was written again')\n"
                 "list(getPlugins(IPlugin))\n")
        again = subprocess.run([sys.executable, "-c", check], cwd=cwd, capture_output=True, text=True, timeout=60)
        self.assertEqual(again.returncode, 0, again.stdout + again.stderr)
        self.assertNotIn("cache", again.stdout + again.stderr)  # neither written nor failing to be

    def test_systemd_accepts_it(self):
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise SkipTest("systemd-analyze is not installed")
        scratch = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, scratch, True)
        path = os.path.join(scratch, "gloom.service")
        with open(path, "w") as f:
            f.write(self.unit().replace("/opt/gloom/bin/twistd", twistd_command()[0]))
        result = subprocess.run([analyze, "verify", path], capture_output=True, text=True, timeout=60)
        self.assertEqual((result.returncode, result.stderr.strip()), (0, ""))


class ReadmeTLSRecipeTests(SynchronousTestCase):
    """The README's openssl recipe and TLS slave snippet work as printed."""

    def section(self):
        with open(os.path.join(ROOT, "README.rst")) as readme:
            text = readme.read()
        return text.split("Making the certificates with ``openssl``", 1)[1].split("\nLimits and backpressure\n")[0]

    def block(self, language):
        (block,) = re.findall(rf"\.\. code-block:: {language}\n\n((?:    .*\n|\n)+)", self.section())
        return "\n".join(line[4:] for line in block.splitlines()) + "\n"

    def test_recipe_certificates_pass_mutual_tls(self):
        if shutil.which("openssl") is None:
            raise SkipTest("openssl is not installed")
        certs = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, certs, True)
        made = subprocess.run(["bash", "-e", "-c", self.block("sh")], cwd=certs, capture_output=True,
                              text=True, timeout=120)
        self.assertEqual(made.returncode, 0, made.stderr)
        key, cert, ca = (os.path.join(certs, name) for name in ("server.key", "server.crt", "ca.crt"))
        daemon = TwistdDaemon(self, "-n", "gloom", "--master", "tcp:0:interface=127.0.0.1", "--slave",
                        f"mtls:0:interface=127.0.0.1:privateKey={key}:certKey={cert}:caCerts={ca}")
        _, slave_port = daemon.ports()
        connect = self.block("python").replace('("gloom.example.com", 9999)', f'("127.0.0.1", {slave_port})')
        join = (
            "import json, struct\n"
            "data = json.dumps({'action': 'join', 'type': 't'}).encode()\n"
            "sock.sendall(struct.pack('!I', len(data)) + data)\n"
            "print(sock.recv(100)[4:].decode())\n"
        )
        joined = subprocess.run([sys.executable, "-c", connect + join], cwd=certs, capture_output=True,
                                text=True, timeout=30)
        self.assertEqual(joined.returncode, 0, joined.stderr)
        self.assertEqual(json.loads(joined.stdout), {"ok": True})
        self.assertIn("client certificate 'CN=worker-1'", daemon.read_until(lambda out: "CN=worker-1" in out))

        anonymous = connect.replace('context.load_cert_chain("worker-1.crt", "worker-1.key")\n', "")
        refused = subprocess.run([sys.executable, "-c", anonymous + join], cwd=certs, capture_output=True,
                                 text=True, timeout=30)
        self.assertNotEqual(refused.returncode, 0)
        self.assertNotIn('"ok"', refused.stdout)


class HTTPHeadTests(SynchronousTestCase):
    """``curl -I`` on /status and /metrics: the headers of GET, no body, and
    nothing logged about it."""

    def test_head_requests(self):
        import http.client

        daemon = TwistdDaemon(self, "-n", "gloom", *ANY_PORT, "--http", "tcp:0:interface=127.0.0.1")
        text = daemon.read_until(lambda t: "Listening for HTTP on" in t)
        port = int(re.search(r"Listening for HTTP on 127\.0\.0\.1:(\d+)", text).group(1))
        for path in ("/status", "/metrics"):
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            connection.request("GET", path)
            response = connection.getresponse()
            body, content_type = response.read(), response.getheader("Content-Type")
            connection.request("HEAD", path)
            response = connection.getresponse()
            self.assertEqual(response.status, 200)
            self.assertEqual(response.read(), b"")
            self.assertEqual(response.getheader("Content-Type"), content_type)
            # The length a GET would have (not exactly: uptime and process
            # figures move between the two requests).
            # (trial's assertAlmostEqual ignores ``delta``, so bound it here.)
            difference = abs(int(response.getheader("Content-Length")) - len(body))
            self.assertLessEqual(difference, len(body) // 10)
            connection.close()
        daemon.process.send_signal(signal.SIGTERM)
        status, output = daemon.finish()
        self.assertEqual(status, -signal.SIGTERM, output)
        self.assertNotIn("HEAD", output)


class TLSLogTests(SynchronousTestCase):
    """A failed mutual-TLS handshake is logged once, with the peer and the
    reason; a connection is logged as connected only once TLS is up."""

    def test_client_without_a_certificate(self):
        import socket
        import ssl

        from tests.certs import Authority

        certs = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, certs, True)
        ca = Authority(certs)
        key, cert = ca.issue("localhost", server=True)
        worker_key, worker_cert = ca.issue("worker-1", server=False)
        daemon = TwistdDaemon(self, "-n", "gloom", "--master", "tcp:0:interface=127.0.0.1", "--slave",
                              f"mtls:0:interface=127.0.0.1:privateKey={key}:certKey={cert}:caCerts={ca.path}")
        _, slave_port = daemon.ports()

        def connect(certificate):
            context = ssl.create_default_context(cafile=ca.path)
            if certificate is not None:
                context.load_cert_chain(*certificate)
            sock = context.wrap_socket(socket.create_connection(("127.0.0.1", slave_port), timeout=10),
                                       server_hostname="localhost")
            self.addCleanup(sock.close)
            return sock, "127.0.0.1:%d" % sock.getsockname()[1]

        anonymous, anonymous_peer = connect(None)
        anonymous.sendall(frame({}))
        with self.assertRaises((ssl.SSLError, ConnectionError)):
            if not anonymous.recv(100):  # under TLS 1.2 the handshake itself fails
                raise ConnectionError("closed")
        text = daemon.read_until(lambda t: "TLS handshake failed" in t)
        (line,) = [line for line in text.splitlines() if "TLS handshake failed" in line]
        self.assertIn(f"slave {anonymous_peer}: TLS handshake failed: ", line)
        self.assertIn("certificate", line.split("TLS handshake failed: ")[1])

        worker, worker_peer = connect((worker_cert, worker_key))
        worker.sendall(frame({"action": "join", "type": "t"}))
        self.assertEqual(worker.recv(100), b'\x00\x00\x00\x0b{"ok":true}')
        worker.close()
        text = daemon.read_until(lambda t: f"slave {worker_peer} disconnected" in t)
        self.assertIn(f"slave connected from {worker_peer} (TLS established, client certificate 'CN=worker-1')",
                      text)
        daemon.process.send_signal(signal.SIGTERM)
        status, output = daemon.finish()
        self.assertEqual(output.count("TLS handshake failed"), 1, output)
        self.assertNotIn(f"connected from {anonymous_peer}", output)
        self.assertNotIn(f"{anonymous_peer} disconnected", output)
