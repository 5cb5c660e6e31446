"""Threshold rules: when a reading crosses a limit, ask for a device config change.

The rules come from the ``--threshold_rules`` flag, a JSON object keyed by metric name::

    {"temperature": {"above": 80, "config": {"fan": "max"}},
     "battery":     {"below": 10, "config": {"report_interval_s": 600}}}

Each rule needs ``config`` (an object, sent as is) and at least one of ``above`` / ``below`` (strict
comparisons). A reading that breaks several rules yields one request whose config merges theirs in metric-name
order. The request is the config-push function's input: ``{"device_id": ..., "config": {...}}``.
"""

from __future__ import annotations

import json
from typing import Any

from dataflow_jobs.telemetry import Reading
from iotbridge.spec import RuleError, ThresholdRule, parse_threshold_rules
from iotbridge.spec import config_request as shared_config_request

__all__ = ["RuleError", "ThresholdRule", "config_request", "evaluate", "parse_rules"]


def parse_rules(text: str) -> tuple[ThresholdRule, ...]:
    """The ``--threshold_rules`` flag's rules; :class:`RuleError` names the flag, the metric and the key at fault.

    The schema is the shared description's (``iotbridge.spec.parse_threshold_rules``), the one the stack's config
    checks too: a rule set ``pulumi preview`` accepts is one the pipeline launches with.
    """
    try:
        return parse_threshold_rules(text)
    except RuleError as exc:
        raise RuleError(f"--threshold_rules: {exc}") from None


def evaluate(reading: Reading, rules: tuple[ThresholdRule, ...]) -> tuple[dict[str, Any], list[str]] | None:
    """The merged config and the rules that fired, or None when the reading breaks no rule."""
    config: dict[str, Any] = {}
    fired: list[str] = []
    for rule in rules:
        value = reading.metrics.get(rule.metric)
        if value is not None and rule.breached(value):
            config.update(rule.config)
            fired.append(rule.describe())
    return (config, fired) if fired else None


def config_request(device_id: str, config: dict[str, Any]) -> bytes:
    """The message body the config-push function takes (``iotbridge.spec.config_request``): the config as
    compact JSON bytes, delivered as they are."""
    return shared_config_request(device_id, json.dumps(config, separators=(",", ":"), sort_keys=True).encode())
