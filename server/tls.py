"""TLS for the gRPC port: server credentials whose PEM files are re-read when they change.

gRPC calls the fetcher before every new connection's handshake. It compares the files' identity
(inode, size, mtime) with those last loaded and hands gRPC a new configuration only when one moved,
so a renewed certificate (cert-manager, a rotated Kubernetes secret) serves new connections without
a restart while open connections keep theirs. A changed set that does not load (a certificate
replaced before its key, a file half written) keeps the old one in force and is tried again at the
next connection, so rotating the files one by one is safe.
"""

from __future__ import annotations

import logging
import os
import ssl
from dataclasses import dataclass

import grpc
from loraserve.server.config import StartupError

log = logging.getLogger(__name__)

Identity = tuple[tuple[int, int, int] | None, ...]


@dataclass(frozen=True)
class _Pem:
    cert: bytes
    key: bytes
    client_ca: bytes | None


class CertificateFiles:
    def __init__(self, cert: str, key: str, client_ca: str | None):
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._identity = self._stat()
        try:
            self._initial = self._read()
        except (OSError, ValueError, ssl.SSLError) as e:
            raise StartupError(f"TLS (--tls-cert {cert}, --tls-key {key}"
                               f"{f', --tls-client-ca {client_ca}' if client_ca else ''}): {_reason(e)}") from e

    def credentials(self) -> grpc.ServerCredentials:
        """Credentials for add_secure_port; with a client CA, clients must present a certificate it signed."""
        return grpc.dynamic_ssl_server_credentials(_configuration(self._initial), self.fetch,
                                                   require_client_authentication=self.client_ca is not None)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's fetcher: a new configuration if the files changed and load, else None (no change)."""
        identity = self._stat()
        if identity == self._identity:
            return None
        try:
            pem = self._read()
        except (OSError, ValueError, ssl.SSLError) as e:
            log.warning("TLS files changed but do not load (%s); keeping the previous ones until they do",
                        _reason(e))
            return None
        self._identity = identity
        log.info("TLS files changed: new connections use the new certificate")
        return _configuration(pem)

    def _paths(self) -> tuple[str, ...]:
        return (self.cert, self.key) + ((self.client_ca,) if self.client_ca else ())

    def _stat(self) -> Identity:
        return tuple(_identity(p) for p in self._paths())

    def _read(self) -> _Pem:
        pem = _Pem(_read(self.cert), _read(self.key), _read(self.client_ca) if self.client_ca else None)
        # ssl (OpenSSL) checks what gRPC would only find at a client's handshake: each file is PEM
        # and the key belongs to the certificate.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key, password=_no_password)
        if pem.client_ca:
            context.load_verify_locations(cadata=pem.client_ca.decode("ascii", "replace"))
        return pem


def _configuration(pem: _Pem) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration([(pem.key, pem.cert)], root_certificates=pem.client_ca)


def _identity(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _no_password() -> str:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
    raise ValueError("the private key is encrypted; give an unencrypted key (protect it by file permissions)")


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return str(e) or type(e).__name__


class ReloadingSslContext:
    """The same PEM files for the HTTP front, as Python's ssl sees them, re-read when they change.

    OpenSSL calls the SNI callback at every handshake (with server_name None when the client sent
    none); it checks the files' identity and hands the connection the newest context that loaded, so
    the HTTP port rotates certificates exactly as the gRPC port does.
    """

    def __init__(self, cert: str, key: str, client_ca: str | None):
        self.paths = (cert, key, client_ca)
        self._identity = self._stat()
        self._current = self._build()
        self.context = self._build()  # the listener's; only its callback is used after the handshake starts
        self.context.sni_callback = self._pick

    def _stat(self) -> Identity:
        return tuple(_identity(p) for p in self.paths if p)

    def _build(self) -> ssl.SSLContext:
        cert, key, client_ca = self.paths
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(cert, key, password=_no_password)
        if client_ca:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cafile=client_ca)
        return context

    def _pick(self, connection: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> None:
        identity = self._stat()
        if identity != self._identity:
            try:
                self._current = self._build()
                self._identity = identity
                log.info("TLS files changed: new HTTP connections use the new certificate")
            except (OSError, ValueError, ssl.SSLError) as e:
                log.warning("TLS files changed but do not load (%s); keeping the previous ones until they do",
                            _reason(e))
        connection.context = self._current
        return None
