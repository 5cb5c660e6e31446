"""Infra test session hooks: the API schema conformance test's count of checked inputs, shown in every run's
summary (``make test`` included), so a mapping that silently stops matching shows as a smaller number."""

from __future__ import annotations

import sys

import pytest


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    test_api_schema = sys.modules.get("tests.infra.test_api_schema")  # absent when the run did not collect it
    if test_api_schema is not None and test_api_schema.CHECKED:
        counts = ", ".join(f"{stack} {n}" for stack, n in test_api_schema.CHECKED.items())
        total = sum(test_api_schema.CHECKED.values())
        terminalreporter.write_sep("-", f"API schema conformance: {total} resource inputs checked ({counts})")
