"""TLS and per-call metadata, end to end: the client against `esp serve` started with a
certificate made here and a required auth header."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from esp.scoring import ModelUnavailable
from esp.localstack import free_port
from serving.client import TFServingScorer
from serving.local import ModelServerProcess
from tests.fixtures.tls import self_signed, ssl_config

AUTH = ("authorization", "Bearer test-token-7f3a")


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A throwaway certificate for 127.0.0.1 (IP SAN), so the client verifies the server for real."""
    cert, key = self_signed()
    cert_path, key_path = tmp_path / "server.pem", tmp_path / "server.key"
    cert_path.write_bytes(cert)
    key_path.write_bytes(key)
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


def test_tf_serving_ssl_config_file(tmp_path: Path, test_model_base: Path, start_model_server: Callable[..., ModelServerProcess]) -> None:
    """TF Serving's own TLS file (--ssl_config_file), PEMs inline, as the TLS component mounts it."""
    cert, key = self_signed(dns_names=("tf-serving.esp.svc.cluster.local",), ips=())
    config = tmp_path / "ssl.config"
    config.write_text(ssl_config(cert, key))
    server = start_model_server(
        test_model_base, extra_args=["--ssl-config-file", str(config)], tls_root_certificates=cert,
        tls_server_name="tf-serving.esp.svc.cluster.local",
    )
    # The certificate names the Service, not 127.0.0.1: the client checks that name.
    with TFServingScorer(
        server.target, root_certificates=cert, tls_server_name="tf-serving.esp.svc.cluster.local", timeout_s=5, retry_budget_s=2
    ) as scorer:
        assert scorer.predict(["hello"]).model_version == 1
    with TFServingScorer(server.target, root_certificates=cert, timeout_s=2, retry_budget_s=1) as wrong_name:
        with pytest.raises(ModelUnavailable):
            wrong_name.predict(["hello"])


def test_ssl_config_with_client_verify_refuses_a_client_without_a_certificate(
    tmp_path: Path, test_model_base: Path, start_model_server: Callable[..., ModelServerProcess]
) -> None:
    cert, key = self_signed()
    config = tmp_path / "ssl.config"
    config.write_text(ssl_config(cert, key, client_verify=True))
    # Without a client certificate nothing gets through gRPC, the health check included: ready by REST.
    server = start_model_server(test_model_base, extra_args=["--ssl-config-file", str(config)], rest_api_port=free_port())
    with TFServingScorer(server.target, root_certificates=cert, timeout_s=2, retry_budget_s=1) as scorer:
        with pytest.raises(ModelUnavailable):
            scorer.predict(["hello"])
