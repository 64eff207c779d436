"""Ready for a distributed runner: what Dataflow does to a pipeline, done here first.

- The multi-process DirectRunner pickles every DoFn and model handler and runs them in other
  processes, as Dataflow's workers do: the backfill (BigQuery in, BigQuery, files and the scores
  topic out) and `prepare-data` must survive it.
- The Dataflow job is built without the network (`--template_location`, as Beam's own tests do),
  and its steps are checked.
- The custom-container Dockerfile passes hadolint; the Flex Template spec names only real options.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import pytest

from beam_jobs.backfill import ATTR_RUN, ATTR_SOURCE, BackfillConfig, run
from esp.contracts import parse_score
from esp.settings import BackfillSettings
from serving.saved_model import SavedModelScorer
from tests.fixtures.bigquery import PROJECT
from tests.fixtures.pubsub import create_subscription, pull_until

REPO_ROOT = Path(__file__).resolve().parents[1]
MULTI_PROCESS = ["--runner=DirectRunner", "--direct_running_mode=multi_processing", "--direct_num_workers=2"]


def test_backfill_on_the_multi_process_runner(bigquery_emulator, bq_dataset: str, test_model_base: Path, pubsub_settings, tmp_path: Path) -> None:
    from google.cloud import bigquery

    from beam_jobs.bigquery import rest_client
    from esp.pubsub import publisher_client

    comments = {f"m{i:04d}": f"comment number {i}, {'you idiot' if i % 3 else 'thanks'}" for i in range(400)}

    rest = rest_client(bigquery_emulator.settings(), PROJECT)
    source = f"{bq_dataset}.comments"
    rest.create_table(bigquery.Table(source, schema=[bigquery.SchemaField("id", "STRING"), bigquery.SchemaField("text", "STRING")]))
    rows = [{"id": c, "text": t} for c, t in comments.items()] + [{"id": "bad", "text": ""}]
    assert not rest.insert_rows_json(source, rows)

    publisher = publisher_client(pubsub_settings)
    publisher.create_topic(request={"name": pubsub_settings.topic_path(pubsub_settings.scores_topic)})
    publisher.stop()
    create_subscription(pubsub_settings, pubsub_settings.scores_topic, "backfill-scores")

    config = BackfillConfig(
        bq_table=source,
        bq_scores_table=f"{bq_dataset}.scores",
        output=str(tmp_path / "out"),
        publish_scores=True,
        backend="saved_model",
        saved_model_dir=str(test_model_base),
        max_batch_size=16,
        bigquery=bigquery_emulator.settings(),
        backfill=BackfillSettings(tf_threads=1, progress_interval_s=0.5),
        pubsub=pubsub_settings,
    )
    summary = run(config, MULTI_PROCESS)
    assert (summary.read, summary.scored, summary.dead_lettered, summary.published, summary.merged) == (401, 400, 1, 400, 400)

    scorer = SavedModelScorer(test_model_base)
    out = scorer.predict(list(comments.values()))
    expected = {cid: dict(zip(out.labels, row)) for cid, row in zip(comments, out.probabilities)}
    table_rows = [dict(r) for r in rest.query(f"SELECT * FROM `{bq_dataset}.scores`").result()]
    assert len(table_rows) == 400
    for row in table_rows:
        assert {label: row[label] for label in out.labels} == pytest.approx(expected[row["id"]], abs=1e-5)

    messages = pull_until(pubsub_settings, "backfill-scores", 400, timeout_s=60)
    assert len(messages) == 400
    records = {}
    for m in messages:
        record = parse_score(m.message.data)  # the stream's own score record
        records[record["id"]] = record
        attrs = dict(m.message.attributes)
        assert attrs[ATTR_SOURCE] == "backfill" and attrs[ATTR_RUN] == config.run_id
        assert attrs["model_version"] == "1" and attrs["flagged"] in ("true", "false")
    assert set(records) == set(comments)
    assert all(records[c]["scores"] == pytest.approx(expected[c], abs=1e-5) for c in comments)

    file_ids = {json.loads(l)["id"] for f in (tmp_path / "out").glob("scores-*.jsonl") for l in f.read_text().splitlines()}
    assert file_ids == set(comments)
    rest.close()


def test_prepare_data_on_the_multi_process_runner(tmp_path: Path) -> None:
    from beam_jobs.prepare_data import PrepareConfig
    from beam_jobs.prepare_data import run as prepare

    labels = ("toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate")
    with open(tmp_path / "in.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "comment_text", *labels])
        for i in range(300):
            writer.writerow([f"r{i}", f"row {i}", "1" if i % 3 == 0 else "0", "0", "0", "0", "0", "0"])
        writer.writerow(["", "no id", *["0"] * 6])
    stats = prepare(PrepareConfig(input_patterns=(str(tmp_path / "in.csv"),), output_dir=str(tmp_path / "o")), MULTI_PROCESS)
    assert stats["rows"]["total"] == 300 and stats["rejects"] == {"missing_id": 1}
    assert sum(stats["rows"][s] for s in ("train", "dev", "test")) == 300


def _dataflow_job(tmp_path: Path, *source_and_sinks: str) -> tuple[dict, Any]:
    """Builds the Dataflow job offline; returns the job description and the pipeline proto it staged."""
    from apache_beam.portability.api import beam_runner_api_pb2

    template = tmp_path / "template.json"
    for folder in ("staging", "tmp"):  # Beam stages into local folders but does not create them
        (tmp_path / folder).mkdir(parents=True)
    result = subprocess.run(
        [sys.executable, "-m", "esp.cli.main", "backfill", *source_and_sinks, "--project", "my-project",
         "--backend", "saved_model", "--saved-model-dir", "gs://my-bucket/models/bert",
         "--runner=DataflowRunner", "--region=europe-west1", f"--template_location={template}",
         f"--staging_location={tmp_path / 'staging'}", f"--temp_location={tmp_path / 'tmp'}", "--no_auth",
         # A localhost endpoint is how Beam itself skips the gs:// checks of staging and temp locations
         # (PipelineOptionsValidator.is_service_runner); a template is written, nothing is submitted.
         "--dataflow_endpoint=http://localhost:1",
         f"--sdk_container_image={IMAGE}", "--sdk_location=container"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "job description written" in result.stdout
    job = json.loads(template.read_text())
    # Runner v2 keeps the graph in the staged pipeline proto that the job description points at.
    pipeline = beam_runner_api_pb2.Pipeline()
    pipeline.ParseFromString(Path(job["environment"]["sdkPipelineOptions"]["options"]["pipelineUrl"]).read_bytes())
    return job, pipeline


IMAGE = "europe-docker.pkg.dev/my-project/esp/backfill:1"


def _steps(pipeline: Any) -> set[str]:
    return {t.unique_name for t in pipeline.components.transforms.values() if "/" not in t.unique_name}


def test_dataflow_job_graph_is_built_offline(tmp_path: Path) -> None:
    from apache_beam.portability.api import beam_runner_api_pb2

    job, pipeline = _dataflow_job(
        tmp_path, "--bq-table", "my-project.history.comments", "--bq-scores-table", "my-project.scores.toxicity", "--publish-scores"
    )
    assert {"Source", "PlanRead", "SpreadStreams", "ReadStreams", "Validate", "Spread", "Score", "Split", "ScoreRows",
            "WriteStaging", "DeadLetterRows", "WriteDeadLetterRows", "FinalizeTrigger", "CommitAndMerge",
            "PublishScores"} <= _steps(pipeline)
    options = job["environment"]["sdkPipelineOptions"]["options"]
    assert options["project"] == "my-project" and options["region"] == "europe-west1"
    (environment,) = pipeline.components.environments.values()
    docker = beam_runner_api_pb2.DockerPayload()
    docker.ParseFromString(environment.payload)
    assert docker.container_image == IMAGE, "workers run the custom container"
    # Every DoFn was pickled into the graph (a DoFn that cannot be pickled fails the build here).
    pardos = [t for t in pipeline.components.transforms.values() if t.spec.urn == "beam:transform:pardo:v1"]
    assert len(pardos) >= 8

    _, files = _dataflow_job(tmp_path / "files", "--input", "gs://my-bucket/comments/*.jsonl.gz", "--output", "gs://my-bucket/scores")
    assert {"ReadFiles", "Validate", "Spread", "Score", "WriteScores", "WriteDeadLetters"} <= _steps(files)


def test_dockerfile_passes_hadolint() -> None:
    dockerfile = REPO_ROOT / "beam_jobs" / "Dockerfile"
    text = dockerfile.read_text()
    assert "FROM apache/beam_python3.11_sdk:2.77.0" in text
    result = subprocess.run([str(Path(sys.executable).parent / "hadolint"), str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_flex_template_parameters_are_backfill_options() -> None:
    from esp.cli.backfill_cmd import backfill

    spec = json.loads((REPO_ROOT / "beam_jobs" / "flex-template" / "metadata.json").read_text())
    options = {opt.lstrip("-").replace("-", "_") for p in backfill.params if isinstance(p, click.Option) for opt in p.opts}
    names = [p["name"] for p in spec["parameters"]]
    assert len(names) == len(set(names))
    assert {"bq_table", "bq_query", "bq_scores_table", "publish_scores", "saved_model_dir"} <= set(names)
    beam_options = {"sdk_container_image"}
    unknown = [n for n in names if n not in options and n not in beam_options]
    assert not unknown, f"metadata.json parameters that esp backfill does not take: {unknown}"
    assert all(p["helpText"] and p["label"] for p in spec["parameters"])


def test_flex_template_parameters_become_esp_options() -> None:
    from beam_jobs.flex_main import translate

    options, flags = {"--bq-table", "--max-batch-size"}, {"--publish-scores"}
    argv = ["--bq_table=p.d.t", "--publish_scores=false", "--max_batch_size=64", "--runner=DataflowRunner",
            "--temp_location=gs://b/tmp", "--publish_scores=true"]
    assert translate(argv, options, flags) == [
        "--bq-table=p.d.t", "--no-publish-scores", "--max-batch-size=64", "--runner=DataflowRunner",
        "--temp_location=gs://b/tmp", "--publish-scores",
    ]
