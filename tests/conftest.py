"""Fixtures shared across the suite live in tests/fixtures/; each module is registered here."""

pytest_plugins = [
    "tests.fixtures.pubsub",
    "tests.fixtures.models",
    "tests.fixtures.model_server",
    "tests.fixtures.worker",
    "tests.fixtures.trained_model",
    "tests.fixtures.fuzz",
    "tests.fixtures.api",
]
pytest_plugins.append("tests.fixtures.bigquery")
pytest_plugins.append("tests.fixtures.watchdog")
