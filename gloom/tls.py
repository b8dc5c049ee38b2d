"""Server endpoints with mutual TLS: the ``mtls:`` endpoint string.

``mtls:PORT:privateKey=KEY.pem:certKey=CERT.pem:caCerts=CA.pem[:interface=ADDR]``
listens like Twisted's ``ssl:`` endpoint and also requires every client to
present a certificate signed by one of the CAs in ``caCerts`` (a PEM file of
one or more certificates).  A client without one fails the handshake and
never reaches the protocol.

The key and certificates are loaded with ``cryptography`` and handed to
pyOpenSSL as ``cryptography`` objects (pyOpenSSL 24.3 and later deprecate
its own ``X509`` and ``PKey`` objects there).
"""

from __future__ import annotations

import re

from cryptography import x509
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_private_key,
)
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    trustRootFromCertificates,
)

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def certificates_in(path: str) -> list[x509.Certificate]:
    """Every certificate in a PEM file, in the order they appear.

    :param path: the name of a PEM file; anything outside its
        ``BEGIN CERTIFICATE`` blocks (a private key, comments) is ignored.
    :returns: the certificates, at least one.
    :raises ValueError: if the file holds no certificate or a block that is
        not a valid certificate.
    """
    blocks = _PEM_CERTIFICATE.findall(_read(path))
    if not blocks:
        raise ValueError(f"no PEM certificate in {path}")
    try:
        return [x509.load_pem_x509_certificate(block) for block in blocks]
    except ValueError as e:
        raise ValueError(f"bad PEM certificate in {path}: {e}") from None


def private_key_in(path: str):
    """The (unencrypted) private key in a PEM file.

    :param path: the name of a PEM file holding the key, possibly along with
        certificates.
    :returns: a ``cryptography`` private key.
    :raises ValueError: if the file holds no usable private key, or the key
        is encrypted with a passphrase.
    """
    try:
        return load_pem_private_key(_read(path), password=None)
    except TypeError:
        # cryptography's word for "encrypted, and no password given".
        raise ValueError(f"the private key in {path} is encrypted; give an unencrypted key") from None
    except ValueError as e:
        raise ValueError(f"no usable PEM private key in {path}: {e}") from None


def _public_key_bytes(key) -> bytes:
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def mutual_tls_options(private_key: str, certificate: str, ca_certificates: str) -> CertificateOptions:
    """TLS options that present our certificate and require a client
    certificate signed by one of ``ca_certificates``.

    :param private_key: the name of a PEM file with the server's private key
        (unencrypted).
    :param certificate: the name of a PEM file with the server's
        certificate, followed by any intermediate CA certificates, which are
        sent to clients as the rest of the chain.  It may be the same file as
        ``private_key``.
    :param ca_certificates: the name of a PEM file of one or more CA
        certificates; a client must present a certificate signed by one of
        them.
    :returns: options for ``twisted.internet.endpoints.SSL4ServerEndpoint``.
    :raises ValueError: if a file lacks what it should hold, or the private
        key does not belong to the certificate.
    """
    key = private_key_in(private_key)
    own, *intermediates = certificates_in(certificate)
    if _public_key_bytes(key.public_key()) != _public_key_bytes(own.public_key()):
        raise ValueError(f"the private key in {private_key} does not match the certificate in {certificate}")
    # Twisted's trust roots are still built from pyOpenSSL certificates
    # (OpenSSL.crypto.X509Store.add_cert takes nothing else); making them
    # warns of nothing.
    authorities = [Certificate.loadPEM(ca.public_bytes(Encoding.PEM))
                   for ca in certificates_in(ca_certificates)]
    return CertificateOptions(
        privateKey=key,
        certificate=own,
        extraCertChain=intermediates or None,
        trustRoot=trustRootFromCertificates(authorities),
    )


def mutual_tls_endpoint(reactor, port, privateKey, certKey=None, caCerts=None,
                        interface="", backlog=50):
    """Build the endpoint an ``mtls:`` string describes (the arguments are
    the string's fields, as text).

    :param reactor: the reactor to listen with.
    :param port: the TCP port number.
    :param privateKey: the PEM file with the server's private key.
    :param certKey: the PEM file with the server's certificate and any
        intermediates; by default, ``privateKey``.
    :param caCerts: the PEM file of the CA certificates that client
        certificates must be signed by (required).
    :param interface: the address to listen on; by default, all.
    :param backlog: the size of the queue of connections not yet accepted.
    :returns: a ``twisted.internet.endpoints.SSL4ServerEndpoint``.
    :raises ValueError: if ``caCerts`` is missing, or as
        `mutual_tls_options` does.
    """
    if caCerts is None:
        raise ValueError("mtls: needs caCerts=FILE, the CA(s) client certificates must be signed by")
    options = mutual_tls_options(privateKey, certKey or privateKey, caCerts)
    return SSL4ServerEndpoint(reactor, int(port), options, backlog=int(backlog), interface=interface)
