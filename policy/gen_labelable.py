"""Regenerate ``labelable_types.json``: every pulumi-gcp resource type that takes user labels, and the field.

The policy pack runs in its own virtualenv without pulumi-gcp, so the list ships as data. A test rescans the
installed pulumi-gcp and fails when the file is stale (a provider upgrade adds labelable types).

    .venv/bin/python policy/gen_labelable.py      # rewrites policy/labelable_types.json
"""

from __future__ import annotations

import json
import pathlib
import re

HERE = pathlib.Path(__file__).resolve().parent
OUTPUT = HERE / "labelable_types.json"

_TOKEN = re.compile(r"super\(\w+, __self__\)\.__init__\(\s*'(gcp:[^']+)'")
# Only a string map is a resource's labels: monitoring MetricDescriptor ``labels`` are label descriptors, and a
# NotificationChannel's ``labels`` are its settings (email_address), its resource labels being ``user_labels``.
_MAP_PARAM = r"\n\s+{name}: pulumi\.Input\[Optional\[Mapping\[str"


def scan(package_dir: pathlib.Path) -> dict[str, str]:
    """Type token -> the camelCase input that holds the resource's labels, for every resource in pulumi-gcp."""
    found: dict[str, str] = {}
    for path in sorted(package_dir.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        token = _TOKEN.search(text)
        if not token:
            continue
        start = text.find("def _internal_init(")
        signature = text[start:text.find("__props__=None)", start)]
        if re.search(_MAP_PARAM.format(name="user_labels"), signature):
            found[token.group(1)] = "userLabels"
        elif re.search(_MAP_PARAM.format(name="labels"), signature):
            found[token.group(1)] = "labels"
    return found


def installed() -> dict[str, str]:
    import pulumi_gcp

    return scan(pathlib.Path(pulumi_gcp.__file__).resolve().parent)


def render(types: dict[str, str]) -> str:
    from importlib.metadata import version

    import pulumi_gcp  # noqa: F401  (the version goes into the file)

    return json.dumps({"pulumi_gcp": version("pulumi_gcp"), "types": dict(sorted(types.items()))}, indent=1) + "\n"


if __name__ == "__main__":
    OUTPUT.write_text(render(installed()), encoding="utf-8")
    print(f"wrote {OUTPUT}")
