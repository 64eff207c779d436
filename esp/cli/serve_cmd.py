"""`esp serve` (a local TF-Serving-compatible model server) and `esp score TEXT...` (score strings).

Runnable on its own too (`python -m esp.cli.serve_cmd ...` is `esp serve ...`), which is how
serving.local starts servers for tests, the demo and benchmarks.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import click

from esp.settings import LogSettings, ModelClientSettings, ModelServerSettings, build, click_options


def _read_pem(path: str | None, option: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise click.BadParameter(f"cannot read {path}: {exc.strerror}", param_hint=option) from None

_CLIENT_FIELDS = tuple(f.name for f in dataclasses.fields(ModelClientSettings))


@click.command()
@click_options(ModelServerSettings)
@click_options(ModelClientSettings, exclude=tuple(n for n in _CLIENT_FIELDS if n != "model_name"))
@click_options(LogSettings)
def serve(**options: object) -> None:
    """Serve SavedModels over TF Serving's gRPC API (Predict, GetModelMetadata, GetModelStatus).

    Stands in for TF Serving where it cannot be installed: the same SavedModel layout
    (<base>/<version>/), version policies and labels (--model-config-file in TF Serving's format),
    warmup, status codes and batching parameters. Prints "serving model NAME version N on
    HOST:PORT" once every model has a version taking traffic; stops cleanly on SIGTERM.
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
        sources = read_model_config(settings.model_config_file)
    else:
        base = os.path.abspath(str(settings.model_base_path))
        if not os.path.isdir(base):
            raise click.BadParameter(f"{base} is not a directory", param_hint="--model-base-path")
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
        tls_cert_chain=_read_pem(settings.tls_cert_file, "--tls-cert-file"),
        tls_private_key=_read_pem(settings.tls_key_file, "--tls-key-file"),
        required_metadata=settings.required_metadata(),
    )
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

    serve_forever(ModelServer(config), on_ready=announce, on_change=changed)
    # Drained and stopped. Skip the interpreter's TensorFlow teardown, which takes seconds and
    # has nothing left to flush: a restarting pod or test fixture should not wait for it.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


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
    width = max(8, *(len(label) for label in output.labels))
    header = "  ".join(f"{label:>{width}}" for label in output.labels)
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
    serve()
