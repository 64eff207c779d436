"""Which Scorer to build from settings: the one place the backends are chosen.

The worker, `esp score` and the Beam backfill all call `make_scorer`, so a backend option (the
signature, the version, TLS) cannot be honoured by one of them and forgotten by another. Imports
are lazy: the TF Serving path never loads TensorFlow.
"""

from __future__ import annotations

from esp.errors import ConfigError
from esp.scoring import Scorer
from esp.settings import ModelClientSettings

BACKENDS = ("tfserving", "saved_model")


def make_scorer(
    backend: str,
    client: ModelClientSettings,
    *,
    saved_model_dir: str | None = None,
    retry_budget_s: float | None = None,
) -> Scorer:
    """TF Serving over gRPC (`tfserving`) or the SavedModel loaded in this process (`saved_model`).

    `retry_budget_s` overrides the client's budget for callers with a retry loop of their own.
    """
    check_options(backend, client, saved_model_dir)
    if backend == "tfserving":
        from serving.client import TFServingScorer

        overrides = {} if retry_budget_s is None else {"retry_budget_s": retry_budget_s}
        return TFServingScorer.from_settings(client, **overrides)
    from serving.saved_model import SavedModelScorer

    return SavedModelScorer(
        saved_model_dir,
        version=client.model_version,
        model_name=client.model_name,
        signature_name=client.model_signature,
    )


def check_options(backend: str, client: ModelClientSettings, saved_model_dir: str | None) -> None:
    """Refuses backend options that cannot work together, before anything is loaded or started."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if backend == "saved_model":
        if client.model_version_label is not None:
            raise ConfigError("--model-version-label needs a model server; with --backend saved_model use --model-version")
        if not saved_model_dir:
            raise ConfigError("--backend saved_model needs --saved-model-dir")
