"""`esp demo`: run the whole stream path locally and show the result (behind `make demo`)."""

from __future__ import annotations

import click


@click.command()
@click.option("--timeout-s", type=click.FloatRange(10), default=300.0, help="Give up waiting for scores after this long, seconds.")
def demo(timeout_s: float) -> None:
    """Run ESP end to end on this machine: emulator, model server, worker, sample comments in, scores out.

    The first run trains the small `demo` model from the shipped data (a few minutes on 2 cores)
    and caches it in models/demo; later runs start in seconds.
    """
    from esp.demo import render, run_demo, write_scores

    result = run_demo(timeout_s=timeout_s)
    write_scores(result)
    click.echo(render(result))
