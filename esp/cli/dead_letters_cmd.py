"""`esp dead-letters ...`: inspect, export, replay and purge dead letters (the on-call tool).

Thin: the logic, and the reasoning about leases and acks, lives in the esp.dead_letters package. Tables and
JSON go to stdout; the closing summary of looking commands goes to stderr so `--json` output stays
clean. Every command exits non-zero when anything failed.
"""

from __future__ import annotations

import contextlib
import json
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from esp.settings import DeadLetterSettings, FiniteFloat, PubSubSettings, build, click_options


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

# Settings that only replay uses; the other commands do not offer them.
_REPLAY_ONLY = ("max_replays", "park_topic", "replay_window")


def _filter_options(parked_default: str) -> Callable[[Callable], Callable]:
    def decorate(fn: Callable) -> Callable:
        options = [
            click.option("--stage", "stages", multiple=True, help="Only this stage (validate, score, publish, unknown); repeatable."),
            click.option(
                "--error-type",
                "error_types",
                multiple=True,
                help="Only this error type (e.g. model_rejected, invalid_json, max_delivery_attempts); repeatable.",
            ),
            click.option("--reason", "reasons", multiple=True, help="Only reasons containing this text (any case); repeatable."),
            click.option(
                "--kind",
                "kinds",
                multiple=True,
                type=click.Choice(["worker", "policy", "unknown"]),
                help="worker: dead-lettered by ESP with a reason; policy: forwarded by Pub/Sub's dead-letter policy; "
                "unknown: neither (published to the dead-letter topic by someone else).",
            ),
            click.option("--since", default=None, help="Dead-lettered at or after: ISO-8601 time (UTC if no zone) or an age (30m, 2h, 3d)."),
            click.option("--until", default=None, help="Dead-lettered at or before: ISO-8601 time or an age."),
            click.option("--id", "ids", multiple=True, help="Comment id (from the body) or message id; repeatable."),
            click.option(
                "--ids-file",
                type=click.Path(exists=True, dir_okay=False, path_type=Path),
                default=None,
                help="File of ids, one per line (# comments allowed).",
            ),
            click.option(
                "--parked",
                type=click.Choice(["include", "exclude", "only"]),
                default=parked_default,
                show_default=True,
                help="Whether parked dead letters (esp_parked=true) are included.",
            ),
        ]
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


def _common(*, replay: bool = False) -> Callable[[Callable], Callable]:
    def decorate(fn: Callable) -> Callable:
        fn = click_options(DeadLetterSettings, exclude=() if replay else _REPLAY_ONLY)(fn)
        return click_options(PubSubSettings)(fn)

    return decorate


def _max_option(default: int | None, what: str) -> Callable[[Callable], Callable]:
    return click.option(
        "--max",
        "max_messages",
        type=click.IntRange(min=1),
        default=default,
        show_default=default is not None,
        help=f"Most dead letters to scan{what}; messages beyond it are not looked at.",
    )


def _settings(options: dict[str, Any]) -> tuple[PubSubSettings, DeadLetterSettings]:
    return build(PubSubSettings, options), build(DeadLetterSettings, options)


def _build_filter(options: dict[str, Any], *, include_parked: bool = False) -> Any:
    from esp.dead_letters import Filter, parse_when, read_ids_file

    times = {}
    for name in ("since", "until"):
        value = options.get(name)
        if value is None:
            times[name] = None
            continue
        try:
            times[name] = parse_when(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint=f"--{name}") from None
    ids = set(options.get("ids") or ())
    if options.get("ids_file") is not None:
        try:
            from_file = read_ids_file(options["ids_file"])
        except (OSError, UnicodeDecodeError) as exc:
            raise click.BadParameter(f"cannot read {options['ids_file']}: {exc}", param_hint="--ids-file") from None
        if not from_file:
            raise click.BadParameter(f"{options['ids_file']} lists no ids", param_hint="--ids-file")
        ids.update(from_file)
    try:
        return Filter(
            stages=frozenset(options.get("stages") or ()),
            error_types=frozenset(options.get("error_types") or ()),
            reason_contains=tuple(options.get("reasons") or ()),
            kinds=frozenset(options.get("kinds") or ()),
            since=times["since"],
            until=times["until"],
            ids=frozenset(ids),
            parked="include" if include_parked else options.get("parked", "include"),
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


@click.group("dead-letters")
def dead_letters() -> None:
    """Inspect, export, replay and purge dead letters.

    Dead letters are read from the dead-letter hold subscription. Looking (stats, list, show,
    export without --consume) consumes nothing: messages are held while the command runs, then
    handed straight back. Replay acks a dead letter only after its republish is confirmed, so an
    interrupted replay can simply be run again. See docs/dead-letters.md for the on-call runbook.
    """


@dead_letters.command()
@_common()
@_filter_options("include")
@_max_option(10000, "")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def stats(as_json: bool, max_messages: int, **options: Any) -> int:
    """Count dead letters by stage and error type, with their reasons, oldest and newest."""
    from esp.dead_letters import Stats, format_stats, look

    settings, dl = _settings(options)
    flt = _build_filter(options)
    result = Stats()
    found = look(settings, dl, flt, result.add, max_messages=max_messages)
    if as_json:
        click.echo(json.dumps({**result.to_dict(), "scanned": found.scanned, "truncated": not found.complete}, indent=2))
    else:
        for line in format_stats(result):
            click.echo(line)
    click.echo(f"{result.total} dead letter(s) match ({flt.describe()}); {found.note}; nothing consumed", err=True)
    return 0


@dead_letters.command("list")
@_common()
@_filter_options("include")
@_max_option(1000, "")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array for scripts.")
def list_(as_json: bool, max_messages: int, **options: Any) -> int:
    """List dead letters (oldest first) without consuming them."""
    from esp.dead_letters import format_table, look

    settings, dl = _settings(options)
    flt = _build_filter(options)
    found = look(settings, dl, flt, lambda x: x.classification(), max_messages=max_messages)
    rows = sorted(found.items, key=lambda r: r["dead_lettered_at"])
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        for line in format_table(rows):
            click.echo(line)
    click.echo(f"{len(rows)} dead letter(s) match ({flt.describe()}); {found.note}; nothing consumed", err=True)
    return 0


@dead_letters.command()
@click.argument("ids", nargs=-1, required=True)
@_common()
@_max_option(10000, " while looking for the ids")
@click.option("--json", "as_json", is_flag=True, help="Print the full records (as `export` writes them) as a JSON array.")
def show(ids: tuple[str, ...], as_json: bool, max_messages: int, **options: Any) -> int:
    """Show dead letters in full (body, attributes, reason) by comment id or message id."""
    from esp.dead_letters import Filter, format_letter, peek

    settings, dl = _settings(options)
    found = peek(settings, dl, Filter(ids=frozenset(ids)), max_messages=max_messages)
    if as_json:
        click.echo(json.dumps([x.to_record() for x in found.items], indent=2, ensure_ascii=False))
    else:
        for i, letter in enumerate(found.items):
            if i:
                click.echo("")
            for line in format_letter(letter):
                click.echo(line)
    seen = set().union(*(x.ids() for x in found.items)) if found.items else set()
    missing = [i for i in ids if i not in seen]
    if missing:
        click.echo(
            f"{len(found.items)} dead letter(s) shown; not found: {', '.join(missing)} ({found.note}); nothing consumed",
            err=True,
        )
        return 1
    click.echo(f"{len(found.items)} dead letter(s) shown ({found.note}); nothing consumed", err=True)
    return 0


@dead_letters.command()
@click.argument("file", type=click.Path(dir_okay=False, writable=True, path_type=Path))
@_common()
@_filter_options("include")
@_max_option(None, " (default: all)")
@click.option("--consume", is_flag=True, help="Ack (remove) the exported dead letters once the file is safely written.")
@click.option("--force", is_flag=True, help="Replace FILE if it exists.")
def export(file: Path, consume: bool, force: bool, max_messages: int | None, **options: Any) -> int:
    """Write matching dead letters to FILE as JSON lines (body, attributes, classification).

    The file is written to a temporary name, fsynced and renamed into place; only then, with
    --consume, are the exported dead letters acked.
    """
    from esp.dead_letters import export as do_export

    settings, dl = _settings(options)
    flt = _build_filter(options)
    result = do_export(settings, dl, flt, file, max_messages=max_messages, consume=consume, overwrite=force)
    consumed = f"consumed {result.acked}" if consume else "nothing consumed"
    failed = f", {result.ack_failed} ack(s) failed (still dead letters)" if result.ack_failed else ""
    click.echo(
        f"exported {result.written} dead letter(s) ({flt.describe()}) to {file}; {consumed}{failed}; {result.note}"
    )
    return 1 if result.ack_failed else 0


@dead_letters.command()
@_common(replay=True)
@_filter_options("exclude")
@click.option("--include-parked", is_flag=True, help="Replay parked dead letters too (same as --parked include).")
@click.option("--to", "to_topic", default=None, help="Topic to republish to (default: the comments topic).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Replay (or park) at most this many.")
@click.option("--rate", type=FiniteFloat(min=0.001), default=None, help="Most republishes per second (at least 0.001).")
@click.option("--dry-run", is_flag=True, help="Count what would be replayed and parked; change nothing.")
@_max_option(None, " (default: all)")
def replay(
    include_parked: bool,
    to_topic: str | None,
    limit: int | None,
    rate: float | None,
    dry_run: bool,
    max_messages: int | None,
    **options: Any,
) -> int:
    """Republish matching dead letters to the comments topic (or --to), then ack them.

    What the producer sent is republished exactly (body, attributes under their original names,
    ordering key), with esp_replay_count incremented. A dead letter is acked only after Pub/Sub
    stored its republished copy; one that would exceed --max-replays is parked instead (rewritten
    with esp_parked=true to the dead-letter topic or --park-topic). A dead letter that could not
    keep the whole body is left as it is and counted. Dead letters that do not match are handed
    back untouched.
    """
    from tqdm import tqdm

    from esp.dead_letters import replay as do_replay

    settings, dl = _settings(options)
    flt = _build_filter(options, include_parked=include_parked)
    # tqdm writes to stderr and turns itself off when stderr is not a terminal. SIGTERM (a plain
    # `kill`, or Kubernetes stopping a Job) takes the same orderly path as Ctrl-C: settle and ack
    # what was sent, hand back the rest.
    with _sigterm_as_interrupt(), tqdm(total=limit, unit="msg", desc="replay", disable=None, dynamic_ncols=True) as bar:
        result = do_replay(
            settings,
            dl,
            flt,
            to_topic=to_topic,
            limit=limit,
            rate=rate,
            dry_run=dry_run,
            max_messages=max_messages,
            progress=bar.update,
        )
    click.echo(result.summary())
    if result.interrupted:
        return 130
    return 0 if result.ok else 1


@dead_letters.command()
@_common()
@_filter_options("include")
@click.option("--yes", is_flag=True, help="Really discard the matching dead letters (there is no undo).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Purge at most this many.")
@click.option("--dry-run", is_flag=True, help="Count what would be purged; change nothing.")
@_max_option(None, " (default: all)")
def purge(yes: bool, limit: int | None, dry_run: bool, max_messages: int | None, **options: Any) -> int:
    """Discard (ack) matching dead letters for good. Refuses without --yes."""
    if not yes and not dry_run:
        raise click.UsageError("purge discards dead letters for good; add --yes (or see what it would take with --dry-run)")
    from esp.dead_letters import purge as do_purge

    settings, dl = _settings(options)
    flt = _build_filter(options)
    result = do_purge(settings, dl, flt, limit=limit, dry_run=dry_run, max_messages=max_messages)
    note = result.note + ("; --limit reached" if result.limit_reached else "")
    if dry_run:
        click.echo(f"dry run: would purge {result.matched} dead letter(s) ({flt.describe()}); nothing changed; {note}")
        return 0
    failed = f", {result.ack_failed} ack(s) failed (still dead letters)" if result.ack_failed else ""
    click.echo(f"purged {result.purged} dead letter(s) ({flt.describe()}){failed}; {note}")
    return 1 if result.ack_failed else 0
