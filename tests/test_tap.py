"""The listening services makeService builds, without sockets."""

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase

from gloom.tap import ListenService


class Port:
    def __init__(self):
        self.stopped = False

    def getHost(self):
        from twisted.internet.address import IPv4Address

        return IPv4Address("TCP", "127.0.0.1", 9998)

    def stopListening(self):
        self.stopped = True


class Endpoint:
    """Listens with whatever Deferred the test gives it."""

    def __init__(self, outcome):
        self.outcome = outcome

    def listen(self, factory):
        return self.outcome


class Reactor(MemoryReactor):
    def __init__(self):
        super().__init__()
        self.stopped = False

    def stop(self):
        self.stopped = True


class ListenServiceTests(SynchronousTestCase):
    def service(self, outcome):
        self.reactor = Reactor()
        return ListenService("master", "tcp:9998", Endpoint(outcome), Factory(), self.reactor)

    def test_listens_and_stops_listening(self):
        port = Port()
        service = self.service(succeed(port))
        service.privilegedStartService()
        service.startService()
        self.assertIs(service.port, port)
        service.stopService()
        self.assertTrue(port.stopped)
        self.assertIsNone(service.port)

    def test_a_port_that_cannot_be_bound_stops_start_up_with_one_line(self):
        error = CannotListenError("127.0.0.1", 9998, OSError(98, "Address already in use"))
        service = self.service(fail(error))
        with self.assertRaises(SystemExit) as raised:
            service.privilegedStartService()
        self.assertEqual(str(raised.exception),
                         "gloom: cannot listen for masters on tcp:9998: [Errno 98] Address already in use")
        self.assertFalse(self.reactor.stopped)

    def test_a_later_failure_to_listen_stops_the_reactor(self):
        later = Deferred()
        service = self.service(later)
        service.privilegedStartService()
        self.assertFalse(self.reactor.stopped)
        later.errback(CannotListenError("127.0.0.1", 9998, OSError(98, "Address already in use")))
        self.assertTrue(self.reactor.stopped)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_stopping_before_listening_cancels_quietly(self):
        later = Deferred()
        service = self.service(later)
        service.privilegedStartService()
        service.startService()
        service.stopService()
        self.assertFalse(self.reactor.stopped)
        self.assertEqual(self.flushLoggedErrors(), [])


class StartUpTests(SynchronousTestCase):
    def start(self):
        from twisted.internet.testing import MemoryReactorClock
        from twisted.logger import globalLogPublisher

        from gloom.tap import makeService

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        reactor = MemoryReactorClock()
        service = makeService({"master": "tcp:9998", "slave": "tcp:9999", "max-frame": 1024,
                               "retries": 3}, reactor)
        service.privilegedStartService()
        self.assertEqual([port[0] for port in reactor.tcpServers], [9998, 9999])
        return [e["log_format"] for e in events if e.get("log_namespace", "").startswith("gloom")]

    def test_start_up_says_when_connections_cannot_send_directly(self):
        from gloom import transport

        self.patch(transport, "_available", False)
        self.patch(transport, "_unavailable_because", "no such buffer")
        formats = self.start()
        self.assertTrue(any("transport interface only" in f for f in formats), formats)

    def test_start_up_is_quiet_about_direct_sends_when_they_work(self):
        formats = self.start()
        self.assertFalse(any("transport interface only" in f for f in formats), formats)
