"""ESP's settings: one typed place per process.

Each group is a frozen dataclass in a module of this package; every field names its environment
variable, its unit and its default. Commands compose the groups they need (`click_options`), other
entry points use `from_env`. `ALL_GROUPS` feeds `esp config` and the README's configuration table.
"""

from esp.settings.base import FiniteFloat, build, click_options, describe, from_env, setting
from esp.settings.batching import BatchingSettings
from esp.settings.contracts import CommentSettings
from esp.settings.dead_letters import DeadLetterSettings
from esp.settings.logs import LogSettings
from esp.settings.pubsub import PubSubSettings
from esp.settings.serving import ModelClientSettings, ModelServerSettings
from esp.settings.worker import WorkerSettings
from esp.settings.training import DataSettings, PrepareDataSettings, PretrainedSettings, ReportSettings, TrainSettings
from esp.settings.backfill import BackfillSettings, BigQuerySettings

ALL_GROUPS: list[type] = [PubSubSettings, CommentSettings, DeadLetterSettings, LogSettings, ModelClientSettings, ModelServerSettings, BatchingSettings, WorkerSettings, DataSettings, PrepareDataSettings, TrainSettings, ReportSettings, PretrainedSettings]
ALL_GROUPS += [BigQuerySettings, BackfillSettings]

__all__ = [
    "ALL_GROUPS",
    "BatchingSettings",
    "CommentSettings",
    "DataSettings",
    "DeadLetterSettings",
    "FiniteFloat",
    "LogSettings",
    "ModelClientSettings",
    "ModelServerSettings",
    "PrepareDataSettings",
    "PretrainedSettings",
    "PubSubSettings",
    "ReportSettings",
    "TrainSettings",
    "build",
    "click_options",
    "describe",
    "from_env",
    "setting",
    "WorkerSettings",
    "BackfillSettings",
    "BigQuerySettings",
]

# The HTTP API (`esp api`, issue 11).
from esp.settings.api import ApiSettings  # noqa: E402

ALL_GROUPS.append(ApiSettings)
__all__.append("ApiSettings")
