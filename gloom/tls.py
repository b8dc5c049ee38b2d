"""Server endpoints with mutual TLS: the ``mtls:`` endpoint string.

``mtls:PORT:privateKey=KEY.pem:certKey=CERT.pem:caCerts=CA.pem[:interface=ADDR]``
listens like Twisted's ``ssl:`` endpoint and also requires every client to
present a certificate signed by one of the CAs in ``caCerts`` (a PEM file of
one or more certificates).  A client without one fails the handshake and
never reaches the protocol.
"""

from __future__ import annotations

import re

from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    PrivateCertificate,
    trustRootFromCertificates,
)

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def certificates_in(path: str) -> list:
    """Every certificate in a PEM file; at least one is required."""
    blocks = _PEM_CERTIFICATE.findall(_read(path))
    if not blocks:
        raise ValueError(f"no PEM certificate in {path}")
    return [Certificate.loadPEM(block) for block in blocks]


def mutual_tls_options(private_key: str, certificate: str, ca_certificates: str) -> CertificateOptions:
    """TLS options that present our certificate and require a client
    certificate signed by one of ``ca_certificates``."""
    certificate_pem = _read(certificate)
    own = PrivateCertificate.loadPEM(_read(private_key) + b"\n" + certificate_pem)
    intermediates = _PEM_CERTIFICATE.findall(certificate_pem)[1:]
    chain = [Certificate.loadPEM(block).original for block in intermediates]
    return CertificateOptions(
        privateKey=own.privateKey.original,
        certificate=own.original,
        extraCertChain=chain or None,
        trustRoot=trustRootFromCertificates(certificates_in(ca_certificates)),
    )


def mutual_tls_endpoint(reactor, port, privateKey, certKey=None, caCerts=None,
                        interface="", backlog=50):
    """Build the endpoint an ``mtls:`` string describes."""
    if caCerts is None:
        raise ValueError("mtls: needs caCerts=FILE, the CA(s) client certificates must be signed by")
    options = mutual_tls_options(privateKey, certKey or privateKey, caCerts)
    return SSL4ServerEndpoint(reactor, int(port), options, backlog=int(backlog), interface=interface)
