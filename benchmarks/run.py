#!/usr/bin/env python3
"""Reproduce Gloom's performance figures on this machine.

    python benchmarks/run.py [--venv .venv] [--client-venv .venv] [--quick]

Starts ``twistd -n gloom`` from --venv (pinned to core 0 where taskset and
two cores exist) and drives it with ``gloom bench`` from --client-venv
(pinned to core 1), then measures:

- flow: 4 masters x 64 jobs in flight, 8 echo slaves, 64-byte bodies;
- drain: 100,000 jobs queued at random priorities, then 8 slaves drain them;
- serial: one master, one job in flight, one slave (round-trip latency);
- depth: the drain rate with 10,000 and with 1,000,000 jobs queued;
- memory: resident memory before and after queueing 1,000,000 jobs with
  16-byte bodies, per job;
- idle slaves: resident memory per connection with 10,000 idle slaves.

The daemon runs with PYPY_GC_NURSERY=32MB unless the environment sets it
(see "Running on PyPy" in the README; CPython ignores it).

Flow, drain and serial are the median of --reps runs (default 3).  Prints a
table and, last, one JSON line.  --quick runs smaller sizes (for a check that
the script works, not for figures).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time


def pinned(command, core):
    """``command`` run on CPU ``core`` (taskset), where there are two cores
    or more; as it is for ``core`` None.  The other benchmarks use it too."""
    if core is not None and shutil.which("taskset") and (os.cpu_count() or 1) >= 2:
        return ["taskset", "-c", str(core)] + command
    return command


def wait_port(port, timeout=30.0):
    """Return once something listens on the loopback ``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on port {port}")


def resident_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


LISTENING = re.compile(r"Listening for (master|slave)s on 127\.0\.0\.1:(\d+)")


class Daemon:
    """``twistd -n gloom`` on ports it picks itself (``tcp:0``), read back
    from its log.  (A port found free beforehand may be taken by anything
    else on the machine before the daemon binds it.)"""

    def __init__(self, venv):
        command = [os.path.join(venv, "bin", "twistd"), "--pidfile=", "-n", "gloom",
                   "--master", "tcp:0:interface=127.0.0.1",
                   "--slave", "tcp:0:interface=127.0.0.1",
                   "--max-queued", "2000000"]  # one master queues a million jobs
        environment = dict(os.environ)
        environment.setdefault("PYPY_GC_NURSERY", "32MB")  # as README and etc/gloom.service advise
        self.process = subprocess.Popen(pinned(command, 0), stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, env=environment)
        self.ports = {}
        self._listening = threading.Event()
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        if not self._listening.wait(30) or len(self.ports) < 2:
            self.stop()
            raise SystemExit("the daemon did not start")
        self.master, self.slave = self.ports["master"], self.ports["slave"]

    def _read_log(self):
        """Note the ports the daemon says it listens on, then keep reading
        its log (one line per connection) so that it never blocks on a
        full pipe."""
        for line in self.process.stdout:
            found = LISTENING.search(line.decode(errors="replace"))
            if found:
                self.ports[found.group(1)] = int(found.group(2))
                if len(self.ports) == 2:
                    self._listening.set()
        self._listening.set()  # the daemon exited

    @property
    def pid(self):
        return self.process.pid

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._reader.join(30)
        self.process.stdout.close()


def bench(client_venv, daemon, *arguments):
    command = [os.path.join(client_venv, "bin", "gloom"), "bench", "--json", "--no-progress",
               "--master", f"127.0.0.1:{daemon.master}", "--slave", f"127.0.0.1:{daemon.slave}",
               *map(str, arguments)]
    result = subprocess.run(pinned(command, 1), capture_output=True, text=True, timeout=1800)
    if result.returncode:
        raise SystemExit(f"gloom bench failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def frame(message):
    data = json.dumps(message, separators=(",", ":")).encode()
    return struct.pack("!I", len(data)) + data


def read_frames(sock, count):
    """Read ``count`` frames (acks), discarding them."""
    buffer = b""
    seen = 0
    while seen < count:
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise SystemExit("the daemon closed the connection")
        buffer += chunk
        while len(buffer) >= 4:
            (length,) = struct.unpack("!I", buffer[:4])
            if len(buffer) < 4 + length:
                break
            buffer = buffer[4 + length:]
            seen += 1


def memory_per_job(venv, jobs):
    """Resident memory per queued job (16-byte bodies), in bytes."""
    daemon = Daemon(venv)
    try:
        time.sleep(0.5)
        before = resident_kib(daemon.pid)
        sock = socket.create_connection(("127.0.0.1", daemon.master))
        reader = threading.Thread(target=read_frames, args=(sock, jobs))
        reader.start()
        body = "x" * 14  # 16 bytes of JSON with its quotes
        batch = 10000
        for start in range(0, jobs, batch):
            sock.sendall(b"".join(frame({"action": "submit", "id": f"mem-{i}", "type": "memory", "body": body})
                                  for i in range(start, min(jobs, start + batch))))
        reader.join()
        time.sleep(0.5)
        after = resident_kib(daemon.pid)
        sock.close()
        return {"jobs": jobs, "rss_before_mib": round(before / 1024, 1), "rss_after_mib": round(after / 1024, 1),
                "bytes_per_job": round((after - before) * 1024 / jobs, 1)}
    finally:
        daemon.stop()


def memory_per_idle_slave(venv, slaves):
    """Resident memory per idle slave connection, in bytes."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < slaves + 100:
        return {"slaves": slaves, "skipped": f"open-file limit {hard} is too low"}
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, slaves + 100), hard))
    daemon = Daemon(venv)
    connections = []
    try:
        time.sleep(0.5)
        before = resident_kib(daemon.pid)
        join = frame({"action": "join", "type": "idle"})
        for _ in range(slaves):
            sock = socket.create_connection(("127.0.0.1", daemon.slave))
            sock.sendall(join)
            connections.append(sock)
        for sock in connections:
            read_frames(sock, 1)
        time.sleep(0.5)
        after = resident_kib(daemon.pid)
        probe = socket.create_connection(("127.0.0.1", daemon.master))
        probe.sendall(frame({"action": "submit", "id": "probe", "type": "idle", "body": 1}))
        read_frames(probe, 1)
        probe.close()
        return {"slaves": slaves, "rss_before_mib": round(before / 1024, 1),
                "rss_after_mib": round(after / 1024, 1),
                "bytes_per_slave": round((after - before) * 1024 / slaves, 1), "all_joined": True}
    finally:
        for sock in connections:
            sock.close()
        daemon.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", default=os.path.dirname(os.path.dirname(os.path.abspath(sys.executable))),
                        help="the environment whose twistd runs the daemon (default: this Python's)")
    parser.add_argument("--client-venv", help="the environment whose gloom bench drives it (default: --venv)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    client = args.client_venv or args.venv
    scale = 10 if args.quick else 1
    shapes = {
        "flow": ["--jobs", 100000 // scale],
        "drain": ["--drain", "--slaves", 8, "--jobs", 100000 // scale],
        "serial": ["--masters", 1, "--window", 1, "--slaves", 1, "--jobs", 5000 // scale],
    }
    runs = {name: [] for name in shapes}
    for _ in range(args.reps):
        daemon = Daemon(args.venv)
        try:
            for name, arguments in shapes.items():
                runs[name].append(bench(client, daemon, *arguments))
        finally:
            daemon.stop()
    figures = {
        "flow_jobs_per_s": statistics.median(r["jobs_per_s"] for r in runs["flow"]),
        "flow_p99_ms": statistics.median(r["p99_ms"] for r in runs["flow"]),
        "drain_jobs_per_s": statistics.median(r["jobs_per_s"] for r in runs["drain"]),
        "serial_p50_ms": statistics.median(r["p50_ms"] for r in runs["serial"]),
    }
    for depth in (10000 // scale, 1000000 // scale):
        daemon = Daemon(args.venv)
        try:
            figures[f"drain_at_{depth}_jobs_per_s"] = bench(client, daemon, "--drain", "--jobs", depth)["jobs_per_s"]
        finally:
            daemon.stop()
    figures["memory"] = memory_per_job(args.venv, 1000000 // scale)
    figures["idle_slaves"] = memory_per_idle_slave(args.venv, 10000 // scale)
    python = subprocess.run([os.path.join(args.venv, "bin", "python"), "-c",
                             "import platform; print(platform.python_implementation(), platform.python_version())"],
                            capture_output=True, text=True).stdout.strip()
    figures["daemon_python"] = python
    figures["date"] = time.strftime("%Y-%m-%d")
    print(f"Gloom on {python}, {os.cpu_count()} cores, {figures['date']}")
    print(f"flow    {figures['flow_jobs_per_s']:>12,.0f} jobs/s   p99 {figures['flow_p99_ms']} ms")
    print(f"drain   {figures['drain_jobs_per_s']:>12,.0f} jobs/s   ({100000 // scale:,} deep)")
    print(f"serial  {figures['serial_p50_ms']:>12} ms p50")
    for depth in (10000 // scale, 1000000 // scale):
        print(f"drain at {depth:,} deep: {figures[f'drain_at_{depth}_jobs_per_s']:,.0f} jobs/s")
    memory = figures["memory"]
    print(f"memory: {memory['rss_before_mib']} MiB -> {memory['rss_after_mib']} MiB with {memory['jobs']:,} "
          f"queued jobs: {memory['bytes_per_job']} bytes per job")
    idle = figures["idle_slaves"]
    if "skipped" in idle:
        print(f"idle slaves: skipped ({idle['skipped']})")
    else:
        print(f"idle slaves: {idle['slaves']:,} joined, {idle['bytes_per_slave']} bytes each")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
