"""Count the Firestore operations of a process, as Firestore bills them: a read per document a lookup or query
returns (a query that returns nothing is billed one), a write per document a commit writes.

``bench.profile_front`` starts the broker host with ``IOTBRIDGE_COUNT_FIRESTORE=<directory>`` and this directory's
``firestore_shim`` first on ``PYTHONPATH``: its ``sitecustomize`` calls :func:`install` in each of the host's Python
processes, which then writes its counts twice a second to ``<directory>/<role>-<pid>.json`` (role: the
``python -m iotbridge.bridge`` command, ``front`` or ``service``). The counts are taken at the client library's gRPC
layer (``FirestoreClient``), below every method of the registry, so any version of the front is counted alike.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

ENV = "IOTBRIDGE_COUNT_FIRESTORE"
SHIM = Path(__file__).with_name("firestore_shim")


def install(directory: Path) -> Counter[str]:
    from google.cloud.firestore_v1.services.firestore.client import FirestoreClient

    counts: Counter[str] = Counter()
    lock = threading.Lock()

    def add(**kw: int) -> None:
        with lock:
            counts.update(kw)

    get, query, commit = FirestoreClient.batch_get_documents, FirestoreClient.run_query, FirestoreClient.commit

    def batch_get_documents(self: Any, *args: Any, **kwargs: Any) -> Any:
        add(lookups=1)
        for response in get(self, *args, **kwargs):
            if response.found or response.missing:
                add(reads=1)
            yield response

    def run_query(self: Any, *args: Any, **kwargs: Any) -> Any:
        add(queries=1)
        returned = 0
        for response in query(self, *args, **kwargs):
            if response.document:
                returned += 1
            yield response
        add(reads=max(returned, 1))

    def commit_(self: Any, request: Any = None, *args: Any, **kwargs: Any) -> Any:
        writes = kwargs.get("writes") if request is None else getattr(request, "writes", None) or request.get("writes")
        add(commits=1, writes=len(writes or ()))
        return commit(self, request, *args, **kwargs)

    FirestoreClient.batch_get_documents = batch_get_documents  # type: ignore[method-assign]
    FirestoreClient.run_query = run_query  # type: ignore[method-assign]
    FirestoreClient.commit = commit_  # type: ignore[method-assign]

    def dump() -> None:
        time.sleep(0.5)  # sys.argv is set by then
        role = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1].isidentifier() else "process"
        out = directory / f"{role}-{os.getpid()}.json"
        while True:
            time.sleep(0.5)
            with lock:
                text = json.dumps(dict(counts))
            tmp = out.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.replace(out)

    threading.Thread(target=dump, daemon=True, name="firestore-count").start()
    return counts


def read(directory: Path, role: str = "front") -> Counter[str]:
    """The counts of the processes of ``role`` so far."""
    total: Counter[str] = Counter()
    for path in directory.glob(f"{role}-*.json"):
        try:
            total.update(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return total


def maybe_install() -> None:
    if os.environ.get(ENV):
        install(Path(os.environ[ENV]))
