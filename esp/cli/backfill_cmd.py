"""`esp backfill`: re-score comment files in bulk with Beam (beam_jobs/backfill.py)."""

from __future__ import annotations

import click

from esp.settings import CommentSettings, ModelClientSettings, build, click_options


@click.command(context_settings={"ignore_unknown_options": True})
@click.option("--input", "input_pattern", required=True,
              help="Comment files: JSONL, one message body per line; a path or glob, local or gs:// (.gz read transparently).")
@click.option("--output", required=True, help="Output directory: scores-*.jsonl and dead-letters-*.jsonl; local or gs://.")
@click.option("--backend", type=click.Choice(["tfserving", "saved_model"]), default="tfserving",
              help="Score through TF Serving over gRPC (--model-server), or load the SavedModel in each Beam worker.")
@click.option("--saved-model-dir", default=None, help="Base path or version directory, for --backend saved_model.")
@click.option("--max-batch-size", type=click.IntRange(1), default=32, help="Most comments per model call.")
@click_options(ModelClientSettings)
@click_options(CommentSettings)
@click.argument("beam_args", nargs=-1, type=click.UNPROCESSED, metavar="[BEAM_ARGS]...")
def backfill(input_pattern: str, output: str, backend: str, saved_model_dir: str | None, max_batch_size: int,
             beam_args: tuple[str, ...], **options: object) -> int:
    """Score comment files in bulk (Apache Beam) into the same score records the stream publishes.

    Invalid comments and comments the model rejects go to dead-letters-*.jsonl with the reason.
    Runs on the DirectRunner unless BEAM_ARGS name another (e.g. --runner=DataflowRunner
    --project=P --region=R --temp_location=gs://B/tmp --setup_file=./setup.py).
    """
    from beam_jobs.backfill import BackfillConfig, run, summarize

    from serving.scorers import check_options

    client = build(ModelClientSettings, options)
    # A wrong combination fails here in one line, not inside a Beam worker.
    check_options(backend, client, saved_model_dir)
    config = BackfillConfig(
        input=input_pattern,
        output=output,
        backend=backend,
        saved_model_dir=saved_model_dir,
        client=client,
        max_batch_size=max_batch_size,
        max_body_bytes=build(CommentSettings, options).max_body_bytes,
    )
    click.echo(f"backfill: {input_pattern} -> {output} ({backend}, batches of up to {max_batch_size})", err=True)
    run(config, beam_args)
    scored, dead = summarize(output)
    click.echo(f"scored {scored}, dead-lettered {dead}; results in {output}")
    return 1 if dead else 0
