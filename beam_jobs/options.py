"""Pipeline options shared by ESP's Beam jobs."""

from __future__ import annotations

from collections.abc import Sequence

from apache_beam.options.pipeline_options import PipelineOptions


def pipeline_options(beam_args: Sequence[str] = ()) -> PipelineOptions:
    """Beam options from the pass-through args; DirectRunner unless a runner is named.

    Naming it matters: without a runner, recent Beam picks the Prism runner, which tries to
    download a binary.
    """
    args = list(beam_args)
    if not any(a == "--runner" or a.startswith("--runner=") for a in args):
        args.append("--runner=DirectRunner")
    return PipelineOptions(args)
