"""Apache Beam jobs: training-data preparation and bulk backfill scoring."""
