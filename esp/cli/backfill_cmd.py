"""`esp backfill`: re-score history in bulk with Beam (beam_jobs/backfill.py).

Sources: JSONL files, a BigQuery table or a query. Sinks: files, a BigQuery scores table (staging +
MERGE) with its dead-letters table, the scores topic. Before anything runs, the command checks what
it can reach (the source table and its columns, the datasets, the topic), so a wrong name is one line,
not a stack trace from inside a Beam worker.
"""

from __future__ import annotations

import click

from esp.settings import (
    BackfillSettings,
    BigQuerySettings,
    CommentSettings,
    LogSettings,
    ModelClientSettings,
    PubSubSettings,
    build,
    click_options,
)


@click.command(context_settings={"ignore_unknown_options": True})
@click.option("--input", "input_pattern", default=None,
              help="Source: comment files, JSONL, one message body per line; a path or glob, local or gs:// (.gz read transparently).")
@click.option("--bq-table", default=None, help="Source: a BigQuery table, PROJECT.DATASET.TABLE (columns: --id-column, --text-column).")
@click.option("--bq-query", default=None,
              help="Source: a GoogleSQL query returning --id-column and --text-column; materialised into the staging dataset first.")
@click.option("--output", default=None, help="Sink: a directory for scores-*.jsonl and dead-letters-*.jsonl; local or gs://.")
@click.option("--bq-scores-table", default=None,
              help="Sink: BigQuery scores table PROJECT.DATASET.TABLE, created if missing; rows MERGEd on (id, model_version).")
@click.option("--bq-dead-letters-table", default=None, help="Dead letters' table; default: <scores table>_dead_letters.")
@click.option("--bq-staging-dataset", default=None,
              help="PROJECT.DATASET for the run's staging tables (they expire); default: the scores table's dataset.")
@click.option("--publish-scores/--no-publish-scores", default=False,
              help="Sink: also publish every score to the scores topic (--scores-topic), marked source=backfill.")
@click.option("--backend", type=click.Choice(["tfserving", "saved_model"]), default="tfserving",
              help="Score through TF Serving over gRPC (--model-server), or load the SavedModel in each Beam worker.")
@click.option("--saved-model-dir", default=None, help="Base path or version directory (local or gs://), for --backend saved_model.")
@click.option("--max-batch-size", type=click.IntRange(1), default=32, help="Most comments per model call.")
@click_options(BackfillSettings)
@click_options(BigQuerySettings)
@click_options(ModelClientSettings)
@click_options(CommentSettings)
@click_options(PubSubSettings, exclude=("comments_topic", "dead_letter_topic", "subscription", "dead_letter_subscription",
                                        "max_delivery_attempts", "ack_deadline_s", "min_retry_backoff_s",
                                        "max_retry_backoff_s", "dead_letter_retention_days"))
@click_options(LogSettings)
@click.argument("beam_args", nargs=-1, type=click.UNPROCESSED, metavar="[BEAM_ARGS]...")
def backfill(input_pattern: str | None, bq_table: str | None, bq_query: str | None, output: str | None,
             bq_scores_table: str | None, bq_dead_letters_table: str | None, bq_staging_dataset: str | None,
             publish_scores: bool, backend: str, saved_model_dir: str | None, max_batch_size: int,
             beam_args: tuple[str, ...], **options: object) -> int:
    """Score comments in bulk (Apache Beam) into the same score records the stream publishes.

    Reads JSONL files (--input), a BigQuery table (--bq-table) or a query (--bq-query); writes score
    files (--output), a BigQuery scores table (--bq-scores-table) and/or the scores topic
    (--publish-scores). Invalid comments and comments the model rejects are dead-lettered with the
    reason, beside the scores. Runs on the DirectRunner unless BEAM_ARGS name another (e.g.
    --runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp
    --sdk_container_image=IMAGE; docs/backfill.md). Exits 1 when anything was dead-lettered.
    """
    from beam_jobs.backfill import BackfillConfig, run

    from esp.logs import configure_logging
    from serving.scorers import check_options

    configure_logging(build(LogSettings, options))
    client = build(ModelClientSettings, options)
    # A wrong combination fails here in one line, not inside a Beam worker.
    check_options(backend, client, saved_model_dir)
    config = BackfillConfig(
        input=input_pattern,
        output=output,
        bq_table=bq_table,
        bq_query=bq_query,
        bq_scores_table=bq_scores_table,
        bq_dead_letters_table=bq_dead_letters_table,
        bq_staging_dataset=bq_staging_dataset,
        publish_scores=publish_scores,
        backend=backend,
        saved_model_dir=saved_model_dir,
        client=client,
        max_batch_size=max_batch_size,
        max_body_bytes=build(CommentSettings, options).max_body_bytes,
        bigquery=build(BigQuerySettings, options),
        backfill=build(BackfillSettings, options),
        pubsub=build(PubSubSettings, options),
    )
    beam_args = _with_project(beam_args, config.pubsub.project)
    offline = any(a.startswith("--template_location") for a in beam_args)
    if not offline:
        from beam_jobs.backfill import preflight

        preflight(config)
    click.echo(f"backfill {config.run_id}: {config.source_description} ({backend}, batches of up to {max_batch_size})", err=True)
    summary = run(config, beam_args)
    click.echo(summary.line())
    return 1 if summary.dead_lettered else 0


def _with_project(beam_args: tuple[str, ...], project: str) -> tuple[str, ...]:
    """`--project` is ESP's option too (the topic's project); hand it on to Beam when given here."""
    ctx = click.get_current_context()
    source = ctx.get_parameter_source("project")
    given = source in (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)
    if given and not any(a == "--project" or a.startswith("--project=") for a in beam_args):
        return (*beam_args, f"--project={project}")
    return beam_args
