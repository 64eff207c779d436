"""`esp prepare-data`, `esp train`, `esp evaluate`: the model pipeline's commands.

Light at import (click and esp.settings only); Beam, TensorFlow and scikit-learn load inside the
command bodies.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from esp.errors import EspError
from esp.settings import DataSettings, LogSettings, PrepareDataSettings, PretrainedSettings, ReportSettings, TrainSettings, build, click_options


def _fail_missing(exc: Exception) -> EspError:
    return EspError(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": False})
@click_options(DataSettings)
@click_options(PrepareDataSettings)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.argument("beam_args", nargs=-1, type=click.UNPROCESSED, metavar="[BEAM_ARGS]...")
def prepare_data(no_progress: bool, beam_args: tuple[str, ...], **options: object) -> None:
    """Clean, dedupe and split labelled comments into TFRecords for training (an Apache Beam job).

    Reads CSV/JSONL from local paths or gs:// globs, normalises text, sends rows without text or
    with broken labels to rejects-*.jsonl with the reason, dedupes by normalised text, splits by
    a hash of the id, and writes <data-dir>/{train,dev,test}-*.tfrecord plus stats.json.
    Runs on the DirectRunner unless BEAM_ARGS name another (e.g. --runner=DataflowRunner
    --project=P --region=R --temp_location=gs://B/tmp --setup_file=./setup.py; see docs/training.md).
    """
    data = build(DataSettings, options)
    prep = build(PrepareDataSettings, options)
    from beam_jobs.prepare_data import PrepareConfig, check_headers, run

    config = PrepareConfig(
        input_patterns=prep.patterns(),
        output_dir=data.data_dir,
        id_column=prep.id_column.strip(),
        text_column=prep.text_column,
        label_columns=prep.labels(),
        input_format=prep.input_format,
        train_ratio=prep.train_ratio,
        dev_ratio=prep.dev_ratio,
        test_ratio=prep.test_ratio,
        num_shards=prep.num_shards,
        show_progress=not no_progress,
    )
    from apache_beam.io.filesystems import FileSystems

    for pattern in config.input_patterns:
        if not any(r.metadata_list for r in FileSystems.match([pattern])):
            raise click.BadParameter(f"{pattern!r} matches no file", param_hint="--input")
    try:
        check_headers(config)
    except ValueError as exc:
        raise EspError(str(exc)) from None
    stats = run(config, list(beam_args))
    rows = stats["rows"]
    click.echo(
        f"prepared {rows['total']} comments into {data.data_dir}: train {rows['train']}, dev {rows['dev']}, test {rows['test']}; "
        f"{stats['duplicates_removed']} duplicates removed ({stats['label_conflicts']} with conflicting labels), "
        f"{stats['rejected_total']} rejected {json.dumps(stats['rejects'])}"
    )
    if rows["total"] == 0:
        # Every row refused (a label field the JSONL never has, say) leaves nothing to train on:
        # a failure, not a result.
        raise EspError(f"no comment survived preparation: {stats['rejected_total']} rejected {json.dumps(stats['rejects'])}; "
                       f"the reasons are in {data.data_dir}/rejects-*.jsonl")
    prevalence = stats["prevalence"]["all"]
    click.echo("label prevalence: " + ", ".join(f"{k} {v:.2%}" for k, v in prevalence.items() if v is not None))


@click.command()
@click_options(DataSettings)
@click_options(TrainSettings)
@click_options(PretrainedSettings)
@click_options(ReportSettings)
@click_options(LogSettings)
@click.option("--overwrite", is_flag=True, help="Replace the export version if it exists.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def train(overwrite: bool, no_progress: bool, **options: object) -> None:
    """Train a classifier on prepared data, export it for TF Serving, and write the evaluation report.

    The labels are those `esp prepare-data` was given (--label-columns): Jigsaw's six by default,
    any 0/1 columns of another data set otherwise; serve such a model under its own --model-name.
    Profiles: tiny (tests, seconds), demo (a few minutes), default (the shipped model, about 10
    minutes on 2 cores), minilm (fine-tunes the pretrained all-MiniLM-L6-v2 fetched by `esp
    pretrained fetch`; an hour or more on 2 cores), base (BERT-base, for an accelerator, with
    --pretrained). --teacher distils exported teachers into the profile's model;
    --cross-fit-fold k/K trains one of K cross-fit teachers.
    Exports <export-base-path>/<version>/ per docs/model-contract.md and reports to --report-dir.
    """
    from esp.logs import configure_logging

    configure_logging(build(LogSettings, options))
    data = build(DataSettings, options)
    ts = build(TrainSettings, options)
    ps = build(PretrainedSettings, options)
    rs = build(ReportSettings, options)
    if ts.pretrained and not Path(ts.pretrained).is_dir():
        raise click.BadParameter(f"{ts.pretrained!r} is not a directory", param_hint="--pretrained")
    for teacher in ts.teacher_dirs():
        if not Path(teacher).is_dir():
            raise click.BadParameter(f"{teacher!r} is not a directory", param_hint="--teacher")
    from training.distill import TeacherError
    from training.pretrained import PretrainedError
    from training.records import DataError
    from training.profiles import get_profile
    from training.pipeline import train_and_export

    profile = get_profile(ts.profile, epochs=ts.epochs, max_train_rows=ts.max_train_rows, distill_alpha=ts.distill_alpha, distill_wide=ts.distill_wide)
    work_name = profile.name + (f"-fold{ts.fold()[0]}of{ts.fold()[1]}" if ts.fold() else "") + ("-distilled" if ts.teacher_dirs() else "")

    def on_epoch(record: dict) -> None:
        click.echo(
            f"epoch {record['epoch']}/{profile.epochs}: loss {record['loss']:.4f}, dev mean ROC AUC "
            f"{record['dev_mean_roc_auc']:.4f} ({record['seconds']:.0f}s)",
            err=True,
        )

    try:
        out = train_and_export(
            data_dir=data.data_dir,
            profile=profile,
            work_dir=str(Path(ts.work_dir) / work_name),
            export_base_path=ts.base_path(),
            export_version=ts.export_version,
            seed=ts.seed,
            pretrained=ts.pretrained,
            pretrained_cache_dir=ps.pretrained_cache_dir,
            model_name=ts.model_name,
            teachers=ts.teacher_dirs(),
            allow_in_sample_teacher=ts.allow_in_sample_teacher,
            cross_fit=ts.fold(),
            cache_dir=ts.cache_dir,
            threads=ts.threads,
            target_precision=rs.target_precision,
            natural_prevalence=rs.natural_toxic_prevalence,
            report_dir=rs.report_dir,
            baselines=rs.baselines,
            progress=not no_progress,
            on_epoch=on_epoch,
            overwrite=overwrite,
        )
    except (FileNotFoundError, FileExistsError, PretrainedError, TeacherError, DataError) as exc:
        raise _fail_missing(exc) from None
    click.echo(f"exported {out['version_dir']} as model {ts.model_name} (profile {profile.name}, best epoch {out['best_epoch']}, trained in {out['train_seconds']:.0f}s)")
    click.echo(f"test mean ROC AUC {out['test']['mean_roc_auc']:.4f} (dev {out['dev_mean_roc_auc']:.4f})")
    report = out["report"]
    if report and "tfidf_logreg" in report:
        click.echo(f"TF-IDF + LogReg on the same split: {report['tfidf_logreg']['mean_roc_auc']:.4f}; report in {rs.report_dir}/report.md")


@click.command()
@click.option("--model-dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="An exported version directory (<base>/<version>/) or a base path (the highest version is used).")
@click.option("--compare-with", type=click.Path(exists=True, file_okay=False), default=None,
              help="Another exported model (version or base directory): the paired bootstrap 95% CI of the difference in mean ROC AUC on the same test rows.")
@click_options(DataSettings)
@click_options(ReportSettings)
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def evaluate(model_dir: str, compare_with: str | None, no_progress: bool, **options: object) -> None:
    """Evaluate an exported model on the held-out test split, beside TF-IDF and alt-profanity-check."""
    data = build(DataSettings, options)
    rs = build(ReportSettings, options)
    from esp.scoring import ModelNotFound
    from serving.saved_model_files import resolve_version_dir
    from training.compare import NotComparable
    from training.evaluate import evaluate as run_evaluate
    from training.pipeline import DEFAULT_SAMPLE
    from training.records import DataError

    try:
        path, _ = resolve_version_dir(model_dir)
        other = resolve_version_dir(compare_with)[0] if compare_with else None
    except ModelNotFound as exc:
        raise click.BadParameter(str(exc), param_hint="--model-dir/--compare-with") from None
    try:
        result = run_evaluate(path, data.data_dir, rs.report_dir, baselines=rs.baselines, natural_prevalence=rs.natural_toxic_prevalence,
                              sample_path=DEFAULT_SAMPLE, progress=not no_progress, compare_with=other)
    except (FileNotFoundError, NotComparable, DataError) as exc:
        raise _fail_missing(exc) from None
    click.echo(f"{path}: test mean ROC AUC {result['model']['mean_roc_auc']:.4f} on {result['test_rows']} comments")
    if "compared_with" in result:
        c = result["compared_with"]
        click.echo(f"minus {c['version_dir']} ({c['mean_roc_auc']:.4f}): {c['difference']:+.4f}, 95% CI [{c['low']:+.4f}, {c['high']:+.4f}] "
                   f"(paired bootstrap on the same rows, {c['resamples']} resamples)")
    for key, name in (("tfidf_logreg", "TF-IDF word+char + LogReg"), ("tfidf_logreg_word", "TF-IDF word + LogReg"), ("profanity_check", "alt-profanity-check (optimistic: trained on Jigsaw)")):
        if key in result:
            click.echo(f"{name}: {result[key]['mean_roc_auc']:.4f}")
    if "demo_check" in result:
        d = result["demo_check"]
        click.echo(f"demo check: {d['labelled_toxic']}/{d['top']} of the top-scored sample comments are labelled toxic")
    click.echo(f"report: {rs.report_dir}/report.md")
