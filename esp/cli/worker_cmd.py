"""`esp worker run`: the scoring worker (Pub/Sub comments -> micro-batches -> model -> scores)."""

from __future__ import annotations

import click

from esp.settings import BatchingSettings, CommentSettings, LogSettings, ModelClientSettings, PubSubSettings, build, click_options
from esp.settings.worker import WorkerSettings


@click.group()
def worker() -> None:
    """The scoring worker."""


@worker.command("run")
@click_options(PubSubSettings)
@click_options(ModelClientSettings)
@click_options(WorkerSettings)
@click_options(BatchingSettings)
@click_options(CommentSettings)
@click_options(LogSettings)
def run(**values: object) -> int:
    """Score comments from the comments subscription until SIGTERM/SIGINT.

    Pulls with bounded outstanding messages and bytes, validates (poison goes to the dead-letter
    topic with its reason), scores in micro-batches through TF Serving over gRPC (or an in-process
    SavedModel with --backend saved_model), publishes one score per comment and acks it only after
    that publish is confirmed. While the model server is down it pauses, holds its leases and
    reports not ready on /readyz; an unavailable scores or dead-letter topic pauses it the same
    way. On SIGTERM it stops pulling, finishes in-flight batches within --shutdown-grace-s, nacks
    the rest and exits 0 (within the grace plus 8 s). If a worker thread dies, /healthz fails and it
    exits 1. Serves /metrics, /healthz and /readyz on --metrics-port.
    """
    import signal

    from esp.logs import configure_logging
    from worker.backends import build_scorer
    from worker.service import Worker

    logs = build(LogSettings, values)
    configure_logging(logs)
    pubsub = build(PubSubSettings, values)
    client = build(ModelClientSettings, values)
    settings = build(WorkerSettings, values)
    batching = build(BatchingSettings, values)
    comments = build(CommentSettings, values)

    scorer, probe = build_scorer(settings, client, batching)
    try:
        service = Worker(scorer, pubsub=pubsub, settings=settings, batching=batching, comments=comments, probe=probe)
        signal.signal(signal.SIGTERM, lambda signum, frame: service.request_stop())
        signal.signal(signal.SIGINT, lambda signum, frame: service.request_stop())
        return service.run()
    finally:
        scorer.close()
