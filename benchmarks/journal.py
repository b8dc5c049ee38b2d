#!/usr/bin/env python3
"""What the journal costs: figures for ``--journal`` on this machine.

    python benchmarks/journal.py [--venv .venv] [--client-venv .venv]
                                 [--memory-venv .venv-pypy ...] [--reps 3]
                                 [--dir DIR] [--quick] [--only PART ...]

Parts (``--only`` picks some; all by default):

- ``submit``: detached submits acked per second, with ``--journal-sync
  normal``, with ``full``, and without a journal: 4 masters on plain
  sockets, each keeping 64 submits in flight (as ``gloom bench`` does),
  100,000 jobs with 64-byte bodies, no slaves (the jobs stay queued).  With
  a journal an ack waits for the group commit that writes the job.
- ``attached``: ``gloom bench`` flow, drain and serial (the shapes of
  benchmarks/run.py) against a daemon with a journal and one without,
  alternating; attached jobs never touch the journal, so the two should be
  within 5 %.  Besides the rates, the daemon's CPU time per job in flow and
  drain, which other load on the machine disturbs less than the wall clock.
- ``memory``: bytes per job of a `gloom.scheduler.Scheduler` on a `Clock`
  holding 1,000,000 jobs, delayed (``run_at`` within the next day) or
  queued, each measured in a fresh process by resident memory and, on
  CPython, by tracemalloc; with the Python of --venv and of each
  --memory-venv.
- ``startup``: a journal of 1,000,000 queued detached jobs (16-byte bodies)
  is written with `gloom.journal.Journal`, then ``twistd -n gloom
  --journal`` is timed from its start to "Listening for masters", with its
  resident memory then; with the twistd of --venv and of each
  --memory-venv.

The daemon runs pinned to core 0 and the clients to core 1 where taskset
and two cores exist, with PYPY_GC_NURSERY=32MB unless the environment sets
it, as in benchmarks/run.py.  Journals go in a scratch directory under
--dir (default: the system's temporary directory): the figures for
``full`` depend on how fast that file system syncs.  Timed figures are the
median of --reps runs.  Prints a table and, last, one JSON line.  --quick
runs a tenth of the sizes (to check the script works, not for figures).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import selectors
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _load_run():
    """benchmarks/run.py as a module, for its helpers (`bench`, `pinned`,
    `resident_kib`, `LISTENING`) and its shapes of gloom bench."""
    spec = importlib.util.spec_from_file_location("gloom_benchmarks_run", os.path.join(HERE, "run.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run = _load_run()


def cpu_seconds(pid):
    """CPU time process ``pid`` has used so far (Linux /proc): unlike the
    wall clock, it does not count the time the daemon waited for a CPU
    that other processes held."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def python_of(venv):
    """``implementation version`` of the venv's Python."""
    return subprocess.run([os.path.join(venv, "bin", "python"), "-c",
                           "import platform; print(platform.python_implementation(),"
                           " platform.python_version())"],
                          capture_output=True, text=True, check=True).stdout.strip()


class Daemon:
    """``twistd -n gloom`` from a venv, on ports it picks itself, with extra
    options (``--journal ...``); its log is read in a thread, so that it
    never blocks on a full pipe, and the time it said it listens is kept."""

    def __init__(self, venv, *options, timeout=600):
        """Start it and wait (up to ``timeout`` s) until it listens."""
        command = [os.path.join(venv, "bin", "twistd"), "--pidfile=", "-n", "gloom",
                   "--master", "tcp:0:interface=127.0.0.1",
                   "--slave", "tcp:0:interface=127.0.0.1",
                   "--max-queued", "2000000", *options]
        environment = dict(os.environ)
        environment.setdefault("PYPY_GC_NURSERY", "32MB")
        self.lines = []
        self.ports = {}
        self.listening_at = None
        self._listening = threading.Event()
        self.started_at = time.monotonic()
        self.process = subprocess.Popen(run.pinned(command, 0), stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, env=environment,
                                        cwd=tempfile.gettempdir())
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        if not self._listening.wait(timeout) or len(self.ports) < 2:
            self.stop()
            raise SystemExit("the daemon did not start:\n" + "".join(self.lines[-20:]))
        self.master, self.slave = self.ports["master"], self.ports["slave"]

    def _read_log(self):
        """Keep the log; note the ports and when the master port was reported."""
        for raw in self.process.stdout:
            line = raw.decode(errors="replace")
            self.lines.append(line)
            found = run.LISTENING.search(line)
            if found:
                if found.group(1) == "master" and self.listening_at is None:
                    self.listening_at = time.monotonic()
                self.ports[found.group(1)] = int(found.group(2))
                if len(self.ports) == 2:
                    self._listening.set()
        self._listening.set()  # the daemon exited

    @property
    def pid(self):
        """The daemon's process id (of taskset, which execs twistd)."""
        return self.process.pid

    def stop(self):
        """SIGTERM, and SIGKILL if it has not stopped within 60 s."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(30)
        self.process.stdout.close()


# --- detached submit rate -------------------------------------------------

def _frame(message):
    """One length-prefixed JSON frame."""
    data = json.dumps(message, separators=(",", ":")).encode()
    return struct.pack("!I", len(data)) + data


def submit_rate(daemon, jobs, masters=4, window=64, body_size=64):
    """Acked detached submits per second: ``masters`` connections, each
    with ``window`` submits in flight, ``jobs`` in all.  Frames are built
    before the clock starts; one select loop drives every connection."""
    body = "x" * (body_size - 2)
    share = [list(range(m, jobs, masters)) for m in range(masters)]
    frames = [[_frame({"action": "submit", "id": f"s{i}", "type": "submit-rate", "body": body,
                       "detach": True}) for i in ids] for ids in share]
    selector = selectors.DefaultSelector()
    state = []
    for m in range(masters):
        sock = socket.create_connection(("127.0.0.1", daemon.master))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        state.append({"sock": sock, "next": 0, "acked": 0, "buffer": b""})
        selector.register(sock, selectors.EVENT_READ, m)
    errors = []
    started = time.perf_counter()
    for m, s in enumerate(state):
        count = min(window, len(frames[m]))
        s["sock"].sendall(b"".join(frames[m][:count]))
        s["next"] = count
    remaining = jobs
    while remaining:
        events = selector.select(60)
        if not events:
            raise SystemExit("no ack for 60 s")
        for key, _ in events:
            s = state[key.data]
            chunk = s["sock"].recv(1 << 20)
            if not chunk:
                raise SystemExit("the daemon closed a master connection")
            buffer = s["buffer"] + chunk
            offset = acks = 0
            while len(buffer) - offset >= 4:
                (length,) = struct.unpack_from("!I", buffer, offset)
                if len(buffer) - offset - 4 < length:
                    break
                payload = buffer[offset + 4:offset + 4 + length]
                if not payload.startswith(b'{"ok":true'):
                    errors.append(payload.decode())
                acks += 1
                offset += 4 + length
            s["buffer"] = buffer[offset:]
            remaining -= acks
            more = frames[key.data][s["next"]:s["next"] + acks]
            if more:
                s["sock"].sendall(b"".join(more))
                s["next"] += len(more)
    elapsed = time.perf_counter() - started
    for s in state:
        s["sock"].close()
    selector.close()
    if errors:
        raise SystemExit(f"{len(errors)} submits refused, e.g. {errors[0]}")
    return jobs / elapsed


def submit_part(args, scratch, jobs):
    """Detached submit rates for no journal, normal and full."""
    figures = {}
    for name, options in (("off", []), ("normal", ["--journal-sync", "normal"]),
                          ("full", ["--journal-sync", "full"])):
        rates = []
        for rep in range(args.reps):
            extra = list(options)
            if name != "off":
                path = os.path.join(scratch, f"submit-{name}-{rep}.db")
                extra = ["--journal", path] + extra
            daemon = Daemon(args.venv, *extra)
            try:
                rates.append(submit_rate(daemon, jobs))
            finally:
                daemon.stop()
            if name != "off":
                for suffix in ("", "-wal", "-shm"):
                    if os.path.exists(path + suffix):
                        os.remove(path + suffix)
        figures[name] = round(statistics.median(rates))
        print(f"  submit, journal {name}: {figures[name]:,} acked jobs/s "
              f"(runs: {', '.join(f'{r:,.0f}' for r in rates)})", flush=True)
    return figures


# --- attached jobs, journal on and off ------------------------------------

def attached_part(args, scratch, scale):
    """gloom bench flow, drain and serial with the journal on and off,
    alternating, median of --reps runs each."""
    shapes = {
        "flow": ["--jobs", 100000 // scale],
        "drain": ["--drain", "--slaves", 8, "--jobs", 100000 // scale],
        "serial": ["--masters", 1, "--window", 1, "--slaves", 1, "--jobs", 5000 // scale],
    }
    runs = {(mode, shape): [] for mode in ("off", "on") for shape in shapes}
    client = args.client_venv or args.venv
    for rep in range(args.reps):
        for mode in ("off", "on") if rep % 2 == 0 else ("on", "off"):
            extra = []
            if mode == "on":
                extra = ["--journal", os.path.join(scratch, f"attached-{rep}.db")]
            daemon = Daemon(args.venv, *extra)
            try:
                for shape, arguments in shapes.items():
                    cpu = cpu_seconds(daemon.pid)
                    result = run.bench(client, daemon, *arguments)
                    result["cpu_us_per_job"] = (cpu_seconds(daemon.pid) - cpu) * 1e6 / result["jobs"]
                    runs[(mode, shape)].append(result)
            finally:
                daemon.stop()
    figures = {}
    for mode in ("off", "on"):
        figures[mode] = {
            "flow_jobs_per_s": statistics.median(r["jobs_per_s"] for r in runs[(mode, "flow")]),
            "flow_p99_ms": statistics.median(r["p99_ms"] for r in runs[(mode, "flow")]),
            "drain_jobs_per_s": statistics.median(r["jobs_per_s"] for r in runs[(mode, "drain")]),
            "serial_p50_ms": statistics.median(r["p50_ms"] for r in runs[(mode, "serial")]),
            "flow_cpu_us_per_job": statistics.median(r["cpu_us_per_job"]
                                                     for r in runs[(mode, "flow")]),
            "drain_cpu_us_per_job": statistics.median(r["cpu_us_per_job"]
                                                      for r in runs[(mode, "drain")]),
        }
        figures[mode + "_runs"] = {
            shape: [round(r["jobs_per_s"] if shape != "serial" else r["p50_ms"], 3)
                    for r in runs[(mode, shape)]] for shape in shapes}
    figures["change_percent"] = {
        key: round(100.0 * (figures["on"][key] - figures["off"][key]) / figures["off"][key], 1)
        for key in figures["off"]}
    for key, change in figures["change_percent"].items():
        print(f"  attached {key}: off {figures['off'][key]:,.2f}, on {figures['on'][key]:,.2f}"
              f" ({change:+.1f} %)", flush=True)
    print(f"  attached runs, off: {figures['off_runs']}; on: {figures['on_runs']}", flush=True)
    return figures


# --- memory per delayed and per queued job --------------------------------

_MEMORY_CHILD = r"""
import gc, json, sys, time
kind, jobs, method = sys.argv[1], int(sys.argv[2]), sys.argv[3]
from twisted.internet.task import Clock
from gloom import wire
from gloom.scheduler import Scheduler

class Owner:
    '''Hears nothing: no job ends while it is measured.'''
    def job_answered(self, job, body): pass
    def job_failed(self, job, error): pass

def rss_kib():
    '''This process's resident memory, in KiB.'''
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])

class WallClock(Clock):
    # Reads the time as the reactor does: a new float for each job, as
    # each job's submission time is in a running daemon.
    def seconds(self):
        return time.time()

clock = WallClock()
scheduler = Scheduler(clock=clock)
owner = Owner()
type_json = wire.encode_id("memory")
body = b'"xxxxxxxxxxxxxx"'
now = clock.seconds()
for _ in range(3):
    gc.collect()
if method == "tracemalloc":
    import tracemalloc
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
else:
    before = rss_kib() * 1024
for i in range(jobs):
    job_id = "job-%07d" % i
    frame = wire.job(wire.encode_id(job_id), type_json, body)
    run_at = now + 60 + (i * 7919) % 86400 if kind == "delayed" else None
    scheduler.submit(owner, job_id, "memory", frame, 0, None, run_at)
for _ in range(3):
    gc.collect()
if method == "tracemalloc":
    after = tracemalloc.get_traced_memory()[0]
else:
    after = rss_kib() * 1024
assert scheduler.delayed() == (jobs if kind == "delayed" else 0), scheduler.delayed()
print(json.dumps({"bytes_per_job": (after - before) / jobs}))
"""


def memory_child(venv, kind, jobs, method):
    """Bytes per ``kind`` job ("delayed" or "queued"), measured by
    ``method`` ("rss" or "tracemalloc") in a fresh process of the venv."""
    result = subprocess.run([os.path.join(venv, "bin", "python"), "-c", _MEMORY_CHILD,
                             kind, str(jobs), method],
                            capture_output=True, text=True, timeout=1800, cwd=ROOT)
    if result.returncode:
        raise SystemExit(f"memory child failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])["bytes_per_job"]


def memory_part(venvs, jobs):
    """Bytes per delayed and per queued job, per Python."""
    figures = {}
    for venv in venvs:
        python = python_of(venv)
        methods = ["rss"] + (["tracemalloc"] if python.startswith("CPython") else [])
        row = {}
        for method in methods:
            for kind in ("queued", "delayed"):
                row[f"{kind}_{method}"] = round(memory_child(venv, kind, jobs, method), 1)
        figures[python] = row
        print(f"  memory on {python}: {row}", flush=True)
    return figures


# --- start-up with a big journal ------------------------------------------

def write_journal(venv, path, jobs):
    """Write ``jobs`` queued detached records to a new journal at ``path``
    with `gloom.journal.Journal` (run by the venv's Python, in batches of
    50,000 per commit), as the daemon would have written them."""
    script = r"""
import sys, time
from twisted.internet.task import Clock
from gloom import wire
from gloom.journal import Journal, Record
path, jobs = sys.argv[1], int(sys.argv[2])
journal = Journal(path, "normal", clock=Clock())
type_json = wire.encode_id("startup")
body = b'"xxxxxxxxxxxxxx"'
now = time.time()
for i in range(jobs):
    job_id = "job-%07d" % i
    frame = wire.job(wire.encode_id(job_id), type_json, body)
    journal.put_new(Record(job_id, "startup", 0, frame, None, 3, 0, 0, "queued", None, now,
                           sequence=i))
    if i % 50000 == 49999:
        journal.commit()
journal.commit()
journal.close()
"""
    subprocess.run([os.path.join(venv, "bin", "python"), "-c", script, path, str(jobs)],
                   check=True, timeout=3600, cwd=ROOT)


def startup_part(args, venvs, scratch, jobs):
    """Seconds from starting twistd to its "Listening for masters" line,
    and its resident memory then, with a journal of ``jobs`` queued jobs."""
    path = os.path.join(scratch, "startup.db")
    started = time.monotonic()
    write_journal(args.venv, path, jobs)
    written = time.monotonic() - started
    size = os.path.getsize(path) + (os.path.getsize(path + "-wal")
                                    if os.path.exists(path + "-wal") else 0)
    print(f"  startup: wrote {jobs:,} jobs in {written:.1f} s, {size / 2**20:.0f} MiB", flush=True)
    figures = {"jobs": jobs, "file_mib": round(size / 2**20, 1), "write_s": round(written, 1)}
    for venv in venvs:
        python = python_of(venv)
        seconds, rss, load = [], [], []
        for _ in range(args.reps):
            daemon = Daemon(venv, "--journal", path)
            try:
                seconds.append(daemon.listening_at - daemon.started_at)
                rss.append(run.resident_kib(daemon.pid) / 1024)
                for line in daemon.lines:
                    if "loaded" in line and " in " in line:
                        load.append(float(line.rsplit(" in ", 1)[1].split()[0]))
            finally:
                daemon.stop()
        empty = Daemon(venv)
        try:
            idle_rss = run.resident_kib(empty.pid) / 1024
            idle_seconds = empty.listening_at - empty.started_at
        finally:
            empty.stop()
        figures[python] = {"listening_s": round(statistics.median(seconds), 2),
                           "load_s": round(statistics.median(load), 2) if load else None,
                           "rss_mib": round(statistics.median(rss), 1),
                           "empty_listening_s": round(idle_seconds, 2),
                           "empty_rss_mib": round(idle_rss, 1)}
        print(f"  startup on {python}: {figures[python]}", flush=True)
    return figures


# --- the table ------------------------------------------------------------

def table(figures):
    """The figures as rows of text."""
    rows = []
    if "submit" in figures:
        s = figures["submit"]
        rows.append(("detached submits, no journal", f"{s['off']:,} acked jobs/s"))
        rows.append(("detached submits, --journal-sync normal", f"{s['normal']:,} acked jobs/s"))
        rows.append(("detached submits, --journal-sync full", f"{s['full']:,} acked jobs/s"))
    if "attached" in figures:
        a = figures["attached"]
        for key, label, unit in (("flow_jobs_per_s", "flow", "jobs/s"),
                                 ("flow_p99_ms", "flow p99", "ms"),
                                 ("drain_jobs_per_s", "drain", "jobs/s"),
                                 ("serial_p50_ms", "serial p50", "ms"),
                                 ("flow_cpu_us_per_job", "flow, daemon CPU per job", "us"),
                                 ("drain_cpu_us_per_job", "drain, daemon CPU per job", "us")):
            rows.append((f"attached {label}, journal off / on",
                         f"{a['off'][key]:,.2f} / {a['on'][key]:,.2f} {unit} "
                         f"({a['change_percent'][key]:+.1f} %)"))
    if "memory" in figures:
        for python, row in figures["memory"].items():
            rows.append((f"bytes per queued / delayed job ({python}, RSS)",
                         f"{row['queued_rss']:,.0f} / {row['delayed_rss']:,.0f}"))
            if "queued_tracemalloc" in row:
                rows.append((f"bytes per queued / delayed job ({python}, tracemalloc)",
                             f"{row['queued_tracemalloc']:,.0f} / {row['delayed_tracemalloc']:,.0f}"))
    if "startup" in figures:
        st = figures["startup"]
        for python, row in st.items():
            if isinstance(row, dict):
                rows.append((f"start-up with {st['jobs']:,} journalled jobs ({python})",
                             f"{row['listening_s']} s to listen (load {row['load_s']} s), "
                             f"{row['rss_mib']} MiB RSS (empty: {row['empty_listening_s']} s, "
                             f"{row['empty_rss_mib']} MiB)"))
    width = max(len(name) for name, _ in rows) if rows else 0
    return [f"{name:<{width}}  {value}" for name, value in rows]


def main():
    """Parse the options, run the parts, print the table and the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_venv = os.path.dirname(os.path.dirname(os.path.abspath(sys.executable)))
    parser.add_argument("--venv", default=default_venv,
                        help="the environment whose twistd runs the daemon (default: this Python's)")
    parser.add_argument("--client-venv", help="the environment whose gloom bench drives it "
                                              "(default: --venv)")
    parser.add_argument("--memory-venv", action="append", default=[],
                        help="another environment for the memory and startup parts (repeatable)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where the journals are written")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", action="append", choices=["submit", "attached", "memory", "startup"])
    args = parser.parse_args()
    args.venv = os.path.abspath(args.venv)
    args.client_venv = args.client_venv and os.path.abspath(args.client_venv)
    args.memory_venv = [os.path.abspath(venv) for venv in args.memory_venv]
    parts = args.only or ["submit", "attached", "memory", "startup"]
    scale = 10 if args.quick else 1
    venvs = [args.venv] + args.memory_venv
    scratch = tempfile.mkdtemp(prefix="gloom-journal-bench-", dir=args.dir)
    figures = {}
    try:
        if "submit" in parts:
            figures["submit"] = submit_part(args, scratch, 100000 // scale)
        if "attached" in parts:
            figures["attached"] = attached_part(args, scratch, scale)
        if "memory" in parts:
            figures["memory"] = memory_part(venvs, 1000000 // scale)
        if "startup" in parts:
            figures["startup"] = startup_part(args, venvs, scratch, 1000000 // scale)
    finally:
        shutil.rmtree(scratch, True)
    figures["daemon_python"] = python_of(args.venv)
    figures["date"] = time.strftime("%Y-%m-%d")
    print(f"Gloom's journal on {figures['daemon_python']}, {os.cpu_count()} cores, {figures['date']}")
    for line in table(figures):
        print(line)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
