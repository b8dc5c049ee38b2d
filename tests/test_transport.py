"""The writers of gloom.transport on real TCP connections, and the daemon's
choice between them."""

import socket
import threading
import types

from twisted.internet import protocol, reactor, task
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from gloom import transport
from gloom.transport import DirectTCPWriter, TransportWriter, writer_for
from tests.test_integration import DaemonTestCase


class Accepted(protocol.Protocol):
    """The server side of one test connection; ``made`` fires with it."""

    def __init__(self, made):
        self.made = made

    def connectionMade(self):
        self.made.callback(self)


class RealConnectionTests(TestCase):
    """A Twisted TCP server connection, and a plain socket as the peer."""

    @inlineCallbacks
    def setUp(self):
        made = Deferred()
        factory = protocol.Factory.forProtocol(lambda: Accepted(made))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.peer = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10)
        self.addCleanup(self.peer.close)
        server = yield made
        self.transport = server.transport
        self.addCleanup(self.transport.abortConnection)

    def receive(self, count):
        """Read ``count`` bytes on the peer socket, blocking this thread: the
        reactor does not turn meanwhile."""
        data = b""
        while len(data) < count:
            chunk = self.peer.recv(count - len(data))
            if not chunk:
                break
            data += chunk
        return data

    def test_direct_sends_are_available_on_this_twisted(self):
        self.assertTrue(transport.direct_sends_available(), transport.why_direct_sends_unavailable())
        self.assertIsInstance(writer_for(self.transport), DirectTCPWriter)

    def test_a_direct_send_reaches_the_peer_before_the_reactor_turns(self):
        DirectTCPWriter(self.transport).send(b"hello")
        self.assertEqual(self.receive(5), b"hello")

    def test_the_public_writer_waits_for_the_reactor(self):
        TransportWriter(self.transport).send(b"hello")
        self.peer.settimeout(0.05)
        self.assertRaises(socket.timeout, self.peer.recv, 5)

    @inlineCallbacks
    def test_what_the_socket_cannot_take_is_sent_later_and_never_overtaken(self):
        writer = DirectTCPWriter(self.transport)
        big = bytes(range(256)) * (32 * 1024)  # 8 MiB: more than the socket buffers hold
        writer.send(big)
        writer.send_all([b"after", b" the big one"])
        writer.send(b", last")
        expected = big + b"after the big one, last"
        got = []
        reader = threading.Thread(target=lambda: got.append(self.receive(len(expected))))
        reader.start()
        while reader.is_alive():  # let the reactor send the rest
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(len(got[0]), len(expected))
        self.assertTrue(got[0] == expected, "bytes arrived out of order")

    @inlineCallbacks
    def test_a_lost_connection_takes_nothing_and_raises_nothing(self):
        lost = Deferred()
        self.transport.protocol.connectionLost = lambda reason: lost.callback(None)
        self.peer.close()
        self.transport.loseConnection()
        yield lost
        DirectTCPWriter(self.transport).send(b"into the void")


class FallbackTests(SynchronousTestCase):
    """Without the Twisted internals it relies on, every connection writes
    through the public interface."""

    def setUp(self):
        self.patch(transport, "_available", None)
        self.patch(transport, "_unavailable_because", "")

    def test_a_tcp_connection_without_the_internals_falls_back(self):
        class Connection:
            """A TCP connection class that lost the private buffer."""

            def __init__(self, skt, protocol):
                self.dataBuffer = b""
                self.connected = 1

            def writeSomeData(self, data):
                return len(data)

        self.patch(transport, "tcp", types.SimpleNamespace(Connection=Connection))
        self.assertFalse(transport.direct_sends_available())
        self.assertIn("_tempDataBuffer", transport.why_direct_sends_unavailable())
        self.assertIs(type(writer_for(Connection(None, None))), TransportWriter)

    def test_a_connection_whose_handle_is_not_its_socket_falls_back(self):
        class Connection(transport.tcp.Connection):
            def getHandle(self):
                return None  # a wrapper, perhaps: not the socket it writes to

        self.patch(transport, "tcp", types.SimpleNamespace(Connection=Connection))
        self.assertFalse(transport.direct_sends_available())

    def test_the_check_runs_once(self):
        tries = []
        self.patch(transport, "_try_direct_send", lambda: tries.append(1) or True)
        for _ in range(3):
            self.assertTrue(transport.direct_sends_available())
        self.assertEqual(tries, [1])

    def test_other_transports_get_the_public_writer(self):
        self.assertIs(type(writer_for(StringTransport())), TransportWriter)


class DaemonWriterTests(DaemonTestCase):
    @inlineCallbacks
    def test_the_daemons_tcp_connections_send_directly_in_order(self):
        master = yield self.client("master")
        (server,) = self.service.factories[0].connections
        self.assertIsInstance(server._writer, DirectTCPWriter)
        server.sendString(b'{"n":1}')
        server.transport.write(b'\x00\x00\x00\x07{"n":2}')  # waits in the transport's buffer
        server.sendString(b'{"n":3}')
        server.sendString(b'{"n":4}')
        received = yield self.frames(master, 4)
        self.assertEqual(received, [{"n": 1}, {"n": 2}, {"n": 3}, {"n": 4}])

    @inlineCallbacks
    def test_nothing_is_sent_once_a_connection_is_aborted(self):
        master = yield self.client("master")
        (server,) = self.service.factories[0].connections
        server.abort()  # the transport stays "connected" until the next turn
        server.sendString(b'{"n":1}')
        yield master.lost
        self.assertEqual((master.buffer, master.frames.pending), (b"", []))
