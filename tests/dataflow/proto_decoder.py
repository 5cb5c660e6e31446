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


def not_callable_attribute() -> None:  # pragma: no cover - only its name is used
    return None


NOT_CALLABLE = 42
