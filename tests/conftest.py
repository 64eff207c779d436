"""Fixtures shared across the suite live in tests/fixtures/; each module is registered here."""

pytest_plugins = [
    "tests.fixtures.pubsub",
]
