"""`esp demo`: run the whole stream path locally and show the result (behind `make demo`)."""

from __future__ import annotations

import click

from esp.settings import FiniteFloat


@click.command()
@click.option("--timeout-s", type=FiniteFloat(10), default=300.0, help="Give up waiting for scores after this long, seconds.")
@click.option(
    "--keep-running",
    is_flag=True,
    help="After the result, keep the emulator, model server, worker and HTTP API (with its page) up until Ctrl-C.",
)
def demo(timeout_s: float, keep_running: bool) -> None:
    """Run ESP end to end on this machine: emulator, model server, worker, HTTP API, sample comments in, scores out.

    The first run trains the small `demo` model from the shipped data (a few minutes on 2 cores)
    and caches it in models/demo; later runs start in seconds. With --keep-running the local stack
    and the web page stay up until Ctrl-C, then everything is stopped as usual.
    """
    from esp.demo import DemoResult, render, run_demo, write_scores

    def wait_for_ctrl_c(result: DemoResult) -> None:
        import threading

        write_scores(result)
        click.echo(render(result))
        if result.api is None:
            raise click.ClickException("--keep-running needs the API, and the demo did not start it")
        click.secho(f"The local stack is up: open {result.api.url}/ for the page, {result.api.url}/docs for the API. "
                    "Press Ctrl-C to stop it.", bold=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            click.echo("\nstopping...", err=True)

    result = run_demo(timeout_s=timeout_s, keep_running=wait_for_ctrl_c if keep_running else None)
    if not keep_running:
        write_scores(result)
        click.echo(render(result))
