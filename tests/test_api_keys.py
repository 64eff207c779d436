"""API keys (hashed in the keys file, re-read on change), token buckets, `esp api new-key`, key redaction."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from urllib.parse import unquote

import pytest
from click.testing import CliRunner
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from api.keys import KeyStore, TokenBucket, hash_key, new_key, parse_keys
from api.redact import MASK, RedactingFilter, printable_path, query_key, redact, redact_query
from esp.errors import ConfigError

EXAMPLES = int(os.environ.get("ESP_HYPOTHESIS_EXAMPLES", "200"))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    bucket = TokenBucket(rate_per_s=2.0, burst=4, now=0.0)
    assert bucket.take(4, 0.0) == 0.0
    assert bucket.take(1, 0.0) == pytest.approx(0.5)  # one token comes back after 0.5 s
    assert bucket.take(1, 0.5) == 0.0
    assert bucket.take(3, 10.0) == 0.0  # refilled, capped at the burst
    assert bucket.take(2, 10.0) == pytest.approx(0.5)
    assert bucket.take(5, 100.0) == float("inf")  # more than the bucket can ever hold


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 5), st.floats(0, 3)), max_size=40))
def test_token_bucket_never_grants_more_than_rate_times_time_plus_burst(steps: list[tuple[int, float]]) -> None:
    bucket = TokenBucket(rate_per_s=3.0, burst=5, now=0.0)
    now, granted = 0.0, 0
    for cost, advance in steps:
        now += advance
        if bucket.take(cost, now) == 0.0:
            granted += cost
    assert granted <= 5 + 3.0 * now + 1e-9


def _keys_file(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "keys"
    path.write_text("# name hash rate burst\n" + "\n".join(lines) + "\n")
    return path


def test_keys_are_looked_up_by_hash_and_reloaded_when_the_file_changes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    alice, bob = new_key(), new_key()
    assert len(alice) >= 40 and alice != bob
    path = _keys_file(tmp_path, f"alice {hash_key(alice)} 5 10")
    clock = Clock()
    store = KeyStore(path, default_rate_per_s=1.0, default_burst=2, reload_interval_s=5.0, clock=clock)
    entry = store.lookup(alice)
    assert entry is not None and (entry.name, entry.rate_per_s, entry.burst) == ("alice", 5.0, 10)
    assert store.lookup(bob) is None and store.lookup("") is None
    assert alice not in path.read_text()  # only the hash is stored

    path.write_text(f"bob {hash_key(bob)}\n")
    assert store.lookup(bob) is None  # not re-read before the interval
    clock.now += 6
    bob_entry = store.lookup(bob)
    assert bob_entry is not None and (bob_entry.rate_per_s, bob_entry.burst) == (1.0, 2)
    assert store.lookup(alice) is None

    path.write_text("this is not a keys file\n")
    clock.now += 6
    with caplog.at_level(logging.WARNING, logger="api.keys"):
        assert store.lookup(bob) is not None  # a broken file keeps the keys loaded
    assert "keeping the 1 keys loaded" in caplog.text


def test_each_key_has_its_own_bucket(tmp_path: Path) -> None:
    a, b = new_key(), new_key()
    clock = Clock()
    store = KeyStore(_keys_file(tmp_path, f"a {hash_key(a)} 1 2", f"b {hash_key(b)} 1 2"), default_rate_per_s=1, default_burst=1, clock=clock)
    ea, eb = store.lookup(a), store.lookup(b)
    assert ea and eb
    assert store.take(ea, 2) == 0.0 and store.take(ea, 1) == pytest.approx(1.0)
    assert store.take(eb, 2) == 0.0
    clock.now += 1
    assert store.take(ea, 1) == 0.0


@pytest.mark.parametrize(
    "line, fragment",
    [
        ("alice sha256:abc", "64 hex digits"),
        ("alice md5:" + "0" * 64, "64 hex digits"),
        ("alice " + hash_key("x") + " fast", "rate must be a number"),
        ("alice " + hash_key("x") + " 0", "rate must be positive"),
        ("alice " + hash_key("x") + " 1 2 3", "expected"),
        ("alice", "expected"),
    ],
)
def test_bad_keys_file_lines_are_config_errors_with_the_line(line: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_keys(line, default_rate_per_s=1, default_burst=1, source="keys.txt")
    assert "keys.txt line 1" in str(err.value) and fragment in str(err.value)


def test_duplicates_and_empty_files_are_refused(tmp_path: Path) -> None:
    h = hash_key("k")
    with pytest.raises(ConfigError, match="used twice"):
        parse_keys(f"a {h}\na {hash_key('j')}", default_rate_per_s=1, default_burst=1)
    with pytest.raises(ConfigError, match="listed twice"):
        parse_keys(f"a {h}\nb {h}", default_rate_per_s=1, default_burst=1)
    with pytest.raises(ConfigError, match="lists no keys"):
        parse_keys("# nothing\n", default_rate_per_s=1, default_burst=1)
    with pytest.raises(ConfigError, match="cannot read"):
        KeyStore(tmp_path / "missing", default_rate_per_s=1, default_burst=1)


def test_new_key_command_prints_a_key_once_and_a_line_that_loads(tmp_path: Path) -> None:
    from esp.cli.main import cli

    result = CliRunner().invoke(cli, ["api", "new-key", "moderation-tool", "--rate", "50", "--burst", "100"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    key = result.stderr.split("): ", 1)[1].split()[0]
    line = result.stdout.strip()
    assert key not in line and line.startswith("moderation-tool  sha256:") and line.endswith("  50  100")
    store = KeyStore(_keys_file(tmp_path, line), default_rate_per_s=1, default_burst=1)
    entry = store.lookup(key)
    assert entry is not None and entry.rate_per_s == 50 and entry.burst == 100


# ---------------------------------------------------------------------------------------------
# Redaction

key_text = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp"), blacklist_characters="&#\"';),}]"), min_size=8, max_size=40)


@settings(max_examples=EXAMPLES, deadline=None)
@given(key_text, st.text(max_size=20), st.sampled_from(["GET", "POST"]))
def test_any_key_in_a_url_or_header_is_masked(key: str, other: str, method: str) -> None:
    assume(key not in other and key not in MASK)
    lines = [
        f'{method} /v1alpha1/comments:analyze?key={key}&x=1 400',
        f"{method} /v1/score?a=b&key={key}",
        f"headers: {{'x-goog-api-key': '{key}'}} {other}",
        f"X-Goog-Api-Key: {key}",
        f"[(b'x-goog-api-key', b'{key}')]",
    ]
    for line in lines:
        assert key not in redact(line).replace(MASK, ""), line


def _spelled(letters: str) -> st.SearchStrategy[str]:
    """Every way a query can spell `letters` as a parameter name: any case, any letter percent-encoded."""
    spellings = [st.sampled_from([c.lower(), c.upper(), f"%{ord(c):02x}", f"%{ord(c):02X}"]) for c in letters]
    return st.tuples(*spellings).map("".join)


url_safe_key = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_", min_size=16, max_size=43)


@settings(max_examples=EXAMPLES, deadline=None)
@given(_spelled("key"), url_safe_key, st.sampled_from(["", "monkey=1&", "a=b&key=&"]))
def test_a_key_the_api_accepts_is_masked_however_its_name_is_spelled(name: str, key: str, before: str) -> None:
    query = f"{before}{name}={key}&x=1"
    if unquote(name) == "key":  # the name every query parser reads as `key`
        assert query_key(query) == key  # what the API accepts as the key ...
    logged = [printable_path(b"/v1/score", query.encode()), redact(f"POST /v1/score?{query} 200"), redact_query(query)]
    for line in logged:
        assert key not in line, line  # ... and any spelling of `key` is masked, accepted or not


def test_query_and_path_redaction() -> None:
    assert redact_query("key=s3cret&x=1") == f"key={MASK}&x=1"
    assert redact_query("KEY=s3cret") == f"KEY={MASK}"
    assert redact_query("monkey=ok") == "monkey=ok"
    assert printable_path(b"/v1/score", b"key=s3cret") == f"/v1/score?key={MASK}"
    assert "\n" not in printable_path(b"/a\nb", b"")


def test_filter_masks_messages_args_and_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.redaction")
    handler = caplog.handler
    handler.addFilter(RedactingFilter())
    try:
        logger.warning("bad request %s", "/v1/score?key=s3cretvalue")
        try:
            raise ValueError("x-goog-api-key: s3cretvalue")
        except ValueError:
            logger.exception("failed")
    finally:
        handler.filters.clear()
    assert "s3cretvalue" not in caplog.text
    assert caplog.text.count(MASK) >= 2
