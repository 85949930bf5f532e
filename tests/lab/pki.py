"""The lab's libvirt PKI: one CA per lab `up`, and per host the certificates libvirtd and QEMU use
for TLS between hosts, laid out as libvirt looks for them under ``/etc/pki`` (the host's
``WORKDIR/nK/pki`` is bind-mounted there in its libvirtd's mount namespace, and in its Ansible view).

Per host (``WORKDIR/nK/pki``)::

    CA/cacert.pem                       the lab CA (libvirtd's ca_file; a client's trust)
    libvirt/servercert.pem              libvirtd's TLS socket
    libvirt/private/serverkey.pem
    libvirt/clientcert.pem              what this host's libvirtd presents to a peer (p2p migration)
    libvirt/private/clientkey.pem
    qemu/ca-cert.pem server-cert.pem server-key.pem client-cert.pem client-key.pem
                                        QEMU's migration stream (VIR_MIGRATE_TLS; qemu.conf's
                                        default_tls_x509_cert_dir is /etc/pki/qemu)

Each host has one key and one certificate (``O=pvc.cluster lab,CN=nodeK``, names ``nodeK`` and
``10.77.0.K``, both TLS usages), used as server and client certificate: a peer checks the server's
certificate against the address it connects to, and a libvirtd accepts only the client DNs of
the lab's hosts (``allowed_dns``). Keys are written 0600.

For the tests, ``WORKDIR/pki/clients/<name>`` holds client directories in the layout of libvirt's
``pkipath`` URI parameter (``cacert.pem``, ``clientcert.pem``, ``clientkey.pem``): ``node1`` (a
host's own certificate), ``controller`` (signed by the lab CA, but not a host's DN) and
``foreign`` (the DN of node1, signed by another CA).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import datetime
import ipaddress

ORGANIZATION = "pvc.cluster lab"
VALID_DAYS = 30
CLIENTS = ("node1", "controller", "foreign")


def distinguished_name(common_name: str) -> str:
    """A certificate's DN as libvirt's tls_allowed_dn_list compares it (virt-pki-query-dn's form)."""
    return f"O={ORGANIZATION},CN={common_name}"


def _name(common_name: str, organization: str = ORGANIZATION) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=not ca,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


@dataclass
class Authority:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, common_name: str) -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(_name(common_name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    def issue(self, common_name: str, names: tuple[str, ...] = (), ips: tuple[str, ...] = ()) -> tuple[bytes, bytes]:
        """(certificate PEM, unencrypted key PEM) for ``common_name``, valid as a TLS server
        (``names``/``ips`` in its subjectAltName) and as a TLS client."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        san = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return (
            cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        )

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def _write(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, mode)


def write_host_pki(ca: Authority, pki_dir: Path, name: str, address: str) -> None:
    """The host's /etc/pki (see the module docstring)."""
    cert, key = ca.issue(name, names=(name,), ips=(address,))
    files = {
        "CA/cacert.pem": (ca.cert_pem, 0o644),
        "libvirt/servercert.pem": (cert, 0o644),
        "libvirt/private/serverkey.pem": (key, 0o600),
        "libvirt/clientcert.pem": (cert, 0o644),
        "libvirt/private/clientkey.pem": (key, 0o600),
        "qemu/ca-cert.pem": (ca.cert_pem, 0o644),
        "qemu/server-cert.pem": (cert, 0o644),
        "qemu/server-key.pem": (key, 0o600),
        "qemu/client-cert.pem": (cert, 0o644),
        "qemu/client-key.pem": (key, 0o600),
    }
    for relative, (data, mode) in files.items():
        _write(pki_dir / relative, data, mode)
    (pki_dir / "libvirt" / "private").chmod(0o750)


def write_client_dirs(ca: Authority, clients_dir: Path, host_pki: Path) -> None:
    """The tests' pkipath directories (see the module docstring); ``host_pki``: node1's /etc/pki."""
    foreign = Authority.create("not the lab's CA")
    issued = {
        "node1": (
            (host_pki / "libvirt" / "clientcert.pem").read_bytes(),
            (host_pki / "libvirt" / "private" / "clientkey.pem").read_bytes(),
        ),
        "controller": ca.issue("controller"),
        "foreign": foreign.issue("node1", names=("node1",)),
    }
    for client, (cert, key) in issued.items():
        _write(clients_dir / client / "cacert.pem", ca.cert_pem, 0o644)
        _write(clients_dir / client / "clientcert.pem", cert, 0o644)
        _write(clients_dir / client / "clientkey.pem", key, 0o600)
