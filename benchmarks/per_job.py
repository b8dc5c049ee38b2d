#!/usr/bin/env python3
"""Where a job's time goes: CPU and system calls per job, Gloom against
gearmand, and each run on one fresh daemon in turn (the cold start).

    python benchmarks/per_job.py --blast PATH [--venv .venv] [--runs 3]
                                 [--shape flow|drain] [--jobs 100000] [--no-gearmand]

``--blast`` is the C load generator (``blast.c`` of the shared yardstick,
built with ``cc -O2 -o blast blast.c``): it costs far less per job than the
servers it drives, so what is counted is the server's.  The server (Gloom's
``twistd -n gloom`` from ``--venv``, then gearmand with one thread if it is
installed) is pinned to core 0 and blast to core 1.  ``--runs`` loads run
one after the other on the same freshly started server: the first is the
cold start (PyPy's JIT has compiled nothing yet, unless ``--warm-up`` did),
the last is warm.

For each run it prints the throughput and p99 latency blast saw, the
server's user and system CPU time per job (from ``/proc/PID/stat``), and,
where ``perf`` can count the kernel's system-call tracepoints (as root, or
with a permissive ``perf_event_paranoid``), how many of each system call
the server made per job.  Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from run import pinned, wait_port  # benchmarks/run.py, beside this script

SYSCALLS = ("sendto", "recvfrom", "read", "write", "writev", "epoll_wait", "epoll_ctl")

MASTER_PORT, SLAVE_PORT, GEARMAN_PORT = 19998, 19999, 14730


def cpu_ticks(pid):
    """User and system CPU time of ``pid`` so far, in clock ticks."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def perf_counts():
    """Whether ``perf stat`` can count system-call tracepoints here."""
    if not shutil.which("perf"):
        return False
    probe = subprocess.run(["perf", "stat", "-e", "syscalls:sys_enter_sendto", "true"],
                           capture_output=True, text=True)
    return probe.returncode == 0


class Server:
    """A server pinned to core 0, started fresh, stopped at the end."""

    def __init__(self, command, port):
        self.process = subprocess.Popen(pinned(command, 0), stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True)
        wait_port(port)
        time.sleep(0.3)

    def stop(self):
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def one_run(blast, kind, shape, jobs, pid, count_syscalls):
    """Drive the server once; return blast's figures and the server's costs."""
    ports = (["--master-port", str(MASTER_PORT), "--slave-port", str(SLAVE_PORT)]
             if kind == "gloom" else ["--port", str(GEARMAN_PORT)])
    counter = counted = None
    if count_syscalls:
        counted = tempfile.NamedTemporaryFile("r", suffix=".perf", delete=False)
        events = ",".join(f"syscalls:sys_enter_{name}" for name in SYSCALLS)
        counter = subprocess.Popen(["perf", "stat", "-x", ",", "-e", events, "-p", str(pid),
                                    "-o", counted.name], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        time.sleep(0.5)
    ticks_before = cpu_ticks(pid)
    out = subprocess.run(pinned([blast, kind, shape, "--jobs", str(jobs)] + ports, 1),
                         capture_output=True, text=True, timeout=900)
    ticks_after = cpu_ticks(pid)
    if counter is not None:
        counter.send_signal(signal.SIGINT)
        counter.wait(10)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not lines:
        raise SystemExit(f"blast failed: {out.stderr[-2000:]}")
    result = json.loads(lines[-1])
    tick = os.sysconf("SC_CLK_TCK")
    figures = {
        "jobs_per_s": result.get("jobs_per_s") or result.get("drain_per_s"),
        "p99_ms": result.get("p99_ms"),
        "user_us_per_job": round((ticks_after[0] - ticks_before[0]) / tick / jobs * 1e6, 2),
        "sys_us_per_job": round((ticks_after[1] - ticks_before[1]) / tick / jobs * 1e6, 2),
    }
    if shape == "drain":
        figures["queue_per_s"] = result.get("queue_per_s")
    if counted is not None:
        calls = {}
        with open(counted.name) as text:
            for line in text:
                parts = line.strip().split(",")
                if len(parts) > 2 and parts[2].startswith("syscalls:sys_enter_"):
                    try:
                        calls[parts[2][len("syscalls:sys_enter_"):]] = int(parts[0])
                    except ValueError:
                        pass
        os.unlink(counted.name)
        figures["syscalls_per_job"] = {name: round(count / jobs, 2)
                                       for name, count in calls.items() if count / jobs >= 0.005}
        figures["syscalls_per_job"]["all"] = round(sum(calls.values()) / jobs, 2)
    return figures


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blast", required=True, help="the compiled C load generator")
    parser.add_argument("--venv", default=".venv", help="the virtual environment running Gloom")
    parser.add_argument("--runs", type=int, default=3, help="loads on each fresh server")
    parser.add_argument("--shape", choices=("flow", "drain"), default="flow")
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--no-gearmand", action="store_true")
    parser.add_argument("daemon_options", nargs="*",
                        help="more options for twistd gloom (after --), e.g. --warm-up 0")
    args = parser.parse_args()
    count_syscalls = perf_counts()
    servers = [("gloom", [os.path.join(args.venv, "bin", "twistd"), "-n", "--pidfile=", "gloom",
                          "--master", f"tcp:{MASTER_PORT}:interface=127.0.0.1",
                          "--slave", f"tcp:{SLAVE_PORT}:interface=127.0.0.1"]
                + args.daemon_options, SLAVE_PORT)]
    gearmand = shutil.which("gearmand")
    if gearmand and not args.no_gearmand:
        servers.append(("gearman", [gearmand, "-p", str(GEARMAN_PORT), "-L", "127.0.0.1",
                                    "-t", "1", "-l", "/dev/null"], GEARMAN_PORT))
    os.environ.setdefault("PYPY_GC_NURSERY", "32MB")
    report = {}
    print(f"{'server':8} {'run':>3} {'jobs/s':>9} {'p99 ms':>7} {'user us':>8} {'sys us':>7}"
          f"  system calls per job")
    for kind, command, port in servers:
        server = Server(command, port)
        try:
            runs = report[kind] = []
            for run in range(args.runs):
                figures = one_run(args.blast, kind, args.shape, args.jobs, server.process.pid,
                                  count_syscalls)
                runs.append(figures)
                calls = figures.get("syscalls_per_job", {})
                print(f"{kind:8} {run + 1:>3} {figures['jobs_per_s']:>9,.0f} "
                      f"{figures['p99_ms'] if figures['p99_ms'] is not None else '-':>7} "
                      f"{figures['user_us_per_job']:>8} {figures['sys_us_per_job']:>7}  "
                      + " ".join(f"{name} {value}" for name, value in calls.items()))
        finally:
            server.stop()
    print(json.dumps(report))


if __name__ == "__main__":
    sys.exit(main())
