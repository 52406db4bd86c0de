"""Certificates for the TLS tests, made on the fly by trustme: no key material is committed.

:class:`TLSKit` is a CA with a server certificate for ``localhost`` and
127.0.0.1, written as PEM files into a directory of the test's own, plus
helpers to issue more (other serials, expired, from another CA) and to build
client contexts that trust the CA.
"""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path

import trustme
from cryptography import x509


class TLSKit:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.ca = trustme.CA()
        self.ca_file = directory / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self._count = 0
        self.cert, self.key = self.issue("localhost", "127.0.0.1")

    def issue(
        self,
        *identities: str,
        ca: trustme.CA | None = None,
        common_name: str | None = None,
        not_after: datetime.datetime | None = None,
        not_before: datetime.datetime | None = None,
    ) -> tuple[Path, Path]:
        """A new certificate and its key as files: (chain PEM, key PEM)."""
        self._count += 1
        leaf = (ca or self.ca).issue_cert(
            *identities, common_name=common_name, not_after=not_after, not_before=not_before
        )
        cert = self.dir / f"cert{self._count}.pem"
        key = self.dir / f"key{self._count}.pem"
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(key))
        return cert, key

    def client_context(
        self, cert: tuple[Path, Path] | None = None, max_version: ssl.TLSVersion | None = None
    ) -> ssl.SSLContext:
        """A client context that trusts the kit's CA, presenting ``cert`` if given."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        if cert is not None:
            context.load_cert_chain(cert[0], cert[1])
        if max_version is not None:
            context.maximum_version = max_version
        return context


def serial_of(cert: Path) -> int:
    """The serial number of the first certificate in a PEM file."""
    return x509.load_pem_x509_certificate(cert.read_bytes()).serial_number
