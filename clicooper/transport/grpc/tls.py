"""A local certificate authority and per-party TLS certificates for mutual TLS.

For a deployment on one machine or in a lab: `make_local_pki` makes a CA and one certificate per
party. A party's identity is in its certificate twice: the common name is the party name, and a
URI subject alternative name `clicooper://<job>/<party>` binds it to one job. A DNS name
(`server_name(party)`) lets clients check that they reached the party they dialled. Real
deployments bring their own CA: `TlsCredentials.from_files` reads any PEM CA, chain and key, and a
certificate without the URI name is identified by its common name alone.

Keys are ECDSA P-256 (fast to make, supported by every TLS stack gRPC uses); private keys are
written with mode 0600 and never leave the folder of the party they belong to.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

URI_SCHEME = "clicooper"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class TlsError(ValueError):
    """A certificate or key could not be made, read, or does not name a valid party."""


def check_name(name: str, what: str = "party") -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise TlsError(f"{what} name {name!r} must be 1-63 letters, digits, '_', '.' or '-'")
    return name


def server_name(party: str) -> str:
    """The DNS name in a party's certificate that clients check when they dial it."""
    return f"{check_name(party).lower().replace('_', '-')}.clicooper"


def party_uri(job_id: str, party: str) -> str:
    return f"{URI_SCHEME}://{job_id}/{party}"


@dataclass(frozen=True)
class TlsCredentials:
    """PEM bytes for one party: the CA it trusts, its certificate chain and its private key."""

    ca_cert: bytes
    cert_chain: bytes
    private_key: bytes

    @classmethod
    def from_files(cls, ca: str | Path, cert: str | Path, key: str | Path) -> TlsCredentials:
        try:
            out = cls(Path(ca).read_bytes(), Path(cert).read_bytes(), Path(key).read_bytes())
            x509.load_pem_x509_certificate(out.ca_cert)
            x509.load_pem_x509_certificate(out.cert_chain)
        except (OSError, ValueError) as e:
            raise TlsError(f"cannot read TLS files ({ca}, {cert}, {key}): {e}") from None
        return out

    @classmethod
    def load(cls, folder: str | Path) -> TlsCredentials:
        """A party folder written by `make_local_pki`: ca.pem, cert.pem, key.pem."""
        d = Path(folder)
        return cls.from_files(d / "ca.pem", d / "cert.pem", d / "key.pem")

    def identity(self) -> tuple[str | None, str]:
        """(job, party) named by this party's own certificate."""
        return cert_identity(self.cert_chain)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


@dataclass(frozen=True)
class LocalCA:
    """A self-signed CA (certificate and key in memory)."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls, name: str = "CliCooper local CA", days: int = 365) -> LocalCA:
        key = _new_key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @classmethod
    def load(cls, folder: str | Path) -> LocalCA:
        d = Path(folder)
        try:
            cert = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
            key = serialization.load_pem_private_key((d / "ca.key").read_bytes(), password=None)
        except (OSError, ValueError) as e:
            raise TlsError(f"cannot read the CA in {d}: {e}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise TlsError(f"{d / 'ca.key'}: expected an EC private key")
        return cls(cert, key)

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def save(self, folder: str | Path) -> None:
        d = Path(folder)
        _write(d / "ca.pem", self.cert_pem, 0o644)
        _write(d / "ca.key", _pem_key(self.key), 0o600)

    def issue(
        self,
        job_id: str,
        party: str,
        *,
        hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
        days: int = 365,
    ) -> TlsCredentials:
        """A certificate for `party` in `job_id`, valid for client and server use."""
        check_name(job_id, "job")
        check_name(party)
        key = _new_key()
        now = dt.datetime.now(dt.UTC)
        alt: list[x509.GeneralName] = [
            x509.UniformResourceIdentifier(party_uri(job_id, party)),
            x509.DNSName(server_name(party)),
        ]
        for h in hosts:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                alt.append(x509.DNSName(h))
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, party)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        return TlsCredentials(self.cert_pem, cert.public_bytes(serialization.Encoding.PEM), _pem_key(key))


def save_credentials(creds: TlsCredentials, folder: str | Path) -> None:
    """Write ca.pem, cert.pem and key.pem (0600) into a party's folder."""
    d = Path(folder)
    _write(d / "ca.pem", creds.ca_cert, 0o644)
    _write(d / "cert.pem", creds.cert_chain, 0o644)
    _write(d / "key.pem", creds.private_key, 0o600)


def make_local_pki(
    out: str | Path | None,
    job_id: str,
    parties: list[str],
    *,
    hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
) -> dict[str, TlsCredentials]:
    """A fresh CA and one certificate per party. With `out`, writes `out/ca/{ca.pem,ca.key}` and
    `out/<party>/{ca.pem,cert.pem,key.pem}`; each party's folder holds only its own key."""
    ca = LocalCA.create(f"CliCooper CA for {check_name(job_id, 'job')}")
    creds = {p: ca.issue(job_id, p, hosts=hosts) for p in parties}
    if out is not None:
        ca.save(Path(out) / "ca")
        for p, c in creds.items():
            save_credentials(c, Path(out) / p)
    return creds


def cert_identity(pem: bytes) -> tuple[str | None, str]:
    """(job, party) from a peer's leaf certificate: the `clicooper://job/party` URI name when present,
    otherwise (None, common name). Raises TlsError when neither names a valid party."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as e:
        raise TlsError(f"unreadable peer certificate: {e}") from None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    ours = [u for u in uris if u.startswith(f"{URI_SCHEME}://")]
    if len(ours) > 1:
        raise TlsError(f"certificate names several parties: {ours}")
    if ours:
        rest = ours[0][len(URI_SCHEME) + 3 :]
        job, _, party = rest.partition("/")
        return check_name(job, "job"), check_name(party)
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1:
        raise TlsError("certificate has no single common name")
    return None, check_name(str(cns[0].value))


def main(argv: list[str] | None = None) -> None:
    """python -m clicooper.transport.grpc OUT JOB PARTY [PARTY ...]"""
    import argparse

    ap = argparse.ArgumentParser(description="Make a local CA and one TLS certificate per party.")
    ap.add_argument("out", type=Path, help="folder: out/ca and one sub-folder per party")
    ap.add_argument("job", help="job id (bound into every certificate)")
    ap.add_argument("parties", nargs="+", help="party names, e.g. data_owner trainer_1 verifier")
    ap.add_argument("--host", action="append", default=None, help="extra host name or IP (repeatable)")
    a = ap.parse_args(argv)
    hosts = ("localhost", "127.0.0.1", *(a.host or []))
    make_local_pki(a.out, a.job, a.parties, hosts=hosts)
    print(f"CA in {a.out / 'ca'} (keep ca.key offline); under {a.out}, give each party only its own folder")
