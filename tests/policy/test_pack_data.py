"""The data the policy pack ships stays in step with the sources it was derived from."""

from __future__ import annotations

import json

import yaml

import gen_labelable
import rules
from iotbridge import spec


def test_labelable_types_match_installed_pulumi_gcp():
    shipped = json.loads(gen_labelable.OUTPUT.read_text())["types"]
    current = gen_labelable.installed()
    missing, extra = sorted(set(current) - set(shipped)), sorted(set(shipped) - set(current))
    assert shipped == current, f"regenerate with policy/gen_labelable.py; missing {missing[:5]}, stale {extra[:5]}"
    # The ones this project declares, and the two whose label field is not `labels`.
    for token in ("gcp:storage/bucket:Bucket", "gcp:pubsub/topic:Topic", "gcp:pubsub/subscription:Subscription",
                  "gcp:bigquery/dataset:Dataset", "gcp:bigquery/table:Table", "gcp:bigtable/instance:Instance",
                  "gcp:dataflow/flexTemplateJob:FlexTemplateJob", "gcp:cloudfunctionsv2/function:Function",
                  "gcp:compute/instanceTemplate:InstanceTemplate", "gcp:secretmanager/secret:Secret"):
        assert rules.LABELABLE[token] == "labels", token
    assert rules.LABELABLE["gcp:monitoring/alertPolicy:AlertPolicy"] == "userLabels"
    assert rules.LABELABLE["gcp:monitoring/notificationChannel:NotificationChannel"] == "userLabels"
    assert "gcp:monitoring/metricDescriptor:MetricDescriptor" not in rules.LABELABLE  # labels = descriptors


def test_dead_letter_exemptions_are_the_specs():
    # The Dataflow input is exempt through the job's parameters, not its name (tests/policy/test_rules_fixtures.py).
    exempt = {s.key for s in spec.SUBSCRIPTIONS.values() if not s.dead_letter and not s.dataflow}
    assert exempt, "the spec has a dead-letter audit subscription"
    for key in spec.SUBSCRIPTIONS:
        name = spec.subscription_name("iot-dev", key)
        assert name.endswith(rules.DEAD_LETTER_EXEMPT_SUFFIXES) == (key in exempt), key


def test_policy_pack_project_file():
    doc = yaml.safe_load(gen_labelable.HERE.joinpath("PulumiPolicy.yaml").read_text())
    assert doc["runtime"]["name"] == "python"
    assert doc["runtime"]["options"]["virtualenv"] == "venv"
    reqs = gen_labelable.HERE.joinpath("requirements.txt").read_text()
    from importlib.metadata import version
    assert f"pulumi-policy=={version('pulumi-policy')}" in reqs  # the pack pins what the tests ran
