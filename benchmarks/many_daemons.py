#!/usr/bin/env python3
"""One daemon against two on this machine: the aggregate jobs/s when
clients spread their jobs over several daemons.

    python benchmarks/many_daemons.py [--venv .venv] [--blast PATH] [--jobs N] [--reps R]

Each daemon is ``twistd -n gloom`` from --venv, pinned to a core of its own
where taskset and two cores exist (one daemon: core 0; two: cores 0 and 1).
Two loads, each the flow shape (4 masters x 64 jobs in flight, 8 echo
slaves, 64-byte bodies), are run against one daemon and then two:

- ``gloom bench`` with every daemon's address: Gloom's own client core,
  whose masters route each job by its id's rendezvous hash and whose echo
  slaves serve every daemon;
- the C load generator (``blast``, from the shared benchmark kit, given
  with --blast), one process per daemon with the load split between them:
  clients sharded by hand, the least client cost per job.

With one daemon the load runs on core 1; with two it shares both cores with
the daemons (a 2-core machine has no third).  Prints a table and one JSON
line; figures are medians of --reps runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from run import pinned, wait_port  # benchmarks/run.py, beside this script

PORTS = [(19998, 19999), (20998, 20999)]


def start_daemons(venv, count):
    procs = []
    for index in range(count):
        master, slave = PORTS[index]
        command = [os.path.join(venv, "bin", "twistd"), "-n", "--pidfile=", "gloom",
                   "--master", f"tcp:{master}:interface=127.0.0.1",
                   "--slave", f"tcp:{slave}:interface=127.0.0.1"]
        procs.append(subprocess.Popen(pinned(command, index), stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
    for index in range(count):
        for port in PORTS[index]:
            wait_port(port)
    return procs


def stop(procs):
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def gloom_bench(venv, count, jobs):
    masters = ",".join(f"127.0.0.1:{PORTS[i][0]}" for i in range(count))
    slaves = ",".join(f"127.0.0.1:{PORTS[i][1]}" for i in range(count))
    command = [os.path.join(venv, "bin", "gloom"), "bench", "--json", "--no-progress", "--jobs", str(jobs),
               "--master", masters, "--slave", slaves]
    out = subprocess.run(pinned(command, 1 if count == 1 else None), capture_output=True, text=True,
                         timeout=600)
    if out.returncode:
        raise SystemExit(f"gloom bench failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["jobs_per_s"]


def blast(exe, count, jobs):
    """One blast per daemon, the flow load split evenly; the aggregate is
    all the jobs over the longest run."""
    procs = []
    for index in range(count):
        master, slave = PORTS[index]
        command = [exe, "gloom", "flow", "--masters", str(4 // count), "--slaves", str(8 // count),
                   "--window", "64", "--jobs", str(jobs // count),
                   "--master-port", str(master), "--slave-port", str(slave)]
        procs.append(subprocess.Popen(pinned(command, 1 if count == 1 else None), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        lines = [line for line in stdout.splitlines() if line.startswith("{")]
        if proc.returncode or not lines:
            raise SystemExit(f"blast failed: {stderr[-2000:]}")
        results.append(json.loads(lines[-1]))
    return sum(r["jobs"] for r in results) / max(r["seconds"] for r in results)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", default=".venv")
    parser.add_argument("--blast", help="the compiled C load generator (blast.c); skipped if not given")
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    figures = {}
    for count in (1, 2):
        runs = {"gloom bench": [], "blast": []}
        for _ in range(args.reps):
            procs = start_daemons(args.venv, count)
            try:
                runs["gloom bench"].append(gloom_bench(args.venv, count, args.jobs))
                if args.blast:
                    runs["blast"].append(blast(args.blast, count, args.jobs))
            finally:
                stop(procs)
        figures[count] = {load: round(statistics.median(values)) for load, values in runs.items() if values}

    print(f"{'load':<14}{'1 daemon':>14}{'2 daemons':>14}{'ratio':>8}")
    for load in figures[1]:
        one, two = figures[1][load], figures[2][load]
        print(f"{load:<14}{one:>14,}{two:>14,}{two / one:>8.2f}")
    print(json.dumps({"one_daemon": figures[1], "two_daemons": figures[2]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
