"""`pdserve certs`: a test CA and the credentials of a first deployment, written to one folder.

    ca.pem, ca-key.pem          the CA (keep ca-key.pem off the cluster's hosts)
    member.pem, member-key.pem  every coordinator and node (URI SAN pdserve://member, server and
                                client use; DNS/IP SANs: localhost, 127.0.0.1 and each --host)
    client.pem, client-key.pem  a client under mutual TLS (URI SAN pdserve://client)
    cluster-secret              the cluster join secret (--cluster-secret-file)
    api-key                     one client API key (--api-key-file on the coordinator and the client)

Keys are ECDSA P-256, private files mode 0600. Made with the cryptography package."""
from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import secrets
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pdserve.wire.security import CLIENT_URI, MEMBER_URI


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="folder to write into (created; existing files are kept "
                                                "unless --force)")
    p.add_argument("--host", action="append", default=[], help="a DNS name or IP address the members are reached "
                                                               "at (repeatable; localhost and 127.0.0.1 always)")
    p.add_argument("--days", type=int, default=365, help="validity of every certificate")
    p.add_argument("--force", action="store_true", help="overwrite existing files")


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_ca(days: int = 365, name: str = "pdserve test CA") -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) of a new self-signed CA."""
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return _pem(cert), _pem_key(key)


def make_cert(ca_pem: bytes, ca_key_pem: bytes, role_uri: str, name: str, hosts: list[str] = (),
              days: int = 365) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) signed by the CA, naming role_uri (MEMBER_URI or CLIENT_URI)
    and valid for localhost, 127.0.0.1 and hosts."""
    ca = x509.load_pem_x509_certificate(ca_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, None)
    key = _key()
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(role_uri)]
    for host in ["localhost", "127.0.0.1", *hosts]:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(list(dict.fromkeys(sans))), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return _pem(cert), _pem_key(key)


def write_all(out: str | os.PathLike, hosts: list[str] = (), days: int = 365, force: bool = False) -> dict[str, Path]:
    """Write every file of the module docstring into out; returns name -> path."""
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    names = ["ca.pem", "ca-key.pem", "member.pem", "member-key.pem", "client.pem", "client-key.pem",
             "cluster-secret", "api-key"]
    paths = {n: root / n for n in names}
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not force:
        raise FileExistsError(f"{', '.join(existing)} exist already (--force overwrites)")
    ca, ca_key = make_ca(days)
    member, member_key = make_cert(ca, ca_key, MEMBER_URI, "pdserve member", list(hosts), days)
    client, client_key = make_cert(ca, ca_key, CLIENT_URI, "pdserve client", [], days)
    files = {"ca.pem": ca, "ca-key.pem": ca_key, "member.pem": member, "member-key.pem": member_key,
             "client.pem": client, "client-key.pem": client_key,
             "cluster-secret": secrets.token_urlsafe(32).encode() + b"\n",
             "api-key": secrets.token_urlsafe(24).encode() + b"\n"}
    for name, data in files.items():
        private = name.endswith("-key.pem") or name in ("cluster-secret", "api-key")
        fd = os.open(paths[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    return paths


def main(a: argparse.Namespace) -> int:
    paths = write_all(a.out, a.host, a.days, a.force)
    print(f"wrote {', '.join(p.name for p in paths.values())} to {a.out}")
    print(f"members: --tls-cert {paths['member.pem']} --tls-key {paths['member-key.pem']} --tls-ca {paths['ca.pem']} "
          f"--cluster-secret-file {paths['cluster-secret']}")
    print(f"clients: --tls-ca {paths['ca.pem']} --tls-cert {paths['client.pem']} --tls-key {paths['client-key.pem']} "
          f"--api-key-file {paths['api-key']}")
    return 0
