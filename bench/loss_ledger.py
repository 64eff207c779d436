"""The loss ledger: ESP's promise ("nothing lost, poison set aside with its reason, no silent stop")
counted under faults, on the real local stack.

It publishes a known set of comments, poison included, to the Pub/Sub emulator; runs `esp serve`
and two `esp worker run` processes (their Pub/Sub traffic through esp.fault_proxy); and injects
faults on a schedule while the stream flows:
- the model server SIGKILLed and restarted, or frozen (SIGSTOP/SIGCONT: slow to the point of silence);
- a worker SIGKILLed and restarted, or SIGTERMed (a rolling update) and restarted;
- publishing to the scores topic failing (UNAVAILABLE) for a while;
- a new model version appearing; a version that rejects everything appearing, then withdrawn;
- bursts of hostile bodies.
At the end it reconciles every id it sent against what arrived on the scores and dead-letter
topics (read through subscriptions of its own, so the hold subscription stays intact):
- every valid id scored, every poison id dead-lettered with ESP's reason (never a valid one);
- valid comments whose delivery attempts the kills used up arrive without a reason (forwarded by
  Pub/Sub's policy): they are counted apart, replayed with `esp dead-letters replay`, and must then
  be scored;
- lost = sent - (scored | dead-lettered) must be 0; duplicates are counted and bounded.
It writes a JSON report and charts throughput, latency and worker memory over the run (PNG).

    python bench/loss_ledger.py --duration-s 1200 --model models/bert \\
        --json docs/figures/loss-ledger.json --chart docs/figures/loss-ledger.png   # docs/reliability.md
    python bench/loss_ledger.py --duration-s 60 --test-model --json /tmp/ledger.json  # the suite's short run

Exit status: 0 when the promise held (lost = 0, no valid comment dead-lettered with a reason, every
poison dead-lettered with its reason, duplicates within their bound), 1 otherwise.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import grpc  # noqa: E402

from esp.contracts import DeadLetter, ErrorType  # noqa: E402
from esp.fault_proxy import PUBLISH, FaultProxy, Rule, publish_to  # noqa: E402
from esp.localstack import PubSubEmulator, isolated_pubsub_settings, wait_until  # noqa: E402
from esp.pubsub import publisher_client, subscriber_client  # noqa: E402
from esp.pubsub_admin import init_resources  # noqa: E402
from esp.settings import BatchingSettings, ModelClientSettings, PubSubSettings  # noqa: E402
from esp.settings.worker import WorkerSettings  # noqa: E402
from serving.local import ModelServerProcess  # noqa: E402
from worker.local import WorkerProcess, settings_env  # noqa: E402

log = logging.getLogger("loss_ledger")

LEDGER_ID = "ledger_id"  # attribute on every message the ledger sends: how it recognises them anywhere
JIGSAW = REPO / "data" / "jigsaw" / "jigsaw_trainsplit_union.csv.gz"

# Hostile bodies and the error type ESP must give each; ids ride in the attribute, not the body.
HOSTILE: list[tuple[bytes, str]] = [
    (b'{"id": "x", "text": "hello", "n": ' + b"9" * 5000 + b"}", ErrorType.INVALID_JSON),
    (b'{"a":' * 3000 + b"1" + b"}" * 3000, ErrorType.INVALID_JSON),
    (b'{"id": "x", "text": "lone \\ud800 surrogate"}', ErrorType.UNENCODABLE_TEXT),
    (b'{"id": "x\\nforged", "text": "newline in id"}', ErrorType.INVALID_ID),
    (b"\xff\xfe not utf-8", ErrorType.INVALID_UTF8),
    (b"[1, 2, 3]", ErrorType.NOT_AN_OBJECT),
    (b'{"id": "x", "text": "   "}', ErrorType.EMPTY_TEXT),
    (b'{"id": "x", "text": "' + b"y" * 70_000 + b'"}', ErrorType.BODY_TOO_LARGE),
]


def jigsaw_texts(n: int) -> list[str]:
    import csv
    import gzip

    out: list[str] = []
    with gzip.open(JIGSAW, "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if row["comment_text"].strip():
                out.append(row["comment_text"][:2000])
            if len(out) == n:
                break
    return out


# ---------------------------------------------------------------------------------------------
# What was sent, and what arrived


@dataclasses.dataclass
class Sent:
    ledger_id: str
    poison: bool
    expected_error: str | None
    sent_at: float


class Book:
    """Thread-safe record of every message sent and every score and dead letter that came back."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sent: dict[str, Sent] = {}
        self.scores: collections.Counter[str] = collections.Counter()
        self.letters: dict[str, list[DeadLetter]] = collections.defaultdict(list)
        self.score_times: list[float] = []  # arrival times (monotonic) of score messages
        self.latencies: list[tuple[float, float]] = []  # (arrival, published -> scored seconds)

    def scored_ids(self) -> set[str]:
        with self.lock:
            return set(self.scores)

    def settled(self) -> bool:
        """Every valid id scored or forwarded by policy, every poison id dead-lettered."""
        with self.lock:
            for lid, sent in self.sent.items():
                if sent.poison and lid not in self.letters:
                    return False
                if not sent.poison and lid not in self.scores and not self.letters.get(lid):
                    return False
            return True


class Reader:
    """Pulls one subscription on the emulator (never through the proxy) into the book."""

    def __init__(self, settings: PubSubSettings, subscription: str, on_message: Callable[[Any], None]) -> None:
        self.client = subscriber_client(settings)
        self.path = settings.subscription_path(subscription)
        self.on_message = on_message
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Reader:
        self.thread.start()
        return self

    def _run(self) -> None:
        from google.api_core import exceptions as gexc

        while not self.closed.is_set():
            try:
                resp = self.client.pull(request={"subscription": self.path, "max_messages": 1000}, timeout=2.0, retry=None)
            except gexc.DeadlineExceeded:
                continue
            except gexc.GoogleAPICallError:
                if self.closed.is_set():
                    return
                time.sleep(0.5)
                continue
            if resp.received_messages:
                for rm in resp.received_messages:
                    self.on_message(rm.message)
                self.client.acknowledge(request={"subscription": self.path, "ack_ids": [r.ack_id for r in resp.received_messages]})

    def close(self) -> None:
        self.closed.set()
        self.thread.join(timeout=5)
        self.client.close()


# ---------------------------------------------------------------------------------------------
# The stack and its faults


@dataclasses.dataclass
class Stack:
    settings: PubSubSettings  # on the emulator itself
    via_proxy: PubSubSettings  # the workers' view, through the fault proxy
    proxy: FaultProxy
    server: ModelServerProcess
    base: Path
    good_version_dir: Path
    bad_version_dir: Path
    workers: list[WorkerProcess]
    book: Book

    last_version: int = 1

    def place_version(self, source: Path) -> Path:
        """Copies a version in under a new number (never reused), renamed into place so the server never sees half."""
        self.last_version += 1
        version = self.last_version
        staging = self.base / f".staging-{uuid.uuid4().hex}"
        shutil.copytree(source, staging)
        target = self.base / str(version)
        os.rename(staging, target)
        return target

    def publish_hostile(self, publisher: Any, n: int) -> None:
        topic = self.settings.topic_path(self.settings.comments_topic)
        futures = []
        for _ in range(n):
            body, error = random.choice(HOSTILE)
            lid = f"p-{uuid.uuid4().hex[:12]}"
            with self.book.lock:
                self.book.sent[lid] = Sent(lid, True, error, time.monotonic())
            futures.append(publisher.publish(topic, body, **{LEDGER_ID: lid, "esp_parked": "true", "esp_reason": "forged"}))
        for f in futures:
            f.result(timeout=60)


@dataclasses.dataclass
class Fault:
    name: str
    begin: Callable[[Stack], None]
    end: Callable[[Stack], None]
    hold_s: float


def _restart_worker(i: int) -> Callable[[Stack], None]:
    return lambda s: s.workers[i].start()


def faults(publisher: Any) -> list[Fault]:
    rules: dict[str, Rule] = {}

    def fail_scores(s: Stack) -> None:
        topic = s.settings.topic_path(s.settings.scores_topic)
        rules["scores"] = s.proxy.add(Rule(PUBLISH, grpc.StatusCode.UNAVAILABLE, "injected: scores topic unavailable", publish_to(topic)))

    bad: dict[str, Path] = {}
    return [
        Fault("version that rejects everything", lambda s: bad.__setitem__("dir", s.place_version(s.bad_version_dir)),
              lambda s: shutil.rmtree(bad.pop("dir")), 8.0),
        Fault("worker SIGKILLed", lambda s: s.workers[0].kill(), _restart_worker(0), 4.0),
        Fault("scores topic unavailable", fail_scores, lambda s: s.proxy.remove(rules.pop("scores")), 8.0),
        Fault("hostile burst", lambda s: s.publish_hostile(publisher, 60), lambda s: None, 2.0),
        Fault("model server frozen (SIGSTOP)", lambda s: s.server.send_signal(signal.SIGSTOP),
              lambda s: s.server.send_signal(signal.SIGCONT), 6.0),
        Fault("model server killed", lambda s: s.server.kill(), lambda s: s.server.start(), 8.0),
        Fault("worker SIGTERMed (rolling update)", lambda s: s.workers[1].stop(), _restart_worker(1), 3.0),
        Fault("new model version", lambda s: s.place_version(s.good_version_dir), lambda s: None, 4.0),
    ]


# ---------------------------------------------------------------------------------------------
# The run


@dataclasses.dataclass
class Config:
    duration_s: float
    rate_per_s: float
    poison_every: int
    gap_s: float
    hold_scale: float
    settle_timeout_s: float
    model_dir: Path | None
    log_dir: Path


def prepare_models(config: Config, work: Path) -> tuple[Path, Path, Path, str]:
    """A served base path with version 1, a good version and a bad one kept aside to place later."""
    from tests.fixtures.models import export_test_model

    base = work / "bert"
    base.mkdir(parents=True)
    aside = work / "aside"
    if config.model_dir is None:
        export_test_model(base, 1)
        desc = "test model (tests/fixtures/models.py)"
    else:
        version = max((p for p in config.model_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
        shutil.copytree(version, base / "1")
        desc = f"{config.model_dir} v{version.name}"
    good = aside / "good"
    shutil.copytree(base / "1", good)
    # The empty marker is in every text; no warm-up, which it would reject too (the server would not load it).
    bad = export_test_model(aside, 99, reject_marker="", warmup=False)
    return base, good, bad, desc


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run(config: Config) -> dict[str, Any]:
    started_wall = dt.datetime.now(dt.timezone.utc)
    config.log_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="esp-ledger-"))
    book = Book()
    events: list[dict[str, Any]] = []
    rss: list[tuple[float, int, float]] = []
    t0 = time.monotonic()

    def event(what: str, **extra: Any) -> None:
        events.append({"t": round(time.monotonic() - t0, 2), "event": what, **extra})
        log.info("[%6.1fs] %s %s", time.monotonic() - t0, what, extra or "")

    base, good, bad, model_desc = prepare_models(config, work)
    with contextlib.ExitStack() as stack:
        emulator = PubSubEmulator(log_path=config.log_dir / "emulator.log").start()
        stack.callback(emulator.stop)
        settings = isolated_pubsub_settings(
            emulator.host, prefix="ledger", ack_deadline_s=10, min_retry_backoff_s=1, max_retry_backoff_s=10
        )
        init_resources(settings)
        from tests.fixtures.pubsub import create_subscription

        create_subscription(settings, settings.scores_topic, "ledger-scores")
        create_subscription(settings, settings.dead_letter_topic, "ledger-dead-letters")
        proxy = FaultProxy(emulator.host).start()
        stack.callback(proxy.stop)
        via_proxy = dataclasses.replace(settings, emulator_host=proxy.host)

        server = ModelServerProcess(base, log_path=config.log_dir / "esp-serve.log").start()
        stack.callback(server.stop)
        client = ModelClientSettings(model_server=server.target, model_timeout_s=2.0, model_retry_budget_s=2.0)
        worker_settings = WorkerSettings(metrics_port=0, metrics_host="127.0.0.1", shutdown_grace_s=5.0, pull_timeout_s=1.5)
        batching = BatchingSettings(max_batch_size=32, retry_initial_backoff_s=0.1, retry_max_backoff_s=1.0, idle_probe_interval_s=2.0)
        workers = []
        for i in range(2):
            w = WorkerProcess(via_proxy, client, dataclasses.replace(worker_settings, worker_id=f"ledger-worker-{i}"), batching,
                              log_path=config.log_dir / f"worker-{i}.log", name=f"worker-{i}")
            workers.append(w.start())
            stack.callback(w.stop)
        s = Stack(settings, via_proxy, proxy, server, base, good, bad, workers, book)

        def on_score(msg: Any) -> None:
            rec = json.loads(msg.data)  # scores carry no producer attributes: matched on the comment id
            now = time.monotonic()
            with book.lock:
                book.scores[rec["id"]] += 1
                book.score_times.append(now)
                if rec.get("published_at"):
                    pub = dt.datetime.fromisoformat(rec["published_at"].replace("Z", "+00:00"))
                    scored = dt.datetime.fromisoformat(rec["scored_at"].replace("Z", "+00:00"))
                    book.latencies.append((now, (scored - pub).total_seconds()))

        def on_letter(msg: Any) -> None:
            letter = DeadLetter.from_pubsub(bytes(msg.data), dict(msg.attributes))
            lid = letter.attributes.get(LEDGER_ID) or dict(msg.attributes).get(LEDGER_ID, "?")
            with book.lock:
                book.letters[lid].append(letter)

        readers = [Reader(settings, "ledger-scores", on_score).start(), Reader(settings, "ledger-dead-letters", on_letter).start()]
        for r in readers:
            stack.callback(r.close)

        # The producer: valid comments at the rate, with poison mixed in; ids in body and attribute.
        publisher = publisher_client(settings)
        texts = jigsaw_texts(5000)
        stop_producing = threading.Event()

        def produce() -> None:
            topic = settings.topic_path(settings.comments_topic)
            n = 0
            next_at = time.monotonic()
            while not stop_producing.is_set():
                n += 1
                if n % config.poison_every == 0:
                    body, error = HOSTILE[n % len(HOSTILE)]
                    lid = f"p-{n}"
                    sent = Sent(lid, True, error, time.monotonic())
                else:
                    lid = f"v-{n}"
                    body = json.dumps({"id": lid, "text": texts[n % len(texts)]}).encode()
                    sent = Sent(lid, False, None, time.monotonic())
                with book.lock:
                    book.sent[lid] = sent
                publisher.publish(topic, body, **{LEDGER_ID: lid})
                next_at += 1.0 / config.rate_per_s
                delay = next_at - time.monotonic()
                if delay > 0:
                    stop_producing.wait(delay)

        t0 = time.monotonic()  # the charts' zero: the stream's start, not the set-up's
        producer = threading.Thread(target=produce, daemon=True)
        producer.start()

        def sample_rss() -> None:
            while not stop_producing.is_set() or not sampler_done.is_set():
                now = time.monotonic() - t0
                for i, w in enumerate(workers):
                    if w.running():
                        value = rss_mib(w.pid)
                        if value is not None:
                            rss.append((now, i, value))
                sampler_done.wait(1.0)

        sampler_done = threading.Event()
        sampler = threading.Thread(target=sample_rss, daemon=True)
        sampler.start()

        # The fault schedule, cycled until the duration is spent.
        schedule = faults(publisher)
        event("stream started", rate_per_s=config.rate_per_s, model=model_desc)
        end_at = time.monotonic() + config.duration_s
        i = 0
        fault_counts: collections.Counter[str] = collections.Counter()
        while time.monotonic() + schedule[i % len(schedule)].hold_s * config.hold_scale + config.gap_s < end_at:
            time.sleep(config.gap_s)
            fault = schedule[i % len(schedule)]
            event(f"fault begins: {fault.name}")
            fault.begin(s)
            time.sleep(fault.hold_s * config.hold_scale)
            fault.end(s)
            event(f"fault ends: {fault.name}")
            fault_counts[fault.name] += 1
            i += 1
        remaining = end_at - time.monotonic()
        if remaining > 0:
            time.sleep(remaining)
        stop_producing.set()
        producer.join(timeout=30)
        publisher.stop()
        event("stream stopped", sent=len(book.sent))
        for w in workers:
            if not w.running():
                w.start()

        # Settle: wait until every id is accounted for (or the timeout).
        try:
            wait_until(book.settled, timeout_s=config.settle_timeout_s, interval_s=0.5, what="every id to be scored or dead-lettered")
            event("settled")
        except TimeoutError:
            event("settle timeout")

        # Valid comments Pub/Sub's policy forwarded (attempts spent by kills): replay them, then they must be scored.
        with book.lock:
            forwarded = sorted(
                lid for lid, letters in book.letters.items()
                if not book.sent.get(lid, Sent(lid, True, None, 0)).poison and lid not in book.scores
            )
        replay = None
        if forwarded:
            env = dict(os.environ, **settings_env(settings), ESP_LOG_LEVEL="WARNING")
            result = subprocess.run(
                [sys.executable, "-m", "esp.cli.main", "dead-letters", "replay", "--kind", "policy", "--min-scan-s", "15"],
                capture_output=True, text=True, env=env, timeout=300,
            )
            replay = {"exit_code": result.returncode, "output": (result.stdout + result.stderr)[-2000:]}
            event("replayed policy-forwarded letters", count=len(forwarded), exit_code=result.returncode)
            with contextlib.suppress(TimeoutError):
                wait_until(lambda: set(forwarded) <= book.scored_ids(), timeout_s=config.settle_timeout_s, interval_s=0.5,
                           what="replayed comments to be scored")
        sampler_done.set()
        final = {w.name: w.readyz() for w in workers}
        event("final readiness", **{name: status for name, (status, _) in final.items()})
        report = reconcile(book, forwarded, replay, fault_counts, events, config, model_desc, started_wall, rss, t0)
        report["workers_ready_at_end"] = all(status == 200 for status, _ in final.values())
        report["promise_held"] = report["promise_held"] and report["workers_ready_at_end"]
    shutil.rmtree(work, ignore_errors=True)
    return report


def reconcile(
    book: Book, forwarded: list[str], replay: dict[str, Any] | None, fault_counts: collections.Counter[str],
    events: list[dict[str, Any]], config: Config, model_desc: str, started: dt.datetime,
    rss: list[tuple[float, int, float]], t0: float,
) -> dict[str, Any]:
    with book.lock:
        valid = {lid for lid, s in book.sent.items() if not s.poison}
        poison = {lid: s.expected_error for lid, s in book.sent.items() if s.poison}
        scored = set(book.scores)
        reasoned = {lid for lid, letters in book.letters.items() if any(lt.kind == "worker" for lt in letters)}
        wrong_reason = sorted(
            lid for lid, expected in poison.items()
            if lid in book.letters and not any(lt.kind == "worker" and lt.error_type == expected for lt in book.letters[lid])
        )
        lost_valid = sorted(valid - scored)
        lost_poison = sorted(set(poison) - set(book.letters))
        valid_with_reason = sorted(valid & reasoned)
        duplicates = sum(n - 1 for n in book.scores.values())
        poison_forwarded = sorted(lid for lid in poison if lid in book.letters and lid not in reasoned)
        score_times = sorted(t - t0 for t in book.score_times)
        latencies = [(t - t0, lat) for t, lat in book.latencies]
    kills = fault_counts["worker SIGKILLed"]
    # A SIGKILLed worker's unacked work is redelivered: at most what it may hold per kill, plus some
    # at-least-once slack (two batches) per other fault.
    duplicate_bound = kills * WorkerSettings().max_outstanding_messages + sum(fault_counts.values()) * 64
    held = not lost_valid and not lost_poison and not valid_with_reason and not wrong_reason and duplicates <= duplicate_bound
    return {
        "command": " ".join(sys.argv),
        "started": started.isoformat(timespec="seconds"),
        "model": model_desc,
        "duration_s": config.duration_s,
        "rate_per_s": config.rate_per_s,
        "sent": {"valid": len(valid), "poison": len(poison)},
        "scored_valid": len(valid & scored),
        "poison_dead_lettered_with_reason": len(set(poison) & reasoned) - len(wrong_reason),
        "poison_forwarded_by_policy": len(poison_forwarded),
        "valid_forwarded_by_policy_then_replayed": len(forwarded),
        "replay": replay,
        "lost": len(lost_valid) + len(lost_poison),
        "lost_ids": (lost_valid + lost_poison)[:50],
        "valid_dead_lettered_with_reason": valid_with_reason[:50],
        "poison_with_wrong_reason": wrong_reason[:50],
        "duplicates": duplicates,
        "duplicate_bound": duplicate_bound,
        "faults": dict(fault_counts),
        "events": events,
        "promise_held": held,
        "series": {"score_times_s": score_times, "latencies": latencies, "rss_mib": rss},
    }


def chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = report["series"]
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(11, 8), sharex=True)
    times = series["score_times_s"]
    if times:
        end = int(max(times)) + 1
        counts = [0] * (end + 1)
        for t in times:
            counts[int(t)] += 1
        window = 5
        smooth = [sum(counts[max(0, i - window + 1) : i + 1]) / window for i in range(len(counts))]
        ax1.plot(range(len(smooth)), smooth, lw=1)
    ax1.set_ylabel("scores/s (5 s mean)")
    lat = series["latencies"]
    if lat:
        buckets: dict[int, list[float]] = collections.defaultdict(list)
        for t, v in lat:
            buckets[int(t // 10) * 10].append(v)
        xs = sorted(buckets)
        ax2.plot(xs, [sorted(buckets[x])[len(buckets[x]) // 2] for x in xs], label="p50")
        ax2.plot(xs, [sorted(buckets[x])[min(len(buckets[x]) - 1, int(len(buckets[x]) * 0.99))] for x in xs], label="p99")
        ax2.set_yscale("log")
        ax2.legend(loc="upper right")
    ax2.set_ylabel("publish -> scored, s")
    for i in (0, 1):
        pts = [(t, v) for t, w, v in series["rss_mib"] if w == i]
        if pts:
            ax3.plot([p[0] for p in pts], [p[1] for p in pts], lw=1, label=f"worker {i}")
    ax3.set_ylabel("worker RSS, MiB")
    ax3.set_xlabel("seconds since the stream started")
    ax3.legend(loc="upper right")
    begins = {}
    for e in report["events"]:
        if e["event"].startswith("fault begins: "):
            begins[e["event"][14:]] = e["t"]
        elif e["event"].startswith("fault ends: "):
            name = e["event"][12:]
            if name in begins:
                for ax in (ax1, ax2, ax3):
                    ax.axvspan(begins[name], e["t"], color="tab:red", alpha=0.12)
                ax1.text(begins[name], ax1.get_ylim()[1] * 0.95, name, rotation=90, fontsize=6, va="top")
    fig.suptitle(
        f"Loss ledger: {report['sent']['valid']} valid + {report['sent']['poison']} poison sent, lost {report['lost']}, "
        f"duplicates {report['duplicates']}; faults shaded"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration-s", type=float, default=1200.0, help="how long the stream flows under faults")
    p.add_argument("--rate", type=float, default=60.0, help="comments published per second")
    p.add_argument("--poison-every", type=int, default=25, help="every Nth message is a hostile body")
    p.add_argument("--gap-s", type=float, default=6.0, help="calm seconds between two faults")
    p.add_argument("--hold-scale", type=float, default=1.0, help="multiplies how long each fault lasts (shorter for the suite)")
    p.add_argument("--settle-timeout-s", type=float, default=180.0, help="longest wait for every id to be accounted for")
    model = p.add_mutually_exclusive_group()
    model.add_argument("--model", type=Path, help="a model base path (default: models/bert if trained, else the test model)")
    model.add_argument("--test-model", action="store_true", help="the tiny test model (tests/fixtures/models.py)")
    p.add_argument("--json", type=Path, help="write the report here")
    p.add_argument("--chart", type=Path, help="write the PNG chart here")
    p.add_argument("--log-dir", type=Path, default=None, help="process logs (default: a temporary directory)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    model_dir = None if args.test_model else (args.model or (REPO / "models" / "bert" if (REPO / "models/bert/1").exists() else None))
    config = Config(
        duration_s=args.duration_s, rate_per_s=args.rate, poison_every=args.poison_every, gap_s=args.gap_s,
        hold_scale=args.hold_scale,
        settle_timeout_s=args.settle_timeout_s, model_dir=model_dir,
        log_dir=args.log_dir or Path(tempfile.mkdtemp(prefix="esp-ledger-logs-")),
    )
    report = run(config)
    summary = {k: v for k, v in report.items() if k not in ("series", "events")}
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report))
    if args.chart:
        chart(report, args.chart)
    print(f"logs: {config.log_dir}")
    return 0 if report["promise_held"] else 1


if __name__ == "__main__":
    sys.exit(main())
