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
    stack: StackOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """Register a device with one credential."""
    from iotbridge.registry import Credential

    reg = open_registry(stack, as_json)
    cred = registry_call(as_json, Credential, fmt, public_key.read_text())
    d = registry_call(as_json, reg.create_device, device_id, [cred])
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


def config_request(device_id: str, payload: bytes, version_to_update: int) -> bytes:
    """The config-push function's request: a JSON object as ``config``, anything else as base64 ``binary_data``."""
    import base64

    request: dict[str, Any] = {"device_id": device_id}
    try:
        parsed = json.loads(payload)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        request["config"] = parsed
    else:
        request["binary_data"] = base64.b64encode(payload).decode()
    if version_to_update:
        request["version_to_update"] = version_to_update
    return json.dumps(request).encode()


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
    stack: StackOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """A fleet speaking the device protocol: keys generated and registered on first use, QoS 1 telemetry."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from iotbridge.simulate import ConnectError, Fleet

    t = target_or_fail(stack, as_json)
    if not t.mqtt_host or not t.mqtt_port:
        fail(f"target {t.name} has no MQTT endpoint", as_json)
    reg = open_registry(stack, as_json)
    try:
        fleet = Fleet(project=t.project_id, region=t.region, registry=reg, host=t.mqtt_host or "",
                      port=t.mqtt_port or 0, ca_certs=t.mqtt_ca_cert, key_dir=key_dir_for(t), devices=devices,
                      prefix=prefix)
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


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
