"""Three ``twistd gloom`` processes and the blocking client: one daemon
is killed with SIGKILL mid-run and started again on its ports."""

import threading
import time

from twisted.trial.unittest import SynchronousTestCase

from gloom.client import Master, Slave, TransportError
from gloom.core import rendezvous
from tests.support import TwistdDaemon, reserved_port


class SigkillTests(SynchronousTestCase):
    def start(self, index):
        master, slave = self.ports[index]
        daemon = TwistdDaemon(self, "-n", "gloom", "--master", f"tcp:{master}:interface=127.0.0.1",
                              "--slave", f"tcp:{slave}:interface=127.0.0.1")
        return daemon

    def serve(self, job_type, ran):
        """A blocking Slave serving ``job_type`` on every daemon, in a
        thread, counting the jobs it ran in ``ran``."""
        slave = Slave(self.slaves)

        def handler(job):
            ran[job.id] = ran.get(job.id, 0) + 1
            return job.body

        thread = threading.Thread(target=slave.serve, args=(handler, job_type), daemon=True)
        thread.start()

        def stop():
            slave.stop()
            thread.join(10)
            slave.disconnect()

        self.addCleanup(stop)

    def ids_for(self, index, count, prefix):
        """``count`` job ids that daemon ``index`` comes first for."""
        ids = (f"{prefix}-{n}" for n in range(10 ** 6))
        return [job_id for job_id, _ in zip((i for i in ids if rendezvous(i, self.masters)[0] ==
                                             self.masters[index]), range(count))]

    def until(self, predicate, seconds=20):
        deadline = time.monotonic() + seconds
        while not predicate():
            self.assertLess(time.monotonic(), deadline, f"not within {seconds} s")
            time.sleep(0.05)

    def test_a_daemon_killed_with_sigkill_and_started_again(self):
        self.ports = [(reserved_port(self), reserved_port(self)) for _ in range(3)]
        self.masters = [f"127.0.0.1:{master}" for master, _ in self.ports]
        self.slaves = [f"127.0.0.1:{slave}" for _, slave in self.ports]
        daemons = [self.start(index) for index in range(3)]
        for daemon in daemons:
            daemon.ports()  # it listens
        ran = {}
        self.serve("echo", ran)
        with Master(self.masters) as master:
            self.assertEqual(list(master.map("echo", range(30), window=8, wait=10)), list(range(30)))
            doomed = self.ids_for(1, 4, "doomed")
            survivors = self.ids_for(0, 3, "safe0") + self.ids_for(2, 3, "safe2")
            for job_id in doomed + survivors:
                master.submit(job_id, "later", job_id)  # no worker serves "later" yet
            self.assertEqual(master.stats()["types"]["later"]["queued"], 10)

            daemons[1].kill()  # SIGKILL: no word to anyone
            lost = set()
            for _ in doomed:
                error = self.assertRaises(TransportError, master.receive, 10)
                self.assertEqual(error.daemon, self.masters[1])
                self.assertIn(f"job {error.id!r} was dropped by {self.masters[1]}", str(error))
                lost.add(error.id)
            self.assertEqual(lost, set(doomed))

            # New jobs go to the survivors, whatever their id; the jobs there all along are answered once.
            rerouted = self.ids_for(1, 10, "rerouted")
            for job_id in rerouted:
                master.submit(job_id, "echo", job_id)
            self.assertEqual({master.receive(10).id for _ in rerouted}, set(rerouted))
            later = {}
            self.serve("later", later)
            self.assertEqual({master.receive(10).id for _ in survivors}, set(survivors))
            self.assertEqual(later, dict.fromkeys(survivors, 1))
            self.assertTrue(all(count == 1 for count in ran.values()))

            # It comes back on its ports: the workers rejoin it, the master uses it again.
            daemons[1] = self.start(1)
            daemons[1].ports()
            self.until(lambda: master.stats() and self.masters[1] in master.connected)
            self.until(lambda: master.stats()["daemons"][self.masters[1]]["slaves"] == 2)
            back = self.ids_for(1, 8, "back")
            for job_id in back:
                master.submit(job_id, "echo", job_id)
            self.assertEqual({master.receive(10).id for _ in back}, set(back))
            self.assertEqual(master.stats()["daemons"][self.masters[1]]["totals"]["completed"], len(back))
            self.assertTrue(all(count == 1 for count in ran.values()))
