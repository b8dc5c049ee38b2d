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
        soak = Soak(reactor, self.port("master"), self.port("slave"), jobs=800, masters=4, slaves=6,
                    walk_away=0.01, limit=60)
        report = yield soak.run()
        context = f"seed {report['seed']}: {report}"
        self.assertEqual(report["problems"], [], context)
        for fault in ("vanish", "stall", "fail", "cancel", "master disconnect", "late answers refused"):
            self.assertGreater(report["faults injected"].get(fault, 0), 0, f"no {fault} injected; {context}")
        self.assertEqual(sum(report["outcomes"].values()), report["jobs checked (masters that stayed)"], context)
        totals = report["daemon totals"]
        self.assertEqual(totals["submitted"], 800)
        self.assertEqual(len(self.scheduler), 0)
