"""`make test` checks the emulator components before anything else, and says in one line what is missing."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check-emulators.sh"
LAUNCHERS = {
    "pubsub-emulator": "pubsub-emulator/bin/cloud-pubsub-emulator",
    "cloud-firestore-emulator": "cloud-firestore-emulator/cloud_firestore_emulator",
    "bigtable": "bigtable-emulator/cbtemulator",
}


def fake_sdk(root: Path, components: list[str]) -> Path:
    """An SDK folder whose platform/ holds executable stand-ins for the named components' launchers."""
    for component in components:
        launcher = root / "platform" / LAUNCHERS[component]
        launcher.parent.mkdir(parents=True, exist_ok=True)
        launcher.write_text("#!/bin/sh\nexit 0\n")
        launcher.chmod(0o755)
    (root / "platform").mkdir(parents=True, exist_ok=True)
    return root


def check(sdk: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT)], env={"PATH": "/usr/bin:/bin", "CLOUDSDK_ROOT_DIR": str(sdk),
                                                      "HOME": str(sdk)},
                          capture_output=True, text=True, timeout=30, check=False)


def test_all_components_present_passes(tmp_path: Path) -> None:
    out = check(fake_sdk(tmp_path, list(LAUNCHERS)))
    assert (out.returncode, out.stderr) == (0, "")


@pytest.mark.parametrize("absent", list(LAUNCHERS))
def test_a_missing_component_fails_in_one_line_with_its_install_command(tmp_path: Path, absent: str) -> None:
    out = check(fake_sdk(tmp_path, [c for c in LAUNCHERS if c != absent]))
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert absent in lines[0] and f"gcloud components install {absent}" in lines[0]


def test_a_launcher_that_is_not_executable_counts_as_missing(tmp_path: Path) -> None:
    sdk = fake_sdk(tmp_path, list(LAUNCHERS))
    (sdk / "platform" / LAUNCHERS["bigtable"]).chmod(0o644)
    out = check(sdk)
    assert out.returncode == 1 and "bigtable" in out.stderr
