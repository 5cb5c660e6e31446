"""The local services start on free loopback ports and stop leaving nothing behind."""

from __future__ import annotations

import pytest
from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials

from iotbridge.local import services

pytestmark = pytest.mark.emulator


def test_pubsub_emulator_serves_topics(pubsub_emulator, emulator_env):
    from google.cloud import pubsub_v1

    emulator_env(pubsub_emulator)
    publisher = pubsub_v1.PublisherClient()
    topic = publisher.create_topic(name="projects/local-project/topics/svc-check")
    assert topic.name.endswith("/svc-check")
    assert pubsub_emulator.host == "127.0.0.1"


def test_bigquery_local_engine_answers_queries(bigquery_emulator):
    from google.cloud import bigquery

    client = bigquery.Client(
        project="local-project",
        credentials=AnonymousCredentials(),
        client_options=ClientOptions(api_endpoint=bigquery_emulator.env["BIGQUERY_EMULATOR_HOST"]),
    )
    rows = list(client.query("SELECT 40 + 2 AS answer").result(timeout=30))
    assert rows[0]["answer"] == 42


def test_stop_leaves_no_process_or_port(tmp_path):
    svc = services.start_bigtable(tmp_path)
    pid, port = svc.proc.pid, svc.port
    assert services.port_open("127.0.0.1", port)
    svc.stop()
    assert svc.proc.poll() is not None, f"bigtable emulator {pid} still running"
    assert not services.port_open("127.0.0.1", port)


def test_a_missing_haproxy_fails_the_test_that_needs_it_with_its_install_command(tmp_path, monkeypatch):
    """HAProxy (the stand-in load balancer of tests/bridge/test_scale_out.py) is found where Debian installs it; when
    it is absent the test that needs it fails, saying how to install it, and is never skipped."""
    from tests.conftest import require

    assert services.haproxy_binary().endswith("/haproxy")
    with pytest.raises(services.MissingPrerequisite, match=r"apt-get install -y haproxy"):
        services.haproxy_binary(search=str(tmp_path))  # a PATH without it
    found = services.haproxy_binary
    monkeypatch.setattr(services, "haproxy_binary", lambda: found(search=str(tmp_path)))
    with pytest.raises(pytest.fail.Exception, match="prerequisite missing: haproxy not found"):
        require(services.start_haproxy, services.free_port(), [], tmp_path)
