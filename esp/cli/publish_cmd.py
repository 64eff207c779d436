"""`esp publish FILE|-`: publish comments from JSONL or CSV."""

from __future__ import annotations

import click

from esp.settings import CommentSettings, PubSubSettings, build, click_options

MAX_REJECTIONS_SHOWN = 20


def _attribute(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, str]:
    from esp.contracts import CLIENT_KEYWORDS, attribute_problem

    out = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{value!r} is not KEY=VALUE", ctx=ctx, param=param)
        if key in CLIENT_KEYWORDS:
            # The Pub/Sub client takes these names as publish() arguments, not as attributes.
            raise click.BadParameter(f"{key!r} is a name the Pub/Sub client keeps for itself; choose another", ctx=ctx, param=param)
        problem = attribute_problem(key, val)
        if problem is not None:
            raise click.BadParameter(f"{value[:60]!r}: {problem}", ctx=ctx, param=param)
        out[key] = val
    return out


@click.command()
@click.argument("source", metavar="FILE|-")
@click.option("--format", "fmt", type=click.Choice(["auto", "jsonl", "csv"]), default="auto", show_default=True,
              help="Input format; auto goes by the file name (.jsonl/.csv, optionally .gz); stdin is JSONL.")
@click.option("--id-column", default="id", show_default=True, help="CSV column or JSON field holding the comment id.")
@click.option("--text-column", default=None,
              help="CSV column or JSON field holding the text [default: text, else comment_text].")
@click.option("--attribute", "attributes", multiple=True, callback=_attribute, metavar="KEY=VALUE",
              help="Pub/Sub attribute added to every message (repeatable).")
@click.option("--max-outstanding-messages", type=click.IntRange(1), default=10_000, show_default=True,
              help="Publisher flow control: messages sent but not yet confirmed.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click_options(PubSubSettings)
@click_options(CommentSettings)
def publish(source: str, fmt: str, id_column: str, text_column: str | None, attributes: dict[str, str],
            max_outstanding_messages: int, no_progress: bool, **options: object) -> int:
    """Publish comments from a JSONL or CSV file (or - for stdin) to the comments topic.

    Each row needs an id and a text. Rows that break the comment contract are listed with their
    line numbers and not published; the exit code is 1 if any row was rejected or failed.
    """
    from esp.publishing import publish_file

    summary = publish_file(
        source,
        pubsub=build(PubSubSettings, options),
        comments=build(CommentSettings, options),
        fmt=fmt,
        id_column=id_column,
        text_column=text_column,
        attributes=attributes,
        max_outstanding_messages=max_outstanding_messages,
        progress=not no_progress,
    )
    for line, reason in summary.rejections[:MAX_REJECTIONS_SHOWN]:
        click.echo(f"rejected line {line}: {reason}", err=True)
    if summary.rejected > MAX_REJECTIONS_SHOWN:
        click.echo(f"... and {summary.rejected - MAX_REJECTIONS_SHOWN} more rejected rows", err=True)
    for failure in summary.failures:
        click.echo(f"failed {failure}", err=True)
    click.echo(summary.line())
    return 0 if summary.ok else 1
