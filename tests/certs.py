"""Certificates made at test time: a CA, and server and client certificates
it signs.  No private key is ever committed."""

from __future__ import annotations

import datetime
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


class Authority:
    """A CA that writes PEM files into ``directory``.

    :param directory: where the CA's certificate, and the keys and
        certificates it issues, are written.
    :param name: the CA's common name; its certificate is written to
        ``directory/NAME.crt`` (spaces made hyphens).
    :param issuer: the CA that signs this one, making this an intermediate
        CA; by default the CA is a self-signed root.
    """

    def __init__(self, directory: str, name: str = "Gloom Test CA", issuer: Authority | None = None):
        self.directory = directory
        self.issuer = issuer
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name) if issuer is None else issuer.certificate.subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None if issuer is None else 0),
                           critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
        )
        if issuer is not None:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False)
        self.certificate = builder.sign(self.key if issuer is None else issuer.key, hashes.SHA256())
        self.path = self._write(f"{name}.crt".replace(" ", "-"),
                                self.certificate.public_bytes(serialization.Encoding.PEM))

    def chain(self) -> bytes:
        """The PEM certificates of this CA and the CAs between it and its root
        (the root excluded): what a server sends after its own certificate."""
        if self.issuer is None:
            return b""
        return self.certificate.public_bytes(serialization.Encoding.PEM) + self.issuer.chain()

    def _write(self, filename: str, data: bytes) -> str:
        path = os.path.join(self.directory, filename)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def issue(self, common_name: str, server: bool) -> tuple:
        """Sign a new key for ``common_name``; return (key path, certificate path).

        The certificate file holds the new certificate followed by the
        intermediate CAs up to (not including) the root, if this CA is one.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                           critical=False)
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(common_name),
                                             x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
        certificate = builder.sign(self.key, hashes.SHA256())
        key_path = self._write(f"{common_name}.key", key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        cert_path = self._write(f"{common_name}.crt",
                                certificate.public_bytes(serialization.Encoding.PEM) + self.chain())
        return key_path, cert_path
