"""The machinery behind ESP's settings: typed dataclass fields that carry their env var and help.

Each settings group is a frozen dataclass whose fields are declared with `setting(...)`. The same
declaration gives the click option (`--max-batch-size`, reading `ESP_MAX_BATCH_SIZE`), the
environment-only loader used outside the CLI, and the configuration table in the README (a test
keeps that table complete). This module is the only place in ESP that reads `os.environ`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import click

from esp.errors import ConfigError

T = TypeVar("T")

_BOOL_TRUE = {"1", "true", "yes", "on"}
_BOOL_FALSE = {"0", "false", "no", "off", ""}


def setting(default: Any, *, env: str, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """Declares one field of a settings group.

    `env` is the environment variable that sets it (ESP_* by convention; a few standard names such
    as PUBSUB_EMULATOR_HOST are honoured as they are). Units belong in the field name
    (`max_batch_latency_ms`), so a value can never be read in the wrong unit.
    """
    return dataclasses.field(default=default, metadata={"env": env, "help": help, "choices": choices})


@dataclasses.dataclass(frozen=True)
class SettingInfo:
    """One documented setting, as listed by `esp config` and in the README table."""

    group: str
    name: str
    option: str
    env: str
    default: Any
    type_name: str
    help: str
    choices: tuple[str, ...] | None


def _base_type(annotation: Any) -> tuple[type, bool]:
    """Returns (the scalar type, whether None is allowed) for a field annotation."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported settings annotation {annotation!r}")
        return args[0], True
    return annotation, False


def _fields(cls: type) -> Iterator[tuple[dataclasses.Field, type, bool]]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if "env" not in f.metadata:
            continue
        base, optional = _base_type(hints[f.name])
        yield f, base, optional


def option_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def describe(cls: type) -> list[SettingInfo]:
    """Lists the settings of one group, for `esp config` and the README table."""
    out = []
    for f, base, optional in _fields(cls):
        out.append(
            SettingInfo(
                group=cls.__name__,
                name=f.name,
                option=option_name(f.name),
                env=f.metadata["env"],
                default=f.default,
                type_name=("choice" if f.metadata["choices"] else base.__name__),
                help=f.metadata["help"],
                choices=f.metadata["choices"],
            )
        )
    return out


class FiniteFloat(click.FloatRange):
    """click's float (or float range) that also refuses `nan` and `inf`, which Python's float() takes.

    No ESP setting means anything by them: an infinite timeout or grace period overflows the first
    wait it reaches, an infinite batch latency holds a partial batch for ever, and NaN passes every
    range check by comparing false.
    """

    name = "float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return rv


# The longest duration any setting may name: waits longer than this overflow some of the waits they
# reach (a thread join, time.sleep), and no ESP setting means anything by them.
MAX_DURATION_S = 1_000_000.0  # about 11.6 days


def _finite(name: str, value: Any) -> None:
    if not isinstance(value, float | int) or isinstance(value, bool):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, not {value!r}")
    limit = MAX_DURATION_S if name.endswith("_s") else MAX_DURATION_S * 1000 if name.endswith("_ms") else None
    if limit is not None and value > limit:
        raise ConfigError(f"{name} must be at most {limit:,.0f}, not {value!r}")


def _parse(raw: str, base: type, optional: bool, name: str, env: str) -> Any:
    if optional and raw == "":
        return None
    try:
        if base is bool:
            low = raw.strip().lower()
            if low in _BOOL_TRUE:
                return True
            if low in _BOOL_FALSE:
                return False
            raise ValueError(raw)
        value = base(raw)
        if base is float and not math.isfinite(value):
            raise ValueError(raw)
        return value
    except ValueError:
        raise ConfigError(f"{env}={raw!r} is not a valid {base.__name__} for {name}") from None


def from_env(cls: type[T], environ: Mapping[str, str] | None = None, **overrides: Any) -> T:
    """Builds a settings group from environment variables (then keyword overrides)."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f, base, optional in _fields(cls):
        env = f.metadata["env"]
        if env in environ:
            values[f.name] = _parse(environ[env], base, optional, f.name, env)
    values.update(overrides)
    return build(cls, values)


def build(cls: type[T], values: Mapping[str, Any]) -> T:
    """Builds a settings group from a mapping (extra keys ignored), running its validation."""
    names = {f.name for f in dataclasses.fields(cls)}
    for name, value in values.items():
        if name in names:
            _finite(name, value)
    try:
        return cls(**{k: v for k, v in values.items() if k in names})
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None


def click_options(cls: type, *, exclude: tuple[str, ...] = (), defaults: dict[str, Any] | None = None) -> Callable[[Callable], Callable]:
    """A decorator adding one click option per field of `cls`, each also read from its env var.

    `defaults` replaces a field's default for this command only (the API's batch size).
    """

    def decorate(fn: Callable) -> Callable:
        for f, base, optional in reversed(list(_fields(cls))):
            if f.name in exclude:
                continue
            env = f.metadata["env"]
            choices = f.metadata["choices"]
            default = (defaults or {}).get(f.name, f.default)
            kwargs: dict[str, Any] = {
                "envvar": env,
                "show_envvar": True,
                "default": default,
                "show_default": default is not None,
                "help": f.metadata["help"],
            }
            if base is bool:
                decl = f"{option_name(f.name)}/--no-{f.name.replace('_', '-')}"
                fn = click.option(decl, f.name, **kwargs)(fn)
                continue
            kwargs["type"] = click.Choice(choices) if choices else FiniteFloat() if base is float else base
            fn = click.option(option_name(f.name), f.name, **kwargs)(fn)
        return fn

    return decorate


def require(condition: bool, message: str) -> None:
    """Validation helper for `__post_init__`: one clear message per broken rule."""
    if not condition:
        raise ValueError(message)
