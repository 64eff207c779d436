"""`esp api`: the HTTP scoring API (and `esp api new-key` for its keys)."""

from __future__ import annotations

import click

from esp.settings import CommentSettings, FiniteFloat, LogSettings, ModelClientSettings, PubSubSettings, build, click_options
from esp.settings.api import ApiSettings
from esp.settings.batching import API_BATCH_SIZE, BatchingSettings


@click.group(invoke_without_command=True)
@click_options(ApiSettings)
# Batches of 16, not the worker's 32: the API has fewer comments waiting to group by length, and
# smaller batches pad less (measured side by side: +15-23% requests/s, docs/api.md).
@click_options(BatchingSettings, defaults={"max_batch_size": API_BATCH_SIZE})
@click_options(ModelClientSettings)
@click_options(CommentSettings)
@click_options(PubSubSettings)
@click_options(LogSettings)
@click.pass_context
def api(ctx: click.Context, **values: object) -> int | None:
    """Serve the HTTP scoring API until SIGTERM/SIGINT (subcommand `new-key` makes an API key).

    POST /v1/score (the stream's contracts), POST /v1alpha1/comments:analyze and :suggestscore
    (Perspective-compatible), the web page at /, OpenAPI docs at /docs, /healthz, /readyz and
    /metrics, all on --api-port. Comments from concurrent requests share micro-batches to the model
    server (TF Serving over gRPC, --model-server). A full queue answers 429, an unavailable model
    server 503, both with Retry-After, within --api-request-deadline-s. Suggested scores are
    published to --feedback-topic.
    """
    if ctx.invoked_subcommand is not None:
        return None
    from api.server import serve

    return serve(
        build(ApiSettings, values),
        batching=build(BatchingSettings, values),
        client=build(ModelClientSettings, values),
        comments=build(CommentSettings, values),
        pubsub=build(PubSubSettings, values),
        logs=build(LogSettings, values),
    )


@api.command("new-key")
@click.argument("name")
@click.option("--rate", "rate_per_s", type=FiniteFloat(min=0, min_open=True), default=None, help="Comments per second this key may score [default: --api-default-rate-per-s].")
@click.option("--burst", type=click.IntRange(min=1), default=None, help="Token bucket size, comments [default: --api-default-burst].")
def new_key(name: str, rate_per_s: float | None, burst: int | None) -> None:
    """Make an API key called NAME: prints the key (once: only its hash is kept) and the keys-file line."""
    from api.keys import hash_key, new_key as make_key

    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise click.BadParameter("use letters, digits, '-', '_' and '.' only", param_hint="NAME")
    key = make_key()
    line = f"{name}  {hash_key(key)}"
    if rate_per_s is not None:
        line += f"  {rate_per_s:g}"
        if burst is not None:
            line += f"  {burst}"
    elif burst is not None:
        raise click.UsageError("--burst needs --rate (a keys-file line gives the rate before the burst)")
    click.echo(f"key (give it to the client; it is not stored anywhere): {key}", err=True)
    click.echo("add this line to the keys file (ESP_API_KEYS_FILE):", err=True)
    click.echo(line)
