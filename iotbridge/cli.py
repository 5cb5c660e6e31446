"""iotctl: operate a gcp-iot-bridge deployment — the local stack on this machine, or a deployed Pulumi stack.

Every command accepts --json for machine-readable output and exits non-zero with a one-line reason on failure.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from iotbridge.cliutil import JsonFlag, StackOpt, emit, fail, first_line, or_fail, target_or_fail
from iotbridge.local.stack import LocalStack, StackError
from iotbridge.ml.cli import models_app
from iotbridge.targets import Target, TargetError

# google-cloud-bigtable warns on every client it makes against the emulator; the CLI says where it points.
warnings.filterwarnings("ignore", message="Connecting to Bigtable emulator", category=RuntimeWarning)

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
local_app = typer.Typer(help="The whole architecture on this machine (emulators, Mosquitto, local BigQuery).",
                        no_args_is_help=True)
app.add_typer(local_app, name="local")
devices_app = typer.Typer(help="The device registry: create, list, get, block, unblock, delete.",
                          no_args_is_help=True)
app.add_typer(devices_app, name="devices")
config_app = typer.Typer(help="Device configs: push a new version (through the config-push function), get.",
                         no_args_is_help=True)
app.add_typer(config_app, name="config")
commands_app = typer.Typer(help="Commands to connected devices (not stored).", no_args_is_help=True)
app.add_typer(commands_app, name="commands")
hosts_app = typer.Typer(help="Broker hosts' delivery subscriptions.", no_args_is_help=True)
app.add_typer(hosts_app, name="hosts")
app.add_typer(models_app, name="models")

err = Console(stderr=True)


@local_app.command("up")
def local_up(
    detach: Annotated[bool, typer.Option("--detach", help="Start in the background and return.")] = False,
    as_json: JsonFlag = False,
    payload_profiles: Annotated[str, typer.Option(
        "--payload-profiles", envvar="IOT_LOCAL_PAYLOAD_PROFILES",
        help="The pipeline's payload profiles, JSON as the pipelinePayloadProfiles stack key; "
             "empty: telemetry-v1 then json.")] = "",
) -> None:
    """Start the local stack; without --detach, run until Ctrl-C, then stop it."""
    try:
        stack = LocalStack(payload_profiles=payload_profiles)
    except StackError as exc:
        fail(str(exc), as_json)
    try:
        with err.status("starting the local stack") as status:
            stack.up(progress=lambda m: status.update(m))
    except (StackError, OSError, RuntimeError) as exc:
        fail(first_line(exc), as_json)
    info = stack.status()
    emit(info, as_json, f"local stack up: state in {stack.state_dir}; `iotctl local status` for endpoints")
    if detach:
        return
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        err.print("running; press Ctrl-C to stop")
        while not done.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        stopped = stack.down()
        err.print(f"stopped: {', '.join(stopped)}")


@local_app.command("status")
def local_status(as_json: JsonFlag = False) -> None:
    """Endpoints and process health of the running local stack."""
    try:
        info = LocalStack().status()
    except StackError as exc:
        fail(str(exc), as_json)
        return
    if as_json:
        emit(info, True)
        if not info["healthy"]:
            raise typer.Exit(1)
        return
    for k, v in info.items():
        if k != "processes":
            typer.echo(f"{k:26} {v}")
    for name, p in info["processes"].items():
        typer.echo(f"  {name:14} pid {p['pid']:<8} {'up' if p['alive'] else 'DOWN'}  port {p['port']}")
    if not info["healthy"]:
        raise typer.Exit(1)


@local_app.command("down")
def local_down(as_json: JsonFlag = False) -> None:
    """Stop every process the local stack started (also after a crash)."""
    stopped = LocalStack().down()
    emit({"stopped": stopped}, as_json, f"stopped: {', '.join(stopped) or 'nothing was running'}")


def open_registry(stack: str | None, as_json: bool):
    from iotbridge.registry import Registry

    t = target_or_fail(stack, as_json)
    return registry_call(as_json, Registry, t.project_id, t.registry_id, t.region)


def device_view(d) -> dict[str, Any]:
    """A device for display: public keys summarised, never the key material in full."""
    return {
        "id": d.id, "num_id": d.num_id, "registry_id": d.registry_id, "blocked": d.blocked,
        "credentials": [{"format": c.format, "expiration_time": c.expiration_time} for c in d.credentials],
        "metadata": d.metadata, "config_version": d.config_version,
        "last_config_ack_time": d.last_config_ack_time, "last_event_time": d.last_event_time,
        "last_state_time": d.last_state_time, "last_heartbeat_time": d.last_heartbeat_time,
        "gateway_config": d.gateway_config.to_doc(), "bound_gateways": list(d.bound_gateways),
    }


def registry_call(as_json: bool, fn, *args, **kwargs):
    from iotbridge.registry import RegistryError

    return or_fail(as_json, fn, *args, errors=(RegistryError, ValueError), **kwargs)


CredentialFormatOpt = Annotated[
    str, typer.Option("--format", help="Credential format: ES256_PEM, RSA_PEM, RSA_X509_PEM or ES256_X509_PEM.")
]


@devices_app.command("create")
def devices_create(
    device_id: Annotated[str, typer.Argument(metavar="ID", help="Device id: [a-zA-Z][a-zA-Z0-9_.~%-]{2,254}.")],
    public_key: Annotated[Path, typer.Option("--public-key", exists=True, dir_okay=False, readable=True,
                                             help="PEM file: public key or X.509 certificate.")],
    fmt: CredentialFormatOpt = "ES256_PEM",
    gateway: Annotated[bool, typer.Option("--gateway", help="Make it a gateway (gateway_type GATEWAY).")] = False,
    auth_method: Annotated[str | None, typer.Option(
        "--gateway-auth-method", help="ASSOCIATION_ONLY, DEVICE_AUTH_TOKEN_ONLY or ASSOCIATION_AND_DEVICE_AUTH_TOKEN: "
        "how devices attached through a gateway prove themselves (a gateway's default: ASSOCIATION_ONLY; on a "
        "bound device, it can only make its gateway's method stricter).")] = None,
    stack: StackOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """Register a device with one credential (with --gateway: a gateway)."""
    from iotbridge.registry import Credential, GatewayConfig

    reg = open_registry(stack, as_json)
    cred = registry_call(as_json, Credential, fmt, public_key.read_text())
    method = auth_method or ("ASSOCIATION_ONLY" if gateway else None)
    gateway_config = registry_call(as_json, GatewayConfig, "GATEWAY" if gateway else "NON_GATEWAY", method)
    d = registry_call(as_json, reg.create_device, device_id, [cred], gateway_config=gateway_config)
    emit(device_view(d), as_json, f"created {d.id} (num_id {d.num_id})")


@devices_app.command("list")
def devices_list(stack: StackOpt = None, as_json: JsonFlag = False) -> None:
    """All devices of the registry."""
    reg = open_registry(stack, as_json)
    devices = registry_call(as_json, reg.list_devices)
    if as_json:
        emit([device_view(d) for d in devices], True)
        return
    for d in devices:
        typer.echo(f"{d.id:32} num_id {d.num_id:<20} {'BLOCKED' if d.blocked else 'active':8} "
                   f"config v{d.config_version}  last event {d.last_event_time or '-'}")


@devices_app.command("get")
def devices_get(device_id: Annotated[str, typer.Argument(metavar="ID")], stack: StackOpt = None,
                as_json: JsonFlag = False) -> None:
    """One device."""
    reg = open_registry(stack, as_json)
    emit(device_view(registry_call(as_json, reg.get_device, device_id)), as_json)


@devices_app.command("block")
def devices_block(device_id: Annotated[str, typer.Argument(metavar="ID")], stack: StackOpt = None,
                  as_json: JsonFlag = False) -> None:
    """Block a device: it is refused, and dropped if connected."""
    set_blocked(device_id, True, stack, as_json)


@devices_app.command("unblock")
def devices_unblock(device_id: Annotated[str, typer.Argument(metavar="ID")], stack: StackOpt = None,
                    as_json: JsonFlag = False) -> None:
    """Allow a blocked device to connect again."""
    set_blocked(device_id, False, stack, as_json)


def set_blocked(device_id: str, blocked: bool, stack: str | None, as_json: bool) -> None:
    reg = open_registry(stack, as_json)
    d = registry_call(as_json, reg.set_blocked, device_id, blocked)
    emit(device_view(d), as_json, f"{'blocked' if blocked else 'unblocked'} {device_id}")


GatewayArg = Annotated[str, typer.Argument(metavar="GATEWAY")]
BoundDeviceArg = Annotated[str, typer.Argument(metavar="DEVICE")]


@devices_app.command("bind")
def devices_bind(gateway_id: GatewayArg, device_id: BoundDeviceArg, stack: StackOpt = None,
                 as_json: JsonFlag = False) -> None:
    """Bind a device to a gateway, which may then attach it (idempotent)."""
    change_binding(gateway_id, device_id, True, stack, as_json)


@devices_app.command("unbind")
def devices_unbind(gateway_id: GatewayArg, device_id: BoundDeviceArg, stack: StackOpt = None,
                   as_json: JsonFlag = False) -> None:
    """Unbind a device from a gateway; an attached device is detached within the bridge's re-check interval."""
    change_binding(gateway_id, device_id, False, stack, as_json)


def change_binding(gateway_id: str, device_id: str, bind: bool, stack: str | None, as_json: bool) -> None:
    reg = open_registry(stack, as_json)
    registry_call(as_json, reg.bind_device_to_gateway if bind else reg.unbind_device_from_gateway, gateway_id,
                  device_id)
    word = "bound" if bind else "unbound"
    emit({"gateway": gateway_id, word: device_id}, as_json,
         f"{word} {device_id} {'to' if bind else 'from'} gateway {gateway_id}")


@devices_app.command("bound")
def devices_bound(gateway_id: GatewayArg, stack: StackOpt = None, as_json: JsonFlag = False) -> None:
    """The devices bound to a gateway."""
    reg = open_registry(stack, as_json)
    ids = [d.id for d in registry_call(as_json, reg.devices_bound_to, gateway_id)]
    emit({"gateway": gateway_id, "devices": ids}, as_json, "\n".join(ids) or f"no device is bound to {gateway_id}")


@devices_app.command("delete")
def devices_delete(device_id: Annotated[str, typer.Argument(metavar="ID")], stack: StackOpt = None,
                   as_json: JsonFlag = False) -> None:
    """Delete a device and its config versions."""
    reg = open_registry(stack, as_json)
    registry_call(as_json, reg.delete_device, device_id)
    emit({"deleted": device_id}, as_json, f"deleted {device_id}")


DataOpt = Annotated[str | None, typer.Option("--data", help="The payload: a JSON object, or any text.")]
DataFileOpt = Annotated[Path | None, typer.Option("--data-file", exists=True, dir_okay=False, readable=True,
                                                  help="Read the payload from a file (bytes, untouched).")]


def read_payload(data: str | None, data_file: Path | None, as_json: bool) -> bytes:
    if data is not None and data_file is None:
        return data.encode()
    if data is None and data_file is not None:
        return data_file.read_bytes()
    fail("give exactly one of --data or --data-file", as_json)


def config_view(cfg) -> dict[str, Any]:
    try:
        data: Any = json.loads(cfg.data)
    except ValueError:
        import base64

        data = {"binary_data": base64.b64encode(cfg.data).decode()}
    return {"version": cfg.version, "cloud_update_time": cfg.cloud_update_time,
            "device_ack_time": cfg.device_ack_time, "data": data}


@config_app.command("push")
def config_push(
    device_id: Annotated[str, typer.Argument(metavar="ID")],
    data: DataOpt = None,
    data_file: DataFileOpt = None,
    version_to_update: Annotated[int, typer.Option("--version-to-update", min=0,
                                                   help="Compare-and-set: apply only if the device is at "
                                                        "this version (0: unconditional).")] = 0,
    wait: Annotated[float, typer.Option("--wait", min=0, help="Seconds to wait for the new version to be "
                                                              "stored (0: don't wait).")] = 30.0,
    stack: StackOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """Ask the config-push function for a new config version; it stores it and pushes it to the device."""
    import time

    from google.cloud import pubsub_v1

    from iotbridge.spec import config_request

    payload = read_payload(data, data_file, as_json)
    t = target_or_fail(stack, as_json)
    reg = open_registry(stack, as_json)
    device = registry_call(as_json, reg.get_device, device_id)  # unknown device: fail here, not in a log
    before = device.config_version
    try:
        message_id = pubsub_v1.PublisherClient().publish(
            t.topic("config-requests"), config_request(device_id, payload, version_to_update)).result(timeout=60)
    except Exception as exc:  # noqa: BLE001 - any publish failure is one line for the operator
        fail(f"could not publish the request: {exc}", as_json)
        return
    out: dict[str, Any] = {"device_id": device_id, "request_message_id": message_id, "previous_version": before}
    deadline = time.monotonic() + wait
    while wait and time.monotonic() < deadline:
        cfg = registry_call(as_json, reg.get_config, device_id)
        if cfg is not None and cfg.version > before:
            out["config"] = config_view(cfg)
            break
        time.sleep(0.2)
    else:
        if wait:
            fail(f"request {message_id} published, but no new version within {wait:g}s: see the function's "
                 "log or the dead-letter topic", as_json)
    emit(out, as_json, f"{device_id}: config version {out.get('config', {}).get('version', '?')} stored "
                       f"(request {message_id})" if "config" in out else f"request {message_id} published")


@config_app.command("get")
def config_get(device_id: Annotated[str, typer.Argument(metavar="ID")],
               history: Annotated[bool, typer.Option("--history", help="All kept versions, newest first.")] = False,
               stack: StackOpt = None, as_json: JsonFlag = False) -> None:
    """The device's latest config (or its last 10 versions with --history)."""
    reg = open_registry(stack, as_json)
    if history:
        versions = registry_call(as_json, reg.list_config_versions, device_id)
        emit([config_view(c) for c in versions], as_json)
        return
    cfg = registry_call(as_json, reg.get_config, device_id)
    if cfg is None:
        fail(f"device {device_id!r} has no config yet", as_json)
    emit(config_view(cfg), as_json)


@commands_app.command("send")
def commands_send(
    device_id: Annotated[str, typer.Argument(metavar="ID")],
    data: DataOpt = None,
    data_file: DataFileOpt = None,
    subfolder: Annotated[str | None, typer.Option("--subfolder", help="Sent on /devices/ID/commands/SUBFOLDER.")]
    = None,
    stack: StackOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """Send a command to a connected device; fails if it is not connected (commands are not stored)."""
    from google.cloud import pubsub_v1

    from iotbridge.bridge.fanout import DeviceNotConnected, send_command

    payload = read_payload(data, data_file, as_json)
    t = target_or_fail(stack, as_json)
    reg = open_registry(stack, as_json)
    try:
        message_id = registry_call(as_json, send_command, reg, pubsub_v1.PublisherClient(), t.prefix, device_id,
                                   payload, subfolder)
    except (DeviceNotConnected, TargetError) as exc:
        fail(str(exc), as_json)
        return
    emit({"device_id": device_id, "message_id": message_id, "subfolder": subfolder}, as_json,
         f"command sent to {device_id} (message {message_id})")


@hosts_app.command("sweep")
def hosts_sweep(stack: StackOpt = None, as_json: JsonFlag = False) -> None:
    """Delete the delivery subscriptions of broker hosts that are gone (no liveness record renewed in the last
    90 s), and the liveness records that ran out over a day ago; a running host's subscription, and any
    subscription no host made for itself, are left alone."""
    from google.cloud import pubsub_v1

    from iotbridge.bridge.fanout import sweep

    t = target_or_fail(stack, as_json)
    reg = open_registry(stack, as_json)
    deleted = registry_call(as_json, sweep, pubsub_v1.SubscriberClient(), pubsub_v1.PublisherClient(), reg.client,
                            reg.project, t.prefix, reg.registry_id)
    emit({"deleted": deleted}, as_json, f"deleted {len(deleted)} subscription(s) of gone hosts"
         + "".join(f"\n  {d}" for d in deleted))


# ------------------------------------------------------------------------ through the device manager API
# These commands go through the admin API (docs/admin-api.md), the path operator code written for IoT Core takes.

registries_app = typer.Typer(help="Registries, through the device manager API: list, get, create, delete.",
                             no_args_is_help=True)
app.add_typer(registries_app, name="registries")
credentials_app = typer.Typer(help="A device's credentials, through the device manager API: list, set (rotate).",
                              no_args_is_help=True)
devices_app.add_typer(credentials_app, name="credentials")
metadata_app = typer.Typer(help="A device's metadata, through the device manager API: get, set.",
                           no_args_is_help=True)
devices_app.add_typer(metadata_app, name="metadata")
RegistryOpt = Annotated[str | None, typer.Option("--registry", help="The registry (default: the stack's own).")]


def admin_api(stack: str | None, as_json: bool):
    from iotbridge.admin.client import AdminClient

    t = target_or_fail(stack, as_json)
    if not t.admin_api_url:
        fail(f"target {t.name} has no admin_api_url (a local stack started before the API existed: restart it)",
             as_json)
    return AdminClient(t.admin_api_url, t.project_id, t.region, authenticated=t.kind == "stack"), t


def api_call(as_json: bool, client, method: str, path: str, **kwargs) -> dict[str, Any]:  # noqa: ANN001
    from iotbridge.admin.client import ApiCallError

    try:
        return client.call(method, path, **kwargs)
    except ApiCallError as exc:
        fail(str(exc), as_json)


@registries_app.command("list")
def registries_list(stack: StackOpt = None, as_json: JsonFlag = False) -> None:
    """The deployment's registries."""
    api, _ = admin_api(stack, as_json)
    found = api_call(as_json, api, "GET", f"{api.location}/registries").get("deviceRegistries", [])
    emit(found, as_json, "\n".join(r["id"] for r in found) or "no registries")


@registries_app.command("get")
def registries_get(registry_id: Annotated[str, typer.Argument(metavar="ID")], stack: StackOpt = None,
                   as_json: JsonFlag = False) -> None:
    """One registry: its event and state topics, MQTT/HTTP states, log level."""
    api, _ = admin_api(stack, as_json)
    emit(api_call(as_json, api, "GET", api.registry(registry_id)), as_json)


@registries_app.command("create")
def registries_create(
    registry_id: Annotated[str, typer.Argument(metavar="ID")],
    event_topic: Annotated[list[str] | None, typer.Option(
        "--event-topic", help="An event route: TOPIC (every subfolder) or SUBFOLDER=TOPIC; TOPIC is "
                              "projects/P/topics/T. Repeatable; the route without a subfolder goes last.")] = None,
    state_topic: Annotated[str | None, typer.Option("--state-topic", help="Where states go: projects/P/topics/T.")]
    = None,
    stack: StackOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """Create a registry whose devices' events and states go to the topics it names."""
    api, _ = admin_api(stack, as_json)
    routes = []
    for item in event_topic or []:
        sub, sep, topic = item.rpartition("=")
        routes.append({"pubsubTopicName": topic, **({"subfolderMatches": sub} if sep else {})})
    routes.sort(key=lambda r: "subfolderMatches" not in r)
    body: dict[str, Any] = {"id": registry_id, "eventNotificationConfigs": routes}
    if state_topic:
        body["stateNotificationConfig"] = {"pubsubTopicName": state_topic}
    emit(api_call(as_json, api, "POST", f"{api.location}/registries", body=body), as_json, f"created {registry_id}")


@registries_app.command("delete")
def registries_delete(registry_id: Annotated[str, typer.Argument(metavar="ID")], stack: StackOpt = None,
                      as_json: JsonFlag = False) -> None:
    """Delete a registry that has no devices."""
    api, _ = admin_api(stack, as_json)
    api_call(as_json, api, "DELETE", api.registry(registry_id))
    emit({"deleted": registry_id}, as_json, f"deleted {registry_id}")


@credentials_app.command("list")
def credentials_list(device_id: Annotated[str, typer.Argument(metavar="ID")], registry: RegistryOpt = None,
                     stack: StackOpt = None, as_json: JsonFlag = False) -> None:
    """The device's credentials: format and expiration (not the key material)."""
    api, t = admin_api(stack, as_json)
    dev = api_call(as_json, api, "GET", api.device(registry or t.registry_id, device_id),
                   params={"fieldMask": "credentials"})
    shown = [{"format": c["publicKey"]["format"], "expiration_time": c.get("expirationTime")}
             for c in dev.get("credentials", [])]
    emit(shown, as_json, "\n".join(f"{c['format']}  expires {c['expiration_time']}" for c in shown) or "none")


@credentials_app.command("set")
def credentials_set(
    device_id: Annotated[str, typer.Argument(metavar="ID")],
    public_key: Annotated[list[Path], typer.Option("--public-key", exists=True, dir_okay=False, readable=True,
                                                   help="PEM file: public key or X.509 certificate. Repeatable "
                                                        "(at most 3).")],
    fmt: CredentialFormatOpt = "ES256_PEM",
    expires: Annotated[str | None, typer.Option("--expires", help="Expiration of these credentials (RFC 3339).")]
    = None,
    registry: RegistryOpt = None,
    stack: StackOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """Replace the device's credentials (rotation): its sessions the new set no longer allows are ended."""
    api, t = admin_api(stack, as_json)
    creds = [{"publicKey": {"format": fmt, "key": p.read_text()}, **({"expirationTime": expires} if expires else {})}
             for p in public_key]
    dev = api_call(as_json, api, "PATCH", api.device(registry or t.registry_id, device_id),
                   body={"credentials": creds}, params={"updateMask": "credentials"})
    emit({"id": dev["id"], "credentials": len(dev.get("credentials", []))}, as_json,
         f"{device_id}: {len(dev.get('credentials', []))} credential(s) set")


@metadata_app.command("get")
def metadata_get(device_id: Annotated[str, typer.Argument(metavar="ID")], registry: RegistryOpt = None,
                 stack: StackOpt = None, as_json: JsonFlag = False) -> None:
    """The device's metadata (key → value)."""
    api, t = admin_api(stack, as_json)
    dev = api_call(as_json, api, "GET", api.device(registry or t.registry_id, device_id),
                   params={"fieldMask": "metadata"})
    meta = dev.get("metadata", {})
    emit(meta, as_json, "\n".join(f"{k}={v}" for k, v in meta.items()) or "no metadata")


@metadata_app.command("set")
def metadata_set(device_id: Annotated[str, typer.Argument(metavar="ID")],
                 pairs: Annotated[list[str], typer.Argument(metavar="KEY=VALUE...", help="The whole new metadata.")],
                 registry: RegistryOpt = None, stack: StackOpt = None, as_json: JsonFlag = False) -> None:
    """Replace the device's metadata."""
    api, t = admin_api(stack, as_json)
    meta = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            fail(f"{pair!r} is not KEY=VALUE", as_json)
        meta[key] = value
    dev = api_call(as_json, api, "PATCH", api.device(registry or t.registry_id, device_id),
                   body={"metadata": meta}, params={"updateMask": "metadata"})
    emit(dev.get("metadata", {}), as_json, f"{device_id}: metadata set")


@devices_app.command("states")
def devices_states(device_id: Annotated[str, typer.Argument(metavar="ID")],
                   limit: Annotated[int, typer.Option("--limit", min=1, max=10, help="How many, newest first.")] = 10,
                   registry: RegistryOpt = None, stack: StackOpt = None, as_json: JsonFlag = False) -> None:
    """The device's last states (at most 10), newest first."""
    import base64

    api, t = admin_api(stack, as_json)
    states = api_call(as_json, api, "GET", api.device(registry or t.registry_id, device_id) + "/states",
                      params={"numStates": limit}).get("deviceStates", [])
    shown = [{"update_time": s["updateTime"], "data": base64.b64decode(s.get("binaryData", "")).decode(
        errors="backslashreplace")} for s in states]
    emit(shown, as_json, "\n".join(f"{s['update_time']}  {s['data']}" for s in shown) or "no states")


def key_dir_for(t: Target) -> Path:
    from iotbridge.local.stack import default_state_dir

    base = default_state_dir().parent
    return base / ("keys-local" if t.kind == "local" else f"keys-{t.name}")


@app.command("simulate")
def simulate(
    devices: Annotated[int, typer.Option("--devices", min=1, max=10_000, help="Fleet size.")] = 20,
    rate: Annotated[float, typer.Option("--rate", min=0.1, help="Messages per second, whole fleet.")] = 20.0,
    duration: Annotated[float, typer.Option("--duration", min=1, help="Seconds to send for.")] = 60.0,
    prefix: Annotated[str, typer.Option("--prefix", help="Device ids are PREFIX-0000, PREFIX-0001, ...")] = "sim",
    gateway: Annotated[bool, typer.Option(
        "--gateway", help="Speak through one gateway, PREFIX-gw (created and bound to every device on first use), "
        "that attaches the devices and publishes for them on its one connection.")] = False,
    http: Annotated[bool, typer.Option(
        "--http", help="Speak IoT Core's HTTP bridge instead of MQTT (publishEvent, setState, configs polled).",
    )] = False,
    stack: StackOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """A fleet speaking the device protocol: keys generated and registered on first use, QoS 1 telemetry, each
    device on its own, all through one gateway, or over the HTTP bridge."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from iotbridge.simulate import ConnectError, Fleet

    t = target_or_fail(stack, as_json)
    if gateway and http:
        fail("--gateway and --http exclude each other (a gateway speaks MQTT)", as_json)
    if not http and (not t.mqtt_host or not t.mqtt_port):
        fail(f"target {t.name} has no MQTT endpoint", as_json)
    reg = open_registry(stack, as_json)
    try:
        fleet = Fleet(project=t.project_id, region=t.region, registry=reg, host=t.mqtt_host or "",
                      port=t.mqtt_port or 0, ca_certs=t.mqtt_ca_cert, key_dir=key_dir_for(t), devices=devices,
                      prefix=prefix, mode="gateway" if gateway else "http" if http else "mqtt",
                      http_url=t.http_bridge_url or "")
    except ValueError as exc:
        fail(str(exc), as_json)
        return
    try:
        registered = registry_call(as_json, fleet.ensure_registered)
        fleet.connect()
        total = max(1, int(rate * duration))
        with Progress(TextColumn("[bold]simulate[/bold]"), BarColumn(),
                      TextColumn("{task.completed}/{task.total} sent"), TextColumn("{task.fields[acked]} acked"),
                      TimeRemainingColumn(), console=err, disable=as_json) as bar:
            task = bar.add_task("send", total=total, acked=0)
            result = fleet.run(rate, duration, progress=lambda sent, acked: bar.update(task, completed=sent,
                                                                                         acked=acked))
        fleet.drain_commands()
    except (ConnectError, OSError) as exc:
        fail(f"device connection failed: {exc}", as_json)
        return
    finally:
        fleet.close()
    summary = result.to_json() | {"registered": registered}
    emit(summary, as_json, f"{summary['sent']} sent, {summary['acknowledged']} acknowledged by the bridge, "
                           f"{summary['unacknowledged']} unacknowledged, {summary['rate_msg_s']} msg/s "
                           f"from {summary['devices']} devices ({registered} newly registered)")
    if result.unacknowledged:
        raise typer.Exit(1)


# ---- capacity and cost (the logic is iotbridge/planning; docs/capacity.md)
# Numbers are taken as text and checked by the planning module, so that bad input gets one line, not a usage box.
DevicesOpt = Annotated[str | None, typer.Option("--devices", metavar="N", help="Devices in the fleet (required).")]
RateOpt = Annotated[str | None, typer.Option("--rate", metavar="MSG_PER_S",
                                             help="Messages per second per device, e.g. 0.0167 for one a minute "
                                                  "(required).")]
PayloadOpt = Annotated[str, typer.Option("--payload-bytes", metavar="B", help="Bytes of each message's payload.")]
MetricsOpt = Annotated[str, typer.Option("--metrics", metavar="M", help="Metrics in each message.")]
PushesOpt = Annotated[str, typer.Option("--pushes-per-day", metavar="K",
                                        help="Config pushes per device and day (the config-push function).")]
StackConfigOpt = Annotated[Path, typer.Option("--stack-config", metavar="PULUMI_STACK_YAML",
                                              help="The stack's config file: region, machine types, Bigtable "
                                                   "shape and retention, table expiration.")]
ReferenceOpt = Annotated[Path | None, typer.Option(
    "--reference", metavar="RESULTS_JSON",
    help="The bench run whose per-host figures to use; default: the committed bench/reference/results.json.")]


def plan_or_fail(devices: str | None, rate: str | None, payload_bytes: str, metrics: str, pushes: str,
                 stack_config: Path, reference: Path | None, as_json: bool):  # noqa: ANN201 - a Capacity
    from iotbridge.planning import capacity

    if devices is None or rate is None:
        fail("--devices and --rate are required", as_json)
    try:
        fleet = capacity.Fleet.parse(devices, rate, payload_bytes, metrics, pushes)
        return capacity.plan(fleet, capacity.read_stack(stack_config),
                             capacity.read_reference(reference or capacity.REFERENCE))
    except capacity.PlanningError as exc:
        fail(str(exc), as_json)


@app.command("capacity")
def capacity_cmd(devices: DevicesOpt = None, rate: RateOpt = None, payload_bytes: PayloadOpt = "100",
                 metrics: MetricsOpt = "2", pushes: PushesOpt = "0",
                 stack_config: StackConfigOpt = Path("Pulumi.dev.yaml"), reference: ReferenceOpt = None,
                 as_json: JsonFlag = False) -> None:
    """Broker hosts, Dataflow workers, Bigtable nodes, BigQuery volume and registry traffic a fleet needs."""
    from iotbridge.planning import capacity

    c = plan_or_fail(devices, rate, payload_bytes, metrics, pushes, stack_config, reference, as_json)
    emit(c.to_json(), as_json, capacity.render(c))


@app.command("cost")
def cost_cmd(devices: DevicesOpt = None, rate: RateOpt = None, payload_bytes: PayloadOpt = "100",
             metrics: MetricsOpt = "2", pushes: PushesOpt = "0", stack_config: StackConfigOpt = Path("Pulumi.dev.yaml"),
             reference: ReferenceOpt = None,
             prices: Annotated[str, typer.Option("--prices", metavar="SOURCE",
                                                 help="table: the dated list prices in iotbridge/planning/"
                                                      "prices.json; live: the Cloud Billing Catalog API (needs "
                                                      "network and Google credentials).")] = "table",
             as_json: JsonFlag = False) -> None:
    """Monthly list-price estimate per component for a fleet, each line with its quantity and unit price."""
    from iotbridge.planning import capacity, cost

    c = plan_or_fail(devices, rate, payload_bytes, metrics, pushes, stack_config, reference, as_json)
    try:
        if prices == "table":
            book, as_of = cost.table_prices(c.stack.region)
        elif prices == "live":
            book, as_of = cost.live_prices(c.stack.region)
        else:
            raise capacity.PlanningError(f"--prices={prices}: expected table or live")
        lines = cost.estimate(c, book)
    except capacity.PlanningError as exc:
        fail(str(exc), as_json)
    total = round(sum(ln.monthly for ln in lines), 2)
    emit({"prices": as_of, "region": c.stack.region, "lines": [ln.to_json() for ln in lines], "total": total,
          "unchecked_prices": cost.unchecked(lines), "notes": c.notes}, as_json,
         cost.render(lines, as_of) + "".join(f"\nnote: {n}" for n in c.notes))


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
