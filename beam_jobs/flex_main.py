"""The Dataflow Flex Template's entry point: the template's parameters -> `esp backfill`.

The launcher runs this file as `python flex_main.py --name=value ...` with the parameters of
beam_jobs/flex-template/metadata.json (snake_case, as Dataflow requires) and Dataflow's own options
(`--runner`, `--project`, `--template_location`...). ESP's options are hyphenated, so each parameter
that names an `esp backfill` option is renamed; everything else passes through to Beam untouched.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

TRUE = {"true", "1", "yes"}


def translate(argv: Sequence[str], esp_options: set[str], flags: set[str]) -> list[str]:
    """`--bq_table=X` -> `--bq-table=X`; `--publish_scores=true` -> `--publish-scores` (false: `--no-...`)."""
    out = []
    for arg in argv:
        name, sep, value = arg.partition("=")
        option = "--" + name.lstrip("-").replace("_", "-")
        if name.startswith("--") and option in flags:
            out.append(option if value.strip().lower() in TRUE or not sep else "--no-" + option[2:])
        elif name.startswith("--") and option in esp_options and sep:
            out.append(f"{option}={value}")
        else:
            out.append(arg)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    import click

    from esp.cli.backfill_cmd import backfill
    from esp.cli.main import cli

    options, flags = set(), set()
    for param in backfill.params:
        if isinstance(param, click.Option):
            (flags if param.is_flag else options).update(o for o in param.opts if o.startswith("--"))
    args = translate(sys.argv[1:] if argv is None else argv, options, flags)
    cli.main(["backfill", *args], prog_name="esp")


if __name__ == "__main__":
    main()
