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
import math
from dataclasses import dataclass
from typing import Any

from dataflow_jobs.telemetry import Reading
from iotbridge.spec import config_request as shared_config_request


class RuleError(ValueError):
    """The --threshold_rules value is not a valid rule set."""


@dataclass(frozen=True)
class ThresholdRule:
    metric: str
    config: dict[str, Any]
    above: float | None = None
    below: float | None = None

    def breached(self, value: float) -> bool:
        return (self.above is not None and value > self.above) or (self.below is not None and value < self.below)

    def describe(self) -> str:
        parts = [f"{self.metric}>{self.above:g}" if self.above is not None else "",
                 f"{self.metric}<{self.below:g}" if self.below is not None else ""]
        return "|".join(p for p in parts if p)


def _limit(metric: str, spec: dict[str, Any], key: str) -> float | None:
    v = spec.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise RuleError(f"--threshold_rules: {metric}.{key} must be a finite number, got {v!r}")
    return float(v)


def parse_rules(text: str) -> tuple[ThresholdRule, ...]:
    """Parse and check the flag's JSON; the error names the metric and the key at fault."""
    try:
        doc = json.loads(text or "{}")
    except ValueError as exc:
        raise RuleError(f"--threshold_rules is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise RuleError("--threshold_rules must be a JSON object keyed by metric name")
    rules = []
    for metric, spec in sorted(doc.items()):
        if not isinstance(spec, dict):
            raise RuleError(f"--threshold_rules: {metric} must be an object with above/below and config")
        unknown = set(spec) - {"above", "below", "config"}
        if unknown:
            raise RuleError(f"--threshold_rules: {metric} has unknown keys {sorted(unknown)}; "
                            "allowed: above, below, config")
        above, below = _limit(metric, spec, "above"), _limit(metric, spec, "below")
        if above is None and below is None:
            raise RuleError(f"--threshold_rules: {metric} needs 'above' or 'below'")
        config = spec.get("config")
        if not isinstance(config, dict) or not config:
            raise RuleError(f"--threshold_rules: {metric}.config must be a non-empty JSON object")
        rules.append(ThresholdRule(metric, config, above, below))
    return tuple(rules)


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
