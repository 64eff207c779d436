"""`esp demo`: the whole stream path on one machine, end to end, with a readable result.

Starts Google's Pub/Sub emulator, creates ESP's resources, makes sure a `demo` model exists
(training it through the normal pipeline the first time), starts the local model server, the
worker and the HTTP API, publishes the shipped sample comments plus a few poison messages, waits
for every score and dead letter, scores a few comments through the API too, prints what came out
(with a `curl` line to try), and stops everything it started. With `keep_running`, everything
stays up (the page at the API's URL) until Ctrl-C.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess  # nosec B404: the demo runs ESP's own commands, fixed argv
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from esp.contracts import DeadLetter, parse_score
from esp.errors import EspError
from esp.localstack import PubSubEmulator
from esp.settings import CommentSettings, PubSubSettings

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample_comments.jsonl"
DEMO_MODEL_BASE = ROOT / "models" / "demo"
PREPARED_DATA = ROOT / "artifacts" / "data"
WORK = ROOT / "artifacts" / "demo"

# Messages that break the contract: each must come out as a dead letter with its reason.
POISON = [
    b'{"id": "poison-1", "text": "unterminated',
    b'{"id": "poison-2"}',
    b'{"id": "poison-3", "text": 42}',
]


# Scored through the HTTP API by the demo, one request each, as a moderator's tool would.
API_EXAMPLES = [
    "Thank you for fixing the citation, the article reads much better now.",
    "You are an idiot and everyone here hates you.",
    "Stop reverting my edits or I will find you.",
]


@dataclasses.dataclass
class ApiResult:
    url: str
    scores: list[tuple[str, dict, float]]  # (text, score record, round trip ms)
    curl: str


@dataclasses.dataclass
class DemoResult:
    published: int
    scores: dict[str, dict]
    duplicates: int
    dead_letters: list[DeadLetter]
    seconds: float
    api: ApiResult | None = None


def _step(n: int, total: int, what: str) -> None:
    click.secho(f"[{n}/{total}] {what}", fg="cyan", err=True)


def has_model(base: Path) -> bool:
    return any((d / "saved_model.pb").exists() for d in base.glob("*") if d.name.isdigit())


def _esp(*args: str) -> None:
    """Runs an `esp` subcommand in a child process, its progress going straight to the terminal."""
    # TensorFlow's C++ start-up chatter (CUDA probes, oneDNN notes) is noise in a demo.
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run([sys.executable, "-m", "esp.cli.main", *args], cwd=ROOT, env=env)  # nosec B603: ESP's own CLI, no shell
    if result.returncode != 0:
        raise EspError(f"'esp {' '.join(args)}' failed with exit code {result.returncode}")


def ensure_demo_model(base: Path = DEMO_MODEL_BASE) -> None:
    if has_model(base):
        click.echo(f"      using the cached demo model in {base.relative_to(ROOT)}", err=True)
        return
    if not (PREPARED_DATA / "stats.json").exists():
        _esp("prepare-data", "--runner=DirectRunner")
    _esp(
        "train",
        "--profile", "demo",
        "--export-base-path", str(base),
        "--work-dir", str(ROOT / "artifacts" / "train"),
        "--report-dir", str(ROOT / "artifacts" / "report-demo"),
        "--no-baselines",
    )


def _wait_for(collect: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not collect():
        if time.monotonic() > deadline:
            raise EspError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def score_through_api(api: Any) -> ApiResult:
    """Scores API_EXAMPLES through POST /v1/score, one request each; fails loudly on any error answer."""
    results = []
    for text in API_EXAMPLES:
        started = time.monotonic()
        status, _, body = api.post_json("/v1/score", {"text": text})
        if status != 200:
            raise EspError(f"the HTTP API answered {status} for a sample comment: {body}")
        results.append((text, body, (time.monotonic() - started) * 1000))
    payload = json.dumps({"text": "You are a wonderful person."})
    curl = f"curl -s -X POST {api.base_url}/v1/score -H 'Content-Type: application/json' -d '{payload}'"
    return ApiResult(api.base_url, results, curl)


def run_demo(*, timeout_s: float = 300.0, keep_running: Callable[[DemoResult], None] | None = None) -> DemoResult:
    """The demo; with `keep_running`, that callback runs (and may block, e.g. until Ctrl-C) while everything is still up."""
    from api.local import ApiProcess
    from serving.local import ModelServerProcess
    from worker.local import WorkerProcess

    from esp.settings import ModelClientSettings
    from esp.settings.api import ApiSettings

    from esp.pubsub import publisher_client, subscriber_client
    from esp.pubsub_admin import init_resources
    from esp.publishing import publish_file

    total = 8
    WORK.mkdir(parents=True, exist_ok=True)
    if not SAMPLE.exists():
        raise EspError(f"{SAMPLE} is missing: the sample comments ship with the repository")
    expected = {json.loads(line)["id"] for line in SAMPLE.read_text(encoding="utf-8").splitlines() if line.strip()}

    _step(1, total, "model: the demo profile (trained on the shipped Jigsaw data the first time)")
    ensure_demo_model()

    _step(2, total, "starting Google's Pub/Sub emulator")
    emulator = PubSubEmulator(log_path=WORK / "emulator.log").start()
    server = worker = api = publisher = subscriber = None
    try:
        pubsub = PubSubSettings(project="esp-demo", emulator_host=emulator.host)
        click.echo(f"      emulator on {emulator.host} (pid {emulator.pid})", err=True)

        _step(3, total, "esp pubsub init: topics, the worker's subscription with its dead-letter policy")
        init_resources(pubsub)
        subscriber = subscriber_client(pubsub)
        scores_sub = pubsub.subscription_path("demo-scores-reader")
        subscriber.create_subscription(request={"name": scores_sub, "topic": pubsub.topic_path(pubsub.scores_topic)})

        _step(4, total, "starting the model server (esp serve), the worker (esp worker run) and the HTTP API (esp api)")
        server = ModelServerProcess(DEMO_MODEL_BASE, log_path=WORK / "model-server.log").start(timeout_s=120)
        click.echo(f"      model server on {server.target} (pid {server.pid})", err=True)
        worker = WorkerProcess(
            pubsub,
            env={"ESP_MODEL_SERVER": server.target, "ESP_LOG_FORMAT": "text"},
            log_path=WORK / "worker.log",
        ).start()
        click.echo(f"      worker ready (pid {worker.pid}), metrics on {worker.base_url}/metrics", err=True)  # type: ignore[attr-defined]
        api = ApiProcess(
            ModelClientSettings(model_server=server.target),
            pubsub,
            ApiSettings(api_port=0),
            env={"ESP_LOG_FORMAT": "text"},
            log_path=WORK / "api.log",
        ).start()
        click.echo(f"      HTTP API ready (pid {api.pid}) on {api.base_url}", err=True)  # type: ignore[attr-defined]

        _step(5, total, f"publishing {len(expected)} sample comments and {len(POISON)} poison messages")
        started = time.monotonic()
        summary = publish_file(str(SAMPLE), pubsub=pubsub, comments=CommentSettings())
        if not summary.ok:
            raise EspError(f"publishing the samples failed: {summary.line()}")
        publisher = publisher_client(pubsub)
        for body in POISON:
            publisher.publish(pubsub.topic_path(pubsub.comments_topic), body, source="esp-demo").result(timeout=30)

        _step(6, total, "waiting for every score and dead letter")
        scores: dict[str, dict] = {}
        duplicates = 0

        def keep_score(message: Any) -> None:
            nonlocal duplicates
            record = parse_score(message.data)
            duplicates += record["id"] in scores
            scores[record["id"]] = record

        scores_reader = _Reader(subscriber, scores_sub, keep_score)

        def all_scored() -> bool:
            scores_reader.pull()
            return expected <= scores.keys()

        _wait_for(all_scored, timeout_s, f"{len(expected)} scores")
        seconds = time.monotonic() - started

        dead: list[DeadLetter] = []
        dead_reader = _Reader(
            subscriber,
            pubsub.subscription_path(pubsub.dead_letter_subscription),
            lambda message: dead.append(DeadLetter.from_pubsub(message.data, dict(message.attributes))),
        )

        def all_dead_lettered() -> bool:
            dead_reader.pull()
            return len(dead) >= len(POISON)

        _wait_for(all_dead_lettered, 60, f"{len(POISON)} dead letters")

        _step(7, total, "scoring a few comments through the HTTP API (POST /v1/score, one request each)")
        result = DemoResult(len(expected), scores, duplicates, dead, seconds, score_through_api(api))
        if keep_running is not None:
            keep_running(result)

        _step(8, total, "stopping the API and the worker (SIGTERM: drain, flush, exit 0), the model server and the emulator")
        for name, proc, log_name in (("HTTP API", api, "api.log"), ("worker", worker, "worker.log")):
            code = proc.stop(timeout_s=60)
            if code != 0:
                raise EspError(f"the {name} exited with code {code} on SIGTERM (log: {WORK / log_name})")
        api = worker = None
        return result
    finally:
        if api is not None:
            api.stop()
        if worker is not None:
            worker.stop()
        if server is not None:
            server.stop()
        if publisher is not None:
            publisher.stop()
        if subscriber is not None:
            subscriber.close()
        emulator.stop()


class _Reader:
    """Pulls one batch from a subscription, hands each message to `handle`, acks them."""

    def __init__(self, subscriber: Any, subscription: str, handle: Callable[[Any], None]) -> None:
        self._subscriber = subscriber
        self._subscription = subscription
        self._handle = handle

    def pull(self) -> None:
        resp = self._subscriber.pull(request={"subscription": self._subscription, "max_messages": 1000}, timeout=10)
        for received in resp.received_messages:
            self._handle(received.message)
        if resp.received_messages:
            ack_ids = [m.ack_id for m in resp.received_messages]
            self._subscriber.acknowledge(request={"subscription": self._subscription, "ack_ids": ack_ids})


def _labels_of_samples() -> dict[str, dict]:
    out = {}
    for line in SAMPLE.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            out[row["id"]] = row
    return out


def _clip(text: str, width: int = 70) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def render(result: DemoResult) -> str:
    """The readable result: counts, speed, the most and least toxic comments, the dead letters."""
    samples = _labels_of_samples()
    records = list(result.scores.values())
    model = records[0]["model"] if records else {"name": "?", "version": "?"}
    latencies_ms = []
    for r in records:
        if r.get("published_at"):
            pub = _ts(r["published_at"])
            latencies_ms.append((_ts(r["scored_at"]) - pub) * 1000)
    flagged = [r for r in records if r["flags"]]
    by_toxic = sorted(records, key=lambda r: r["scores"].get("toxic", 0.0), reverse=True)
    lines = [
        "",
        click.style("ESP demo result", bold=True),
        f"  {len(records)} of {result.published} comments scored by model {model['name']} v{model['version']} "
        f"in {result.seconds:.1f}s ({len(records) / result.seconds:.0f} comments/s end to end, 2-core machine)",
        f"  latency publish -> scored: p50 {_percentile(latencies_ms, 50):.0f} ms, p95 {_percentile(latencies_ms, 95):.0f} ms, "
        f"max {max(latencies_ms, default=float('nan')):.0f} ms",
        f"  duplicates delivered: {result.duplicates} (at-least-once; consumers dedupe on id + model version)",
        f"  flagged: {len(flagged)} of {len(records)}; by label: "
        + ", ".join(f"{label} {sum(label in r['flags'] for r in records)}" for label in sorted(records[0]["scores"]) if records),
        "",
        click.style("  Most toxic (score for 'toxic', the human label from Jigsaw, the text, the model's flags):", bold=True),
    ]
    top = by_toxic[:10]
    for r in top:
        human = "toxic" if samples[r["id"]]["labels"].get("toxic") else "not toxic"
        flags = ",".join(r["flags"]) or "-"
        lines.append(f"   {r['scores']['toxic']:.3f}  [{human:>9}]  {_clip(samples[r['id']]['text'], 60):<60}  {flags}")
    agree = sum(bool(samples[r["id"]]["labels"].get("toxic")) for r in top)
    lines.append(f"   {agree} of these {len(top)} are labelled toxic by Jigsaw's annotators")
    lines += ["", click.style("  Least toxic:", bold=True)]
    for r in by_toxic[-5:]:
        lines.append(f"   {r['scores']['toxic']:.3f}  {_clip(samples[r['id']]['text'])}")
    lines += ["", click.style(f"  Dead letters ({len(result.dead_letters)}): poison is set aside with its reason, never dropped", bold=True)]
    for d in result.dead_letters:
        lines.append(f"   {d.stage}/{d.error_type}: {d.reason}   body={d.data[:40]!r}")
    if result.api is not None:
        lines += ["", click.style(f"  Through the HTTP API ({result.api.url}), one request per comment:", bold=True)]
        for text, record, ms in result.api.scores:
            flags = ",".join(record["flags"]) or "-"
            lines.append(f"   {record['scores']['toxic']:.3f}  {ms:5.0f} ms  {_clip(text, 55):<55}  {flags}")
        lines += ["   try it yourself (while the API runs: `esp demo --keep-running`):", f"   {result.api.curl}"]
    lines += ["", f"  All scores: {WORK / 'scores.jsonl'}; logs: {WORK}/*.log", ""]
    return "\n".join(lines)


def _ts(value: str) -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def write_scores(result: DemoResult) -> Path:
    path = WORK / "scores.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for record in result.scores.values():
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path
