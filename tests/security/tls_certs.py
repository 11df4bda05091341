"""A small PKI made in the test: CAs, a server certificate for localhost / 127.0.0.1, client certificates.

EC P-256 keys: made in milliseconds where RSA takes a good part of a second each.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    def write(self, directory: Path, name: str) -> tuple[Path, Path]:
        """<name>.pem and <name>.key under directory."""
        cert, key = directory / f"{name}.pem", directory / f"{name}.key"
        cert.write_bytes(self.cert_pem)
        key.write_bytes(self.key_pem)
        return cert, key


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: str, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))


def make_ca(common_name: str) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (_builder(common_name, _name(common_name), key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return Issued(cert, key)


def issue(ca: Issued, common_name: str, *, server: bool) -> Issued:
    """A leaf signed by `ca`: a server certificate for localhost and 127.0.0.1, or a client certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (_builder(common_name, ca.cert.subject, key.public_key())
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                     else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


@dataclass(frozen=True)
class Pki:
    ca: Path
    """Signs the server and the good client."""
    other_ca: Path
    """Signs the rogue client and the replacement server certificate."""
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path
    server: Issued
    other_server: Issued
    """A server certificate from other_ca, for the reload test."""


def make_pki(directory: Path) -> Pki:
    ca, other_ca = make_ca("loraserve test CA"), make_ca("another CA")
    (directory / "ca.pem").write_bytes(ca.cert_pem)
    (directory / "other-ca.pem").write_bytes(other_ca.cert_pem)
    server, other_server = issue(ca, "localhost", server=True), issue(other_ca, "localhost", server=True)
    server_cert, server_key = server.write(directory, "server")
    client_cert, client_key = issue(ca, "good client", server=False).write(directory, "client")
    rogue_cert, rogue_key = issue(other_ca, "rogue client", server=False).write(directory, "rogue")
    return Pki(directory / "ca.pem", directory / "other-ca.pem", server_cert, server_key, client_cert, client_key,
               rogue_cert, rogue_key, server, other_server)
