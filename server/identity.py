"""Who is who: the fleet's certificate authority, the aggregator's TLS certificate, site
certificates, and the aggregator's Ed25519 key that signs manifests and the ledger.

Certificates are ECDSA P-256 X.509: what gRPC's TLS (BoringSSL) accepts for both server
and client authentication everywhere; Ed25519 certificates are not accepted by every
TLS stack sites may run behind. Under mutual TLS a site is the common name of its
certificate; `peer_site_name` reads it from a call.

Private keys are written 0600 from their first byte, atomically, and a key file that
others can read is refused on load (as ssh does), since a leaked aggregator key forges
versions every site would activate.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleetmind.runtime.durable import atomic_write
from fleetmind.runtime.keys import private_key_from_bytes

PRIVATE_MODE = 0o600
SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
CA_DAYS = 3650
LEAF_DAYS = 825  # the longest leaf lifetime browsers accepted; rotation is a command away


@dataclass(frozen=True)
class Credentials:
    """A PEM certificate and its PEM (PKCS#8) private key."""

    certificate_pem: bytes
    private_key_pem: bytes

    def __post_init__(self) -> None:
        certificate = x509.load_pem_x509_certificate(self.certificate_pem)
        key = serialization.load_pem_private_key(self.private_key_pem, password=None)
        if key.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo) \
                != certificate.public_key().public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
            raise ValueError("the private key does not belong to the certificate "
                             f"{certificate.subject.rfc4514_string()}")

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.certificate_pem)

    @property
    def common_name(self) -> str:
        value = self.certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        return value if isinstance(value, str) else value.decode()

    def save(self, folder: Path, name: str) -> tuple[Path, Path]:
        """Writes `name.crt` (0644) and `name.key` (0600); refuses to overwrite either."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
        for path in (cert_path, key_path):
            if path.exists():
                raise FileExistsError(f"{path} exists; move it away to issue a new one")
        atomic_write(key_path, self.private_key_pem, PRIVATE_MODE, replace=False)
        atomic_write(cert_path, self.certificate_pem, 0o644, replace=False)
        return cert_path, key_path

    @classmethod
    def load(cls, folder: Path, name: str) -> Credentials:
        folder = Path(folder)
        return cls((folder / f"{name}.crt").read_bytes(),
                   read_private(folder / f"{name}.key"))


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fleetmind"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: x509.Name, issuer: x509.Name, public_key, days: int
             ) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    # Backdated a little: a site whose clock runs behind must not reject a fresh certificate.
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key),
                           critical=False))


def create_ca(common_name: str = "fleetmind CA", days: int = CA_DAYS) -> Credentials:
    """A self-signed CA that may sign leaf certificates only (path length 0)."""
    key = _new_key()
    name = _name(common_name)
    certificate = (_builder(name, name, key.public_key(), days)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .add_extension(x509.KeyUsage(
                       digital_signature=False, content_commitment=False,
                       key_encipherment=False, data_encipherment=False, key_agreement=False,
                       key_cert_sign=True, crl_sign=True, encipher_only=False,
                       decipher_only=False), critical=True)
                   .sign(key, hashes.SHA256()))
    return Credentials(certificate.public_bytes(serialization.Encoding.PEM), _pem_key(key))


def _issue(ca: Credentials, common_name: str, san: Sequence[x509.GeneralName],
           usage: x509.ObjectIdentifier, days: int) -> Credentials:
    ca_cert = ca.certificate
    ca_key = serialization.load_pem_private_key(ca.private_key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"the CA key is {type(ca_key).__name__}, not the EC key "
                         "`fleetmind server certs ca` writes: make the CA with that command")
    key = _new_key()
    builder = (_builder(_name(common_name), ca_cert.subject, key.public_key(), days)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(
                   digital_signature=True, content_commitment=False, key_encipherment=False,
                   data_encipherment=False, key_agreement=False, key_cert_sign=False,
                   crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   ca_key.public_key()), critical=False))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(san)), critical=False)
    certificate = builder.sign(ca_key, hashes.SHA256())
    return Credentials(certificate.public_bytes(serialization.Encoding.PEM), _pem_key(key))


def issue_server(ca: Credentials, hosts: Sequence[str], days: int = LEAF_DAYS) -> Credentials:
    """The aggregator's certificate, valid for each of `hosts` (IP addresses or DNS names):
    sites check the address they dial against these names."""
    if not hosts:
        raise ValueError("issue_server needs at least one host (the address sites dial, "
                         "e.g. 127.0.0.1 or aggregator.example.org)")
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return _issue(ca, hosts[0], names, ExtendedKeyUsageOID.SERVER_AUTH, days)


def issue_site(ca: Credentials, site_name: str, days: int = LEAF_DAYS) -> Credentials:
    """A site's client certificate; its common name is the site's name at enrolment."""
    if not SITE_NAME.fullmatch(site_name):
        raise ValueError(f"site name {site_name!r} must be 1-63 letters, digits, '.', '_' or "
                         "'-', starting with a letter or digit")
    return _issue(ca, site_name, [], ExtendedKeyUsageOID.CLIENT_AUTH, days)


def server_credentials(server: Credentials, ca_certificate_pem: bytes) -> grpc.ServerCredentials:
    """Mutual TLS: a client without a certificate signed by the fleet's CA is refused in the
    handshake, before any service code runs."""
    return grpc.ssl_server_credentials([(server.private_key_pem, server.certificate_pem)],
                                       root_certificates=ca_certificate_pem,
                                       require_client_auth=True)


def channel_credentials(site: Credentials | None, ca_certificate_pem: bytes
                        ) -> grpc.ChannelCredentials:
    """A site's side of mutual TLS (site=None: server-authenticated only, for auditors)."""
    if site is None:
        return grpc.ssl_channel_credentials(root_certificates=ca_certificate_pem)
    return grpc.ssl_channel_credentials(root_certificates=ca_certificate_pem,
                                        private_key=site.private_key_pem,
                                        certificate_chain=site.certificate_pem)


def peer_site_name(context: grpc.ServicerContext) -> str | None:
    """The verified common name of the calling site's certificate; None without mTLS."""
    names = context.auth_context().get("x509_common_name") or []
    return names[0].decode() if len(names) == 1 else None


def read_private(path: Path) -> bytes:
    """A private key file's bytes, refused if anyone but the owner may read or write it."""
    path = Path(path)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise PermissionError(f"{path} has mode {mode:o}; a private key must be readable by "
                              f"its owner only: chmod 600 {path}")
    return path.read_bytes()


def create_signing_key(path: Path) -> Ed25519PrivateKey:
    """A new aggregator signing key at `path` (0600, atomic); refuses to replace one, since
    every version and ledger entry signed so far verifies only against the old key."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(path, pem, PRIVATE_MODE, replace=False)
    except FileExistsError:
        raise FileExistsError(f"{path} already holds a signing key; load it instead, or "
                              "move it away to start a new chain of trust") from None
    return key


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    return private_key_from_bytes(read_private(path), str(path))


def load_or_create_signing_key(path: Path) -> Ed25519PrivateKey:
    return load_signing_key(path) if Path(path).exists() else create_signing_key(path)


def public_key_bytes(key: Ed25519PrivateKey) -> bytes:
    """The raw 32-byte Ed25519 public key, as sites receive it at enrolment."""
    return key.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw)
