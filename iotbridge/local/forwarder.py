"""Local stand-in for the one path the Pub/Sub emulator cannot run: a BigQuery subscription.

In the cloud the device-logs topic has a Pub/Sub BigQuery subscription with ``write_metadata`` that writes
``subscription_name, message_id, publish_time, data, attributes`` into ``device_logs``. The emulator accepts that
config but cannot write into the local BigQuery, so locally this forwarder pulls the same subscription and writes
the same columns. A message is acknowledged only after its row was accepted: nothing is lost, and a failed insert
is redelivered.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading

from google.cloud import pubsub_v1
from google.cloud.pubsub_v1.subscriber.message import Message

from iotbridge.local.provision import NO_RETRY, LocalNames, bigquery_client

log = logging.getLogger(__name__)


def row_for(message: Message, subscription: str) -> dict[str, object]:
    """The row a BigQuery subscription with write_metadata writes for ``message``."""
    return {
        "subscription_name": subscription,
        "message_id": message.message_id,
        "publish_time": message.publish_time.isoformat(),
        "data": message.data.decode("utf-8", errors="replace"),
        "attributes": json.dumps(dict(message.attributes), sort_keys=True),
    }


class BigQueryForwarder:
    """Pull ``subscription_key`` and insert each message as a row of ``table``."""

    def __init__(self, names: LocalNames, bigquery_endpoint: str, subscription_key: str = "device-logs-bigquery",
                 table: str = "device_logs") -> None:
        self.subscription = names.subscription(subscription_key)
        self.table = f"{names.project}.{names.dataset}.{table}"
        self._bq = bigquery_client(names.project, bigquery_endpoint)
        self._subscriber = pubsub_v1.SubscriberClient()
        self._lock = threading.Lock()
        self.forwarded = 0
        self._future = None

    def _callback(self, message) -> None:
        try:
            errors = self._bq.insert_rows_json(self.table, [row_for(message, self.subscription)],
                                               retry=NO_RETRY, timeout=30)
        except Exception as exc:  # noqa: BLE001 - any failure means: redeliver
            log.warning("device_logs insert failed, message %s will be redelivered: %s", message.message_id, exc)
            message.nack()
            return
        if errors:
            log.warning("device_logs rejected message %s: %s", message.message_id, errors)
            message.nack()
            return
        message.ack()
        with self._lock:
            self.forwarded += 1

    def start(self) -> None:
        self._future = self._subscriber.subscribe(
            self.subscription, self._callback, flow_control=pubsub_v1.types.FlowControl(max_messages=100)
        )

    def stop(self) -> None:
        if self._future is not None:
            self._future.cancel()
            with contextlib.suppress(Exception):  # cancelled futures raise on result()
                self._future.result(timeout=10)
        self._subscriber.close()
