"""The dashboard under load: a screenshot for the README, and what open
dashboards cost the daemon.

    .venv/bin/python benchmarks/dashboard.py screenshot   # writes docs/dashboard.png
    .venv/bin/python benchmarks/dashboard.py cost         # flow with 0 and 20 pages open

Needs Debian's chromium and chromium-driver, and selenium (the [test]
extra).  The daemon runs from this checkout's installed package, pinned to
CPU 0 when there are two; the load and the browser run on the others.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

from run import pinned  # benchmarks/run.py, beside this script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Frames:
    """A blocking framed client."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.buffer = b""

    def send(self, message: dict) -> None:
        data = json.dumps(message).encode()
        self.sock.sendall(struct.pack("!I", len(data)) + data)

    def receive(self) -> dict:
        while True:
            if len(self.buffer) >= 4:
                (length,) = struct.unpack_from("!I", self.buffer)
                if len(self.buffer) >= 4 + length:
                    frame, self.buffer = self.buffer[4:4 + length], self.buffer[4 + length:]
                    return json.loads(frame)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.buffer += chunk


class Daemon:
    def __init__(self, *extra: str):
        self.master, self.slave, self.http = free_port(), free_port(), free_port()
        self.scratch = tempfile.mkdtemp()
        self.process = subprocess.Popen(
            pinned([os.path.join(BIN, "twistd"), "-n", "--pidfile=", "gloom",
                       "--master", f"tcp:{self.master}:interface=127.0.0.1",
                       "--slave", f"tcp:{self.slave}:interface=127.0.0.1",
                       "--http", f"tcp:{self.http}:interface=127.0.0.1", *extra], 0),
            cwd=self.scratch, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.http), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("the daemon did not start")
                time.sleep(0.1)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait()
        shutil.rmtree(self.scratch, True)


def browser(width: int = 1400, height: int = 1500):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                     "--no-first-run", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                     f"--window-size={width},{height}"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def keep_busy(daemon: Daemon, stop: threading.Event) -> None:
    """A steady flow of three types, one queue that waits, and a few dead jobs."""

    def worker(job_type: str, fail_every: int = 0) -> None:
        slave = Frames(daemon.slave)
        slave.send({"action": "join", "type": job_type})
        slave.receive()
        n = 0
        while not stop.is_set():
            job = slave.receive()
            if job.get("action") != "job":
                continue
            n += 1
            time.sleep(0.002)
            if fail_every and n % fail_every == 0:
                slave.send({"action": "fail", "id": job["id"], "reason": "the image is corrupt"})
            else:
                slave.send({"action": "respond", "id": job["id"], "body": job["body"]})

    def master(job_type: str) -> None:
        client = Frames(daemon.master)
        n = 0
        while not stop.is_set():
            n += 1
            client.send({"action": "submit", "id": f"{job_type}-{n}", "type": job_type, "body": n})
            client.receive()
            client.receive()

    def quietly(function, *args) -> None:
        try:
            function(*args)
        except (EOFError, OSError):
            pass  # the daemon stopped

    for job_type, fail_every in (("resize", 50), ("mail", 0), ("report", 0)):
        for _ in range(2):
            threading.Thread(target=quietly, args=(worker, job_type, fail_every), daemon=True).start()
        threading.Thread(target=quietly, args=(master, job_type), daemon=True).start()
    waiting = Frames(daemon.master)
    for n in range(40):
        waiting.send({"action": "submit", "id": f"thumb-{n}", "type": "thumbnails", "body": n,
                      "detach": True})
        waiting.receive()
    for n in range(3):
        waiting.send({"action": "submit", "id": f"invoice-{n}", "type": "invoice", "body": n,
                      "detach": True, "retries": 0})
        waiting.receive()
    dead = Frames(daemon.slave)
    dead.send({"action": "join", "type": "invoice"})
    dead.receive()
    for _ in range(3):
        job = dead.receive()
        dead.send({"action": "fail", "id": job["id"], "reason": "no such customer"})
        dead.receive()
    dead.send({"action": "leave"})


def screenshot(path: str, seconds: float) -> None:
    daemon = Daemon()
    stop = threading.Event()
    try:
        keep_busy(daemon, stop)
        driver = browser()
        try:
            driver.get(f"http://127.0.0.1:{daemon.http}/")
            time.sleep(seconds)
            driver.save_screenshot(path)
        finally:
            driver.quit()
    finally:
        stop.set()
        daemon.stop()
    print(f"wrote {path}")


def flow(daemon: Daemon, jobs: int) -> float:
    result = subprocess.run(
        pinned([os.path.join(BIN, "gloom"), "bench", "--jobs", str(jobs), "--json", "--no-progress",
                   "--master", f"127.0.0.1:{daemon.master}", "--slave", f"127.0.0.1:{daemon.slave}"], 1),
        capture_output=True, text=True, check=True)
    return json.loads(result.stdout)["jobs_per_s"]


PAGE_POLL = ("/api/totals", "/api/types?limit=100", "/api/series")
"""What an open dashboard asks for every second..."""
PAGE_SLOW_POLL = ("/api/connections", "/api/dead?limit=100")
"""...and every fifth second besides (see gloom/dashboard/dashboard.js)."""


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def poll_like_pages(daemon: Daemon, pages: int, stop: threading.Event) -> None:
    """``pages`` pollers asking what an open dashboard asks, as often."""
    import http.client

    def page() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", daemon.http, timeout=30)
        tick = 0
        try:
            while not stop.is_set():
                started = time.monotonic()
                tick += 1
                for path in PAGE_POLL + (PAGE_SLOW_POLL if tick % 5 == 1 else ()):
                    connection.request("GET", path)
                    connection.getresponse().read()
                time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
        except (OSError, http.client.HTTPException):
            pass  # the daemon stopped

    for _ in range(pages):
        threading.Thread(target=page, daemon=True).start()


def cost(pages: int, runs: int, jobs: int, real_browser: bool) -> None:
    daemon = Daemon()
    driver = None
    stop = threading.Event()
    try:
        flow(daemon, jobs)  # warm up
        plain, opened = [], []
        for _ in range(runs):
            plain.append(flow(daemon, jobs))
        if real_browser:
            driver = browser(1200, 900)
            driver.get(f"http://127.0.0.1:{daemon.http}/")
            for _ in range(pages - 1):
                driver.switch_to.new_window("tab")
                driver.get(f"http://127.0.0.1:{daemon.http}/")
        else:
            poll_like_pages(daemon, pages, stop)
        time.sleep(3)
        idle_before, idle_at = cpu_seconds(daemon.process.pid), time.monotonic()
        time.sleep(10)
        idle_cpu = (cpu_seconds(daemon.process.pid) - idle_before) / (time.monotonic() - idle_at)
        for _ in range(runs):
            opened.append(flow(daemon, jobs))
    finally:
        stop.set()
        if driver is not None:
            driver.quit()
        daemon.stop()
    print(f"{pages} pages open and no jobs: the daemon used {idle_cpu * 100:.1f} % of a core")
    plain.sort()
    opened.sort()
    middle = runs // 2
    change = (opened[middle] - plain[middle]) / plain[middle] * 100
    print(f"flow, no page open:   {plain[middle]:,.0f} jobs/s (runs: {', '.join(f'{v:,.0f}' for v in plain)})")
    print(f"flow, {pages} pages open: {opened[middle]:,.0f} jobs/s (runs: {', '.join(f'{v:,.0f}' for v in opened)})")
    print(f"change: {change:+.1f} %")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    shot = commands.add_parser("screenshot", help="write a screenshot of the dashboard under load")
    shot.add_argument("--out", default=os.path.join(ROOT, "docs", "dashboard.png"))
    shot.add_argument("--seconds", type=float, default=30, help="how long the load runs first")
    measure = commands.add_parser("cost", help="flow throughput with and without open pages")
    measure.add_argument("--pages", type=int, default=20)
    measure.add_argument("--runs", type=int, default=3)
    measure.add_argument("--jobs", type=int, default=50000)
    measure.add_argument("--browser", action="store_true",
                         help="open real pages in chromium (its own CPU use then counts too) "
                              "rather than pollers asking what a page asks")
    args = parser.parse_args()
    if args.command == "screenshot":
        screenshot(args.out, args.seconds)
    else:
        cost(args.pages, args.runs, args.jobs, args.browser)


if __name__ == "__main__":
    main()
