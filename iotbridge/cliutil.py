"""What every ``iotctl`` command shares: the ``--json`` and ``--stack`` options, its output (JSON or a human line
on stdout), its failures (one line, exit code 1) and the target it acts on.

``iotbridge/cli.py`` and ``iotbridge/ml/cli.py`` (``iotctl models``) both build on it, so that every command reads
its options, prints and fails the same way:

- ``emit(data, as_json, human)``: ``data`` as indented JSON with ``--json``, else the human text (``data`` as JSON
  when there is none).
- ``fail(reason, as_json)``: the reason on one line, as ``{"error": reason}`` on stdout with ``--json``, else
  ``error: reason`` on stderr; exits 1 (or ``code``).
- ``or_fail(as_json, fn, *args, errors=..., **kwargs)``: ``fn(*args, **kwargs)``, an expected error turned into
  ``fail``.
- ``target_or_fail(stack, as_json)``: where the command acts (``--stack NAME`` or the running local stack), its
  emulator environment applied.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any, NoReturn, TypeVar

import typer

from iotbridge.targets import Target, TargetError, resolve

T = TypeVar("T")

JsonFlag = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
StackOpt = Annotated[
    str | None,
    typer.Option("--stack", help="A deployed Pulumi stack (reads `pulumi stack output --json`); "
                                 "default: the running local stack."),
]


def to_json(data: Any) -> str:
    return json.dumps(data, indent=2, default=str)


def emit(data: Any, as_json: bool, human: str | None = None) -> None:
    """``data`` as JSON with ``--json``; otherwise ``human`` (or ``data`` as JSON when there is no human form)."""
    typer.echo(to_json(data) if as_json or human is None else human)


def fail(reason: str, as_json: bool = False, code: int = 1) -> NoReturn:
    """Print ``reason`` on one line (JSON on stdout with ``--json``, else on stderr) and exit with ``code``."""
    reason = " ".join(str(reason).split())
    if as_json:
        typer.echo(json.dumps({"error": reason}))
    else:
        typer.echo(f"error: {reason}", err=True)
    raise typer.Exit(code)


def first_line(exc: BaseException) -> str:
    """An exception for the operator: the first line of its message, or its type when it has none."""
    text = str(exc)
    return text.splitlines()[0] if text.strip() else type(exc).__name__


def or_fail(as_json: bool, fn: Callable[..., T], *args: Any,
            errors: tuple[type[BaseException], ...] = (ValueError,), **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``; one of ``errors`` fails the command with its message."""
    try:
        return fn(*args, **kwargs)
    except errors as exc:
        fail(str(exc), as_json)


def target_or_fail(stack: str | None, as_json: bool) -> Target:
    """The target of ``--stack`` (the running local stack without it), its emulator hosts put in the environment."""
    target = or_fail(as_json, resolve, stack, errors=(TargetError,))
    target.apply_env()
    return target
