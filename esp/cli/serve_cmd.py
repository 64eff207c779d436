"""`esp serve` (a local TF-Serving-compatible model server) and `esp score TEXT...` (score strings).

Runnable on its own too (`python -m esp.cli.serve_cmd ...` is `esp serve ...`), which is how
serving.local starts servers for tests, the demo and benchmarks.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
from pathlib import Path

import click

from esp.errors import ConfigError, EspError
from esp.settings import LogSettings, ModelClientSettings, ModelServerSettings, build, click_options


def _read_pem(path: str | None, option: str) -> bytes | None:
    if path is None:
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{option}: cannot read {path}: {exc.strerror}") from None
    _check_pem(data, f"{option} {path}")
    return data


def _check_pem(data: bytes, what: str) -> None:
    # gRPC would only fail later, when binding the port, with no word about which file is wrong.
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{what} is not a PEM file")


def _read_text_proto(path: str, message: object, what: str) -> None:
    from google.protobuf import text_format

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path} is not a text file") from None
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as exc:
        raise ConfigError(f"{what} {path}: {exc}") from None


def _check_port_free(host: str, port: int, what: str) -> None:
    """Fails at once on a port in use, before TensorFlow takes seconds to load; binding it for
    real later still catches a port taken in between."""
    if port == 0:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        # As the servers bind: a port left in TIME_WAIT is free, one with a listener is not.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port} for {what}: {exc.strerror}") from None


def _monitoring_path(path: str | None) -> str | None:
    """The Prometheus path of a TF Serving MonitoringConfig, or None when it does not enable one."""
    if path is None:
        return None
    from serving.tf_serving_configs import monitoring_config

    config = monitoring_config()
    _read_text_proto(path, config, "monitoring config")
    if not config.prometheus_config.enable:
        return None
    # TF Serving's default path (util/prometheus_exporter.h) when the config names none.
    return config.prometheus_config.path or "/monitoring/prometheus/metrics"


def _tls(settings: ModelServerSettings) -> tuple[bytes | None, bytes | None, bytes | None, bool]:
    """(cert chain, key, client CA, require client auth), from --tls-cert-file/--tls-key-file or
    from TF Serving's SSLConfig (--ssl-config-file); all None for plaintext."""
    if settings.ssl_config_file is None:
        cert = _read_pem(settings.tls_cert_file, "--tls-cert-file")
        return cert, _read_pem(settings.tls_key_file, "--tls-key-file"), None, False
    from serving.tf_serving_configs import ssl_config

    config = ssl_config()
    what = f"SSL config {settings.ssl_config_file}"
    _read_text_proto(settings.ssl_config_file, config, "SSL config")
    if not config.server_key or not config.server_cert:
        raise ConfigError(f"{what}: needs server_key and server_cert")
    _check_pem(config.server_key.encode(), f"{what}: server_key")
    _check_pem(config.server_cert.encode(), f"{what}: server_cert")
    if config.custom_ca:
        _check_pem(config.custom_ca.encode(), f"{what}: custom_ca")
    if config.client_verify and not config.custom_ca:
        raise ConfigError(f"{what}: client_verify needs custom_ca")
    return config.server_cert.encode(), config.server_key.encode(), config.custom_ca.encode() or None, config.client_verify


_CLIENT_FIELDS = tuple(f.name for f in dataclasses.fields(ModelClientSettings))


@click.command()
@click_options(ModelServerSettings)
@click_options(ModelClientSettings, exclude=tuple(n for n in _CLIENT_FIELDS if n != "model_name"))
@click_options(LogSettings)
def serve(**options: object) -> None:
    """Serve SavedModels over TF Serving's gRPC API (Predict, GetModelMetadata, GetModelStatus).

    Stands in for TF Serving where it cannot be installed: the same SavedModel layout
    (<base>/<version>/), version policies and labels (--model-config-file in TF Serving's format),
    warmup, status codes and batching parameters, TF Serving's REST model status and Prometheus
    page (--rest-api-port, --monitoring-config-file), its gRPC server arguments and SSL config.
    Prints "serving model NAME version N on HOST:PORT" once every model has a version taking
    traffic; stops cleanly on SIGTERM, and exits non-zero if a part of it dies.
    """
    import logging

    from esp.logs import configure_logging

    configure_logging(build(LogSettings, options))
    settings = build(ModelServerSettings, options)
    model_name = str(options["model_name"])

    # TensorFlow and the server load only now: `esp --help` stays fast.
    from serving.batching import BatchingOptions
    from serving.model_config import ModelSource, read_batching_parameters, read_model_config

    if settings.model_config_file:
        sources = read_model_config(settings.model_config_file, gcs_local_dir=settings.gcs_local_dir)
    else:
        base = os.path.abspath(str(settings.model_base_path))
        if not os.path.isdir(base):
            raise ConfigError(f"--model-base-path {base} is not a directory")
        sources = [ModelSource(model_name, base)]
    batching = None
    if settings.enable_batching:
        batching = BatchingOptions(
            max_batch_size=settings.max_batch_size,
            batch_timeout_micros=settings.batch_timeout_micros,
            num_batch_threads=settings.num_batch_threads or (os.cpu_count() or 1),
            max_enqueued_batches=settings.max_enqueued_batches,
            enable_large_batch_splitting=settings.enable_large_batch_splitting,
            max_execution_batch_size=settings.max_execution_batch_size,
        )
        if settings.batching_parameters_file:
            batching = read_batching_parameters(settings.batching_parameters_file, batching)
    # Every file is read, and every port tried, before TensorFlow loads: a wrong path or a port
    # in use fails in a moment, not after seconds.
    cert, key, client_ca, require_client_auth = _tls(settings)
    monitoring_path = _monitoring_path(settings.monitoring_config_file)
    for port, what in ((settings.port, "gRPC"), (settings.rest_api_port, "the REST API"), (settings.metrics_port, "metrics")):
        _check_port_free(settings.bind_host, port, what)
    from serving.server import ModelServer, ServerConfig, serve_forever

    config = ServerConfig(
        sources=sources,
        config_file=settings.model_config_file,
        host=settings.bind_host,
        port=settings.port,
        metrics_port=settings.metrics_port,
        poll_wait_s=settings.file_system_poll_wait_s,
        config_poll_wait_s=settings.model_config_file_poll_wait_s,
        threads=settings.server_threads,
        max_message_bytes=settings.max_message_bytes,
        batching=batching,
        required_metadata=settings.required_metadata(),
        rest_port=settings.rest_api_port,
        monitoring_path=monitoring_path,
        channel_arguments=settings.channel_arguments(),
        gcs_local_dir=settings.gcs_local_dir,
        tls_cert_chain=cert,
        tls_private_key=key,
        tls_client_ca=client_ca,
        tls_require_client_auth=require_client_auth,
    )
    if settings.monitoring_config_file and not settings.rest_api_port:
        logging.getLogger("esp.serve").warning("--monitoring-config-file needs --rest-api-port (as in TF Serving): no metrics page")
    log = logging.getLogger("esp.serve")

    def announce(server: ModelServer) -> None:
        for name, model in sorted(server.manager.models.items()):
            versions = model.available_versions()
            labels = ", ".join(f"{k}={v}" for k, v in sorted(model.source.labels.items()))
            shown = " ".join(str(v) for v in versions)
            click.echo(
                f"serving model {name} version {shown} on {settings.bind_host}:{server.port}"
                + (f" (labels {labels})" if labels else ""),
            )
        if batching:
            log.info("server-side batching on: %s", batching)

    def changed(server: ModelServer) -> None:
        for name, model in sorted(server.manager.models.items()):
            log.info("model %s now serves versions %s", name, model.available_versions())

    code = 0
    try:
        failure = serve_forever(ModelServer(config), on_ready=announce, on_change=changed)
    except EspError as exc:  # a start-up failure (a port in use): one line, as the `esp` group prints it
        click.echo(f"esp: error: {exc}", err=True)
        code = exc.exit_code
    else:
        if failure is not None:
            click.echo(f"esp: error: esp serve stopped: {failure}", err=True)
            code = EspError.exit_code
    # Drained and stopped. Skip the interpreter's TensorFlow teardown, which takes seconds and
    # has nothing left to flush: a restarting pod or test fixture should not wait for it.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@click.command()
@click.argument("texts", nargs=-1, required=True)
@click.option("--saved-model", type=click.Path(exists=True, file_okay=False),
              help="Score in this process with the SavedModel at this base path (or version directory) instead.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per text.")
@click_options(ModelClientSettings)
def score(texts: tuple[str, ...], saved_model: str | None, as_json: bool, **options: object) -> None:
    """Score TEXTS with the model server (or a local SavedModel) and print a table."""
    import json

    from esp.scoring import ScoringError

    settings = build(ModelClientSettings, options)
    from serving.scorers import make_scorer

    scorer = make_scorer("saved_model" if saved_model else "tfserving", settings, saved_model_dir=saved_model)
    try:
        output = scorer.predict(list(texts))
    except ScoringError as exc:
        from esp.errors import EspError

        raise EspError(str(exc)) from None
    finally:
        scorer.close()
    if as_json:
        for text, row, trunc in zip(texts, output.probabilities, output.truncated):
            scores = {label: round(float(p), 6) for label, p in zip(output.labels, row)}
            flags = [label for label, p in scores.items() if p >= output.thresholds[label]]
            click.echo(json.dumps({"text": text, "scores": scores, "flags": flags, "truncated": bool(trunc),
                                   "model": {"name": output.model_name, "version": output.model_version}}))
        return
    click.echo(f"model {output.model_name} version {output.model_version}")
    # Label names are the model's output keys, which TensorFlow lets be anything: escaped, a
    # newline cannot break the table nor an escape sequence drive the terminal.
    from esp.dead_letters.formatting import printable

    names = [printable(label) for label in output.labels]
    width = max(8, *(len(name) for name in names))
    header = "  ".join(f"{name:>{width}}" for name in names)
    click.echo(f"{header}  text")
    for text, row, trunc in zip(texts, output.probabilities, output.truncated):
        cells = []
        for label, p in zip(output.labels, row):
            mark = "*" if p >= output.thresholds[label] else " "
            cells.append(f"{p:>{width - 1}.3f}{mark}")
        shown = text if len(text) <= 60 else text[:57] + "..."
        click.echo("  ".join(cells) + f"  {shown}" + (" [truncated]" if trunc else ""))
    click.echo("* = at or above the model's threshold for that label")


if __name__ == "__main__":
    # Through the `esp` group, so errors end in one line and an exit code, as `esp serve` does.
    from esp.cli.main import cli

    cli(["serve", *sys.argv[1:]], prog_name="esp")
