"""A user-supplied decoder for the raw profile, as a fleet with protobuf firmware would write one.

The devices send a ``google.protobuf.Struct`` (real protobuf wire bytes); the decoder returns the JSON shape the
``json`` profile reads. Referenced by import path: ``tests.dataflow.proto_decoder:decode``.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format, struct_pb2


def encode(doc: dict[str, Any]) -> bytes:
    msg = struct_pb2.Struct()
    msg.update(doc)
    return msg.SerializeToString()


def decode(data: bytes) -> dict[str, Any]:
    msg = struct_pb2.Struct()
    msg.ParseFromString(data)
    return json_format.MessageToDict(msg)


def text_fields(data: bytes) -> dict[str, Any]:
    """``name=value`` lines, values read with "surrogateescape" as a careless decoder might: bytes that are not UTF-8
    become unpaired surrogates. Referenced as ``tests.dataflow.proto_decoder:text_fields``."""
    pairs = (line.split("=", 1) for line in data.decode("utf-8", "surrogateescape").splitlines())
    return {k: float(v) if v.replace(".", "", 1).isdigit() else v for k, v in pairs}


def quoting(data: bytes) -> dict[str, Any]:
    """Refuses every payload, quoting it in its error as a careless decoder might (``surrogateescape``)."""
    raise ValueError(f"not a reading: {data.decode('utf-8', 'surrogateescape')}")


def not_callable_attribute() -> None:  # pragma: no cover - only its name is used
    return None


NOT_CALLABLE = 42
