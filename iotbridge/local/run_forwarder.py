"""``python -m iotbridge.local.run_forwarder``: the device-logs forwarder as a process of the local stack."""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from iotbridge.local.forwarder import BigQueryForwarder
from iotbridge.local.provision import LocalNames


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--project", required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--bigquery-endpoint", required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    fwd = BigQueryForwarder(LocalNames(project=args.project, prefix=args.prefix, dataset=args.dataset),
                            args.bigquery_endpoint)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    fwd.start()
    logging.info("forwarding %s -> %s", fwd.subscription, fwd.table)
    stop.wait()
    fwd.stop()
    logging.info("stopped after %d rows", fwd.forwarded)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
