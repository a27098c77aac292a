"""Throwaway certificate authorities for the lab and the tests, made with `cryptography`.

Owns: making a CA, certificates it signs (a server certificate for IP addresses and/or DNS
names, a client certificate whose common name is an etcd user), and writing them as PEM files
(keys 0600) into a directory the caller gives. These are for one lab or one test run (valid a
few days, never renewed); a deployment brings its own PKI (docs/deploy.md).

Must not touch: any file outside the directory it is given.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CertificateAuthority", "IssuedFiles", "new_ca"]

_VALIDITY: Final = datetime.timedelta(days=7)
_CLOCK_SKEW: Final = datetime.timedelta(minutes=5)

_CA_KEY_USAGE: Final = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


@dataclass(frozen=True, slots=True)
class IssuedFiles:
    """A certificate and its private key, as PEM files."""

    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.touch(mode=0o600)
    path.chmod(0o600)  # touch keeps the mode of a file that was there already
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _subject_alt_names(names: tuple[str, ...]) -> list[x509.GeneralName]:
    general: list[x509.GeneralName] = []
    for name in names:
        try:
            general.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            general.append(x509.DNSName(name))
    return general


class CertificateAuthority:
    """A CA key and self-signed certificate, in memory; `write_cert` puts the certificate on
    disk, `issue_*` sign and write leaf certificates."""

    def __init__(self, common_name: str) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(_name(common_name))
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_SKEW)
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_CA_KEY_USAGE, critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )

    def write_cert(self, path: Path) -> Path:
        path.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))
        return path

    def issue_server(
        self, directory: Path, stem: str, names: tuple[str, ...], *, client_too: bool = False
    ) -> IssuedFiles:
        """A server certificate for `names` (IP addresses or DNS names, as subjectAltNames:
        clients match the address they dialled against them). `client_too` also allows it as
        a client certificate (etcd members dial each other with theirs)."""
        usages = [ExtendedKeyUsageOID.SERVER_AUTH]
        if client_too:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        return self._issue(directory, stem, names[0], usages, _subject_alt_names(names))

    def issue_client(self, directory: Path, stem: str, common_name: str) -> IssuedFiles:
        """A client certificate; etcd with `--client-cert-auth` takes `common_name` as the
        user of a request that carries no token."""
        return self._issue(directory, stem, common_name, [ExtendedKeyUsageOID.CLIENT_AUTH], [])

    def _issue(
        self,
        directory: Path,
        stem: str,
        common_name: str,
        usages: list[x509.ObjectIdentifier],
        alt_names: list[x509.GeneralName],
    ) -> IssuedFiles:
        directory.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_SKEW)
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        if alt_names:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        files = IssuedFiles(cert=directory / f"{stem}.pem", key=directory / f"{stem}-key.pem")
        files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(files.key, key)
        return files


def new_ca(common_name: str) -> CertificateAuthority:
    return CertificateAuthority(common_name)
