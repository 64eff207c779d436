"""TLS and per-call metadata, end to end: the client against `esp serve` started with a
certificate made here and a required auth header."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from esp.scoring import ModelUnavailable
from serving.client import TFServingScorer

AUTH = ("authorization", "Bearer test-token-7f3a")


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A throwaway certificate for 127.0.0.1 (IP SAN), so the client verifies the server for real."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "esp-serve-test")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "server.pem", tmp_path / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@pytest.fixture
def tls_server(tmp_path: Path, test_model_base: Path, start_model_server):  # type: ignore[no-untyped-def]
    cert, key = _self_signed(tmp_path)
    server = start_model_server(
        test_model_base,
        extra_args=["--tls-cert-file", str(cert), "--tls-key-file", str(key), "--required-call-metadata", "=".join(AUTH)],
        tls_root_certificates=cert.read_bytes(),
    )
    return server, cert.read_bytes()


def test_tls_and_call_metadata_end_to_end(tls_server) -> None:  # type: ignore[no-untyped-def]
    server, ca = tls_server
    with TFServingScorer(server.target, root_certificates=ca, call_metadata=(AUTH,), timeout_s=5, retry_budget_s=2) as scorer:
        out = scorer.predict(["a friendly comment", "another one"])
        assert len(out.probabilities) == 2 and out.model_version == 1


def test_missing_metadata_is_refused_and_says_why(tls_server) -> None:  # type: ignore[no-untyped-def]
    server, ca = tls_server
    with TFServingScorer(server.target, root_certificates=ca, timeout_s=5, retry_budget_s=1) as scorer:
        with pytest.raises(ModelUnavailable, match="UNAUTHENTICATED"):
            scorer.predict(["no token"])


def test_plaintext_client_cannot_talk_to_a_tls_server(tls_server) -> None:  # type: ignore[no-untyped-def]
    server, _ = tls_server
    with TFServingScorer(server.target, call_metadata=(AUTH,), timeout_s=2, retry_budget_s=1) as scorer:
        with pytest.raises(ModelUnavailable):
            scorer.predict(["plaintext"])
