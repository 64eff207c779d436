"""ESP's BigQuery source and sink for Beam: DoFns over the BigQuery client libraries.

Beam's own BigQuery connectors build their clients without an endpoint, so they cannot be pointed at
a local emulator; these DoFns take one (esp.settings.BigQuerySettings) and run unchanged against
BigQuery itself.

Source (what Beam's DIRECT_READ does): `PlanRead` turns a table, or a query (materialised first into
a staging table that expires), into one Storage Read session split into streams; after a Reshuffle,
`ReadStream` reads each stream in parallel as Arrow record batches.

Sink: `WriteRows` appends each bundle's rows to its own PENDING Storage Write stream and outputs the
stream's name once the bundle is done. A bundle that fails never outputs its stream, so its rows are
never committed: retries cannot duplicate rows. `Finalize` commits the streams of every bundle that
succeeded (BatchCommitWriteStreams), then runs one MERGE on (id, model_version) from the run's
staging table into the scores table and drops the staging table. MERGE sees committed rows at once,
unlike legacy streaming inserts, whose rows DML cannot touch for a while.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import re
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from esp.errors import ConfigError
from esp.settings import BigQuerySettings

log = logging.getLogger(__name__)

METRICS_NAMESPACE = "esp_backfill"

# Columns every scores row has besides one FLOAT64 column per label (the model's signature decides
# which labels; nothing here names them).
ID = "id"
MODEL_VERSION = "model_version"
SCORES_FIXED_COLUMNS = ("id", "flags", "truncated", "model_name", "model_version", "scored_at", "run_id")
DEAD_LETTER_COLUMNS = ("id", "body", "stage", "error_type", "reason", "dead_lettered_at", "run_id", "source")

# One AppendRows request must stay under 10 MB; stay well inside it.
APPEND_MAX_BYTES = 8 * 1024 * 1024
APPEND_MAX_ROWS = 10_000
# A dead letter's body in the dead-letters table is cut to this many bytes. A row must fit in one
# AppendRows request (10 MB), and the body of a row over --max-body-bytes is as large as the input
# made it: one huge source row used to fail the whole run at the write. The cut row says so in its
# reason, with the whole input's size and SHA-256; the input itself stays where it was read from.
MAX_DEAD_LETTER_BODY_BYTES = 1024 * 1024
# BatchCommitWriteStreams takes a list of streams; commit them in slices of this many.
COMMIT_CHUNK = 1000

_PROJECT_RE = re.compile(r"^[a-z][a-z0-9.:-]{1,100}[a-z0-9]$")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,299}$")
_DATASET_RE = re.compile(r"^[A-Za-z0-9_]{1,1024}$")


@dataclasses.dataclass(frozen=True)
class TableRef:
    """A fully qualified table; its parts are checked, so it can be quoted into SQL safely."""

    project: str
    dataset: str
    table: str

    @classmethod
    def parse(cls, spec: str, default_project: str | None = None, *, what: str = "table") -> TableRef:
        parts = spec.strip().split(".")
        if len(parts) == 2 and default_project:
            parts = [default_project, *parts]
        if len(parts) != 3:
            raise ConfigError(f"{what} {spec!r} must be PROJECT.DATASET.TABLE")
        project, dataset, table = parts
        if not _PROJECT_RE.match(project):
            raise ConfigError(f"{what} {spec!r}: {project!r} is not a project id")
        if not _DATASET_RE.match(dataset):
            raise ConfigError(f"{what} {spec!r}: {dataset!r} is not a dataset id (letters, digits, underscores)")
        if not _DATASET_RE.match(table):
            raise ConfigError(f"{what} {spec!r}: {table!r} is not a table id (letters, digits, underscores)")
        return cls(project, dataset, table)

    def __str__(self) -> str:
        return f"{self.project}.{self.dataset}.{self.table}"

    @property
    def sql(self) -> str:
        return f"`{self.project}.{self.dataset}.{self.table}`"

    @property
    def path(self) -> str:
        """The resource name the Storage APIs use."""
        return f"projects/{self.project}/datasets/{self.dataset}/tables/{self.table}"


@dataclasses.dataclass(frozen=True)
class DatasetRef:
    project: str
    dataset: str

    @classmethod
    def parse(cls, spec: str, default_project: str | None = None) -> DatasetRef:
        parts = spec.strip().split(".")
        if len(parts) == 1 and default_project:
            parts = [default_project, *parts]
        if len(parts) != 2 or not _PROJECT_RE.match(parts[0]) or not _DATASET_RE.match(parts[1]):
            raise ConfigError(f"dataset {spec!r} must be PROJECT.DATASET")
        return cls(*parts)

    def table(self, name: str) -> TableRef:
        return TableRef(self.project, self.dataset, name)

    def __str__(self) -> str:
        return f"{self.project}.{self.dataset}"


# ---------------------------------------------------------------------------------------------
# Clients


def rest_client(settings: BigQuerySettings, project: str) -> Any:
    """A google-cloud-bigquery Client on `settings`' endpoint (anonymous for an emulator)."""
    from google.api_core.client_options import ClientOptions
    from google.cloud import bigquery

    kwargs: dict[str, Any] = {"project": project, "location": settings.bigquery_location}
    if settings.bigquery_api_endpoint:
        kwargs["client_options"] = ClientOptions(api_endpoint=settings.bigquery_api_endpoint)
    if settings.emulated:
        from google.auth.credentials import AnonymousCredentials

        kwargs["credentials"] = AnonymousCredentials()
    return bigquery.Client(**kwargs)


def _storage_transport(settings: BigQuerySettings, transport_cls: Any) -> Any:
    if not settings.bigquery_storage_endpoint:
        return None
    if settings.emulated:
        import grpc

        # BigQuery rows can be large: lift gRPC's 4 MiB receive limit as Google's own client does.
        channel = grpc.insecure_channel(
            settings.bigquery_storage_endpoint, options=[("grpc.max_receive_message_length", -1)]
        )
        return transport_cls(channel=channel)
    return transport_cls(host=settings.bigquery_storage_endpoint)


def read_client(settings: BigQuerySettings) -> Any:
    from google.cloud.bigquery_storage_v1 import BigQueryReadClient
    from google.cloud.bigquery_storage_v1.services.big_query_read.transports import BigQueryReadGrpcTransport

    transport = _storage_transport(settings, BigQueryReadGrpcTransport)
    return BigQueryReadClient(transport=transport) if transport is not None else BigQueryReadClient()


def write_client(settings: BigQuerySettings) -> Any:
    from google.cloud.bigquery_storage_v1 import BigQueryWriteClient
    from google.cloud.bigquery_storage_v1.services.big_query_write.transports import BigQueryWriteGrpcTransport

    transport = _storage_transport(settings, BigQueryWriteGrpcTransport)
    return BigQueryWriteClient(transport=transport) if transport is not None else BigQueryWriteClient()


# ---------------------------------------------------------------------------------------------
# Schemas


@dataclasses.dataclass(frozen=True)
class Column:
    name: str
    type: str  # STRING, FLOAT64, INT64, BOOL, TIMESTAMP
    mode: str = "NULLABLE"  # or REQUIRED, REPEATED
    description: str = ""


def check_labels(labels: Sequence[str]) -> None:
    """Labels become column names: refuse ones BigQuery cannot take or that clash with fixed columns.

    BigQuery column names ignore case, so `ID` clashes with `id` and `toxic` with `TOXIC`.
    """
    seen: set[str] = set()
    for label in labels:
        if not _NAME_RE.fullmatch(label):  # fullmatch: `$` alone lets a trailing newline through
            raise ConfigError(f"label {label!r} is not a valid BigQuery column name")
        if label.lower() in SCORES_FIXED_COLUMNS:
            raise ConfigError(f"label {label!r} clashes with the scores table's own column of that name")
        if label.lower() in seen:
            raise ConfigError(f"labels {list(labels)} repeat a name (BigQuery column names ignore case)")
        seen.add(label.lower())


def scores_columns(labels: Sequence[str]) -> list[Column]:
    """The scores table: one FLOAT64 per label, in the model's order, then the score's other fields."""
    check_labels(labels)
    return [
        Column("id", "STRING", "REQUIRED", "The comment id."),
        *(Column(label, "FLOAT64", "NULLABLE", f"Probability of `{label}`, 0..1.") for label in labels),
        Column("flags", "STRING", "REPEATED", "Labels whose probability reached the model's threshold."),
        Column("truncated", "BOOL", "NULLABLE", "True when the model read only the first part of the text."),
        Column("model_name", "STRING", "NULLABLE", "Model name."),
        Column("model_version", "INT64", "REQUIRED", "Model version that scored the comment."),
        Column("scored_at", "TIMESTAMP", "REQUIRED", "When the comment was scored (the partitioning column)."),
        Column("run_id", "STRING", "NULLABLE", "The backfill run that wrote the row."),
    ]


DEAD_LETTER_SCHEMA = [
    Column("id", "STRING", "NULLABLE", "The comment id, when the row had a readable one."),
    Column("body", "STRING", "NULLABLE", "The input as read: the file line, or the source row as JSON."),
    Column("stage", "STRING", "REQUIRED", "Where it failed: validate or score."),
    Column("error_type", "STRING", "REQUIRED", "Why, as a code (esp.contracts.ErrorType)."),
    Column("reason", "STRING", "NULLABLE", "Why, in words."),
    Column("dead_lettered_at", "TIMESTAMP", "REQUIRED", "When (the partitioning column)."),
    Column("run_id", "STRING", "NULLABLE", "The backfill run."),
    Column("source", "STRING", "NULLABLE", "The input: file pattern, table or `query`."),
]


def labels_of(columns: Sequence[Column]) -> list[str]:
    return [c.name for c in columns if c.type == "FLOAT64"]


def _schema_fields(columns: Sequence[Column]) -> list[Any]:
    from google.cloud import bigquery

    return [bigquery.SchemaField(c.name, c.type, mode=c.mode, description=c.description) for c in columns]


def columns_of(table: Any) -> list[Column]:
    return [Column(f.name, _canonical_type(f.field_type), f.mode or "NULLABLE") for f in table.schema]


def _canonical_type(t: str) -> str:
    return {"FLOAT": "FLOAT64", "INTEGER": "INT64", "BOOLEAN": "BOOL"}.get(t.upper(), t.upper())


def unfit_columns(
    have: Sequence[Column], wanted: Sequence[Column], *, can_add: bool = False, addable: Collection[str] = ()
) -> list[str]:
    """The columns that keep rows of `wanted` out of a table that has `have`, by name.

    A wanted column must be there with its type and repetition (or, with `can_add`, be NULLABLE: such a
    column, a label the table lacks, is added before the MERGE; `addable` names the columns that may be
    added so, when only some may); a REQUIRED column of the table must be
    one the rows always fill. A table that fails this fails the write or the MERGE, after the whole run
    was scored.
    """
    # BigQuery column names ignore case: `ID` is the column `id`.
    by_name = {c.name.lower(): c for c in have}
    filled = {c.name.lower() for c in wanted if c.mode == "REQUIRED"}
    unfit = []
    for c in wanted:
        there = by_name.get(c.name.lower())
        if there is None:
            if not ((can_add or c.name in addable) and c.mode == "NULLABLE"):
                unfit.append(c.name)
        elif there.type != c.type or (there.mode == "REPEATED") != (c.mode == "REPEATED"):
            unfit.append(c.name)
    unfit += [c.name for c in have if c.mode == "REQUIRED" and c.name.lower() not in filled]
    return unfit


def describe_columns(columns: Sequence[Column]) -> str:
    return ", ".join(f"{c.name} {c.type}" + (f" {c.mode}" if c.mode != "NULLABLE" else "") for c in columns)


def ensure_table(
    client: Any,
    ref: TableRef,
    columns: Sequence[Column],
    *,
    partition_field: str,
    clustering: Sequence[str] = (),
    expires: dt.datetime | None = None,
) -> list[Column]:
    """Creates the table if it is missing (day-partitioned, clustered) and returns its columns.

    An existing table keeps its own schema; the caller checks it fits.
    """
    from google.api_core import exceptions as gexc
    from google.cloud import bigquery

    table = bigquery.Table(str(ref), schema=_schema_fields(columns))
    table.time_partitioning = bigquery.TimePartitioning(type_=bigquery.TimePartitioningType.DAY, field=partition_field)
    if clustering:
        table.clustering_fields = list(clustering)
    if expires is not None:
        table.expires = expires
    try:
        created = client.create_table(table)
        log.info("created table %s", ref)
        return columns_of(created)
    except gexc.Conflict:
        return columns_of(client.get_table(str(ref)))


# ---------------------------------------------------------------------------------------------
# Rows as protocol buffers (the Storage Write API's GA format)

_PROTO_TYPES = {"STRING": "TYPE_STRING", "FLOAT64": "TYPE_DOUBLE", "INT64": "TYPE_INT64", "BOOL": "TYPE_BOOL", "TIMESTAMP": "TYPE_INT64"}


class RowCodec:
    """Encodes dict rows as protobuf messages of a descriptor built from the table's columns.

    TIMESTAMP values are datetimes, sent as int64 microseconds since the epoch, as the Write API wants.
    """

    def __init__(self, columns: Sequence[Column]) -> None:
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

        field = descriptor_pb2.FieldDescriptorProto
        proto = descriptor_pb2.FileDescriptorProto(name="esp_backfill_row.proto", syntax="proto2")
        message = proto.message_type.add(name="Row")
        for number, column in enumerate(columns, start=1):
            message.field.add(
                name=column.name,
                number=number,
                type=getattr(field, _PROTO_TYPES[column.type]),
                label=field.LABEL_REPEATED if column.mode == "REPEATED" else field.LABEL_OPTIONAL,
            )
        pool = descriptor_pool.DescriptorPool()
        pool.Add(proto)
        descriptor = pool.FindMessageTypeByName("Row")
        self._cls = message_factory.GetMessageClass(descriptor)
        self.descriptor_proto = descriptor_pb2.DescriptorProto()
        descriptor.CopyToProto(self.descriptor_proto)
        self._timestamps = {c.name for c in columns if c.type == "TIMESTAMP"}
        self._repeated = {c.name for c in columns if c.mode == "REPEATED"}
        self.columns = list(columns)

    def encode(self, row: Mapping[str, Any]) -> bytes:
        msg = self._cls()
        for name, value in row.items():
            if value is None:
                continue
            if name in self._timestamps:
                value = _micros(value)
            if name in self._repeated:
                getattr(msg, name).extend(value)
            else:
                setattr(msg, name, value)
        return msg.SerializeToString()


def _micros(t: dt.datetime) -> int:
    return int(t.timestamp() * 1_000_000) if t.tzinfo else int(t.replace(tzinfo=dt.timezone.utc).timestamp() * 1_000_000)


class PendingStream:
    """One PENDING Storage Write stream: append rows in bounded requests, then finalize."""

    def __init__(self, client: Any, table: TableRef, codec: RowCodec) -> None:
        from google.cloud.bigquery_storage_v1 import types

        self._client = client
        self._types = types
        self._codec = codec
        stream = client.create_write_stream(
            parent=table.path, write_stream=types.WriteStream(type_=types.WriteStream.Type.PENDING)
        )
        self.name: str = stream.name
        self.rows = 0
        self._pending: list[bytes] = []
        self._pending_bytes = 0

    def add(self, row: Mapping[str, Any]) -> None:
        data = self._codec.encode(row)
        if self._pending and (self._pending_bytes + len(data) > APPEND_MAX_BYTES or len(self._pending) >= APPEND_MAX_ROWS):
            self.flush()
        self._pending.append(data)
        self._pending_bytes += len(data)

    def flush(self) -> None:
        if not self._pending:
            return
        types = self._types
        schema = types.ProtoSchema(proto_descriptor=self._codec.descriptor_proto)
        # The offset makes a resent request fail with ALREADY_EXISTS instead of writing rows twice.
        # write_stream is set on every request: allowed by the API, and the emulator requires it.
        request = types.AppendRowsRequest(
            write_stream=self.name,
            offset=self.rows,
            proto_rows=types.AppendRowsRequest.ProtoData(
                writer_schema=schema, rows=types.ProtoRows(serialized_rows=self._pending)
            ),
        )
        for response in self._client.append_rows(iter([request])):
            if response.error.code:
                raise RuntimeError(f"appending {len(self._pending)} rows to {self.name} failed: {response.error.message}")
            for err in response.row_errors:
                raise RuntimeError(f"row {err.index} rejected by {self.name}: {err.message}")
        self.rows += len(self._pending)
        self._pending = []
        self._pending_bytes = 0

    def finalize(self) -> str:
        self.flush()
        self._client.finalize_write_stream(name=self.name)
        return self.name


def commit_streams(client: Any, table: TableRef, names: Sequence[str]) -> None:
    """Commits PENDING streams into `table`; a stream committed by an earlier attempt is fine."""
    from google.cloud.bigquery_storage_v1 import types

    for start in range(0, len(names), COMMIT_CHUNK):
        chunk = list(names[start : start + COMMIT_CHUNK])
        response = client.batch_commit_write_streams(
            types.BatchCommitWriteStreamsRequest(parent=table.path, write_streams=chunk)
        )
        errors = [e for e in response.stream_errors if e.code != types.StorageError.StorageErrorCode.STREAM_ALREADY_COMMITTED]
        if errors or not response.commit_time:
            detail = "; ".join(f"{e.entity}: {e.error_message}" for e in errors) or "no commit time returned"
            raise RuntimeError(f"committing {len(chunk)} write streams into {table} failed: {detail}")


def merge_sql(target: TableRef, staging: TableRef, columns: Sequence[Column]) -> str:
    """One MERGE on (id, model_version): a re-run replaces its rows, whichever day they were scored.

    The source is deduplicated first (the latest score per key wins), because MERGE refuses a target
    row matched by two source rows, and history can hold the same id twice.
    """
    names = [c.name for c in columns]
    for name in names:
        if not _NAME_RE.fullmatch(name):
            raise ConfigError(f"column {name!r} cannot be merged")
    updates = ", ".join(f"`{n}` = S.`{n}`" for n in names if n not in (ID, MODEL_VERSION))
    cols = ", ".join(f"`{n}`" for n in names)
    values = ", ".join(f"S.`{n}`" for n in names)
    # Every name is checked above and every table in TableRef, so nothing here is caller text.
    return (
        f"MERGE {target.sql} T\n"  # nosec B608: identifiers validated (_NAME_RE, TableRef), no values interpolated
        f"USING (SELECT {cols} FROM {staging.sql} WHERE TRUE\n"
        f"       QUALIFY ROW_NUMBER() OVER (PARTITION BY `{ID}`, `{MODEL_VERSION}` ORDER BY scored_at DESC) = 1) S\n"
        f"ON T.`{ID}` = S.`{ID}` AND T.`{MODEL_VERSION}` = S.`{MODEL_VERSION}`\n"
        f"WHEN MATCHED THEN UPDATE SET {updates}\n"
        f"WHEN NOT MATCHED THEN INSERT ({cols}) VALUES ({values})"
    )


# ---------------------------------------------------------------------------------------------
# Source


@dataclasses.dataclass(frozen=True)
class BigQuerySource:
    """A table, or a query materialised into `materialize_to` (a staging table) before reading."""

    id_column: str
    text_column: str
    table: TableRef | None = None
    query: str | None = None
    materialize_to: TableRef | None = None

    def __post_init__(self) -> None:
        if (self.table is None) == (self.query is None):
            raise ConfigError("give a BigQuery source table or a query, not both")
        if self.query is not None and self.materialize_to is None:
            raise ConfigError("a query source needs a staging table to materialise into")

    def describe(self) -> str:
        return str(self.table) if self.table is not None else "query"

    @property
    def select_sql(self) -> str:
        """The query as one statement, as it is run: a trailing `;` would end the CREATE TABLE around it."""
        return (self.query or "").strip().rstrip(";")


@dataclasses.dataclass(frozen=True)
class ReadTask:
    stream: str
    arrow_schema: bytes


class PlanRead(beam.DoFn):
    """A source -> one Storage Read session -> one ReadTask per stream (read after a Reshuffle)."""

    def __init__(self, settings: BigQuerySettings, job_project: str, expiration_h: int) -> None:
        self._settings = settings
        self._project = job_project
        self._expiration_h = expiration_h

    def process(self, source: BigQuerySource) -> Iterator[ReadTask]:
        from google.cloud.bigquery_storage_v1 import types

        table = source.table
        if source.query is not None:
            table = self._materialize(source)
        if table is None:
            raise ConfigError("a BigQuery source names neither a table nor a query")
        client = read_client(self._settings)
        session = client.create_read_session(
            parent=f"projects/{self._project}",
            read_session=types.ReadSession(
                table=table.path,
                data_format=types.DataFormat.ARROW,
                read_options=types.ReadSession.TableReadOptions(selected_fields=[source.id_column, source.text_column]),
            ),
            max_stream_count=self._settings.bigquery_max_read_streams,
        )
        log.info("read session on %s: %d streams, about %d rows", table, len(session.streams), session.estimated_row_count)
        Metrics.counter(METRICS_NAMESPACE, "read_streams").inc(len(session.streams))
        schema = bytes(session.arrow_schema.serialized_schema)
        for stream in session.streams:
            yield ReadTask(stream.name, schema)

    def _materialize(self, source: BigQuerySource) -> TableRef:
        """Runs the query into a staging table: a plain table that a read session can open anywhere."""
        target = source.materialize_to
        if target is None or source.query is None:
            raise ConfigError("a query source needs a table to materialise into")
        client = rest_client(self._settings, self._project)
        query = source.select_sql
        expires = f"TIMESTAMP_ADD(CURRENT_TIMESTAMP(), INTERVAL {int(self._expiration_h)} HOUR)"
        sql = f"CREATE OR REPLACE TABLE {target.sql} OPTIONS (expiration_timestamp = {expires}) AS\n{query}"
        log.info("materialising the source query into %s", target)
        client.query(sql).result(timeout=self._settings.bigquery_timeout_s)
        return target


class ReadStream(beam.DoFn):
    """Reads one Storage Read stream: yields {"id": ..., "text": ...} rows as BigQuery holds them."""

    def __init__(self, settings: BigQuerySettings, id_column: str, text_column: str) -> None:
        self._settings = settings
        self._id = id_column
        self._text = text_column

    def setup(self) -> None:
        self._client = read_client(self._settings)

    def process(self, task: ReadTask) -> Iterator[dict[str, Any]]:
        import pyarrow as pa

        schema = pa.ipc.read_schema(pa.py_buffer(task.arrow_schema))
        # The client's ReadRowsStream reconnects at the last offset on transient errors.
        for response in self._client.read_rows(task.stream):
            if not response.arrow_record_batch.serialized_record_batch:
                continue
            batch = pa.ipc.read_record_batch(pa.py_buffer(response.arrow_record_batch.serialized_record_batch), schema)
            ids = batch.column(self._id).to_pylist()
            texts = batch.column(self._text).to_pylist()
            for cid, text in zip(ids, texts):
                yield {"id": cid, "text": text}

    def teardown(self) -> None:
        client = getattr(self, "_client", None)
        if client is not None:
            client.transport.close()


# ---------------------------------------------------------------------------------------------
# Sink


def _one_output(value: Any) -> WindowedValue:
    return WindowedValue(value, MIN_TIMESTAMP, [GlobalWindow()])


class WriteRows(beam.DoFn):
    """Appends a bundle's rows (dicts) to one PENDING write stream; outputs its name when done.

    The table is created on the first row if missing: `columns_for(row)` gives its columns (the scores
    table's depend on the model's labels, known only from a score).
    """

    def __init__(
        self,
        settings: BigQuerySettings,
        job_project: str,
        table: TableRef,
        columns_for: Any,
        *,
        partition_field: str,
        clustering: Sequence[str] = (),
        expiration_h: int | None = None,
        counter: str = "rows_written",
    ) -> None:
        self._settings = settings
        self._project = job_project
        self._table = table
        self._columns_for = columns_for
        self._partition_field = partition_field
        self._clustering = tuple(clustering)
        self._expiration_h = expiration_h
        self._counter_name = counter

    def setup(self) -> None:
        self._write = write_client(self._settings)
        self._rest = rest_client(self._settings, self._project)
        self._codec: RowCodec | None = None
        self._counter = Metrics.counter(METRICS_NAMESPACE, self._counter_name)

    def start_bundle(self) -> None:
        self._stream: PendingStream | None = None

    def process(self, row: dict[str, Any]) -> None:
        if self._stream is None:
            if self._codec is None:
                self._codec = RowCodec(self._table_columns(row))
            self._stream = PendingStream(self._write, self._table, self._codec)
        self._stream.add(row)

    def _table_columns(self, row: Mapping[str, Any]) -> list[Column]:
        wanted = self._columns_for(row)
        expires = None
        if self._expiration_h:
            expires = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=self._expiration_h)
        have = ensure_table(
            self._rest, self._table, wanted, partition_field=self._partition_field, clustering=self._clustering, expires=expires
        )
        unfit = unfit_columns(have, wanted)
        if unfit:
            raise ConfigError(f"table {self._table} cannot take these rows: columns {unfit} (wanted: {describe_columns(wanted)})")
        return wanted

    def finish_bundle(self) -> Iterable[WindowedValue]:
        if self._stream is None:
            return []
        name = self._stream.finalize()
        self._counter.inc(self._stream.rows)
        self._stream = None
        return [_one_output(name)]

    def teardown(self) -> None:
        write = getattr(self, "_write", None)
        if write is not None:
            write.transport.close()
        rest = getattr(self, "_rest", None)
        if rest is not None:
            rest.close()


@dataclasses.dataclass(frozen=True)
class SinkPlan:
    scores: TableRef
    staging: TableRef
    dead_letters: TableRef
    source_snapshot: TableRef | None = None  # a materialised query to drop at the end


class Finalize(beam.DoFn):
    """Commits the run's streams, MERGEs staging into the scores table, drops the staging tables.

    Runs once, after every bundle wrote (its stream names arrive as side inputs). The scores table is
    created when missing, day-partitioned on scored_at and clustered by model_version then id; a label
    the table lacks (a model with a new label) is added as a column first.
    """

    def __init__(self, settings: BigQuerySettings, job_project: str, plan: SinkPlan) -> None:
        self._settings = settings
        self._project = job_project
        self._plan = plan

    def process(self, _: Any, score_streams: Sequence[str], dead_streams: Sequence[str]) -> Iterator[dict[str, Any]]:
        plan = self._plan
        rest = rest_client(self._settings, self._project)
        write = write_client(self._settings)
        merged = 0
        try:
            # The dead-letters table exists after every run, empty or not, so consumers can always query it.
            ensure_table(rest, plan.dead_letters, DEAD_LETTER_SCHEMA, partition_field="dead_lettered_at")
            if dead_streams:
                commit_streams(write, plan.dead_letters, sorted(dead_streams))
                log.info("committed %d dead-letter streams into %s", len(dead_streams), plan.dead_letters)
            if score_streams:
                commit_streams(write, plan.staging, sorted(score_streams))
                merged = self._merge(rest)
            else:
                log.warning("no comment was scored: nothing to merge into %s", plan.scores)
            for table in (plan.staging, plan.source_snapshot):
                if table is not None:
                    rest.delete_table(str(table), not_found_ok=True)
        finally:
            write.transport.close()
            rest.close()
        Metrics.counter(METRICS_NAMESPACE, "merged").inc(merged)
        yield {"merged": merged, "scores_table": str(plan.scores), "dead_letters_table": str(plan.dead_letters)}

    def _merge(self, rest: Any) -> int:
        plan = self._plan
        staging_columns = columns_of(rest.get_table(str(plan.staging)))
        target_columns = ensure_table(
            rest, plan.scores, staging_columns, partition_field="scored_at", clustering=(MODEL_VERSION, ID)
        )
        self._add_missing_labels(rest, staging_columns, target_columns)
        sql = merge_sql(plan.scores, plan.staging, staging_columns)
        job = rest.query(sql)
        job.result(timeout=self._settings.bigquery_timeout_s)
        affected = int(job.num_dml_affected_rows or 0)
        log.info("merged %d rows from %s into %s", affected, plan.staging, plan.scores)
        return affected

    def _add_missing_labels(self, rest: Any, staging: Sequence[Column], target: Sequence[Column]) -> None:
        unfit = unfit_columns(target, staging, can_add=True)
        if unfit:
            raise ConfigError(f"scores table {self._plan.scores} cannot take the scores: columns {unfit}")
        have = {c.name.lower() for c in target}
        missing = [c for c in staging if c.name.lower() not in have]
        if not missing:
            return
        from google.cloud import bigquery

        table = rest.get_table(str(self._plan.scores))
        table.schema = [*table.schema, *(bigquery.SchemaField(c.name, c.type, mode="NULLABLE") for c in missing)]
        rest.update_table(table, ["schema"])
        log.info("added columns %s to %s", [c.name for c in missing], self._plan.scores)
