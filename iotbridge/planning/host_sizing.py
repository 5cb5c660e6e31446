"""How many device connections one broker host can carry, and the limits its units and kernel get for them.

The arithmetic (docs/broker-scaling.md walks through it for the default machine type):

- Memory: the TLS front and Mosquitto hold ``RSS_PER_DEVICE_KIB`` (42 KiB: 41.7 measured, front 40.8 and
  Mosquitto 0.8, by ``.venv/bin/python -m bench connections`` on 2026-11-30 with 9,980 idle devices) per connected
  device. The host keeps ``max(512 MiB, a quarter of its memory)`` for the
  system, the bridge service, the page cache and the kernel's socket buffers; the rest carries devices.
- The front's CPU: it is one process on one core whatever the machine type, and holding idle devices costs it
  ``FRONT_IDLE_PERMILLE_PER_10K`` of a core per 10,000 (measured with the cloud's 30 s registry re-check:
  ``python -m bench.profile_front idle 10000 30``). Idle devices may take ``FRONT_IDLE_BUDGET_PERMILLE`` (half)
  of its core; the rest is for connects, reconnect storms and traffic. (The VM's CPU signal cannot see a
  saturated front: one busy core of two is 50 %.) The figure is 6.2 % (9,980 idle devices, 2026-11-30; 12.2 %
  before the re-check read only the devices changed since its previous round). A shared-core E2 type sustains
  only part of a core (e2-micro a quarter, e2-small a half): its budget is that part of half a core.
- The host's capacity is the smaller of the two. No port range bounds it: the front reaches Mosquitto over a Unix
  socket (a loopback TCP connection per device did: 55,536 ephemeral ports). The autoscaler aims at
  ``AUTOSCALE_FRACTION`` of it, so a host that dies leaves its devices room on the others while new hosts boot.
- File descriptors: the front holds two per device (the device's socket and its Unix socket to Mosquitto),
  Mosquitto one; each unit's ``LimitNOFILE`` is that times the capacity plus ``FD_SLACK``, and ``fs.file-max``
  covers all three processes (never below the kernel's usual 1,048,576).
- Kernel: ``somaxconn`` and ``tcp_max_syn_backlog`` at 65535 for the reconnect storm after a host goes away;
  ``tcp_mem`` lets TCP buffers use up to a quarter of memory before the kernel drops to its minimum buffers
  (the pressure point at 3/16, the low mark at 1/8).

Only predefined machine types of the families in ``MEMORY_PER_VCPU_MIB`` (and their custom types) are known:
another type fails ``pulumi preview`` with the list, not a host that runs out of memory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# A regional managed instance group holds at most this many VMs (compute.v1 regionInstanceGroupManagers.insert:
# "A regional managed instance group can contain up to 2000 instances.").
MAX_HOSTS = 2000
# 41.7 KiB measured: .venv/bin/python -m bench connections, 2026-11-30 (front 40.8, Mosquitto 0.8).
RSS_PER_DEVICE_KIB = 42
# Of one core, per 10,000 idle devices, re-check every 30 s: 6.2 % with 9,980 held,
# .venv/bin/python -m bench.profile_front idle 10000 30, 2026-11-30.
FRONT_IDLE_PERMILLE_PER_10K = 62
FRONT_IDLE_BUDGET_PERMILLE = 500
AUTOSCALE_FRACTION = 0.7
FD_SLACK = 4096
FRONT_FDS_PER_DEVICE = 2
BROKER_FDS_PER_DEVICE = 1
SERVICE_NOFILE = 65536  # the bridge service: its Pub/Sub and Firestore channels, not per device
MIN_FILE_MAX = 1_048_576
LISTEN_BACKLOG = 65535
PAGE_KIB = 4

# MiB of memory per vCPU of each predefined family's standard, highmem and highcpu types.
MEMORY_PER_VCPU_MIB: dict[str, dict[str, int]] = {
    "e2": {"standard": 4096, "highmem": 8192, "highcpu": 1024},
    "n2": {"standard": 4096, "highmem": 8192, "highcpu": 1024},
    "n2d": {"standard": 4096, "highmem": 8192, "highcpu": 1024},
    "n1": {"standard": 3840, "highmem": 6656, "highcpu": 922},
    "t2d": {"standard": 4096},
}
# The shared-core E2 types: (vCPUs, MiB, the share of one core they sustain in permille). They show two vCPUs and
# burst on them, but sustain a quarter, a half and one whole core: the front's idle budget shrinks with that.
SHARED_CORE: dict[str, tuple[int, int, int]] = {"e2-micro": (2, 1024, 250), "e2-small": (2, 2048, 500),
                                                "e2-medium": (2, 4096, 1000)}
_PREDEFINED = re.compile(r"^(?P<family>[a-z0-9]+)-(?P<kind>standard|highmem|highcpu)-(?P<vcpus>\d+)$")
_CUSTOM = re.compile(r"^(?:(?P<family>[a-z0-9]+)-)?custom-(?P<vcpus>\d+)-(?P<mib>\d+)(?:-ext)?$")


def known_machine_types() -> str:
    """What ``memory_mib`` accepts, for an error message."""
    kinds = ", ".join(f"{family}-{{{'|'.join(per)}}}-N" for family, per in MEMORY_PER_VCPU_MIB.items())
    return f"{kinds}, {', '.join(SHARED_CORE)}, [FAMILY-]custom-VCPUS-MIB"


def memory_mib(machine_type: str) -> int:
    """The memory of a machine type in MiB. Raises ``ValueError`` for a type this module does not know."""
    if machine_type in SHARED_CORE:
        return SHARED_CORE[machine_type][1]
    custom = _CUSTOM.match(machine_type)
    if custom:
        return int(custom.group("mib"))
    found = _PREDEFINED.match(machine_type)
    per_vcpu = MEMORY_PER_VCPU_MIB.get(found.group("family"), {}).get(found.group("kind")) if found else None
    if found is None or per_vcpu is None:
        raise ValueError(f"unknown machine type {machine_type!r}; known: {known_machine_types()}")
    return per_vcpu * int(found.group("vcpus"))


@dataclass(frozen=True)
class HostSizing:
    machine_type: str
    memory_mib: int
    devices_by_memory: int
    devices_by_cpu: int
    devices: int  # what one host carries: the smaller of the two
    autoscale_target: int  # connected devices per host the autoscaler keeps
    front_nofile: int
    broker_nofile: int
    service_nofile: int
    file_max: int
    tcp_mem_pages: tuple[int, int, int]  # low, pressure, high

    def sysctl_conf(self) -> str:
        """The host's /etc/sysctl.d file."""
        low, pressure, high = self.tcp_mem_pages
        return "\n".join([
            f"# gcp-iot-bridge broker host ({self.machine_type}, {self.memory_mib} MiB): {self.devices} devices",
            f"fs.file-max = {self.file_max}",
            f"net.core.somaxconn = {LISTEN_BACKLOG}",
            f"net.ipv4.tcp_max_syn_backlog = {LISTEN_BACKLOG}",
            f"net.ipv4.tcp_mem = {low} {pressure} {high}",
        ]) + "\n"


def sizing(machine_type: str) -> HostSizing:
    """The capacity and limits of one broker host of ``machine_type`` (see the module docstring)."""
    memory = memory_mib(machine_type)
    reserved = max(512, memory // 4)
    by_memory = (memory - reserved) * 1024 // RSS_PER_DEVICE_KIB
    sustained = SHARED_CORE[machine_type][2] if machine_type in SHARED_CORE else 1000
    by_cpu = FRONT_IDLE_BUDGET_PERMILLE * sustained // 1000 * 10_000 // FRONT_IDLE_PERMILLE_PER_10K
    devices = min(by_memory, by_cpu)
    pages = memory * 1024 // PAGE_KIB
    return HostSizing(
        machine_type=machine_type,
        memory_mib=memory,
        devices_by_memory=by_memory,
        devices_by_cpu=by_cpu,
        devices=devices,
        autoscale_target=int(devices * AUTOSCALE_FRACTION),
        front_nofile=FRONT_FDS_PER_DEVICE * devices + FD_SLACK,
        broker_nofile=BROKER_FDS_PER_DEVICE * devices + FD_SLACK,
        service_nofile=SERVICE_NOFILE,
        file_max=max(MIN_FILE_MAX, (FRONT_FDS_PER_DEVICE + BROKER_FDS_PER_DEVICE) * devices + 2 * FD_SLACK
                     + SERVICE_NOFILE),
        tcp_mem_pages=(pages // 8, pages * 3 // 16, pages // 4),
    )
