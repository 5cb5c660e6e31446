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

``device_auth`` "mosquitto" (no front: Mosquitto terminates the devices' TLS, its plugin asks the auth daemon):

- Memory: Mosquitto and the auth daemon hold ``MQ_RSS_PER_DEVICE_KIB`` (18 KiB) per connected device: 17.5 in each
  of two runs (Mosquitto 15.2, the daemon's session record 2.2), with 10,000 idle devices, 2026-11-30:
  ``.venv/bin/python -m bench.connections --device-auth mosquitto``. The daemon also holds every device of the
  registry, connected or not: ``AUTHD_RSS_PER_REGISTRY_DEVICE_KIB`` (4 KiB) per registry device (3.16 and 3.18 in
  two runs with the map read at start, 3.52 and 3.40 with the devices taken in by the change feed:
  ``.venv/bin/python -m bench.profile_front authd-map 10000``). That map is kept back first; ``registry_devices`` is
  the registry's size (``group_sizing`` says what the stack takes it to be).
- CPU: Mosquitto is one thread (one core) and the daemon another process: holding 10,000 idle devices costs
  Mosquitto ``MQ_IDLE_PERMILLE_PER_10K`` (2.2 %: 2.2 and 1.7 measured) and the daemon
  ``AUTHD_IDLE_PERMILLE_PER_10K`` (0.1 %: 0.1 and 0.1) of a core, re-check every 30 s, over 90 s with 10,000 held,
  ``.venv/bin/python -m bench.profile_front idle 10000 30 mosquitto`` (2026-11-30, 2 shared cores at load 5 to 12).
  Each may spend half of its own core on idle devices, so the busier one (Mosquitto) binds; on a shared-core type
  both share the part of a core it sustains.
- File descriptors: Mosquitto one per device (``broker_nofile``), no front; ``file_max`` adds the daemon's fixed set.

Only predefined machine types of the families in ``MEMORY_PER_VCPU_MIB`` (and their custom types) are known:
another type fails ``pulumi preview`` with the list, not a host that runs out of memory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from iotbridge.spec import DEVICE_AUTH_MODES

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
AUTHD_NOFILE = SERVICE_NOFILE  # the auth daemon: its two plugin connections and Firestore channels, not per device

# device_auth "mosquitto" (no front): Mosquitto holds the device's TLS connection, the auth daemon a session record.
# 17.5 KiB measured in each of two runs: .venv/bin/python -m bench.connections --device-auth mosquitto, 2026-11-30.
MQ_RSS_PER_DEVICE_KIB = 18
# The auth daemon's map holds every device of the registry, connected or not (credentials, flags): KiB per registry
# device: 3.16 and 3.18 measured read at start, 3.52 and 3.40 taken in by the change feed,
# .venv/bin/python -m bench.profile_front authd-map 10000, 2026-11-30.
AUTHD_RSS_PER_REGISTRY_DEVICE_KIB = 4
# Of one core, per 10,000 idle devices, re-check every 30 s: Mosquitto 2.2 and 1.7 %, the daemon 0.1 and 0.1 %,
# .venv/bin/python -m bench.profile_front idle 10000 30 mosquitto, 2026-11-30.
MQ_IDLE_PERMILLE_PER_10K = 22  # Mosquitto: one thread, its keep-alive handling
AUTHD_IDLE_PERMILLE_PER_10K = 1  # the auth daemon: its change-feed rounds and session records
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


def kept_mib(memory: int) -> int:
    """What a host of ``memory`` MiB keeps for the system, the bridge service, the page cache and the kernel."""
    return max(512, memory // 4)


@dataclass(frozen=True)
class HostSizing:
    machine_type: str
    device_auth: str  # "front" or "mosquitto" (spec.DEVICE_AUTH_MODES)
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


def sizing(machine_type: str, device_auth: str = "front", registry_devices: int = 0) -> HostSizing:
    """The capacity and limits of one broker host of ``machine_type`` whose devices ``device_auth`` authenticates
    (see the module docstring). ``registry_devices``: the devices of the registry, which the auth daemon of
    ``device_auth`` "mosquitto" holds in memory whether they connect or not (the front's figures ignore it)."""
    if device_auth not in DEVICE_AUTH_MODES:
        raise ValueError(f"device_auth must be one of {', '.join(DEVICE_AUTH_MODES)}, got {device_auth!r}")
    if registry_devices < 0:
        raise ValueError(f"registry_devices must be >= 0, got {registry_devices}")
    memory = memory_mib(machine_type)
    reserved = kept_mib(memory)
    sustained = SHARED_CORE[machine_type][2] if machine_type in SHARED_CORE else 1000
    if device_auth == "front":
        by_memory = (memory - reserved) * 1024 // RSS_PER_DEVICE_KIB
        by_cpu = FRONT_IDLE_BUDGET_PERMILLE * sustained // 1000 * 10_000 // FRONT_IDLE_PERMILLE_PER_10K
    else:
        # The daemon's map first (it is there before any device connects), then each connection.
        free_kib = (memory - reserved) * 1024 - registry_devices * AUTHD_RSS_PER_REGISTRY_DEVICE_KIB
        by_memory = max(0, free_kib // MQ_RSS_PER_DEVICE_KIB)
        budget = FRONT_IDLE_BUDGET_PERMILLE * sustained // 1000
        if machine_type in SHARED_CORE:  # both processes share the part of a core the type sustains
            by_cpu = budget * 10_000 // (MQ_IDLE_PERMILLE_PER_10K + AUTHD_IDLE_PERMILLE_PER_10K)
        else:  # each on a core of its own: the busier one binds
            by_cpu = budget * 10_000 // max(MQ_IDLE_PERMILLE_PER_10K, AUTHD_IDLE_PERMILLE_PER_10K)
    devices = min(by_memory, by_cpu)
    pages = memory * 1024 // PAGE_KIB
    front_fds = FRONT_FDS_PER_DEVICE if device_auth == "front" else 0
    return HostSizing(
        machine_type=machine_type,
        device_auth=device_auth,
        memory_mib=memory,
        devices_by_memory=by_memory,
        devices_by_cpu=by_cpu,
        devices=devices,
        autoscale_target=int(devices * AUTOSCALE_FRACTION),
        front_nofile=front_fds * devices + FD_SLACK,
        broker_nofile=BROKER_FDS_PER_DEVICE * devices + FD_SLACK,
        service_nofile=SERVICE_NOFILE,
        file_max=max(MIN_FILE_MAX, (front_fds + BROKER_FDS_PER_DEVICE) * devices + 2 * FD_SLACK + SERVICE_NOFILE
                     + (AUTHD_NOFILE if device_auth == "mosquitto" else 0)),
        tcp_mem_pages=(pages // 8, pages * 3 // 16, pages // 4),
    )


def group_sizing(machine_type: str, device_auth: str = "front", max_hosts: int = 10,
                 devices_per_host: int | None = None) -> HostSizing:
    """What one host of a stack's group carries (the stack sizes its hosts and autoscaler with it).

    With ``device_auth`` "mosquitto" every host's auth daemon holds the whole registry, taken to be what the group
    keeps connected at its largest: ``max_hosts`` x ``devices_per_host``, or without ``devices_per_host``, the
    largest ``d`` that a host carries with the map of ``max_hosts`` x ``AUTOSCALE_FRACTION`` x ``d`` devices beside
    its ``d`` connections: ``d`` = (memory for devices) / (``MQ_RSS_PER_DEVICE_KIB`` + ``AUTOSCALE_FRACTION`` x
    ``max_hosts`` x ``AUTHD_RSS_PER_REGISTRY_DEVICE_KIB``), at most what the CPU allows."""
    if device_auth != "mosquitto":
        return sizing(machine_type, device_auth)
    if devices_per_host:
        return sizing(machine_type, device_auth, registry_devices=max_hosts * devices_per_host)
    bare = sizing(machine_type, device_auth)  # no map
    free_kib = (bare.memory_mib - kept_mib(bare.memory_mib)) * 1024
    per_device = MQ_RSS_PER_DEVICE_KIB + AUTOSCALE_FRACTION * max_hosts * AUTHD_RSS_PER_REGISTRY_DEVICE_KIB
    d = min(bare.devices_by_cpu, int(free_kib / per_device))
    return sizing(machine_type, device_auth, registry_devices=max_hosts * int(d * AUTOSCALE_FRACTION))
