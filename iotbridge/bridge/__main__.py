"""python -m iotbridge.bridge — what a broker host runs, from the settings file its startup script writes.

  mosquitto-config  write mosquitto.conf, passwd and acl for the settings file (before Mosquitto starts)
  front             the TLS front devices connect to (ADC in the cloud; FIRESTORE_EMULATOR_HOST locally)
  service           the bridge service Mosquitto <-> Pub/Sub (ADC in the cloud; the emulators' hosts locally)
  authd             the auth daemon of device_auth mosquitto (beside Mosquitto, started before it)
  build-plugin      compile the Mosquitto auth plugin of device_auth mosquitto (gcc, Mosquitto's headers)

A broker host on this machine, with a throw-away CA and free ports: python -m iotbridge.local.broker_host.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
import threading
from pathlib import Path

from iotbridge.bridge.settings import BridgeSettings


def _registry(settings: BridgeSettings):  # noqa: ANN202
    from iotbridge.registry import Registry

    database = None if settings.firestore_database == "(default)" else settings.firestore_database
    return Registry(settings.project, settings.registry_id, settings.region, database=database)


def freeze_startup_objects() -> None:
    """Take every object alive once a part has started (the Google client libraries' modules, classes and
    descriptors: some 70,000) out of the garbage collector's reach. Each full collection walked every one of them
    and stopped every thread of the process while it did: 48-70 ms of CPU in the bridge service, 27-36 ms in the
    front, once or twice every 8 s at half the maximum rate (``bench/profile_latency.py``). Frozen, they are never
    scanned again (nor freed: they live as long as the process anyway); a full collection then takes 1-11 ms
    (docs/broker-scaling.md, "Latency, device to Pub/Sub")."""
    gc.freeze()


async def until_stopped() -> None:
    """Once an asyncio part has started: its startup objects frozen, then wait for SIGTERM or SIGINT."""
    freeze_startup_objects()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def run_front(settings: BridgeSettings) -> None:
    from iotbridge.bridge.front import Front, server_ssl_context

    secrets = settings.secrets()

    async def main() -> None:
        ssl_context = server_ssl_context(settings.tls_cert, settings.tls_key, settings.client_ca)
        front = Front(settings, _registry(settings), ssl_context, front_password=secrets["front"],
                      control_password=secrets["bridge"])
        await front.start()
        http = None
        if settings.http_port:
            from iotbridge.bridge.http_bridge import HttpBridge

            http = HttpBridge(front, secrets["bridge"])
            await http.start()
        await until_stopped()
        if http is not None:
            await http.stop()
        await front.stop(settings.drain_s)

    asyncio.run(main())


def run_authd(settings: BridgeSettings, group: str | None) -> None:
    from iotbridge.bridge.authd import AuthDaemon

    async def main() -> None:
        password = settings.secrets()["bridge"] if settings.secrets_file else None
        daemon = AuthDaemon(settings, _registry(settings), control_password=password)
        await daemon.start(group)
        await until_stopped()
        await daemon.stop()

    if not settings.auth_socket:
        raise SystemExit("error: auth_socket is not set in the settings: the auth daemon's Unix socket")
    asyncio.run(main())


def run_service(settings: BridgeSettings) -> None:
    from iotbridge.bridge.service import BridgeService

    publisher = None
    if settings.publisher_factory:
        import importlib

        module, _, name = settings.publisher_factory.partition(":")
        publisher = getattr(importlib.import_module(module), name)()
    service = BridgeService(settings, _registry(settings), settings.secrets()["bridge"], publisher=publisher)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    service.start()
    freeze_startup_objects()
    stop.wait()
    service.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m iotbridge.bridge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name, text in (("front", "the TLS front"), ("service", "the bridge service")):
        p = sub.add_parser(name, help=f"run {text}")
        p.add_argument("--settings", type=Path, required=True, help="the host's settings.json")
    authd = sub.add_parser("authd", help="run the auth daemon of device_auth mosquitto (before Mosquitto starts)")
    authd.add_argument("--settings", type=Path, required=True, help="the host's settings.json")
    authd.add_argument("--group", help="the group the auth socket is given to (Mosquitto's; default: the daemon's)")
    build = sub.add_parser("build-plugin", help="compile the Mosquitto auth plugin (iotbridge_auth.so)")
    build.add_argument("--out", type=Path, required=True, help="folder for iotbridge_auth.so")
    mconf = sub.add_parser("mosquitto-config", help="write mosquitto.conf, passwd and acl for a settings file")
    mconf.add_argument("--settings", type=Path, required=True)
    mconf.add_argument("--out", type=Path, required=True, help="folder for the files and the persistence data")
    mconf.add_argument("--user", help="the user Mosquitto drops privileges to (default: root)")
    mconf.add_argument("--plugin", type=Path,
                       help="the device plugin iotbridge_auth.so (required with device_auth mosquitto)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("google").setLevel(logging.WARNING)

    if args.cmd == "mosquitto-config":
        from iotbridge.bridge.settings import mosquitto_config

        text = mosquitto_config(BridgeSettings.load(args.settings), args.out, user=args.user, plugin_path=args.plugin)
        (args.out / "mosquitto.conf").write_text(text)
        print(f"wrote {args.out}/mosquitto.conf")
    elif args.cmd == "authd":
        run_authd(BridgeSettings.load(args.settings), args.group)
    elif args.cmd == "build-plugin":
        from iotbridge.bridge.plugin import BuildError, build

        try:
            print(f"wrote {build(args.out)}")
        except BuildError as exc:
            raise SystemExit(f"error: {exc}") from None
    elif args.cmd == "front":
        run_front(BridgeSettings.load(args.settings))
    else:
        run_service(BridgeSettings.load(args.settings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
