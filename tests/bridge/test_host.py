"""A broker host rehearsed locally the way the cloud boots it: the code archive that Pulumi uploads, unpacked on
its own; the settings the startup script writes (no pre-made subscription: the bridge makes its own filtered one,
and deletes it at a clean stop; /healthz on); Mosquitto configured by ``python -m iotbridge.bridge
mosquitto-config``; then a device end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from datetime import timedelta

import pytest
from google.cloud import pubsub_v1

from gcp_iot_bridge.infra import broker as bc
from iotbridge import spec
from iotbridge.bridge import fanout
from iotbridge.bridge.settings import new_secrets, write_secrets
from iotbridge.device import Device, DeviceIdentity
from iotbridge.local import services
from iotbridge.local.broker_host import READY_SERVICE
from iotbridge.local.tls import generate_local_tls
from tests.waiting import wait_for

from .conftest import PROJECT, REGION, REGISTRY, DeviceFactory, PubSubReader, create_topics

pytestmark = pytest.mark.emulator


def test_cloud_host_layout_end_to_end(bridge_env, registry, tmp_path):
    prefix = f"h{uuid.uuid4().hex[:8]}"
    create_topics(PROJECT, prefix)
    # Pulumi declares no subscription for the hosts: each makes its own.
    sub = pubsub_v1.SubscriberClient()
    own = sub.subscription_path(PROJECT, fanout.host_subscription(prefix, "host-a"))

    app = tmp_path / "app"
    for rel, text in bc.code_files().items():
        (app / rel).parent.mkdir(parents=True, exist_ok=True)
        (app / rel).write_text(text)
    script = bc.startup_script(
        project=PROJECT, region=REGION, registry_id=REGISTRY, prefix=prefix, code_url="gs://unused/x.zip",
        tls_key_secret="k", passwords_secret="p", server_cert_pem="unused", database="(default)",
        routes={"logs": spec.topic_name(prefix, "device-logs")}, health_port=8080)
    settings = json.loads(script.split("<<'JSON'\n", 1)[1].split("\nJSON\n", 1)[0])
    tls = generate_local_tls(tmp_path / "tls")
    write_secrets(tmp_path / "secrets.json", new_secrets())
    (tmp_path / "var").mkdir()
    # Only what cannot be the cloud's on a shared test machine: loopback addresses, free ports, temp paths.
    settings.update(host_id="host-a", front_host="127.0.0.1", front_port=services.free_port(),
                    broker_port=services.free_port(), health_port=services.free_port(),
                    broker_socket=str(tmp_path / "var" / "mosquitto" / "broker.sock"),
                    tls_cert=str(tls.server_cert), tls_key=str(tls.server_key),
                    secrets_file=str(tmp_path / "secrets.json"),
                    workdir=str(tmp_path / "var"), recheck_interval_s=1.0)
    settings_file = tmp_path / "settings.json"
    settings_file.write_text(json.dumps(settings))

    env = {**os.environ, **bridge_env, "PYTHONPATH": str(app)}
    run = [sys.executable, "-m", "iotbridge.bridge"]
    conf_dir = tmp_path / "var" / "mosquitto"
    user = ["--user", "root"] if os.geteuid() == 0 else []
    subprocess.run([*run, "mosquitto-config", "--settings", str(settings_file), "--out", str(conf_dir), *user],
                   check=True, cwd=app, env=env, timeout=60)
    procs: list[services.Service] = []
    try:
        procs.append(services.start_mosquitto((conf_dir / "mosquitto.conf").read_text(), settings["broker_port"],
                                              conf_dir))
        for role in ("service", "front"):
            log = tmp_path / f"{role}.log"
            with open(log, "ab") as f:
                proc = subprocess.Popen([*run, role, "--settings", str(settings_file)], cwd=app, env=env, stdout=f,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            svc = services.Service(role, proc, "127.0.0.1", settings["front_port"], log)
            procs.append(svc)
            if role == "service":
                services.wait_for_log(svc, READY_SERVICE, 30)
            else:
                services.wait_for_port(svc, 30)
        assert f"delivery subscription {own} (filter {spec.host_filter('host-a')})" in (
            tmp_path / "service.log").read_text()
        made = sub.get_subscription(request={"subscription": own})
        assert (made.filter, made.expiration_policy.ttl) == (spec.host_filter("host-a"), timedelta(hours=24))
        # Healthy once the service has written its first stats (half a second after it started).
        wait_for("/healthz 200", lambda: _health(settings["health_port"]), lambda v: v == 200, timeout=10)

        reader = PubSubReader(PROJECT, prefix)
        reader.attach(uuid.uuid4().hex[:6])
        factory = DeviceFactory(registry, None)  # type: ignore[arg-type]
        device_id, private = factory.register("RS256")
        dev = Device(DeviceIdentity(PROJECT, REGION, REGISTRY, device_id, private, "RS256"), "127.0.0.1",
                     settings["front_port"], str(tls.ca_cert))
        dev.connect()
        dev.subscribe_config()
        dev.publish_event(b"from the cloud layout", sub_folder="logs").wait_for_publish(10)
        assert [m.data for m in reader.pull("device-logs", 1)] == [b"from the cloud layout"]
        assert dev.configs.get(timeout=20) == b""  # its first config, empty, delivered on subscribe
        fanout.push_config(registry, pubsub_v1.PublisherClient(), prefix, device_id, b"cfg")
        assert dev.configs.get(timeout=20) == b"cfg"
        wait_for("ack", lambda: registry.list_config_versions(device_id)[0].device_ack_time, timeout=15)
        dev.disconnect()
        # A clean stop (systemd's SIGTERM) leaves no subscription behind.
        procs.pop(1).stop()
        from google.api_core import exceptions as gexc

        with pytest.raises(gexc.NotFound):
            sub.get_subscription(request={"subscription": own})
    finally:
        for p in reversed(procs):
            p.stop()


def _health(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except urllib.error.URLError:
        return 0  # not listening yet: the front opens its device port before its health port
