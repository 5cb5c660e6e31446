"""Pub/Sub's documented per-message and per-request limits, as pure functions.

Pub/Sub refuses a whole publish request with INVALID_ARGUMENT when any message in it breaks one of these;
the emulator checks none of them. The bridge service
checks every message here before it joins a publish request, and the front can refuse a device's PUBLISH whose
topic alone could never become a valid message (:func:`event_topic_violation`).

Sizes are UTF-8 bytes, as Pub/Sub counts them, not characters.
"""

from __future__ import annotations

from collections.abc import Mapping

MAX_ATTRIBUTES = 100
MAX_ATTRIBUTE_KEY_BYTES = 256
MAX_ATTRIBUTE_VALUE_BYTES = 1024
MAX_MESSAGE_BYTES = 10_000_000  # data plus attribute keys and values
MAX_REQUEST_BYTES = 10_000_000
MAX_REQUEST_MESSAGES = 1000
# Reserved for Google: Pub/Sub refuses attribute keys that start with it.
RESERVED_KEY_PREFIX = "goog"

# Reasons, also used as the ``error`` attribute of a dead-lettered message.
ATTRIBUTE_KEY_TOO_LONG = "attribute_key_too_long"
ATTRIBUTE_KEY_RESERVED = "attribute_key_reserved"
ATTRIBUTE_VALUE_TOO_LONG = "attribute_value_too_long"
TOO_MANY_ATTRIBUTES = "too_many_attributes"
MESSAGE_TOO_LARGE = "message_too_large"
EMPTY_MESSAGE = "empty_message"


def _utf8_len(text: str) -> int:
    # A character is at most 4 UTF-8 bytes: short strings need no encoding to be known within a limit.
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _over(text: str, limit: int) -> bool:
    return len(text) * 4 > limit and _utf8_len(text) > limit


def message_violation(data: bytes, attributes: Mapping[str, str]) -> tuple[str, str] | None:
    """``(reason, detail)`` when Pub/Sub would refuse a message with this data and these attributes, else None."""
    # The bridge checks every device message: first in characters (at most 4 UTF-8 bytes each), which settles the
    # usual message without encoding anything; only a message near a limit is measured in bytes.
    chars = 0
    for key, value in attributes.items():
        if (len(key) > MAX_ATTRIBUTE_KEY_BYTES // 4 or len(value) > MAX_ATTRIBUTE_VALUE_BYTES // 4
                or key.startswith(RESERVED_KEY_PREFIX)):
            break
        chars += len(key) + len(value)
    else:
        if (data or attributes) and len(attributes) <= MAX_ATTRIBUTES and len(data) + 4 * chars <= MAX_MESSAGE_BYTES:
            return None
    return _violation(data, attributes)


def _violation(data: bytes, attributes: Mapping[str, str]) -> tuple[str, str] | None:
    if len(attributes) > MAX_ATTRIBUTES:
        return TOO_MANY_ATTRIBUTES, f"{len(attributes)} attributes, at most {MAX_ATTRIBUTES}"
    size = len(data)
    for key, value in attributes.items():
        if _over(key, MAX_ATTRIBUTE_KEY_BYTES):
            return ATTRIBUTE_KEY_TOO_LONG, (f"attribute key of {_utf8_len(key)} bytes, at most "
                                            f"{MAX_ATTRIBUTE_KEY_BYTES}")
        if key.startswith(RESERVED_KEY_PREFIX):
            return ATTRIBUTE_KEY_RESERVED, f"attribute key {key[:64]!r} starts with {RESERVED_KEY_PREFIX!r}"
        if _over(value, MAX_ATTRIBUTE_VALUE_BYTES):
            return ATTRIBUTE_VALUE_TOO_LONG, (f"attribute {key!r} has a value of {_utf8_len(value)} bytes, at most "
                                              f"{MAX_ATTRIBUTE_VALUE_BYTES}")
        size += _utf8_len(key) + _utf8_len(value)
    if size > MAX_MESSAGE_BYTES:
        return MESSAGE_TOO_LARGE, f"message of {size} bytes, at most {MAX_MESSAGE_BYTES}"
    if not data and not attributes:
        return EMPTY_MESSAGE, "a message needs data or at least one attribute"
    return None


def event_topic_violation(topic: str, device_id: str) -> tuple[str, str] | None:
    """For the front: ``(reason, detail)`` when a device's PUBLISH to ``topic`` could never be forwarded, because
    the subfolder it names would be an attribute value (``subFolder``) over Pub/Sub's limit; None otherwise.

    Only the topic is judged: a device's payload is bounded far below the message limit by the front's own
    event and state limits."""
    base = f"/devices/{device_id}/events/"
    if not topic.startswith(base):
        return None
    sub_folder = topic[len(base):]
    if _over(sub_folder, MAX_ATTRIBUTE_VALUE_BYTES):
        return ATTRIBUTE_VALUE_TOO_LONG, (f"subfolder of {_utf8_len(sub_folder)} bytes, at most "
                                          f"{MAX_ATTRIBUTE_VALUE_BYTES}")
    return None


def clip_utf8(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes, never inside a character."""
    if not _over(text, limit):
        return text
    return text.encode("utf-8", "surrogatepass")[:limit].decode("utf-8", "ignore")
