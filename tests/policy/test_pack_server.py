"""The policy pack as the Pulumi CLI runs it: ``policy/__main__.py`` serving the analyzer gRPC protocol.

The CLI is not installable here, so the test plays its part: starts the pack with the stack's config in
PULUMI_CONFIG (as the engine passes it), reads the port the pack prints, and calls GetAnalyzerInfo, Analyze and
AnalyzeStack with resources in the engine's wire form.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import grpc
import pytest
from google.protobuf import empty_pb2, struct_pb2
from pulumi.runtime.proto import analyzer_pb2, analyzer_pb2_grpc

import rules
from tests.infra import harness

PACK = harness.ROOT / "policy" / "__main__.py"
# The engine's sentinel for a string not known during preview (sdk/go/common/resource/plugin/rpc.go).
UNKNOWN_STRING = "04da6b54-80e4-46f7-96ec-b56ff0331ba9"


def _start(config: dict[str, str]) -> tuple[subprocess.Popen[bytes], analyzer_pb2_grpc.AnalyzerStub, grpc.Channel]:
    env = {**os.environ, "PULUMI_CONFIG": json.dumps(config), "PULUMI_PROJECT": "gcp-iot-bridge",
           "PULUMI_STACK": "dev", "PULUMI_DRY_RUN": "true"}
    proc = subprocess.Popen([sys.executable, str(PACK)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            cwd=PACK.parent)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode().strip()  # the pack prints its port first, then serves
    if not line.isdigit():
        proc.kill()
        stderr = proc.stderr.read().decode() if proc.stderr else ""
        raise AssertionError(f"pack did not print a port: {line!r} {stderr}")
    channel = grpc.insecure_channel(f"127.0.0.1:{line}")
    grpc.channel_ready_future(channel).result(timeout=30)
    return proc, analyzer_pb2_grpc.AnalyzerStub(channel), channel


@pytest.fixture(scope="module")
def pack() -> Iterator[analyzer_pb2_grpc.AnalyzerStub]:
    proc, stub, channel = _start({"gcp-iot-bridge:deletionProtection": "false"})
    try:
        yield stub
    finally:
        channel.close()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _struct(d: dict) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(d)
    return s


def _analyze(stub: analyzer_pb2_grpc.AnalyzerStub, type_: str, props: dict) -> dict[str, list[str]]:
    urn = f"urn:pulumi:dev::gcp-iot-bridge::{type_}::r"
    response = stub.Analyze(analyzer_pb2.AnalyzeRequest(type=type_, properties=_struct(props), urn=urn, name="r"),
                            timeout=30)
    found: dict[str, list[str]] = {}
    for d in response.diagnostics:
        found.setdefault(d.policyName, []).append(d.message)
    return found


def test_pack_announces_every_policy_as_mandatory(pack):
    info = pack.GetAnalyzerInfo(empty_pb2.Empty(), timeout=30)
    names = {p.name for p in info.policies}
    assert names >= {p.name for p in rules.POLICIES} | {p.name for p in rules.STACK_POLICIES}
    assert {p.enforcementLevel for p in info.policies} == {analyzer_pb2.MANDATORY}


def test_bad_resource_is_reported_by_its_policy(pack):
    found = _analyze(pack, "gcp:storage/bucket:Bucket", {"uniformBucketLevelAccess": False, "labels": {}})
    assert "bucket-uniform-access-no-public" in found
    assert "labels-everywhere" in found
    # The stack's config (deletionProtection=false) reached the pack: a bucket that cannot be destroyed fails.
    assert "deletion-protection-follows-stack" in found


def test_good_resource_passes_and_unknowns_do_not_fail_a_preview(pack):
    labels = {"app": "gcp-iot-bridge", "stack": "dev"}
    assert _analyze(pack, "gcp:dataflow/flexTemplateJob:FlexTemplateJob", {
        "ipConfiguration": "WORKER_IP_PRIVATE", "serviceAccountEmail": UNKNOWN_STRING, "labels": labels,
        "onDelete": "cancel", "skipWaitOnJobTermination": False}) == {}
    found = _analyze(pack, "gcp:dataflow/flexTemplateJob:FlexTemplateJob", {
        "ipConfiguration": "WORKER_IP_PUBLIC", "serviceAccountEmail": UNKNOWN_STRING, "labels": labels,
        "onDelete": "cancel", "skipWaitOnJobTermination": False})
    assert set(found) == {"dataflow-private-workers"}


def test_stack_policy_sees_all_resources(pack):
    sa = "iot-dev-dataflow@p.iam.gserviceaccount.com"
    resources = [
        analyzer_pb2.AnalyzerResource(type="gcp:dataflow/flexTemplateJob:FlexTemplateJob", name="job",
                                      urn="urn:pulumi:dev::gcp-iot-bridge::gcp:dataflow/flexTemplateJob:FlexTemplateJob::job",
                                      properties=_struct({"serviceAccountEmail": sa})),
        analyzer_pb2.AnalyzerResource(type="gcp:cloudfunctionsv2/function:Function", name="fn",
                                      urn="urn:pulumi:dev::gcp-iot-bridge::gcp:cloudfunctionsv2/function:Function::fn",
                                      properties=_struct({"serviceConfig": {"serviceAccountEmail": sa}})),
    ]
    response = pack.AnalyzeStack(analyzer_pb2.AnalyzeStackRequest(resources=resources), timeout=30)
    assert {d.policyName for d in response.diagnostics} == {"workload-service-accounts-not-shared"}


def test_prod_config_flips_the_teardown_verdict():
    proc, stub, channel = _start({"gcp-iot-bridge:deletionProtection": "true"})
    try:
        assert "deletion-protection-follows-stack" not in _analyze(stub, "gcp:bigquery/table:Table", {})
        assert "deletion-protection-follows-stack" in _analyze(stub, "gcp:bigquery/table:Table",
                                                               {"deletionProtection": False})
    finally:
        channel.close()
        proc.terminate()
        proc.wait(timeout=10)


def test_pack_refuses_to_guess_without_the_teardown_switch():
    proc, stub, channel = _start({})
    started = time.monotonic()
    try:
        with pytest.raises(grpc.RpcError):
            _analyze(stub, "gcp:bigquery/table:Table", {})
        assert time.monotonic() - started < 60
    finally:
        channel.close()
        proc.terminate()
        proc.wait(timeout=10)


def test_plain_credential_in_config_fails_the_stack_when_the_engine_lists_secret_keys(monkeypatch):
    monkeypatch.setenv("PULUMI_CONFIG_SECRET_KEYS", '["gcp-iot-bridge:apiToken"]')
    proc, stub, channel = _start({"gcp-iot-bridge:deletionProtection": "false", "gcp-iot-bridge:mqttPassword": "x",
                                  "gcp-iot-bridge:apiToken": "y"})
    try:
        response = stub.AnalyzeStack(analyzer_pb2.AnalyzeStackRequest(resources=[]), timeout=30)
        messages = [d.message for d in response.diagnostics if d.policyName == "config-secrets-encrypted"]
        assert len(messages) == 1 and "mqttPassword" in messages[0]
    finally:
        channel.close()
        proc.terminate()
        proc.wait(timeout=10)
