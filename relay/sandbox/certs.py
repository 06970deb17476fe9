"""Throwaway certificate authorities and server certificates for the loopback sandboxes.

`SandboxPKI.create` makes two certificate authorities with trustme: a trusted one,
whose certificate goes into `ca_file` (the bundle the relay is told to trust), and
an untrusted one that no client is ever told about. From them it issues one server
certificate per `CertificateKind`, so a test can point the relay at a sandbox that
presents a good certificate, one for the wrong host name, one from an unknown CA or
an expired one, and check that only the good one is accepted.
"""

from __future__ import annotations

import datetime
import enum
import ssl
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import trustme

# The names a client may use to reach a sandbox bound to loopback.
LOOPBACK_IDENTITIES = ("localhost", "127.0.0.1", "::1")

# A host name no sandbox is reachable under, for the wrong-host certificate.
WRONG_HOST_IDENTITY = "wrong.example"


class CertificateKind(enum.StrEnum):
    """Which certificate a sandbox server presents."""

    # Issued by the trusted CA for localhost, 127.0.0.1 and ::1.
    GOOD = "good"
    # Issued by the trusted CA, but only for wrong.example.
    WRONG_HOST = "wrong_host"
    # Issued for the loopback names by a second CA that is not in `ca_file`.
    UNTRUSTED = "untrusted"
    # Issued by the trusted CA for the loopback names, but its notAfter has passed.
    EXPIRED = "expired"


@dataclass(frozen=True)
class ServerCertificate:
    """The PEM files of one server certificate: its chain and its private key."""

    chain_file: Path
    key_file: Path


@dataclass(frozen=True)
class SandboxPKI:
    """The sandbox's certificate authorities and server certificates, written as PEM.

    Build it with `SandboxPKI.create(directory)`; the constructor only records paths.
    """

    directory: Path
    # The trusted CA certificate: the bundle the relay and the tests trust.
    ca_file: Path
    # The CA behind the `untrusted` certificate; nothing trusts it.
    untrusted_ca_file: Path
    certificates: Mapping[CertificateKind, ServerCertificate]

    @classmethod
    def create(cls, directory: Path) -> SandboxPKI:
        """Generate both CAs and every kind of server certificate into `directory`."""
        directory.mkdir(parents=True, exist_ok=True)
        trusted_ca = trustme.CA()
        untrusted_ca = trustme.CA()
        now = datetime.datetime.now(datetime.UTC)

        ca_file = directory / "ca.pem"
        trusted_ca.cert_pem.write_to_path(str(ca_file))
        untrusted_ca_file = directory / "untrusted-ca.pem"
        untrusted_ca.cert_pem.write_to_path(str(untrusted_ca_file))

        leaves = {
            CertificateKind.GOOD: trusted_ca.issue_cert(*LOOPBACK_IDENTITIES),
            CertificateKind.WRONG_HOST: trusted_ca.issue_cert(WRONG_HOST_IDENTITY),
            CertificateKind.UNTRUSTED: untrusted_ca.issue_cert(*LOOPBACK_IDENTITIES),
            CertificateKind.EXPIRED: trusted_ca.issue_cert(
                *LOOPBACK_IDENTITIES,
                not_before=now - datetime.timedelta(days=30),
                not_after=now - datetime.timedelta(days=1),
            ),
        }
        certificates: dict[CertificateKind, ServerCertificate] = {}
        for kind, leaf in leaves.items():
            chain_file = directory / f"{kind.value}-chain.pem"
            chain_file.write_bytes(
                b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
            )
            key_file = directory / f"{kind.value}-key.pem"
            key_file.touch(mode=0o600)
            key_file.write_bytes(leaf.private_key_pem.bytes())
            certificates[kind] = ServerCertificate(
                chain_file=chain_file, key_file=key_file
            )

        return cls(
            directory=directory,
            ca_file=ca_file,
            untrusted_ca_file=untrusted_ca_file,
            certificates=MappingProxyType(certificates),
        )

    def server_context(
        self,
        kind: CertificateKind | str = CertificateKind.GOOD,
        *,
        maximum_version: ssl.TLSVersion | None = None,
    ) -> ssl.SSLContext:
        """Return a server-side TLS context presenting the certificate of `kind`.

        `maximum_version` caps the protocol, for downgrade tests: a server capped at
        TLS 1.1 offers exactly that version at OpenSSL security level 0,
        because OpenSSL 3 refuses TLS 1.0/1.1 at the default level. Some OpenSSL
        builds refuse them at every level; then the handshake simply fails, which is
        the outcome those tests expect from a correct client anyway.
        """
        certificate = self.certificates[CertificateKind(kind)]

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        # Exchange Online's floor, so a sandbox never accepts less than the real one.
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if maximum_version is not None and maximum_version < ssl.TLSVersion.TLSv1_2:
            # Offering a deprecated version is the point of a downgrade test, so
            # Python's DeprecationWarning about it is noise here.
            context.set_ciphers("DEFAULT:@SECLEVEL=0")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                context.minimum_version = maximum_version
                context.maximum_version = maximum_version
        elif maximum_version is not None:
            context.maximum_version = maximum_version
        context.load_cert_chain(certificate.chain_file, certificate.key_file)

        return context

    def client_trust_context(self) -> ssl.SSLContext:
        """Return a verifying client context that trusts only the sandbox's CA."""
        return ssl.create_default_context(cafile=str(self.ca_file))
