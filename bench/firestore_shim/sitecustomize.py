"""Loaded by Python at start-up when this directory is on PYTHONPATH (bench.profile_front puts it there for the
broker host it starts): counts the front's Firestore operations (bench/firestore_ops.py)."""

import contextlib

with contextlib.suppress(ImportError):
    from bench.firestore_ops import maybe_install

    maybe_install()
