"""TLS for the HTTP API: the appliance's certificate, its fingerprint, and pinning a peer's.

Appliances talk to each other (replication) across sites, where no public CA vouches for
either. Like PBS, each appliance makes a self-signed certificate on first start and an
operator copies its SHA-256 fingerprint into the other appliance's `[[remotes]]`; the
client then trusts exactly that certificate and nothing else. A CA-signed certificate
can be configured instead (`api.tls_cert`/`api.tls_key`); pinning works the same way.
"""

from __future__ import annotations

import datetime
import hashlib
import re
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance.durable import create_durably
from appliance.errors import ConfigError, RemoteRefused

CERT_NAME = "api-tls.crt"
KEY_NAME = "api-tls.key"
CERT_DAYS = 3650
_FINGERPRINT = re.compile(r"(?:sha256:)?([0-9a-f]{2}(?::?[0-9a-f]{2}){31})")
PROBE_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class TlsIdentity:
    """The certificate and key files the API serves with, and the certificate's fingerprint."""

    cert_file: Path
    key_file: Path
    fingerprint: str


def fingerprint_of(der: bytes) -> str:
    """The form operators copy: ``sha256:ab:cd:...`` (what `openssl x509 -fingerprint -sha256` shows)."""
    return "sha256:" + ":".join(f"{byte:02x}" for byte in hashlib.sha256(der).digest())


def normal_fingerprint(text: str) -> str:
    """A fingerprint as given (upper or lower case, colons or not, `sha256:` or not) in `fingerprint_of`'s form."""
    match = _FINGERPRINT.fullmatch(text.strip().lower())
    if match is None:
        raise ValueError(f"{text!r} is not a SHA-256 certificate fingerprint (64 hex digits)")
    digits = match.group(1).replace(":", "")
    return "sha256:" + ":".join(digits[i : i + 2] for i in range(0, 64, 2))


def _self_signed(host_name: str) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host_name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


def _fingerprint_of_file(path: Path) -> str:
    try:
        certificate = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(str(path), f"cannot read the API certificate: {exc}") from None
    return fingerprint_of(certificate.public_bytes(serialization.Encoding.DER))


def api_identity(store_path: Path, cert_file: Path | None, key_file: Path | None) -> TlsIdentity:
    """The configured certificate, or the store's self-signed one (made on first use)."""
    if cert_file is None or key_file is None:
        cert_file, key_file = store_path / CERT_NAME, store_path / KEY_NAME
        if not cert_file.exists():
            cert_pem, key_pem = _self_signed(socket.gethostname())
            create_durably(key_file, key_pem)
            create_durably(cert_file, cert_pem)
    return TlsIdentity(cert_file, key_file, _fingerprint_of_file(cert_file))


def peer_certificate(url: str) -> bytes:
    """The DER certificate the server at `url` presents (nothing is sent but the TLS handshake)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or 443
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    probe.check_hostname = False
    probe.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_SECONDS) as raw:
            with probe.wrap_socket(raw, server_hostname=host) as wrapped:
                der = wrapped.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError) as exc:
        raise RemoteRefused(f"cannot reach {url} over TLS: {exc}") from None
    if der is None:
        raise RemoteRefused(f"{url} presented no certificate")
    return der


def pinned_context(url: str, fingerprint: str) -> ssl.SSLContext:
    """A client context that trusts only the certificate with `fingerprint`, checked before any request.

    The certificate is fetched by a bare handshake and compared; the context then holds it
    as its one trust anchor, so a later connection to an impostor fails its handshake
    before the token is sent.
    """
    der = peer_certificate(url)
    found = fingerprint_of(der)
    if found != normal_fingerprint(fingerprint):
        raise RemoteRefused(f"{url} presents a certificate with fingerprint {found}, not the pinned "
                            f"{normal_fingerprint(fingerprint)}: refusing to send it the token")
    return trusting(ssl.DER_cert_to_PEM_cert(der))


def trusting(cert_pem: str) -> ssl.SSLContext:
    """A client context whose only trust anchor is `cert_pem` (host names are not checked: the pin is the check)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cadata=cert_pem)
    return context
