"""The threshold-rule schema is defined once (``iotbridge.spec.parse_threshold_rules``): the stack's config
(``pipelineThresholdRules``) and the pipeline (``--threshold_rules``) accept and refuse the same rule sets, with the
same reason, so a rule set ``pulumi preview`` lets through is one the pipeline launches with."""

from __future__ import annotations

import json

import pytest

from dataflow_jobs import rules
from gcp_iot_bridge.infra import config
from tests.infra import harness

KEY = f"{config.PROJECT}:pipelineThresholdRules"

BAD = [
    ("nope", "not JSON"),
    ("[]", "must be a JSON object keyed by metric name"),
    ('{"t": 5}', "t must be an object with above/below and config"),
    ('{"t": {"config": {"a": 1}}}', "t needs 'above' or 'below'"),
    ('{"t": {"above": "9", "config": {"a": 1}}}', "t.above must be a finite number, got '9'"),
    ('{"t": {"below": true, "config": {"a": 1}}}', "t.below must be a finite number, got True"),
    ('{"t": {"above": 1e999, "config": {"a": 1}}}', "t.above must be a finite number, got inf"),
    ('{"t": {"above": 9}}', "t.config must be a non-empty JSON object"),
    ('{"t": {"above": 9, "config": {}}}', "t.config must be a non-empty JSON object"),
    ('{"t": {"above": 9, "config": "max"}}', "t.config must be a non-empty JSON object"),
    ('{"t": {"above": 9, "config": {"a": 1}, "when": 1}}',
     "t has unknown keys ['when']; allowed: above, below, config"),
    (json.dumps({"x" * 129: {"above": 1, "config": {"a": 1}}}), "must have 1..128 characters"),
    ('{"": {"above": 1, "config": {"a": 1}}}', "metric name '' must have 1..128 characters"),
]


def stack_refusal(text: str) -> str:
    with pytest.raises(config.ConfigError) as exc:
        config.parse(harness.stack_config("dev", {KEY: text}), "dev")
    return str(exc.value)


def pipeline_refusal(text: str) -> str:
    with pytest.raises(rules.RuleError) as exc:
        rules.parse_rules(text)
    return str(exc.value)


@pytest.mark.parametrize(("text", "reason"), BAD)
def test_stack_config_and_pipeline_refuse_the_same_rule_with_the_same_reason(text: str, reason: str) -> None:
    stack, pipeline = stack_refusal(text), pipeline_refusal(text)
    assert reason in pipeline and reason in stack
    assert KEY in stack.splitlines()[0]  # one line naming the key
    assert pipeline.startswith("--threshold_rules: ")


@pytest.mark.parametrize("text", [
    "{}",
    '{"temperature": {"above": 80, "config": {"fan": "max"}}}',
    '{"battery": {"below": 10, "config": {"report_interval_s": 600}}, "t": {"above": -1.5, "below": -40, '
    '"config": {"heater": "on", "limits": {"rpm": 900}}}}',
])
def test_both_accept_the_same_rule_sets(text: str) -> None:
    cfg = config.parse(harness.stack_config("dev", {KEY: text}), "dev")
    assert cfg.pipeline_threshold_rules == text
    assert {r.metric for r in rules.parse_rules(text)} == set(json.loads(text))
