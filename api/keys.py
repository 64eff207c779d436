"""API keys, stored hashed, each with a token-bucket rate limit.

The keys file (ESP_API_KEYS_FILE; on Kubernetes a Secret mounted as a file) has one key per line:

    # name            hash                                                                     comments/s  burst
    moderation-tool   sha256:5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8  50          100

The server never sees a key in clear except in a request: `esp api new-key NAME` makes a key,
prints it once, and prints the line to add. SHA-256, not a slow password hash, because a key is
256 random bits (nothing to guess) and is checked on every request, inside a 0.4 ms CPU budget.
Lookup is by the hash of what the client sent, so no comparison leaks timing about a stored key.

The file is re-read when its modification time or size changes (a rotated Secret), at most every
`reload_interval_s`; a file that no longer parses keeps the previous keys and says why in the log.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path

from esp.errors import ConfigError

log = logging.getLogger(__name__)

HASH_PREFIX = "sha256:"
KEY_BYTES = 32


def hash_key(key: str) -> str:
    return HASH_PREFIX + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def new_key() -> str:
    """A fresh key: 256 random bits, URL-safe (it travels in `?key=`)."""
    return secrets.token_urlsafe(KEY_BYTES)


class TokenBucket:
    """`rate_per_s` tokens per second up to `burst`; time is passed in, so tests drive it directly."""

    def __init__(self, rate_per_s: float, burst: int, now: float) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._tokens = float(burst)
        self._at = now

    def take(self, cost: int, now: float) -> float:
        """Takes `cost` tokens and returns 0.0, or takes none and returns the seconds until it could."""
        self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate_per_s)
        self._at = now
        if cost <= self._tokens:
            self._tokens -= cost
            return 0.0
        if cost > self.burst:
            return float("inf")  # can never be paid at once
        return (cost - self._tokens) / self.rate_per_s


@dataclasses.dataclass(frozen=True)
class KeyEntry:
    name: str
    key_hash: str
    rate_per_s: float
    burst: int


def parse_keys(text: str, *, default_rate_per_s: float, default_burst: int, source: str = "keys file") -> dict[str, KeyEntry]:
    """Parses a keys file: hash -> entry. Raises ConfigError naming the line that is wrong."""
    entries: dict[str, KeyEntry] = {}
    names: set[str] = set()
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        where = f"{source} line {lineno}"
        if len(fields) not in (2, 3, 4):
            raise ConfigError(f"{where}: expected 'NAME sha256:HEX [COMMENTS_PER_S [BURST]]', got {len(fields)} fields")
        name, key_hash = fields[0], fields[1].lower()
        digest = key_hash.removeprefix(HASH_PREFIX)
        if not key_hash.startswith(HASH_PREFIX) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ConfigError(f"{where}: the hash must be 'sha256:' and 64 hex digits (esp api new-key prints one)")
        try:
            rate = float(fields[2]) if len(fields) > 2 else default_rate_per_s
            burst = int(fields[3]) if len(fields) > 3 else max(default_burst, int(rate) or 1)
        except ValueError:
            raise ConfigError(f"{where}: rate must be a number and burst an integer") from None
        if not (rate > 0 and burst >= 1) or rate != rate or rate == float("inf"):
            raise ConfigError(f"{where}: rate must be positive and burst at least 1")
        if name in names:
            raise ConfigError(f"{where}: the name {name!r} is used twice")
        if key_hash in entries:
            raise ConfigError(f"{where}: the same key hash is listed twice")
        names.add(name)
        entries[key_hash] = KeyEntry(name, key_hash, rate, burst)
    if not entries:
        raise ConfigError(f"{source} lists no keys: every request would be refused (unset ESP_API_KEYS_FILE to need none)")
    return entries


class KeyStore:
    """The keys of a keys file, re-read when it changes, and one token bucket per key."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        default_rate_per_s: float,
        default_burst: int,
        reload_interval_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path)
        self.default_rate_per_s = default_rate_per_s
        self.default_burst = default_burst
        self.reload_interval_s = reload_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, TokenBucket] = {}
        self._stamp: tuple[int, int] | None = None
        self._checked_at = clock()
        self._entries = self._read()  # a start-up failure is a ConfigError: one line, exit 2

    def _read(self) -> dict[str, KeyEntry]:
        try:
            stat = self.path.stat()
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the API keys file {self.path}: {exc}") from None
        entries = parse_keys(text, default_rate_per_s=self.default_rate_per_s, default_burst=self.default_burst, source=str(self.path))
        self._stamp = (stat.st_mtime_ns, stat.st_size)
        return entries

    def _maybe_reload(self, now: float) -> None:
        if now - self._checked_at < self.reload_interval_s:
            return
        self._checked_at = now
        try:
            stat = self.path.stat()
        except OSError as exc:
            log.warning("API keys file %s cannot be read (%s); keeping the %d keys loaded", self.path, exc.strerror, len(self._entries))
            return
        if (stat.st_mtime_ns, stat.st_size) == self._stamp:
            return
        try:
            entries = self._read()
        except ConfigError as exc:
            log.warning("API keys file changed but is not valid (%s); keeping the %d keys loaded", exc, len(self._entries))
            return
        self._entries = entries
        # A key whose rate changed gets a fresh bucket; removed keys lose theirs.
        self._buckets = {h: b for h, b in self._buckets.items() if h in entries and b.rate_per_s == entries[h].rate_per_s and b.burst == entries[h].burst}
        log.info("API keys reloaded from %s: %d keys", self.path, len(entries))

    @property
    def count(self) -> int:
        return len(self._entries)

    def lookup(self, key: str) -> KeyEntry | None:
        now = self._clock()
        with self._lock:
            self._maybe_reload(now)
            return self._entries.get(hash_key(key))

    def take(self, entry: KeyEntry, cost: int) -> float:
        """0.0 when `entry` may spend `cost` comments now, else the seconds to wait (inf: never in one request)."""
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(entry.key_hash)
            if bucket is None:
                bucket = self._buckets[entry.key_hash] = TokenBucket(entry.rate_per_s, entry.burst, now)
            return bucket.take(cost, now)
