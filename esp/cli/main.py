"""`esp`: the root command group, and the one place that turns errors into exit codes.

Usage errors and ESP's own operational errors print one line on stderr and exit non-zero; only a
real bug shows a traceback.
"""

from __future__ import annotations

import importlib
import sys

import click

from esp import __version__
from esp.errors import EspError

# name -> "module:attribute". Modules are imported to build the command tree, so they must stay
# light: heavy imports go inside the command functions.
SUBCOMMANDS = {
    "config": "esp.cli.config_cmd:config",
    "pubsub": "esp.cli.pubsub_cmd:pubsub",
    "publish": "esp.cli.publish_cmd:publish",
    "demo": "esp.cli.demo_cmd:demo",
    "worker": "esp.cli.worker_cmd:worker",
    "dead-letters": "esp.cli.dead_letters_cmd:dead_letters",
    "prepare-data": "esp.cli.train_cmd:prepare_data",
    "train": "esp.cli.train_cmd:train",
    "evaluate": "esp.cli.train_cmd:evaluate",
    "backfill": "esp.cli.backfill_cmd:backfill",
    "serve": "esp.cli.serve_cmd:serve",
    "score": "esp.cli.serve_cmd:score",
    "api": "esp.cli.api_cmd:api",
    "pretrained": "esp.cli.pretrained_cmd:pretrained",
}


class EspGroup(click.Group):
    def main(self, *args, **kwargs):  # type: ignore[override]
        kwargs["standalone_mode"] = False
        try:
            rv = super().main(*args, **kwargs)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            click.echo("esp: aborted", err=True)
            sys.exit(130)
        except click.UsageError as exc:
            # One line, with where to look next, instead of click's three-line usage dump.
            where = exc.ctx.command_path if exc.ctx else "esp"
            click.echo(f"esp: error: {exc.format_message()} (see '{where} --help')", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"esp: error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except EspError as exc:
            click.echo(f"esp: error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("esp: interrupted", err=True)
            sys.exit(130)
        # A command may return an int exit code (for "finished, but some items failed").
        sys.exit(rv if isinstance(rv, int) else 0)


# Options that are not settings (e.g. `esp publish --id-column`) still read the environment, under
# click's derived name: ESP_<COMMAND>_<SUBCOMMAND>_<OPTION>, e.g. ESP_PUBLISH_ID_COLUMN.
CONTEXT_SETTINGS = {
    "help_option_names": ["-h", "--help"],
    "max_content_width": 110,
    "auto_envvar_prefix": "ESP",
    "show_default": True,
}


@click.group(cls=EspGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "--version", prog_name="esp")
def cli() -> None:
    """ESP, the Elastic Synapse Processor: score user comments for toxicity at scale.

    Comments arrive on Pub/Sub, workers batch them to TensorFlow Serving over gRPC and publish
    scores; Beam jobs prepare training data and backfill history. Every option can also be set by
    the environment variable shown in its help (`esp config` lists them all).
    """


for _name, _target in SUBCOMMANDS.items():
    _module, _attr = _target.split(":")
    cli.add_command(getattr(importlib.import_module(_module), _attr), _name)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
