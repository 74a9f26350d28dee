"""`qfram tls-init`: certificates for TLS migration, in QEMU's tls-creds-x509 layout.

One directory serves both ends and QEMU too (``-object tls-creds-x509,dir=DIR,...``):
``ca-cert.pem``, ``server-cert.pem``/``server-key.pem`` (the listening side) and
``client-cert.pem``/``client-key.pem`` (the connecting side).  Keys are EC P-256,
written 0600.  The CA's own key is thrown away once it has signed the two certificates:
a copy of the directory can then authenticate, but never mint a new peer.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
from typing import List

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from qfram.io.outputs import Directory, NewFile

FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem", "client-cert.pem",
         "client-key.pem")
VALID_DAYS = 3650


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "qfram"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _alt_names(hosts: List[str]) -> x509.SubjectAlternativeName:
    names: List[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _certificate(subject: x509.Name, key, issuer: x509.Name, issuer_key, *, ca: bool,
                 usage=None, alt_names=None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(subject).issuer_name(issuer).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(
                   digital_signature=not ca, key_encipherment=not ca, key_cert_sign=ca,
                   crl_sign=ca, content_commitment=False, data_encipherment=False,
                   key_agreement=False, encipher_only=False, decipher_only=False),
                   critical=True))
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if alt_names is not None:
        builder = builder.add_extension(alt_names, critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def init(directory: str, host: str = "localhost", force: bool = False) -> List[str]:
    """Make the five files in ``directory`` (created 0700 if missing).  The server's
    certificate is for ``host`` and for localhost/127.0.0.1/::1; existing files are
    kept unless ``force``.  Returns the paths written."""
    paths = [os.path.join(directory, name) for name in FILES]
    present = [p for p in paths if os.path.lexists(p)]
    if present and not force:
        raise FileExistsError(f"{present[0]} exists (--force replaces the credentials)")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("qfram migration CA")
    ca = _certificate(ca_name, ca_key, ca_name, ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    hosts = list(dict.fromkeys([host, "localhost", "127.0.0.1", "::1"]))
    server = _certificate(_name(host), server_key, ca_name, ca_key, ca=False,
                          usage=ExtendedKeyUsageOID.SERVER_AUTH, alt_names=_alt_names(hosts))
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _certificate(_name(f"qfram client of {host}"), client_key, ca_name, ca_key,
                          ca=False, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    contents = [_pem(ca), _pem(server), _key_pem(server_key), _pem(client),
                _key_pem(client_key)]
    folder = Directory(directory)
    try:
        for name, data in zip(FILES, contents):
            # a key is never readable by others, not even for a moment
            with NewFile(folder, name, mode=0o600 if name.endswith("-key.pem") else 0o644) \
                    as out:
                os.fchmod(out.fd, 0o600 if name.endswith("-key.pem") else 0o644)
                os.write(out.fd, data)
                out.commit()
    finally:
        folder.close()
    return paths
