"""Errors a user can act on.

`EspError` and its subclasses carry a one-line message meant for people; the CLI prints it without
a traceback and exits non-zero. Anything else escaping a command is a bug and keeps its traceback.
"""


class EspError(Exception):
    """An operational error with a message a user can act on."""

    exit_code = 1


class ConfigError(EspError):
    """A setting is missing, malformed, or inconsistent with another."""

    exit_code = 2


class ServiceUnreachable(EspError):
    """A service ESP depends on (Pub/Sub, the model server) did not answer."""
