"""Drives the admin API with google-cloud-iot's ``DeviceManagerClient`` (REST transport), unmodified but for the
endpoint. Runs in ``.venv-iot`` (the client needs protobuf < 5): ``python gapic_client.py URL PROJECT REGION TAG
ES256_PUBLIC_KEY_PEM CONNECTED_DEVICE_NAME``; prints every call as JSON — its discovery method id and either the
response (proto JSON, camelCase) or the error status the client raised with and the status the call should get."""

from __future__ import annotations

import importlib
import json
import sys
from typing import Any

iot: Any = importlib.import_module("google.cloud.iot_v1")
exceptions: Any = importlib.import_module("google.api_core.exceptions")
credentials: Any = importlib.import_module("google.auth.credentials")
json_format: Any = importlib.import_module("google.protobuf.json_format")
iam: Any = importlib.import_module("google.iam.v1.iam_policy_pb2")
policy_pb2: Any = importlib.import_module("google.iam.v1.policy_pb2")
field_mask: Any = importlib.import_module("google.protobuf.field_mask_pb2")

M = "cloudiot.projects.locations.registries."
calls: list[dict[str, Any]] = []


def as_json(resp: Any) -> Any:
    if resp is None:
        return {}
    if hasattr(type(resp), "to_json"):
        return json.loads(type(resp).to_json(resp, use_integers_for_enums=False,
                                             including_default_value_fields=False))
    return json.loads(json_format.MessageToJson(resp))


def ok(method: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    resp = fn(*args, **kwargs)
    page = next(iter(resp.pages)) if hasattr(resp, "pages") else resp
    calls.append({"method": M + method, "response": as_json(page)})
    return resp


def bad(method: str, expect: str, fn: Any, *args: Any, **kwargs: Any) -> None:
    try:
        resp = fn(*args, **kwargs)
        if hasattr(resp, "pages"):
            next(iter(resp.pages))
    except exceptions.GoogleAPICallError as exc:
        body = exc.response.json() if getattr(exc, "response", None) is not None else {}
        calls.append({"method": M + method, "expect": expect, "error": {
            "status": body.get("error", {}).get("status", type(exc).__name__), "class": type(exc).__name__,
            "code": exc.code}})
        return
    raise SystemExit(f"{method}: no error, expected {expect}")


def main(url: str, project: str, region: str, tag: str, public_key: str, connected: str) -> None:
    client = iot.DeviceManagerClient(transport="rest", client_options={"api_endpoint": url.rstrip("/")},
                                     credentials=credentials.AnonymousCredentials())
    location = f"projects/{project}/locations/{region}"
    reg_id = f"gapic-{tag}"
    parent = f"{location}/registries/{reg_id}"
    topic = f"projects/{project}/topics/gapic-{tag}"

    bad("create", "INVALID_ARGUMENT", client.create_device_registry, parent=location,
        device_registry=iot.DeviceRegistry(id="9bad"))
    ok("create", client.create_device_registry, parent=location, device_registry=iot.DeviceRegistry(
        id=reg_id, event_notification_configs=[iot.EventNotificationConfig(pubsub_topic_name=topic)],
        log_level=iot.LogLevel.INFO))
    ok("get", client.get_device_registry, name=parent)
    bad("get", "NOT_FOUND", client.get_device_registry, name=f"{location}/registries/absent-{tag}")
    ok("list", client.list_device_registries, parent=location)
    bad("list", "PERMISSION_DENIED", client.list_device_registries, parent=f"projects/other/locations/{region}")
    ok("patch", client.update_device_registry, device_registry=iot.DeviceRegistry(
        name=parent, log_level=iot.LogLevel.DEBUG), update_mask=field_mask.FieldMask(paths=["log_level"]))
    bad("patch", "INVALID_ARGUMENT", client.update_device_registry, device_registry=iot.DeviceRegistry(
        name=parent), update_mask=field_mask.FieldMask(paths=["id"]))

    device = iot.Device(id=f"dev-{tag}", credentials=[iot.DeviceCredential(public_key=iot.PublicKeyCredential(
        format=iot.PublicKeyFormat.ES256_PEM, key=public_key))], metadata={"site": "lyon"})
    ok("devices.create", client.create_device, parent=parent, device=device)
    bad("devices.create", "ALREADY_EXISTS", client.create_device, parent=parent, device=device)
    gateway = iot.Device(id=f"gw-{tag}", gateway_config=iot.GatewayConfig(gateway_type=iot.GatewayType.GATEWAY))
    client.create_device(parent=parent, device=gateway)
    dev_name = f"{parent}/devices/dev-{tag}"
    ok("devices.get", client.get_device, name=dev_name)
    bad("devices.get", "NOT_FOUND", client.get_device, name=f"{parent}/devices/absent-{tag}")
    ok("devices.list", client.list_devices, request={"parent": parent, "field_mask": {"paths": ["metadata"]}})
    bad("devices.list", "INVALID_ARGUMENT", client.list_devices,
        request={"parent": parent, "field_mask": {"paths": ["no_such_field"]}})
    ok("devices.patch", client.update_device, device=iot.Device(name=dev_name, blocked=True),
       update_mask=field_mask.FieldMask(paths=["blocked"]))
    client.update_device(device=iot.Device(name=dev_name, blocked=False), update_mask=field_mask.FieldMask(
        paths=["blocked"]))
    bad("devices.patch", "INVALID_ARGUMENT", client.update_device, device=iot.Device(name=dev_name),
        update_mask=field_mask.FieldMask(paths=["num_id"]))

    ok("bindDeviceToGateway", client.bind_device_to_gateway, parent=parent, gateway_id=f"gw-{tag}",
       device_id=f"dev-{tag}")
    bad("bindDeviceToGateway", "INVALID_ARGUMENT", client.bind_device_to_gateway, parent=parent,
        gateway_id=f"dev-{tag}", device_id=f"gw-{tag}")
    ok("unbindDeviceFromGateway", client.unbind_device_from_gateway, parent=parent, gateway_id=f"gw-{tag}",
       device_id=f"dev-{tag}")
    bad("unbindDeviceFromGateway", "NOT_FOUND", client.unbind_device_from_gateway, parent=parent,
        gateway_id=f"absent-{tag}", device_id=f"dev-{tag}")

    ok("devices.modifyCloudToDeviceConfig", client.modify_cloud_to_device_config, request={
        "name": dev_name, "binary_data": b"\x00\xff\xfe", "version_to_update": 1})
    bad("devices.modifyCloudToDeviceConfig", "FAILED_PRECONDITION", client.modify_cloud_to_device_config,
        request={"name": dev_name, "binary_data": b"x", "version_to_update": 1})
    ok("devices.configVersions.list", client.list_device_config_versions, name=dev_name)
    bad("devices.configVersions.list", "NOT_FOUND", client.list_device_config_versions,
        name=f"{parent}/devices/absent-{tag}")
    ok("devices.states.list", client.list_device_states, name=dev_name)
    bad("devices.states.list", "NOT_FOUND", client.list_device_states, name=f"{parent}/devices/absent-{tag}")
    bad("devices.sendCommandToDevice", "FAILED_PRECONDITION", client.send_command_to_device, name=dev_name,
        binary_data=b"cmd")
    ok("devices.sendCommandToDevice", client.send_command_to_device, name=connected, binary_data=b"\x00gapic",
       subfolder="ops")

    ok("getIamPolicy", client.get_iam_policy, request=iam.GetIamPolicyRequest(resource=parent))
    bad("getIamPolicy", "NOT_FOUND", client.get_iam_policy,
        request=iam.GetIamPolicyRequest(resource=f"{location}/registries/absent-{tag}"))
    ok("setIamPolicy", client.set_iam_policy, request=iam.SetIamPolicyRequest(
        resource=parent, policy=policy_pb2.Policy(bindings=[policy_pb2.Binding(
            role="roles/cloudiot.viewer", members=["user:ops@example.com"])])))
    bad("setIamPolicy", "INVALID_ARGUMENT", client.set_iam_policy, request=iam.SetIamPolicyRequest(
        resource=parent, policy=policy_pb2.Policy(bindings=[policy_pb2.Binding(role="viewer")])))
    ok("testIamPermissions", client.test_iam_permissions, request=iam.TestIamPermissionsRequest(
        resource=parent, permissions=["cloudiot.devices.get"]))
    bad("testIamPermissions", "INVALID_ARGUMENT", client.test_iam_permissions, request=iam.TestIamPermissionsRequest(
        resource=parent, permissions=["cloudiot.*"]))

    bad("delete", "FAILED_PRECONDITION", client.delete_device_registry, name=parent)
    ok("devices.delete", client.delete_device, name=dev_name)
    client.delete_device(name=f"{parent}/devices/gw-{tag}")
    bad("devices.delete", "NOT_FOUND", client.delete_device, name=dev_name)
    ok("delete", client.delete_device_registry, name=parent)
    json.dump({"calls": calls}, sys.stdout)


if __name__ == "__main__":
    main(*sys.argv[1:7])
