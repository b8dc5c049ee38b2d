"""The soak run at a size that takes about a second (see tests/soak.py)."""

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks

from tests.soak import Soak
from tests.test_integration import DaemonTestCase


class SoakTests(DaemonTestCase):
    max_frame = 1 << 20
    retries = 3

    @inlineCallbacks
    def test_nothing_is_lost_under_faults(self):
        # Each fault below must happen at least once.  They are drawn at
        # random, so each has a chance of never being drawn: some 800 acks
        # at 2% per ack leave no master disconnect once in 10 million runs
        # (at 1%, once in 3,000).
        soak = Soak(reactor, self.port("master"), self.port("slave"), jobs=800, masters=4, slaves=6,
                    walk_away=0.02, limit=60)
        report = yield soak.run()
        held = [repr(job) for job in self.scheduler.jobs()]
        peers = [str(c.transport.getPeer()) for f in self.service.factories for c in f.connections]
        context = f"seed {report['seed']}: {report}; the daemon holds {held}; connected: {peers}"
        self.assertEqual(report["problems"], [], context)
        for fault in ("vanish", "stall", "fail", "cancel", "master disconnect", "late answers refused"):
            self.assertGreater(report["faults injected"].get(fault, 0), 0, f"no {fault} injected; {context}")
        self.assertEqual(sum(report["outcomes"].values()), report["jobs checked (masters that stayed)"], context)
        totals = report["daemon totals"]
        self.assertEqual(totals["submitted"], 800)
        self.assertEqual(len(self.scheduler), 0)
