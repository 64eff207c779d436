"""`esp config`: every setting, its environment variable, default and meaning."""

from __future__ import annotations

import json

import click

from esp.settings import ALL_GROUPS, describe


def settings_table_markdown() -> str:
    """The README's configuration table, generated from the settings declarations."""
    rows = ["| env var | option | default | meaning |", "|---|---|---|---|"]
    for group in ALL_GROUPS:
        for s in describe(group):
            default = "" if s.default is None else f"`{s.default}`"
            choices = f" One of: {', '.join(s.choices)}." if s.choices else ""
            rows.append(f"| `{s.env}` | `{s.option}` | {default} | {s.help}{choices} |")
    return "\n".join(rows)


@click.command()
@click.option("--markdown", is_flag=True, help="Print the table as Markdown (as in the README).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def config(markdown: bool, as_json: bool) -> None:
    """List every setting with its environment variable and default."""
    if markdown:
        click.echo(settings_table_markdown())
        return
    infos = [s for group in ALL_GROUPS for s in describe(group)]
    if as_json:
        click.echo(json.dumps([{**s.__dict__, "choices": list(s.choices or [])} for s in infos], indent=2, default=str))
        return
    for s in infos:
        click.echo(f"{s.env:<34} {s.option:<32} default={s.default!s:<22} {s.help}")
