"""Make a throw-away certificate authority and TLS files for a ZooKeeper secure client port.

Everything is generated with the `cryptography` package (a dependency of ansible-core), so no
openssl or keytool run is needed. ZooKeeper 3.8 picks the store type from the file extension: the
key store is PKCS#12 (``.p12``, the server's key and certificate), the trust store PEM (``.pem``, the
CA certificate). The Python side (kazoo) gets plain PEM files.

Certificates name ``localhost`` and ``127.0.0.1``: ZooKeeper verifies the host name of TLS peers by
default, the client's certificate included (against the client's address).
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support.zookeeper import TLSFiles

DEFAULT_NAMES = ("localhost",)
DEFAULT_IPS = ("127.0.0.1",)


@dataclass
class TLSMaterial:
    directory: Path
    ca_cert: Path  # PEM: the CA certificate (what clients and the server trust)
    server_keystore: Path  # PKCS#12: the server's key + certificate (ZooKeeper key store)
    server_truststore: Path  # PEM: the CA certificate (ZooKeeper trust store)
    client_cert: Path  # PEM: a client certificate signed by the CA
    client_key: Path  # PEM: its unencrypted key
    password: str  # protects the server key inside the key store
    other_ca_cert: Path  # PEM: an unrelated CA, for "wrong trust" tests
    ca_key: Path  # PEM: the CA's key, to issue the server a new certificate (reissue_server_keystore)
    server_names: tuple[str, ...] = DEFAULT_NAMES
    server_ips: tuple[str, ...] = DEFAULT_IPS

    def zookeeper_files(self) -> TLSFiles:
        return TLSFiles(
            keystore=str(self.server_keystore),
            truststore=str(self.server_truststore),
            password=self.password,
        )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pvc.cluster tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _new_key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
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
    return key, cert


def _leaf(
    common_name: str,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    names: tuple[str, ...],
    ips: tuple[str, ...],
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _new_key()
    now = datetime.datetime.now(datetime.UTC)
    san = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        # one certificate per side, but both usages: ZooKeeper checks them strictly
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_tls_material(
    directory: Path,
    names: tuple[str, ...] = DEFAULT_NAMES,
    ips: tuple[str, ...] = DEFAULT_IPS,
    password: str = "pvc-test-secret",
    server_names: tuple[str, ...] | None = None,
    server_ips: tuple[str, ...] | None = None,
) -> TLSMaterial:
    """Write a CA, a server key store + trust store for ZooKeeper and a client cert/key pair.
    ``server_names``/``server_ips``: other names for the server's certificate than the client's
    (a server that is not the host a client connects to)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _ca("pvc.cluster test CA")
    server_key, server_cert = _leaf(
        "zookeeper",
        ca_key,
        ca_cert,
        names if server_names is None else server_names,
        ips if server_ips is None else server_ips,
    )
    client_key, client_cert = _leaf("pvc-client", ca_key, ca_cert, names, ips)
    _other_key, other_ca = _ca("unrelated test CA")

    material = TLSMaterial(
        directory=directory,
        ca_cert=directory / "ca.pem",
        server_keystore=directory / "server-keystore.p12",
        server_truststore=directory / "server-truststore.pem",
        client_cert=directory / "client.pem",
        client_key=directory / "client-key.pem",
        password=password,
        other_ca_cert=directory / "other-ca.pem",
        ca_key=directory / "ca-key.pem",
        server_names=names if server_names is None else server_names,
        server_ips=ips if server_ips is None else server_ips,
    )
    material.ca_key.write_bytes(
        ca_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    material.ca_cert.write_bytes(_pem(ca_cert))
    material.server_truststore.write_bytes(_pem(ca_cert))
    material.other_ca_cert.write_bytes(_pem(other_ca))
    # The key store is PKCS#12 (Java's own PKCS#12 reader handles the PBES2/AES encryption that
    # `cryptography` writes; ZooKeeper's PEM reader does not: "PBES2 SecretKeyFactory not available").
    material.server_keystore.write_bytes(
        pkcs12.serialize_key_and_certificates(
            b"zookeeper",
            server_key,
            server_cert,
            None,
            serialization.BestAvailableEncryption(password.encode()),
        )
    )
    material.client_cert.write_bytes(_pem(client_cert))
    material.client_key.write_bytes(
        client_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    for path in (material.server_keystore, material.client_key, material.ca_key):
        path.chmod(0o600)
    return material


def server_certificate(material: TLSMaterial) -> x509.Certificate:
    """The certificate in the server's key store."""
    _key, cert, _more = pkcs12.load_key_and_certificates(
        material.server_keystore.read_bytes(), material.password.encode()
    )
    return cert


def reissue_server_keystore(material: TLSMaterial) -> x509.Certificate:
    """Give the server a new key and certificate from the same CA (same names), in its key store's
    file: a certificate renewed as an operator renews one. Returns the new certificate."""
    ca_key = serialization.load_pem_private_key(material.ca_key.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(material.ca_cert.read_bytes())
    key, cert = _leaf("zookeeper", ca_key, ca_cert, material.server_names, material.server_ips)
    material.server_keystore.write_bytes(
        pkcs12.serialize_key_and_certificates(
            b"zookeeper", key, cert, None, serialization.BestAvailableEncryption(material.password.encode())
        )
    )
    return cert
