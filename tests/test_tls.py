"""The ``mtls:`` endpoint's TLS options (gloom/tls.py): real handshakes on
loopback with client certificates, certificate chains, no deprecation
warnings, and clear errors for bad files."""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet import defer, endpoints, error, protocol, reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.ssl import Certificate, CertificateOptions, trustRootFromCertificates
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from gloom.tls import certificates_in, mutual_tls_endpoint, mutual_tls_options
from tests.certs import Authority


@implementer(IHandshakeListener)
class _NamesTheClient(protocol.Protocol):
    """Server side: once TLS is up, write the common name of the client's
    certificate (pyOpenSSL verified it against the CAs) and hang up."""

    def handshakeCompleted(self):
        self.factory.handshakes += 1
        peer = self.transport.getHandle().get_peer_certificate(as_cryptography=True)
        (name,) = peer.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        self.transport.write(name.value.encode())
        self.transport.loseConnection()


@implementer(IHandshakeListener)
class _Reader(protocol.Protocol):
    """Client side: ``done`` fires with everything the server wrote and why
    the connection closed, once it has."""

    def __init__(self):
        self.received = b""
        self.done = defer.Deferred()

    def handshakeCompleted(self):
        # Under TLS 1.3 the client is done before the server has checked
        # the client's certificate, so this says little; the server's count
        # of handshakes is what tells.
        pass

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.done.callback((self.received, reason))


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def client_options(trusted: str, key_and_certificate: tuple | None) -> CertificateOptions:
    """Client TLS options built from ``cryptography`` objects, as Gloom's
    server options are (Twisted's ``optionsForClientTLS`` with a client
    certificate still hands pyOpenSSL its deprecated objects)."""
    keyword = {}
    if key_and_certificate is not None:
        key, certificate = key_and_certificate
        keyword = dict(privateKey=serialization.load_pem_private_key(_read(key), password=None),
                       certificate=x509.load_pem_x509_certificates(_read(certificate))[0])
    authorities = [Certificate.loadPEM(ca.public_bytes(serialization.Encoding.PEM))
                   for ca in x509.load_pem_x509_certificates(_read(trusted))]
    return CertificateOptions(trustRoot=trustRootFromCertificates(authorities), **keyword)


class HandshakeTests(TestCase):
    """An ``mtls`` listener on loopback and a Twisted TLS client."""

    def setUp(self):
        self.certs = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.certs, True)
        self.ca = Authority(self.certs)

    @inlineCallbacks
    def handshake(self, server: tuple, client: tuple | None):
        """Listen with ``mtls:`` for the server's (key, certificate) and the
        test CA; connect with the client's (key, certificate), trusting the
        test CA; return the client's bytes received and reason the
        connection closed, and the server's count of handshakes."""
        key, cert = server
        endpoint = mutual_tls_endpoint(reactor, "0", key, cert, self.ca.path, interface="127.0.0.1")
        factory = protocol.Factory.forProtocol(_NamesTheClient)
        factory.handshakes = 0
        port = yield endpoint.listen(factory)
        self.addCleanup(port.stopListening)
        client_endpoint = endpoints.wrapClientTLS(
            client_options(self.ca.path, client),
            endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port))
        reader = yield endpoints.connectProtocol(client_endpoint, _Reader())
        received, reason = yield reader.done
        return received, reason, factory.handshakes

    @inlineCallbacks
    def test_handshake_with_client_certificate_warns_of_nothing(self):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            received, reason, handshakes = yield self.handshake(self.ca.issue("localhost", server=True),
                                                                self.ca.issue("worker-1", server=False))
        self.assertEqual((received, handshakes), (b"worker-1", 1))
        reason.trap(error.ConnectionDone)
        deprecations = [f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}" for w in caught
                        if issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))]
        self.assertEqual(deprecations, [])

    @inlineCallbacks
    def test_intermediate_certificates_are_sent_to_the_client(self):
        """A server certificate from an intermediate CA verifies against the
        root alone: the intermediate in the certificate file is sent too."""
        intermediate = Authority(self.certs, name="Gloom Intermediate", issuer=self.ca)
        server = intermediate.issue("localhost", server=True)
        client = self.ca.issue("worker-2", server=False)
        received, reason, handshakes = yield self.handshake(server, client)
        self.assertEqual((received, handshakes), (b"worker-2", 1))
        reason.trap(error.ConnectionDone)
        # Without the intermediate the client cannot verify the server.
        key, cert = server
        leaf_only = os.path.join(self.certs, "leaf-only.crt")
        with open(leaf_only, "wb") as f:
            f.write(x509.load_pem_x509_certificates(_read(cert))[0].public_bytes(serialization.Encoding.PEM))
        self.check_refused((yield self.handshake((key, leaf_only), client)))

    def check_refused(self, outcome):
        received, reason, handshakes = outcome
        self.assertEqual((received, handshakes), (b"", 0))
        reason.trap(SSL.Error)

    @inlineCallbacks
    def test_client_without_certificate_fails_the_handshake(self):
        self.check_refused((yield self.handshake(self.ca.issue("localhost", server=True), None)))

    @inlineCallbacks
    def test_client_certificate_from_another_ca_fails_the_handshake(self):
        other = Authority(self.certs, name="Someone Else")
        self.check_refused((yield self.handshake(self.ca.issue("localhost", server=True),
                                                 other.issue("intruder", server=False))))


class OptionsTests(SynchronousTestCase):
    """What `mutual_tls_options` builds from the files, and its errors."""

    def setUp(self):
        self.certs = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.certs, True)
        self.ca = Authority(self.certs)
        self.key, self.cert = self.ca.issue("localhost", server=True)

    def write(self, name: str, data: bytes) -> str:
        path = os.path.join(self.certs, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def test_cryptography_objects_are_passed_to_pyopenssl(self):
        intermediate = Authority(self.certs, name="Gloom Intermediate", issuer=self.ca)
        key, cert = intermediate.issue("server", server=True)
        options = mutual_tls_options(key, cert, self.ca.path)
        self.assertIsInstance(options.privateKey, ec.EllipticCurvePrivateKey)
        self.assertEqual(options.certificate, certificates_in(cert)[0])
        self.assertEqual(options.extraCertChain, [intermediate.certificate])
        options.getContext()

    def test_key_and_certificate_in_one_file(self):
        both = self.write("both.pem", _read(self.key) + _read(self.cert))
        options = mutual_tls_options(both, both, self.ca.path)
        self.assertEqual(options.certificate, certificates_in(self.cert)[0])
        self.assertEqual(options.extraCertChain, [])
        options.getContext()
        endpoint = mutual_tls_endpoint(reactor, "0", both, caCerts=self.ca.path)
        self.assertIsInstance(endpoint, endpoints.SSL4ServerEndpoint)

    def test_several_cas(self):
        other = Authority(self.certs, name="Another CA")
        cas = self.write("cas.pem", _read(other.path) + b"\n" + _read(self.ca.path))
        self.assertEqual(certificates_in(cas), [other.certificate, self.ca.certificate])
        mutual_tls_options(self.key, self.cert, cas).getContext()

    def assertRaisesMessage(self, message: str, f, *args):
        error = self.assertRaises(ValueError, f, *args)
        self.assertIn(message, str(error))

    def test_missing_ca_certificates(self):
        self.assertRaisesMessage("mtls: needs caCerts=FILE", mutual_tls_endpoint, reactor, "0", self.key,
                                 self.cert)

    def test_file_without_certificates(self):
        self.assertRaisesMessage(f"no PEM certificate in {self.key}", mutual_tls_options, self.key, self.key,
                                 self.ca.path)
        self.assertRaisesMessage(f"no PEM certificate in {self.key}", mutual_tls_options, self.key, self.cert,
                                 self.key)

    def test_broken_certificate(self):
        broken = self.write("broken.crt", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
        self.assertRaisesMessage(f"bad PEM certificate in {broken}", mutual_tls_options, self.key, self.cert,
                                 broken)

    def test_file_without_private_key(self):
        self.assertRaisesMessage(f"no usable PEM private key in {self.cert}", mutual_tls_options, self.cert,
                                 self.cert, self.ca.path)

    def test_encrypted_private_key(self):
        key = serialization.load_pem_private_key(_read(self.key), password=None)
        encrypted = self.write("encrypted.key", key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret")))
        self.assertRaisesMessage(f"the private key in {encrypted} is encrypted", mutual_tls_options, encrypted,
                                 self.cert, self.ca.path)

    def test_key_of_another_certificate(self):
        other_key, _ = self.ca.issue("other", server=True)
        self.assertRaisesMessage(f"the private key in {other_key} does not match the certificate in {self.cert}",
                                 mutual_tls_options, other_key, self.cert, self.ca.path)
