"""Builds the worker's Scorer from settings: TF Serving over gRPC (default) or an in-process SavedModel.

One Scorer interface for both (STYLE.md points 1-2). The TF Serving path imports only ESP's own
protobufs and grpc, never TensorFlow (6 s and ~620 MiB, DESIGN.md), so a worker pod stays small
and starts fast; only `--backend saved_model` loads TensorFlow, lazily, here.
"""

from __future__ import annotations

from collections.abc import Callable

from esp.scoring import Scorer
from esp.settings import BatchingSettings, ModelClientSettings
from esp.settings.worker import WorkerSettings
from serving.scorers import make_scorer


def build_scorer(
    worker: WorkerSettings, client: ModelClientSettings, batching: BatchingSettings
) -> tuple[Scorer, Callable[[], object]]:
    """The scorer and its readiness probe (raises while the model cannot serve)."""
    # The client retries UNAVAILABLE inside its own budget before raising. The engine has its own
    # retry loop that also pauses pulling and reports not ready, so the client's budget is capped at
    # the engine's longest backoff: a blip is absorbed by the client, an outage is seen by the worker
    # within seconds instead of after the client's whole budget.
    scorer = make_scorer(
        worker.backend,
        client,
        saved_model_dir=worker.saved_model_dir,
        retry_budget_s=min(client.model_retry_budget_s, batching.retry_max_backoff_s),
    )
    return scorer, scorer.check_ready  # type: ignore[attr-defined]
