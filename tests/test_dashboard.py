"""The dashboard in a real headless browser (Debian's chromium, driven by
selenium through chromium-driver) against ``twistd -n gloom --http``.

Without the browser these tests skip, saying how to install it; under
``CI=true`` (as ``.ci/run`` sets) a missing browser fails them instead.
"""

import json
import os
import shutil
import tempfile
import threading
import time
import urllib.request

from twisted.trial.unittest import SynchronousTestCase

from tests.support import BlockingClient, TwistdDaemon, reserved_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
INSTALL = ("apt-get install chromium chromium-driver (Debian), and pip install selenium "
           "(part of the [test] extra)")
TOKEN = "dashboard-test-token-0123456789"


def browser_or_skip(test):
    """A headless chromium driven by selenium, or skip (fail under CI=true)."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        webdriver = None
    missing = [name for name, found in (("selenium", webdriver), ("chromium", CHROMIUM),
                                        ("chromedriver", CHROMEDRIVER)) if not found]
    if missing:
        message = f"no {', '.join(missing)}: install with {INSTALL}"
        if os.environ.get("CI") == "true":
            test.fail(message)
        test.skipTest(message)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp()
    test.addCleanup(shutil.rmtree, profile, True)
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                     "--no-first-run", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                     "--window-size=1280,1000", f"--user-data-dir={profile}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    test.addCleanup(driver.quit)
    return driver


def wait_for(test, condition, what, timeout=20.0):
    """Poll ``condition`` (bounded: the page updates once a second)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            test.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


class DashboardTestCase(SynchronousTestCase):
    token = True

    def setUp(self):
        self.driver = browser_or_skip(self)
        self.master_port, self.slave_port, self.http_port = (reserved_port(self) for _ in range(3))
        arguments = ["-n", "gloom", "--master", f"tcp:{self.master_port}:interface=127.0.0.1",
                     "--slave", f"tcp:{self.slave_port}:interface=127.0.0.1",
                     "--http", f"tcp:{self.http_port}:interface=127.0.0.1"]
        if self.token:
            scratch = tempfile.mkdtemp()
            self.addCleanup(shutil.rmtree, scratch, True)
            path = os.path.join(scratch, "token")
            with open(path, "w") as file:
                file.write(TOKEN + "\n")
            arguments += ["--admin-token-file", path]
        self.daemon = TwistdDaemon(self, *arguments)
        self.daemon.read_until(lambda text: "Listening for HTTP" in text)
        self.stop_work = threading.Event()
        self.addCleanup(self.stop_work.set)

    def url(self, path=""):
        return f"http://127.0.0.1:{self.http_port}/{path}"

    def open_page(self):
        self.driver.get(self.url())
        wait_for(self, lambda: int(self.driver.find_element("tag name", "body")
                                   .get_attribute("data-polls") or 0) >= 2, "the page to poll")

    def stats(self):
        with urllib.request.urlopen(self.url("status"), timeout=10) as response:
            return json.load(response)

    def console_errors(self):
        return [entry for entry in self.driver.get_log("browser") if entry["level"] == "SEVERE"]

    def worker(self, job_type="resize"):
        """A slave in a thread answering every job of ``job_type``."""
        slave = BlockingClient(self.slave_port)
        self.addCleanup(slave.close)
        slave.send({"action": "join", "type": job_type})
        self.assertEqual(slave.receive(), {"ok": True})

        def serve():
            try:
                while not self.stop_work.is_set():
                    job = slave.receive()
                    if job.get("action") == "job":
                        slave.send({"action": "respond", "body": job["body"]})
            except (OSError, EOFError, ValueError):
                pass

        threading.Thread(target=serve, daemon=True).start()

    def flow(self, job_type="resize"):
        """A master in a thread keeping jobs flowing until the test ends."""
        master = BlockingClient(self.master_port)
        self.addCleanup(master.close)

        def submit():
            n = 0
            try:
                while not self.stop_work.is_set():
                    n += 1
                    master.send({"action": "submit", "id": f"f{n}", "type": job_type, "body": n})
                    master.receive()  # the ack
                    master.receive()  # the answer
                    time.sleep(0.005)
            except (OSError, EOFError, ValueError):
                pass

        threading.Thread(target=submit, daemon=True).start()

    # The page redraws its tables and cards every second, so an element
    # found may be gone by the time it is read or clicked: reads go through
    # one script, clicks are retried.

    def card(self, name):
        text = self.driver.execute_script(
            "const b = document.querySelector(arguments[0]); return b ? b.textContent : null;",
            f"#total-{name} b")
        return int(text) if text and text.isdigit() else -1

    def row_cells(self, job_type):
        """The text of each cell of a type's row, or None if it is not shown."""
        return self.driver.execute_script(
            "const row = document.querySelector('tr[data-type=\"' + arguments[0] + '\"]');"
            "return row ? Array.from(row.cells).map(c => c.textContent) : null;", job_type)

    def buttons_shown(self, job_type):
        """Per button in a type's row: its label and whether it is displayed."""
        return self.driver.execute_script(
            "return Array.from(document.querySelectorAll('tr[data-type=\"' + arguments[0] + '\"] button'))"
            ".map(b => [b.textContent, b.offsetParent !== null]);", job_type)

    def click(self, job_type, label):
        """Click a type's button, however often the row is redrawn meanwhile."""
        from selenium.common.exceptions import StaleElementReferenceException

        def attempt():
            try:
                found = self.driver.find_elements(
                    "xpath", f'//tr[@data-type="{job_type}"]//button[text()="{label}"]')
                if found and found[0].is_displayed():
                    found[0].click()
                    return True
            except StaleElementReferenceException:
                pass
            return False

        wait_for(self, attempt, f"the {label} button of {job_type}")


class PageTests(DashboardTestCase):
    def test_the_page_loads_without_console_errors(self):
        self.open_page()
        self.assertEqual(self.console_errors(), [])
        self.assertEqual(self.driver.title, "Gloom")

    def test_its_numbers_change_as_jobs_flow(self):
        self.worker()
        self.open_page()
        first = self.card("completed")
        self.flow()
        wait_for(self, lambda: self.card("completed") > first + 10, "completed jobs to rise")
        cells = wait_for(self, lambda: self.row_cells("resize"), "the resize row")
        self.assertEqual(cells[0], "resize")
        self.assertEqual(self.console_errors(), [])

    def test_a_graph_draws(self):
        self.worker()
        self.flow()
        self.open_page()
        canvas = self.driver.find_element("id", "graph-answered")
        wait_for(self, lambda: int(canvas.get_attribute("data-points") or 0) >= 2
                 and float(canvas.get_attribute("data-last") or 0) > 0, "the answered graph to draw")
        painted = self.driver.execute_script(
            "const c = arguments[0]; const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
            "let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n;", canvas)
        self.assertGreater(painted, 50)

    def test_a_job_looked_up_by_id_shows_its_state(self):
        master = BlockingClient(self.master_port)
        self.addCleanup(master.close)
        master.send({"action": "submit", "id": "lookup-1", "type": "nobody", "body": 1, "detach": True})
        self.assertEqual(master.receive(), {"ok": True, "id": "lookup-1"})
        self.open_page()
        self.driver.find_element("id", "job-id").send_keys("lookup-1")
        self.driver.find_element("css selector", "#lookup button").click()
        state = wait_for(self, lambda: self.driver.find_elements("id", "job-state"), "the job's state")
        self.assertEqual(state[0].text, "lookup-1: queued")


class AdminTests(DashboardTestCase):
    def test_with_the_token_the_pause_button_pauses_a_type(self):
        self.worker()
        self.open_page()
        self.driver.find_element("id", "token").send_keys(TOKEN)
        self.driver.find_element("css selector", "#login button").click()
        self.click("resize", "Pause")
        wait_for(self, lambda: self.stats()["types"]["resize"]["paused"], "the daemon to pause resize")
        wait_for(self, lambda: ["Resume", True] in (self.buttons_shown("resize") or []),
                 "the Resume button")
        self.assertEqual(self.console_errors(), [])

    def test_without_the_token_a_pause_is_refused(self):
        self.worker()
        self.open_page()
        self.click("resize", "Pause")
        error = wait_for(self, lambda: self.driver.find_element("id", "error").text, "the refusal")
        self.assertIn("token", error.lower())
        self.assertTrue(self.driver.find_element("id", "login").is_displayed())
        self.assertFalse(self.stats()["types"]["resize"]["paused"])


class ReadOnlyTests(DashboardTestCase):
    token = False

    def test_without_a_credential_there_is_no_pause_button(self):
        self.worker()
        self.open_page()
        buttons = wait_for(self, lambda: self.buttons_shown("resize"), "the resize row's buttons")
        self.assertTrue(self.driver.find_element("id", "readonly").is_displayed())
        self.assertEqual(buttons, [["Pause", False], ["Clear", False]])
        self.assertEqual(self.console_errors(), [])
