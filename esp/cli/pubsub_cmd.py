"""`esp pubsub ...`: Pub/Sub resources."""

from __future__ import annotations

import click

from esp.settings import PubSubSettings, build, click_options


@click.group()
def pubsub() -> None:
    """Create and check the Pub/Sub topics and subscriptions ESP uses."""


@pubsub.command()
@click_options(PubSubSettings)
@click.option("--update", is_flag=True, help="Change existing resources that differ from what ESP needs.")
@click.option(
    "--project-number",
    default=None,
    envvar="ESP_PROJECT_NUMBER",
    show_envvar=True,
    help="Numeric project id, for the dead-letter IAM grants (looked up when omitted).",
)
@click.option("--skip-iam", is_flag=True, help="Do not grant Pub/Sub's service agent the dead-letter roles.")
def init(update: bool, project_number: str | None, skip_iam: bool, **options: object) -> int:
    """Create the topics and subscriptions ESP needs, idempotently.

    Creates the comments, scores and dead-letter topics, the worker's subscription (with a
    dead-letter policy and retry backoff) and a subscription that holds dead letters. Running it
    again changes nothing and says so; where a resource differs from what ESP needs, it reports the
    difference, and --update fixes it. On a real project it also grants Pub/Sub's service agent the
    roles dead-lettering needs, or prints the gcloud commands when it may not.
    """
    from esp.pubsub_admin import init_resources

    settings = build(PubSubSettings, options)
    report = init_resources(settings, update=update, project_number=project_number, grant_iam=not skip_iam)
    for change in report.changes:
        click.echo(str(change))
    if report.differs:
        click.echo(f"{len(report.differs)} resource(s) need attention (see above).", err=True)
        return 1
    click.echo("Pub/Sub is ready for ESP." + ("" if report.changed else " Nothing changed."))
    return 0
