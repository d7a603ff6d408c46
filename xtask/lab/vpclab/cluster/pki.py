"""The cluster's certificates: one CA, a serving certificate for the API server, client
certificates per component (the API server's RBAC and Node authorizer key off their names
and groups), and the service-account signing key. Made once per lab, in its run dir."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID = datetime.timedelta(days=30)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(k: ec.EllipticCurvePrivateKey) -> bytes:
    return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                           serialization.NoEncryption())


def _name(cn: str, orgs: list[str] | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in orgs or []]
    return x509.Name(attrs + [x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class Pki:
    """Files under `dir`: ca.{crt,key}, <name>.{crt,key}, sa.{key,pub}."""

    def __init__(self, dir: Path):
        self.dir = dir

    def path(self, name: str, ext: str) -> Path:
        return self.dir / f"{name}.{ext}"

    def ensure_ca(self) -> None:
        if self.path("ca", "crt").exists():
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        key = _key()
        now = datetime.datetime.now(datetime.timezone.utc)
        name = _name("vpc-ebpf-lab-ca")
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + VALID)
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                             crl_sign=True, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False,
                                             key_agreement=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .sign(key, hashes.SHA256()))
        self.path("ca", "key").write_bytes(_pem_key(key))
        self.path("ca", "crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def _ca(self):
        key = serialization.load_pem_private_key(self.path("ca", "key").read_bytes(), None)
        cert = x509.load_pem_x509_certificate(self.path("ca", "crt").read_bytes())
        return key, cert

    def issue(self, name: str, cn: str, orgs: list[str] | None = None, *,
              server_names: list[str] | None = None, server_ips: list[str] | None = None,
              client: bool = True) -> None:
        """A key and certificate `name`.{key,crt} signed by the CA; with server names or
        addresses it also serves TLS."""
        if self.path(name, "crt").exists():
            return
        ca_key, ca_cert = self._ca()
        key = _key()
        now = datetime.datetime.now(datetime.timezone.utc)
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
        b = (x509.CertificateBuilder().subject_name(_name(cn, orgs))
             .issuer_name(ca_cert.subject).public_key(key.public_key())
             .serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + VALID)
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True))
        if server_names or server_ips:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
            sans = [x509.DNSName(n) for n in server_names or []]
            sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in server_ips or []]
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        b = b.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        cert = b.sign(ca_key, hashes.SHA256())
        self.path(name, "key").write_bytes(_pem_key(key))
        self.path(name, "crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def ensure_service_account_key(self) -> None:
        if self.path("sa", "key").exists():
            return
        key = _key()
        self.path("sa", "key").write_bytes(_pem_key(key))
        self.path("sa", "pub").write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))

    def kubeconfig(self, name: str, server: str, user: str) -> Path:
        """A kubeconfig for the certificate `name`, talking to `server`."""
        path = self.dir / f"{name}.kubeconfig"
        path.write_text(f"""apiVersion: v1
kind: Config
clusters:
- name: lab
  cluster:
    server: {server}
    certificate-authority: {self.path("ca", "crt")}
users:
- name: {user}
  user:
    client-certificate: {self.path(name, "crt")}
    client-key: {self.path(name, "key")}
contexts:
- name: lab
  context: {{cluster: lab, user: {user}}}
current-context: lab
""")
        return path
