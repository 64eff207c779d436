"""The TF Serving gRPC client against a real `esp serve`: results, labels, big batches, errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import grpc
import pytest

from esp.scoring import ModelNotFound, ModelRejected, ModelServerError, score_batch
from esp.contracts import Comment
from esp.fault_proxy import FaultProxy, Rule
from serving.client import PREDICT_METHOD, TFServingScorer
from serving.saved_model import SavedModelScorer
from tests.fixtures.model_server import model_client_settings
from tests.fixtures.models import MAX_SEQ_LENGTH, TEST_LABELS, TEST_THRESHOLDS

TEXTS = [
    "You are a complete idiot and everyone knows it.",
    "Thanks for the thoughtful edit, I learned something.",
    "I will find you.",
    "Ünïcödé tëxt, emoji 🙂 and a non-breaking\u00a0space",
    " ".join(["supercalifragilistic"] * 40),  # far over MAX_SEQ_LENGTH word pieces
    "ok",
]


@pytest.fixture(scope="module")
def local_scorer(test_model_base):
    scorer = SavedModelScorer(test_model_base)
    yield scorer
    scorer.close()


@pytest.fixture
def scorer(model_server):
    scorer = TFServingScorer.from_settings(model_client_settings(model_server))
    yield scorer
    scorer.close()


def test_predict_matches_the_in_process_model(scorer, local_scorer):
    remote = scorer.predict(TEXTS)
    local = local_scorer.predict(TEXTS)
    assert remote.model_version == local.model_version == 1
    assert remote.labels == local.labels
    assert len(remote.probabilities) == len(TEXTS)
    for r_row, l_row in zip(remote.probabilities, local.probabilities):
        assert r_row == pytest.approx(l_row, abs=1e-5)
    # Scores differ between texts: the comparison above is not between constants.
    assert len({round(row[0], 4) for row in remote.probabilities}) > 3
    assert remote.truncated == local.truncated
    assert remote.truncated[4] is True and remote.truncated[0] is False
    assert remote.thresholds == pytest.approx(local.thresholds)


def test_single_rows_match_the_batch(scorer):
    batch = scorer.predict(TEXTS)
    for i, text in enumerate(TEXTS):
        assert scorer.predict([text]).probabilities[0] == pytest.approx(batch.probabilities[i], abs=1e-5)


def test_labels_and_thresholds_come_from_the_model(scorer):
    assert set(scorer.labels()) == set(TEST_LABELS)
    assert scorer.check_ready() == 1
    out = scorer.predict(["hello"])
    assert out.labels == tuple(sorted(TEST_LABELS))
    assert out.thresholds == pytest.approx(TEST_THRESHOLDS)


def test_score_batch_through_the_client(scorer):
    comments = [Comment(id=f"c{i}", text=t) for i, t in enumerate(TEXTS)]
    scores = score_batch(scorer, comments)
    assert [s.id for s in scores] == [c.id for c in comments]
    assert all(s.model_version == 1 and set(s.probabilities) == set(TEST_LABELS) for s in scores)


def test_a_thousand_strings(scorer, local_scorer):
    texts = [f"comment number {i}: {TEXTS[i % len(TEXTS)]}" for i in range(1000)]
    out = scorer.predict(texts)
    assert len(out.probabilities) == 1000 and len(out.truncated) == 1000
    local = local_scorer.predict(texts[:50])
    for r_row, l_row in zip(out.probabilities[:50], local.probabilities):
        assert r_row == pytest.approx(l_row, abs=1e-5)


def test_a_request_over_4_mib(model_server):
    # 300 texts of 16 KiB: ~4.7 MiB on the wire, over gRPC's default 4 MiB receive limit. Tokenising
    # them takes the model seconds on a busy 2-core machine: the deadline is about size, not speed.
    texts = [(f"text {i} " + "lorem ipsum dolor sit amet " * 700)[: 16 * 1024] for i in range(300)]
    assert sum(len(t) for t in texts) > 4 * 1024 * 1024
    with TFServingScorer.from_settings(model_client_settings(model_server, model_timeout_s=60.0, model_retry_budget_s=60.0)) as scorer:
        out = scorer.predict(texts)
    assert len(out.probabilities) == 300
    assert all(out.truncated)


def test_empty_batch_is_an_empty_answer(scorer):
    out = scorer.predict([])
    assert out.probabilities == [] and out.truncated == []
    assert out.model_version == 1
    assert set(out.labels) == set(TEST_LABELS)


def test_unknown_model_is_not_found(model_server):
    with TFServingScorer(model_server.target, model_name="no-such-model", retry_budget_s=1.0) as scorer:
        with pytest.raises(ModelNotFound, match="no-such-model"):
            scorer.predict(["hi"])
        with pytest.raises(ModelNotFound):
            scorer.check_ready()


def test_unknown_version_and_label_are_not_found(model_server):
    with TFServingScorer(model_server.target, model_version=99) as scorer:
        with pytest.raises(ModelNotFound, match="99"):
            scorer.predict(["hi"])
    with TFServingScorer(model_server.target, version_label="canary") as scorer:
        # TF Serving answers INVALID_ARGUMENT for an unknown label; the client calls it what it is.
        with pytest.raises(ModelNotFound, match="canary"):
            scorer.predict(["hi"])


def test_unknown_signature_is_not_found(model_server):
    with TFServingScorer(model_server.target, signature_name="nope") as scorer:
        with pytest.raises(ModelNotFound, match="nope"):
            scorer.predict(["hi"])


def test_server_keeps_serving_after_errors(scorer, model_server):
    before = scorer.predict(TEXTS[:2])
    with TFServingScorer(model_server.target, model_name="missing") as bad:
        with pytest.raises(ModelNotFound):
            bad.predict(["x"])
    after = scorer.predict(TEXTS[:2])
    for a, b in zip(after.probabilities, before.probabilities):
        assert a == pytest.approx(b, abs=1e-6)


def test_rejected_input_is_model_rejected(tmp_path, start_model_server):
    from tests.fixtures.models import export_test_model

    export_test_model(tmp_path / "bert", 1, reject_marker="POISON")
    server = start_model_server(tmp_path / "bert")
    with TFServingScorer(server.target) as scorer:
        with pytest.raises(ModelRejected, match="POISON"):
            scorer.predict(["fine", "this is POISON"])
        assert len(scorer.predict(["fine", "also fine"]).probabilities) == 2


@pytest.mark.parametrize("code", [grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN])
def test_a_server_failing_on_an_input_is_ambiguous_not_an_outage(model_server, code):
    # TF Serving answers INTERNAL/UNKNOWN when an op breaks on one input (or on every input): the
    # canary must decide, so it is never ModelUnavailable (which pauses and retries forever).
    proxy = FaultProxy(model_server.target).start()
    try:
        proxy.add(Rule(PREDICT_METHOD, code, "injected: op failed on this input", matches=lambda request: b"<<op-fails>>" in request))
        with TFServingScorer.from_settings(model_client_settings(model_server, model_server=proxy.host)) as scorer:
            with pytest.raises(ModelServerError, match=code.name):
                scorer.predict(["fine", "this one <<op-fails>>"])
            assert len(scorer.predict(["fine", "also fine"]).probabilities) == 2
    finally:
        proxy.stop()


def test_importing_the_client_does_not_load_tensorflow():
    code = textwrap.dedent(
        """
        import sys
        import serving.client
        import esp.scoring
        heavy = sorted(m for m in ("tensorflow", "tensorflow_serving", "numpy", "apache_beam") if m in sys.modules)
        print(",".join(heavy))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == ""


def test_truncation_limit_is_the_models(local_scorer):
    short = " ".join(["a"] * (MAX_SEQ_LENGTH - 1))
    long = " ".join(["a"] * (MAX_SEQ_LENGTH + 1))
    assert local_scorer.predict([short, long]).truncated == [False, True]


def test_client_settings_validate_and_build_a_scorer(tmp_path):
    from esp.errors import ConfigError
    from esp.settings import ModelClientSettings, from_env

    with pytest.raises(ConfigError, match="not both"):
        from_env(ModelClientSettings, {"ESP_MODEL_VERSION": "2", "ESP_MODEL_VERSION_LABEL": "stable"})
    with pytest.raises(ConfigError, match="key=value"):
        from_env(ModelClientSettings, {"ESP_MODEL_CALL_METADATA": "novalue"})
    settings = from_env(
        ModelClientSettings,
        {"ESP_MODEL_SERVER": "127.0.0.1:1", "ESP_MODEL_VERSION_LABEL": "canary",
         "ESP_MODEL_CALL_METADATA": "Authorization=Bearer t0k, x-team=esp"},
    )
    assert settings.call_metadata() == (("authorization", "Bearer t0k"), ("x-team", "esp"))
    with TFServingScorer.from_settings(settings) as scorer:
        assert "label 'canary'" in scorer.describe() and "127.0.0.1:1" in scorer.describe()
    missing = ModelClientSettings(model_tls_root_certs=str(tmp_path / "none.pem"))
    with pytest.raises(ConfigError, match="TLS root certificates"):
        TFServingScorer.from_settings(missing)
