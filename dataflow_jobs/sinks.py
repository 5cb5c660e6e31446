"""Sinks: BigQuery streaming inserts and Bigtable mutations.

BigQuery is written by :class:`InsertRows`, a DoFn over ``google-cloud-bigquery``'s ``insert_rows_json``
(the ``tabledata.insertAll`` API Beam's ``WriteToBigQuery`` uses in STREAMING_INSERTS mode) rather than by
``WriteToBigQuery`` itself, because the latter builds its own apitools client with Google's endpoint and
Application Default Credentials and cannot be pointed at the local BigQuery. The production path is this same
code with the default endpoint and the worker's credentials; ``--bigquery_endpoint`` switches only the endpoint
(and, for a plaintext ``http://`` endpoint, which can only be a local one, sends no credentials at all).

Each row carries an ``insertId`` derived from its content key, so BigQuery's best-effort de-duplication also
absorbs a bundle that is retried after a partial write.

Bigtable is written by Beam's own ``WriteToBigTable`` (the Python client path, which honours
``BIGTABLE_EMULATOR_HOST``); :class:`ToDirectRow` turns the row key and cells of :func:`telemetry.bigtable_cells`
(made by the pipeline's ``BigtableCells`` step, where a reading that makes them raise is dead-lettered) into a
``DirectRow``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import apache_beam as beam
from apache_beam.metrics.metric import Metrics

from dataflow_jobs import telemetry

_LOG = logging.getLogger(__name__)

# tabledata.insertAll takes up to 50,000 rows / 10 MB per request; 500 rows is Google's recommended batch.
MAX_BATCH_ROWS = 500


class BigQueryInsertError(RuntimeError):
    """BigQuery refused rows. Raised so that the runner retries the bundle (Dataflow: until it succeeds)."""


def bigquery_client(project: str, endpoint: str | None):
    from google.api_core.client_options import ClientOptions
    from google.cloud import bigquery

    if not endpoint:
        return bigquery.Client(project=project)
    credentials = None
    if endpoint.startswith("http://"):
        # Never send an OAuth token over plaintext; a plaintext endpoint is the local BigQuery.
        from google.auth.credentials import AnonymousCredentials

        credentials = AnonymousCredentials()
    return bigquery.Client(project=project, credentials=credentials,
                           client_options=ClientOptions(api_endpoint=endpoint))


class InsertRows(beam.DoFn):
    """Stream ``(insert_id, row)`` pairs into one BigQuery table, batched per bundle."""

    def __init__(self, table: str, endpoint: str | None = None, request_timeout: float = 30.0,
                 retry_deadline: float = 120.0):
        # table: "project.dataset.table"
        self.table = table
        self.endpoint = endpoint or None
        self.request_timeout = request_timeout
        self.retry_deadline = retry_deadline
        self.rows_written = Metrics.counter("bigquery", f"rows_written_{table.rsplit('.', 1)[-1]}")
        self._client: Any = None
        self._batch: list[tuple[str, dict[str, Any]]] = []

    def setup(self) -> None:
        self._client = bigquery_client(self.table.split(".", 1)[0], self.endpoint)

    def start_bundle(self) -> None:
        self._batch = []

    def process(self, element: tuple[str, dict[str, Any]]) -> None:
        self._batch.append(element)
        if len(self._batch) >= MAX_BATCH_ROWS:
            self._flush()

    def finish_bundle(self) -> None:
        self._flush()

    def _flush(self) -> None:
        if not self._batch:
            return
        from google.api_core.retry import Retry
        from google.cloud.bigquery import DEFAULT_RETRY

        batch, self._batch = self._batch, []
        retry: Retry = DEFAULT_RETRY.with_deadline(self.retry_deadline)
        errors = self._client.insert_rows_json(
            self.table, [row for _, row in batch], row_ids=[rid for rid, _ in batch],
            retry=retry, timeout=self.request_timeout)
        if errors:
            # Rows are validated against the schema before they get here, so a refusal means the table and
            # the pipeline disagree (schema drift): fail loudly rather than drop data. No payload in the message.
            reasons = sorted({e.get("reason", "?") for err in errors for e in err.get("errors", [])})
            raise BigQueryInsertError(f"{self.table}: {len(errors)} of {len(batch)} rows refused ({reasons})")
        self.rows_written.inc(len(batch))

    def teardown(self) -> None:
        if self._client is not None:
            self._client.close()


class ToDirectRow(beam.DoFn):
    """A reading's row key and cells (:func:`telemetry.bigtable_cells`, spec.BIGTABLE) as a Bigtable ``DirectRow``."""

    def process(self, element: tuple[bytes, list[telemetry.Cell]]) -> Iterable[Any]:
        from google.cloud.bigtable.row import DirectRow

        key, cells = element
        row = DirectRow(row_key=key)
        for family, qualifier, value, ts_us in cells:
            row.set_cell(family, qualifier, value, timestamp=_micros_to_datetime(ts_us))
        yield row


def _micros_to_datetime(us: int):
    from datetime import UTC, datetime, timedelta

    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)
