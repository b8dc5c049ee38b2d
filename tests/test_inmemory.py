"""Masters and slaves talking to the daemon's protocols in memory, through
Twisted's ``iosim``: whole conversations, no sockets and no reactor, on a
`Clock`.  Each peer is a plain Int32StringReceiver, as a client of the 2009
protocol would be."""

import json

from twisted.internet.task import Clock
from twisted.protocols.basic import Int32StringReceiver
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from gloom.master import MasterFactory
from gloom.protocol import Outbox
from gloom.scheduler import Scheduler
from gloom.slave import SlaveFactory, SlaveState


class Peer(Int32StringReceiver):
    """A master or slave: sends JSON messages, keeps every frame it gets."""

    def __init__(self):
        self.frames = []
        self.lost = False

    def stringReceived(self, frame):
        self.frames.append(json.loads(frame))

    def connectionLost(self, reason):
        self.lost = True

    def send(self, **message):
        self.sendString(json.dumps(message).encode())

    def take(self):
        """The frames received since the last take."""
        frames, self.frames = self.frames, []
        return frames


class InMemoryDaemon:
    """The scheduler and both factories on one Clock; `connect` links a
    new `Peer` to a new server protocol with an iosim pump."""

    def __init__(self, retries=3, timeout=None):
        self.clock = Clock()
        self.scheduler = Scheduler(max_retries=retries, clock=self.clock, default_timeout=timeout)
        self.scheduler.startService()
        outbox = Outbox(self.clock)
        self.masters = MasterFactory(self.scheduler, self.clock, outbox=outbox)
        self.slaves = SlaveFactory(self.scheduler, self.clock, outbox=outbox)
        self.pumps = []

    def connect(self, factory):
        server = factory.buildProtocol(None)
        peer = Peer()
        pump = iosim.connect(server, iosim.makeFakeServer(server), peer, iosim.makeFakeClient(peer),
                             clock=self.clock)
        self.pumps.append(pump)
        return peer, server

    def master(self):
        return self.connect(self.masters)[0]

    def slave(self, job_type):
        peer, server = self.connect(self.slaves)
        peer.send(action="join", type=job_type)
        self.flush()
        assert peer.frames.pop(0) == {"ok": True}
        return peer, server

    def flush(self):
        """Deliver everything in flight, in every direction, until quiet."""
        while any([pump.pump() for pump in self.pumps]):
            pass

    def drop(self, peer):
        """The peer's connection breaks."""
        peer.transport.loseConnection()
        self.flush()


def job(job_id, body, job_type="t"):
    """The frame a slave gets for a job."""
    return {"action": "job", "id": job_id, "type": job_type, "body": body}


class ConversationTests(SynchronousTestCase):
    def setUp(self):
        self.daemon = InMemoryDaemon()

    def test_jobs_reach_slaves_by_priority_and_answers_their_master(self):
        master, other = self.daemon.master(), self.daemon.master()
        for job_id, priority in (("low", 0), ("high", 9), ("mid", 5)):
            master.send(action="submit", id=job_id, type="t", priority=priority, body=job_id)
        other.send(action="submit", id="low", type="t", body="other's")
        self.daemon.flush()
        self.assertEqual(master.take(), [{"ok": True, "id": i} for i in ("low", "high", "mid")])
        slave, _ = self.daemon.slave("t")
        order = []
        for _ in range(4):
            (job,) = slave.take()
            order.append(job["body"])
            slave.send(action="respond", id=job["id"], body=job["body"].upper())
            self.daemon.flush()
            self.assertEqual(slave.frames.pop(0), {"ok": True})
        self.assertEqual(order, ["high", "mid", "low", "other's"])
        self.assertEqual(master.take(), [{"id": "high", "body": "HIGH"}, {"id": "mid", "body": "MID"},
                                         {"id": "low", "body": "LOW"}])
        self.assertEqual(other.take(), [{"ok": True, "id": "low"}, {"id": "low", "body": "OTHER'S"}])
        self.assertEqual(len(self.daemon.scheduler), 0)

    def test_a_slave_lost_mid_job_has_its_job_run_elsewhere(self):
        master = self.daemon.master()
        first, first_server = self.daemon.slave("t")
        second, _ = self.daemon.slave("t")
        master.send(action="submit", id="j", type="t", body=1)
        self.daemon.flush()
        self.assertEqual(first.take(), [job("j", 1)])
        self.assertEqual(first_server.state, SlaveState.BUSY)
        self.daemon.drop(first)
        self.assertEqual(second.take(), [job("j", 1)])
        second.send(action="respond", id="j", body=2)
        self.daemon.flush()
        self.assertEqual(master.take(), [{"ok": True, "id": "j"}, {"id": "j", "body": 2}])
        self.assertEqual(self.daemon.scheduler.totals["retried"], 1)

    def test_a_lost_master_withdraws_its_queued_jobs_and_drops_its_answers(self):
        master = self.daemon.master()
        slave, _ = self.daemon.slave("t")
        for job_id in ("run", "wait"):
            master.send(action="submit", id=job_id, type="t", body=None)
        self.daemon.flush()
        self.daemon.drop(master)
        self.assertEqual(self.daemon.scheduler.queued("t"), 0)
        (job,) = slave.take()
        slave.send(action="respond", id=job["id"], body="nobody listens")
        self.daemon.flush()
        self.assertEqual(slave.take(), [{"ok": True}])
        self.assertEqual(len(self.daemon.scheduler), 0)
        self.assertEqual(self.daemon.scheduler.totals["cancelled"], 2)

    def test_a_slow_slaves_late_answer_is_refused_and_the_retry_answers(self):
        daemon = InMemoryDaemon(timeout=10)
        master = daemon.master()
        slow, slow_server = daemon.slave("t")
        master.send(action="submit", id="j", type="t", body=None)
        daemon.flush()
        slow.take()
        daemon.clock.advance(10)
        fast, _ = daemon.slave("t")
        self.assertEqual(fast.take(), [job("j", None)])
        slow.send(action="respond", id="j", body="late")
        fast.send(action="respond", id="j", body="on time")
        daemon.flush()
        (refusal,) = slow.take()
        self.assertEqual((refusal["error"], refusal["id"]), ("timed_out", "j"))
        self.assertEqual(slow_server.state, SlaveState.WAITING)
        self.assertEqual(master.take(), [{"ok": True, "id": "j"}, {"id": "j", "body": "on time"}])

    def test_an_idle_slave_switching_types_is_served_the_new_one(self):
        master = self.daemon.master()
        slave, server = self.daemon.slave("t")
        self.assertEqual(server.state, SlaveState.WAITING)
        slave.send(action="join", type="u")
        self.daemon.flush()
        master.send(action="submit", id="t1", type="t", body=None)
        master.send(action="submit", id="u1", type="u", body=None)
        self.daemon.flush()
        self.assertEqual(slave.take(), [{"ok": True}, job("u1", None, "u")])
        self.assertEqual(self.daemon.scheduler.queued("t"), 1)

    def test_stopping_tells_each_master_of_each_unfinished_job(self):
        master = self.daemon.master()
        slave, server = self.daemon.slave("t")
        idle, idle_server = self.daemon.slave("u")
        for job_id in ("run", "wait"):
            master.send(action="submit", id=job_id, type="t", body=None)
        self.daemon.flush()
        master.take()
        self.daemon.scheduler.stopService()
        self.daemon.flush()
        self.assertEqual(sorted((f["error"], f["id"]) for f in master.take()),
                         [("shutdown", "run"), ("shutdown", "wait")])
        self.assertEqual(idle_server.state, SlaveState.WAITING)
        self.assertEqual(self.daemon.scheduler.idle_slaves("u"), 0)
        slave.send(action="respond", body="after the stop")
        self.daemon.flush()
        self.assertEqual(slave.take(), [job("run", None), {"ok": True}])
        self.assertEqual(master.take(), [])
