"""Dead letters: look at them, export, replay and purge them, without losing any.

Pub/Sub has neither peek nor redrive, so every verb works on the dead-letter hold subscription
with leases (hold.py): a scan holds what it pulled until it ends, and always ends (idle, a count,
or a duration). Looking (looking.py: stats, list, show) consumes nothing; export (exporting.py)
streams to a file and consumes only after the file is safely on disk; replay (replaying.py) acks a
letter only after Pub/Sub stored its republished copy; purge (purging.py) acks on purpose.

Every kind of message on the dead-letter topic is read through esp.contracts.DeadLetter: the
worker's own (reason in `esp_*` attributes), those Pub/Sub's dead-letter policy forwarded (no
reason; their `esp_*` attributes are the producer's and never believed), and anything else. No
letter, whatever its body or attributes, can make a verb raise (letters.py, formatting.py).
"""

from esp.contracts import UNREADABLE
from esp.dead_letters.exporting import ExportResult, atomic_jsonl, export
from esp.dead_letters.filters import PARKED_ANY, PARKED_EXCLUDE, PARKED_ONLY, Filter, parse_when, read_ids_file
from esp.dead_letters.formatting import format_age, format_letter, format_stats, format_table, printable
from esp.dead_letters.hold import HoldSession, holding, scan_note
from esp.dead_letters.letters import Letter, record_data
from esp.dead_letters.looking import Looked, Stats, look, peek
from esp.dead_letters.purging import PurgeResult, purge
from esp.dead_letters.replaying import RateLimiter, ReplayResult, in_flight_window, replay

__all__ = [
    "PARKED_ANY",
    "PARKED_EXCLUDE",
    "PARKED_ONLY",
    "UNREADABLE",
    "ExportResult",
    "Filter",
    "HoldSession",
    "Letter",
    "Looked",
    "PurgeResult",
    "RateLimiter",
    "ReplayResult",
    "Stats",
    "atomic_jsonl",
    "export",
    "format_age",
    "format_letter",
    "format_stats",
    "format_table",
    "holding",
    "in_flight_window",
    "look",
    "parse_when",
    "peek",
    "printable",
    "purge",
    "read_ids_file",
    "record_data",
    "replay",
    "scan_note",
]
