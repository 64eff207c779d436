"""Pipeline options shared by ESP's Beam jobs, and the pipeline they run on."""

from __future__ import annotations

from collections.abc import Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions


def pipeline_options(beam_args: Sequence[str] = ()) -> PipelineOptions:
    """Beam options from the pass-through args; DirectRunner unless a runner is named.

    Naming it matters: without a runner, recent Beam picks the Prism runner, which tries to
    download a binary.
    """
    args = list(beam_args)
    if not any(a == "--runner" or a.startswith("--runner=") for a in args):
        args.append("--runner=DirectRunner")
    return PipelineOptions(args)


def new_pipeline(options: PipelineOptions) -> beam.Pipeline:
    """A pipeline on the runner `options` name; for the DirectRunner, one that never tries Prism.

    Beam 2.77's DirectRunner first tries to run a batch pipeline on the Prism runner, downloading
    its binary from GitHub, and falls back to its own in-process runner (the FnApiRunner, where the
    multi-process mode lives) only when that fails: offline, a failed download on every run; online,
    a runner ESP is not tested on. Its one switch for staying off Prism is the interactive mark,
    which it reads for nothing else.
    """
    runner = None
    name = str(options.view_as(StandardOptions).runner or "").rsplit(".", 1)[-1].lower()
    if name in ("directrunner", "switchingdirectrunner"):
        from apache_beam.runners.direct.direct_runner import SwitchingDirectRunner

        runner = SwitchingDirectRunner()
        runner.is_interactive()
    return beam.Pipeline(runner=runner, options=options)
