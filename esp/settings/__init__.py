"""ESP's settings: one typed place per process.

Each group is a frozen dataclass in a module of this package; every field names its environment
variable, its unit and its default. Commands compose the groups they need (`click_options`), other
entry points use `from_env`. `ALL_GROUPS` feeds `esp config` and the README's configuration table.
"""

from esp.settings.base import build, click_options, describe, from_env, setting
from esp.settings.contracts import CommentSettings
from esp.settings.logs import LogSettings
from esp.settings.pubsub import PubSubSettings

ALL_GROUPS: list[type] = [PubSubSettings, CommentSettings, LogSettings]

__all__ = [
    "ALL_GROUPS",
    "CommentSettings",
    "LogSettings",
    "PubSubSettings",
    "build",
    "click_options",
    "describe",
    "from_env",
    "setting",
]
