"""Transport security: mutual TLS between sender and receiver, and an optional shared token.

* ``pagehaul certs --out DIR`` makes a throw-away CA and two key pairs signed by it
  (``receiver.crt``/``.key`` for the server, ``sender.crt``/``.key`` for the client), for tests
  and first deployments. Production should bring certificates from its own PKI.
* The receiver requires a client certificate signed by its CA (``require_client_auth``): a
  client without one, or with one from another CA, fails the TLS handshake before a single
  message is read. The certificate must also be meant for clients: the TLS library refuses an
  extended key usage without clientAuth, and :meth:`Security.peer_refusal` one without the
  extension at all (which X.509 reads as "any usage").
* A session's resume is bound to the certificate that opened it (:func:`client_identity`).
* A shared token (``--token-file`` on both sides) travels as ``authorization: Bearer …``
  metadata and is checked before the session is opened; it adds a second factor and works
  behind TLS-terminating proxies.
* Plain TCP only with ``--insecure``, which logs a warning on every start.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import logging
import os
import socket
import ssl
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from pagehaul.errors import ConfigError

log = logging.getLogger(__name__)

TOKEN_METADATA_KEY = "authorization"  # noqa: S105 -- a header name, not a secret
# grpc's auth context: property name -> values (the peer's leaf certificate under this key).
AuthContext = Mapping[str, Iterable[bytes]]
PEER_CERT_KEY = "x509_pem_cert"


def _peer_pem(auth: AuthContext | None) -> bytes | None:
    for value in (auth or {}).get(PEER_CERT_KEY, ()):
        return value
    return None


def client_identity(auth: AuthContext | None) -> str:
    """SHA-256 of the peer's TLS certificate (DER), or "" on a connection without one."""
    pem = _peer_pem(auth)
    if pem is None:
        return ""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files: this side's certificate and key, and the CA that signs the peer."""

    cert: Path
    key: Path
    ca: Path

    def _read(self) -> tuple[bytes, bytes, bytes]:
        try:
            return self.cert.read_bytes(), self.key.read_bytes(), self.ca.read_bytes()
        except OSError as err:
            raise ConfigError(f"cannot read TLS material: {err.filename}: {err.strerror}") from err

    def server_credentials(self) -> grpc.ServerCredentials:
        cert, key, ca = self._read()
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)

    def server_ssl_context(self) -> ssl.SSLContext:
        """The same mutual TLS for a server that is not gRPC (CRIU's page server, ``criu --tls``):
        a client certificate signed by ``ca`` is required. No TLS 1.3 session tickets: CRIU's
        GnuTLS client reads the ticket sent after the handshake as EAGAIN from its blocking
        ``recv`` and fails the dump ("The page server doesn't answer")."""
        try:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_cert_chain(self.cert, self.key)
            ctx.load_verify_locations(self.ca)
        except ssl.SSLError as err:  # before OSError, its base class
            raise ConfigError(f"cannot use TLS material {self.cert}, {self.key}, {self.ca}: "
                              f"{err.reason or err}") from err
        except OSError as err:
            raise ConfigError(f"cannot read TLS material: {err.filename or self.cert}: {err.strerror or err}") from err
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.num_tickets = 0
        return ctx

    def channel_credentials(self) -> grpc.ChannelCredentials:
        cert, key, ca = self._read()
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


@dataclass(frozen=True, slots=True)
class Security:
    """How one side authenticates: TLS files (None only when ``insecure``) and an optional token."""

    tls: TlsFiles | None = None
    token: str | None = None
    insecure: bool = False

    def __post_init__(self) -> None:
        if self.tls is None and not self.insecure:
            raise ConfigError("no TLS material given: pass --tls-cert, --tls-key and --tls-ca "
                              "(make test ones with 'pagehaul certs'), or --insecure for plain TCP")

    @classmethod
    def from_args(cls, cert: Path | None, key: Path | None, ca: Path | None, token_file: Path | None,
                  insecure: bool) -> Security:
        given = [p for p in (cert, key, ca) if p is not None]
        if given and len(given) != 3:
            raise ConfigError("--tls-cert, --tls-key and --tls-ca go together")
        if given and insecure:
            raise ConfigError("--insecure and --tls-* exclude each other")
        token = read_token(token_file) if token_file else None
        tls = TlsFiles(cert, key, ca) if cert and key and ca else None
        if insecure:
            log.warning("INSECURE: plain TCP without TLS; anyone on the network can read or inject memory pages")
        return cls(tls=tls, token=token, insecure=insecure)

    def token_metadata(self) -> tuple[tuple[str, str], ...]:
        return ((TOKEN_METADATA_KEY, f"Bearer {self.token}"),) if self.token else ()

    def peer_refusal(self, auth: AuthContext | None) -> str | None:
        """Why a peer that passed the TLS handshake is still refused (None: it is not): with TLS,
        its certificate must carry the clientAuth extended key usage."""
        if self.tls is None:
            return None
        return client_cert_refusal(_peer_pem(auth))

    def token_ok(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> bool:
        if self.token is None:
            return True
        want = f"Bearer {self.token}".encode()
        for k, v in metadata or ():
            if k == TOKEN_METADATA_KEY:
                got = v.encode() if isinstance(v, str) else v
                return hmac.compare_digest(got, want)
        return False


def client_cert_refusal(pem: bytes | None) -> str | None:
    """Why a client whose certificate (PEM) passed the TLS handshake is still refused (None: it is
    not): it must carry the clientAuth extended key usage (no extension at all reads as any)."""
    if pem is None:
        return "no client certificate"
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    try:
        usage = x509.load_pem_x509_certificate(pem).extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    except x509.ExtensionNotFound:
        return "client certificate has no extended key usage (clientAuth required)"
    except ValueError as err:
        return f"client certificate cannot be read: {err}"
    if ExtendedKeyUsageOID.CLIENT_AUTH not in usage.value:
        return "client certificate is not for clientAuth"
    return None


def read_token(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except OSError as err:
        raise ConfigError(f"cannot read token file {path}: {err.strerror}") from err
    if len(token) < 16:
        raise ConfigError(f"token in {path} is too short (at least 16 characters)")
    return token


def make_test_pki(out: Path, names: Sequence[str] = ()) -> list[Path]:
    """A CA and receiver/sender key pairs under ``out``; the receiver certificate is valid for
    localhost, 127.0.0.1, ::1, this host's name and ``names`` (host names or IP addresses)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    written: list[Path] = []

    def write(name: str, data: bytes, mode: int) -> None:
        path = out / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        written.append(path)

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pagehaul test CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=365))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .sign(ca_key, hashes.SHA256()))
    write("ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    write("ca.key", key_pem(ca_key), 0o600)

    hosts = ["localhost", socket.gethostname()]
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [ipaddress.ip_address("127.0.0.1"),
                                                                 ipaddress.ip_address("::1")]
    for name in names:  # an address goes in as an IP SAN, anything else as a DNS name
        try:
            ips.append(ipaddress.ip_address(name))
        except ValueError:
            hosts.append(name)
    sans: list[x509.GeneralName] = [x509.DNSName(h) for h in dict.fromkeys(hosts)]
    sans += [x509.IPAddress(ip) for ip in ips]
    for role, usage in (("receiver", ExtendedKeyUsageOID.SERVER_AUTH), ("sender", ExtendedKeyUsageOID.CLIENT_AUTH)):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"pagehaul {role}")]))
                   .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=365))
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if role == "receiver":
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        write(f"{role}.crt", cert.public_bytes(serialization.Encoding.PEM), 0o644)
        write(f"{role}.key", key_pem(key), 0o600)
    return written
