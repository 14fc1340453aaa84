"""TLS for the gRPC port: credentials from PEM files, checked before they are used.

Server (``adpredict serve --tls-cert FILE --tls-key FILE [--tls-client-ca FILE]``): the
certificate chain and its private key make the port TLS-only; with a client CA bundle it is
mutual TLS, and a client must present a certificate signed by one of those CAs. Health and
reflection share the port and its credentials.

Client (``adpredict predict --tls-ca FILE [--tls-cert FILE --tls-key FILE]``): the CA bundle
that signed the server's certificate (default: the system's roots), plus a client certificate
and key for mutual TLS.

gRPC itself reports an unusable file late and vaguely (a failed handshake, or a port that does
not bind), so every file is read and checked here with the standard library's ``ssl``: a
missing or unreadable file, a file that is not PEM, and a key that does not belong to the
certificate each raise ``error_class`` (``StartupError`` for the server) naming the file.
No TensorFlow and no third-party crypto package is needed.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc

from adpredict.errors import AdpredictError, StartupError

__all__ = ["channel_credentials", "server_credentials"]

_CERT_MARK = b"-----BEGIN CERTIFICATE-----"
_KEY_MARK = b"PRIVATE KEY-----"


def _read(path: str | Path, what: str, error_class: type[AdpredictError]) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise error_class(f"{what} {path}: cannot read it: {exc.strerror}") from None
    if not data.strip():
        raise error_class(f"{what} {path}: the file is empty")
    return data


def _check_certificates(
    data: bytes, path: str | Path, what: str, err: type[AdpredictError]
) -> None:
    if _CERT_MARK not in data:
        raise err(f"{what} {path}: not a PEM certificate (no '{_CERT_MARK.decode()}' block)")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cadata=data.decode("ascii", errors="replace"))
    except (ssl.SSLError, ValueError) as exc:
        raise err(f"{what} {path}: not a valid PEM certificate ({exc})") from None


def _check_pair(
    cert_file: str | Path, key_file: str | Path, key: bytes, err: type[AdpredictError]
) -> None:
    """The key must be a PEM private key matching the first certificate of the chain."""
    if _KEY_MARK not in key:
        raise err(f"TLS key {key_file}: not a PEM private key (no '... {_KEY_MARK.decode()}')")
    if b"ENCRYPTED" in key:
        raise err(f"TLS key {key_file}: the key is encrypted; gRPC needs an unencrypted key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(str(cert_file), str(key_file))
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise err(
                f"TLS key {key_file}: does not match the certificate in {cert_file}"
            ) from None
        raise err(f"TLS key {key_file} / certificate {cert_file}: unusable ({exc})") from None
    except OSError as exc:
        raise err(f"TLS key {key_file}: cannot read it: {exc.strerror}") from None


def _cert_and_key(
    cert_file: str | Path, key_file: str | Path, err: type[AdpredictError]
) -> tuple[bytes, bytes]:
    cert = _read(cert_file, "TLS certificate", err)
    key = _read(key_file, "TLS key", err)
    _check_certificates(cert, cert_file, "TLS certificate", err)
    _check_pair(cert_file, key_file, key, err)
    return cert, key


def server_credentials(
    cert_file: str | Path, key_file: str | Path, client_ca_file: str | Path | None = None
) -> grpc.ServerCredentials:
    """TLS credentials for a server port; with ``client_ca_file``, clients must present a
    certificate signed by one of its CAs (mutual TLS). ``StartupError`` names a bad file."""
    cert, key = _cert_and_key(cert_file, key_file, StartupError)
    client_ca = None
    if client_ca_file:
        client_ca = _read(client_ca_file, "TLS client CA", StartupError)
        _check_certificates(client_ca, client_ca_file, "TLS client CA", StartupError)
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def channel_credentials(
    ca_file: str | Path | None = None,
    cert_file: str | Path | None = None,
    key_file: str | Path | None = None,
    *,
    error_class: type[AdpredictError] = AdpredictError,
) -> grpc.ChannelCredentials:
    """TLS credentials for a client channel: trust ``ca_file`` (default: the system's roots)
    and, with ``cert_file`` and ``key_file``, present that certificate (mutual TLS)."""
    if bool(cert_file) != bool(key_file):
        raise error_class("a TLS client certificate and its key go together: give both or neither")
    ca = None
    if ca_file:
        ca = _read(ca_file, "TLS CA", error_class)
        _check_certificates(ca, ca_file, "TLS CA", error_class)
    cert = key = None
    if cert_file and key_file:
        cert, key = _cert_and_key(cert_file, key_file, error_class)
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )
