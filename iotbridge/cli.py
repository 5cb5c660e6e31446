"""iotctl: operate a gcp-iot-bridge deployment — the local stack on this machine, or a deployed Pulumi stack.

Every command accepts --json for machine-readable output and exits non-zero with a one-line reason on failure.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from typing import Annotated, Any

import typer
from rich.console import Console

from iotbridge.local.stack import LocalStack, StackError

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
local_app = typer.Typer(help="The whole architecture on this machine (emulators, Mosquitto, local BigQuery).",
                        no_args_is_help=True)
app.add_typer(local_app, name="local")

err = Console(stderr=True)
JsonFlag = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def emit(data: Any, as_json: bool, human: str | None = None) -> None:
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=str))
    else:
        typer.echo(human if human is not None else json.dumps(data, indent=2, default=str))


def fail(reason: str, as_json: bool = False, code: int = 1) -> None:
    reason = " ".join(str(reason).split())  # one line
    if as_json:
        typer.echo(json.dumps({"error": reason}))
    else:
        err.print(f"[red]error:[/red] {reason}", highlight=False)
    raise typer.Exit(code)


@local_app.command("up")
def local_up(
    detach: Annotated[bool, typer.Option("--detach", help="Start in the background and return.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Start the local stack; without --detach, run until Ctrl-C, then stop it."""
    stack = LocalStack()
    try:
        with err.status("starting the local stack") as status:
            stack.up(progress=lambda m: status.update(m))
    except (StackError, OSError, RuntimeError) as exc:
        fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, as_json)
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
    for name, p in info["processes"].items():  # type: ignore[union-attr]
        typer.echo(f"  {name:14} pid {p['pid']:<8} {'up' if p['alive'] else 'DOWN'}  port {p['port']}")
    if not info["healthy"]:
        raise typer.Exit(1)


@local_app.command("down")
def local_down(as_json: JsonFlag = False) -> None:
    """Stop every process the local stack started (also after a crash)."""
    stopped = LocalStack().down()
    emit({"stopped": stopped}, as_json, f"stopped: {', '.join(stopped) or 'nothing was running'}")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
