"""The device registry against the real Firestore emulator."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta
from itertools import pairwise

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from iotbridge import registry as reg
from iotbridge.registry import Credential, Registry
from tests.waiting import wait_for

PROJECT = "local-project"


def _pub_pem(key) -> str:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def _cert_pem(key) -> str:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "unused")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=1))
            .not_valid_after(now + timedelta(days=1)).sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode()


@pytest.fixture(scope="module")
def keys():
    return {"rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
            "ec": ec.generate_private_key(ec.SECP256R1())}


@pytest.fixture(scope="module")
def creds(keys):
    return {
        "RSA_PEM": Credential("RSA_PEM", _pub_pem(keys["rsa"])),
        "RSA_X509_PEM": Credential("RSA_X509_PEM", _cert_pem(keys["rsa"])),
        "ES256_PEM": Credential("ES256_PEM", _pub_pem(keys["ec"])),
        "ES256_X509_PEM": Credential("ES256_X509_PEM", _cert_pem(keys["ec"])),
    }


# ------------------------------------------------------------------------------------- no emulator needed

BAD_IDS = ["a/b-device", "dev+ice", "dev#ice", "dev ice", "dev\x00ice", "ab", "a" * 256, "1device", "_device",
           "", "dev\nice", "dévice", "dev*ice", "dev$ice"]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_bad_device_ids_are_refused(bad):
    with pytest.raises(reg.InvalidDeviceId):
        reg.validate_device_id(bad)


@pytest.mark.parametrize("good", ["abc", "a" * 255, "Dev_1.2~3%4-5", "sensor-0001"])
def test_good_device_ids_are_accepted(good):
    assert reg.validate_device_id(good) == good


def test_credentials_parse_and_expose_algorithm(creds, keys):
    assert creds["RSA_PEM"].algorithm() == "RS256"
    assert creds["RSA_X509_PEM"].algorithm() == "RS256"
    assert creds["ES256_PEM"].algorithm() == "ES256"
    assert creds["ES256_X509_PEM"].algorithm() == "ES256"
    # The key inside the certificate is the device's public key.
    assert creds["ES256_X509_PEM"].public_key().public_numbers() == keys["ec"].public_key().public_numbers()
    assert creds["RSA_X509_PEM"].public_key().public_numbers() == keys["rsa"].public_key().public_numbers()


def test_bad_credentials_are_refused(keys):
    ec_pub, rsa_pub = _pub_pem(keys["ec"]), _pub_pem(keys["rsa"])
    small_rsa = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    p384 = ec.generate_private_key(ec.SECP384R1())
    private_pem = keys["ec"].private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()).decode()
    cases = [
        ("RSA_PEM", ec_pub, "expected an RSA key"),
        ("ES256_PEM", rsa_pub, "EC P-256"),
        ("ES256_PEM", _pub_pem(p384), "EC P-256"),
        ("ES256_PEM", _pub_pem(ed25519.Ed25519PrivateKey.generate()), "EC P-256"),
        ("RSA_PEM", _pub_pem(small_rsa), "1024 bits"),
        ("ES256_X509_PEM", ec_pub, "not a PEM X.509 certificate"),
        ("ES256_PEM", "-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----\n", "not a PEM"),
        ("ES256_PEM", "", "empty"),
        ("ES256_PEM", private_pem, "private key"),
        ("DSA_PEM", ec_pub, "unknown credential format"),
    ]
    for fmt, pem, message in cases:
        with pytest.raises(reg.InvalidCredential, match=message):
            Credential(fmt, pem)  # type: ignore[arg-type]
    with pytest.raises(reg.InvalidCredential, match="timezone"):
        Credential("ES256_PEM", ec_pub, datetime.now() + timedelta(days=1))  # naive: refused


def test_credential_expiry(creds, clock):
    now = clock.now()
    past = Credential("ES256_PEM", creds["ES256_PEM"].public_key_pem, now - timedelta(seconds=1))
    future = Credential("ES256_PEM", creds["ES256_PEM"].public_key_pem, now + timedelta(hours=1))
    assert past.expired(now) and not future.expired(now) and not creds["ES256_PEM"].expired(now)
    assert past.expired(now - timedelta(seconds=2)) is False  # expiry is judged at the time asked, not today
    device = reg.Device(id="d", num_id="1", registry_id="r", credentials=(past, future, creds["ES256_PEM"]))
    assert device.valid_credentials(now) == (future, creds["ES256_PEM"])


# ------------------------------------------------------------------------------------- Firestore emulator


@pytest.fixture
def registry(firestore_emulator, emulator_env) -> Registry:
    emulator_env(firestore_emulator)
    # A fresh registry per test: the emulator is shared by the session.
    return Registry(PROJECT, f"reg-{uuid.uuid4().hex[:12]}", "europe-west1")


@pytest.mark.emulator
def test_create_get_list_delete(registry, creds):
    expiry = (datetime.now(UTC) + timedelta(days=365)).replace(microsecond=0)
    es_with_expiry = Credential("ES256_PEM", creds["ES256_PEM"].public_key_pem, expiry)
    d = registry.create_device("sensor-1", [es_with_expiry, creds["RSA_X509_PEM"]], metadata={"site": "lyon"})
    assert d.id == "sensor-1" and d.registry_id == registry.registry_id
    assert d.num_id.isdigit() and int(d.num_id) >= 10**15
    assert d.credentials == (es_with_expiry, creds["RSA_X509_PEM"])
    assert d.credentials[0].expiration_time == expiry
    # IoT Core's first config: version 1, empty.
    assert d.metadata == {"site": "lyon"} and not d.blocked and d.config_version == 1
    assert registry.get_config("sensor-1").version == 1 and registry.get_config("sensor-1").data == b""
    assert registry.get_device("sensor-1") == d
    assert registry.get_device_by_num_id(d.num_id).id == "sensor-1"

    other = registry.create_device("sensor-2", [creds["RSA_PEM"]])
    assert other.num_id != d.num_id
    assert [x.id for x in registry.list_devices()] == ["sensor-1", "sensor-2"]

    with pytest.raises(reg.DeviceExists):
        registry.create_device("sensor-1")

    registry.update_config("sensor-1", b'{"a":1}', min_interval_s=0)
    registry.delete_device("sensor-1")
    with pytest.raises(reg.DeviceNotFound):
        registry.get_device("sensor-1")
    with pytest.raises(reg.DeviceNotFound):
        registry.get_device_by_num_id(d.num_id)
    # Its config versions went with it: a device re-created under the id starts again from an empty version 1.
    again = registry.create_device("sensor-1")
    assert again.config_version == 1 and registry.get_config("sensor-1").data == b""
    assert [v.version for v in registry.list_config_versions("sensor-1")] == [1]
    with pytest.raises(reg.DeviceNotFound):
        registry.delete_device("never-was")


@pytest.mark.emulator
@pytest.mark.parametrize("bad", ["a/b-device", "dev+ice", "dev#ice", "dev ice", "dev\x00ice", "ab", "a" * 256])
def test_registry_refuses_bad_ids_and_stores_nothing(registry, bad):
    with pytest.raises(reg.InvalidDeviceId):
        registry.create_device(bad)
    with pytest.raises(reg.InvalidDeviceId):
        registry.get_device(bad)
    assert registry.list_devices() == []


@pytest.mark.emulator
def test_at_most_three_credentials(registry, creds):
    four = list(creds.values())
    with pytest.raises(reg.InvalidCredential, match="at most 3"):
        registry.create_device("dev-four", four)
    with pytest.raises(reg.DeviceNotFound):
        registry.get_device("dev-four")
    registry.create_device("dev-three", four[:3])
    with pytest.raises(reg.InvalidCredential, match="already has 3"):
        registry.add_credential("dev-three", four[3])
    assert len(registry.get_device("dev-three").credentials) == 3

    registry.create_device("dev-one", four[:1])
    assert registry.add_credential("dev-one", four[2]).credentials == (four[0], four[2])


@pytest.mark.emulator
def test_bad_metadata_is_refused(registry):
    with pytest.raises(reg.InvalidMetadata):
        registry.create_device("dev-meta", metadata={"bad key": "x"})
    with pytest.raises(reg.InvalidMetadata):
        registry.create_device("dev-meta", metadata={"k": "x" * (32 * 1024 + 1)})


@pytest.mark.emulator
def test_block_unblock(registry):
    registry.create_device("dev-b")
    assert registry.set_blocked("dev-b", True).blocked
    with pytest.raises(reg.DeviceBlocked):
        registry.update_config("dev-b", b"{}")
    assert not registry.set_blocked("dev-b", False).blocked
    assert registry.update_config("dev-b", b"{}").version == 2
    with pytest.raises(reg.DeviceNotFound):
        registry.set_blocked("nobody", True)


@pytest.mark.emulator
def test_config_versions_monotonic_keep_last_ten(registry):
    registry.create_device("dev-c")
    assert registry.get_config("dev-c").version == 1
    for i in range(2, 13):
        cfg = registry.update_config("dev-c", f'{{"i":{i}}}'.encode(), min_interval_s=0)
        assert cfg.version == i and cfg.data == f'{{"i":{i}}}'.encode() and cfg.device_ack_time is None
    versions = registry.list_config_versions("dev-c")
    assert [v.version for v in versions] == list(range(12, 2, -1))
    assert registry.get_config("dev-c").data == b'{"i":12}'
    assert registry.get_device("dev-c").config_version == 12
    times = [v.cloud_update_time for v in reversed(versions)]
    assert times == sorted(times)
    assert [v.version for v in registry.list_config_versions("dev-c", limit=3)] == [12, 11, 10]


@pytest.mark.emulator
def test_compare_and_set(registry):
    registry.create_device("dev-cas")
    with pytest.raises(reg.VersionConflict, match="stale"):
        registry.update_config("dev-cas", b"{}", version_to_update=2, min_interval_s=0)
    assert registry.update_config("dev-cas", b"2", version_to_update=0, min_interval_s=0).version == 2
    assert registry.update_config("dev-cas", b"3", version_to_update=2, min_interval_s=0).version == 3
    with pytest.raises(reg.VersionConflict):
        registry.update_config("dev-cas", b"4", version_to_update=2, min_interval_s=0)
    assert registry.get_config("dev-cas").data == b"3"


@pytest.mark.emulator
def test_size_limit(registry):
    registry.create_device("dev-size")
    assert registry.update_config("dev-size", b"x" * reg.MAX_CONFIG_BYTES).version == 2
    with pytest.raises(reg.ConfigTooLarge):
        registry.update_config("dev-size", b"x" * (reg.MAX_CONFIG_BYTES + 1), min_interval_s=0)
    assert registry.get_device("dev-size").config_version == 2


@pytest.mark.emulator
def test_rate_limit_one_update_per_second(registry):
    registry.create_device("dev-rate")
    registry.update_config("dev-rate", b"1")  # the empty first version does not count against the limit
    with pytest.raises(reg.RateLimited, match="at most one update per 1s"):
        registry.update_config("dev-rate", b"2")
    assert registry.get_device("dev-rate").config_version == 2
    # The window is measured from the last accepted update; it reopens once it has passed.
    last = registry.get_device("dev-rate").last_config_update_time
    assert last is not None
    reopens = last + timedelta(seconds=1.05)
    wait_for("the rate-limit window to pass (the time now)", lambda: datetime.now(UTC), lambda now: now >= reopens,
             timeout=5, interval=0.05)
    assert registry.update_config("dev-rate", b"2").version == 3


@pytest.mark.emulator
def test_request_id_is_idempotent(registry):
    registry.create_device("dev-idem")
    first = registry.update_config("dev-idem", b"A", request_id="1234567890")
    # Redelivered immediately: neither the rate limit nor a second version.
    again = registry.update_config("dev-idem", b"A", request_id="1234567890")
    assert again.version == first.version == 2 and again.data == b"A"
    assert registry.get_device("dev-idem").config_version == 2
    # Redelivered after other updates, with the version_to_update it was sent with: still its own version.
    registry.update_config("dev-idem", b"B", request_id="1234567891", min_interval_s=0)
    late = registry.update_config("dev-idem", b"A", version_to_update=0, request_id="1234567890")
    assert late.version == 2 and late.data == b"A"
    assert [v.version for v in registry.list_config_versions("dev-idem")] == [3, 2, 1]


def _twin(registry: Registry) -> Registry:
    """A second client on the same registry, as another process (bridge host, function instance) would be."""
    return Registry(registry.project, registry.registry_id, registry.region)


@pytest.mark.emulator
def test_concurrent_updates_stay_unique_and_monotonic(registry):
    registry.create_device("dev-race")
    writers = {"t1": registry, "t2": _twin(registry)}
    results: dict[str, list[int]] = {name: [] for name in writers}
    errors: list[BaseException] = []
    start = threading.Barrier(len(writers))
    per_writer = 3

    def writer(name: str) -> None:
        try:
            start.wait()
            for i in range(per_writer):
                cfg = writers[name].update_config("dev-race", f"{name}-{i}".encode(), request_id=f"{name}{i}",
                                                  min_interval_s=0)
                results[name].append(cfg.version)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in writers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    total = per_writer * len(writers)
    assert sorted(results["t1"] + results["t2"]) == list(range(2, total + 2)), results  # unique, no gaps
    assert all(vs == sorted(vs) for vs in results.values())
    stored = registry.list_config_versions("dev-race")[:-1]  # the empty first version last
    assert [v.version for v in stored] == list(range(total + 1, 1, -1))
    # Each stored version holds the data of the call that got that version number.
    by_version = {v: f"{n}-{i}".encode() for n, vs in results.items() for i, v in enumerate(vs)}
    assert all(v.data == by_version[v.version] for v in stored)
    # Redelivering every request afterwards creates nothing.
    for name, vs in results.items():
        for i, v in enumerate(vs):
            assert writers[name].update_config("dev-race", f"{name}-{i}".encode(), request_id=f"{name}{i}",
                                               min_interval_s=0).version == v
    assert registry.get_device("dev-race").config_version == total + 1


@pytest.mark.emulator
def test_concurrent_updates_respect_the_rate_limit(registry):
    registry.create_device("dev-flood")
    writers = [registry, _twin(registry), registry, _twin(registry)]
    outcomes: list[object] = []
    start = threading.Barrier(len(writers))

    def writer(i: int) -> None:
        start.wait()
        try:
            outcomes.append(writers[i].update_config("dev-flood", str(i).encode()).version)
        except reg.RateLimited as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(len(writers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(outcomes) == len(writers)
    accepted = sorted(o for o in outcomes if isinstance(o, int))
    assert accepted and accepted == list(range(2, len(accepted) + 2))
    # Whatever the interleaving (a retried transaction may run more than a second later), accepted versions
    # are at least a second apart.
    times = [v.cloud_update_time for v in reversed(registry.list_config_versions("dev-flood")) if v.version > 1]
    assert all((b - a).total_seconds() >= 1.0 for a, b in pairwise(times))


@pytest.mark.emulator
def test_ack_state_event_heartbeat(registry):
    registry.create_device("dev-ack")
    registry.update_config("dev-ack", b"1", min_interval_s=0)
    registry.update_config("dev-ack", b"2", min_interval_s=0)
    t = (datetime.now(UTC) - timedelta(minutes=5)).replace(microsecond=0)
    registry.ack_config("dev-ack", 3, when=t)
    assert registry.get_config("dev-ack").device_ack_time == t
    assert registry.list_config_versions("dev-ack")[1].device_ack_time is None
    assert registry.get_device("dev-ack").last_config_ack_time == t
    # An older, later-arriving ack does not move the device's ack time back.
    registry.ack_config("dev-ack", 2, when=t - timedelta(hours=1))
    assert registry.get_device("dev-ack").last_config_ack_time == t

    registry.record_state("dev-ack", b"\x00\x01state", when=t)
    registry.record_event("dev-ack", when=t + timedelta(seconds=1))
    registry.record_heartbeat("dev-ack", when=t + timedelta(seconds=2))
    d = registry.get_device("dev-ack")
    assert d.state == b"\x00\x01state" and d.last_state_time == t
    assert d.last_event_time == t + timedelta(seconds=1)
    assert d.last_heartbeat_time == t + timedelta(seconds=2)
    with pytest.raises(ValueError):
        registry.record_state("dev-ack", b"x" * (reg.MAX_STATE_BYTES + 1))
    with pytest.raises(reg.DeviceNotFound):
        registry.record_event("ghost-device")
    with pytest.raises(reg.DeviceNotFound):
        registry.ack_config("ghost-device", 1)


@pytest.mark.emulator
def test_a_device_without_an_index_entry_still_owns_its_id(registry):
    """A device of the deployment's own registry created before the device index existed (no entry) blocks its
    id in every other registry of the deployment; ensuring the own registry backfills the entry, idempotently."""
    registry.create_device("pump-1")
    registry.create_device("pump-2")
    index = registry.client.collection("registries").document(registry.registry_id).collection("device_index")
    index.document("pump-1").delete()  # as before the index existed
    index.document("pump-2").delete()
    lab = Registry(PROJECT, f"lab-{uuid.uuid4().hex[:12]}", "europe-west1", deployment=registry.registry_id)
    with pytest.raises(reg.DeviceExists, match=registry.registry_id):
        lab.create_device("pump-1")
    assert not lab._device_ref("pump-1").get().exists
    assert reg.registry_of(registry.client, registry.registry_id, "pump-1") is None

    registry.ensure_registry(reg.RegistrySettings())
    assert reg.registry_of(registry.client, registry.registry_id, "pump-1") == registry.registry_id
    assert reg.registry_of(registry.client, registry.registry_id, "pump-2") == registry.registry_id
    assert registry.backfill_index() == 0  # idempotent: nothing left to add
    index.document("pump-2").delete()
    registry.ensure_registry(reg.RegistrySettings())  # done once: a restart does not re-read every device
    assert reg.registry_of(registry.client, registry.registry_id, "pump-2") is None
    assert registry.backfill_index() == 1
    with pytest.raises(reg.DeviceExists, match=registry.registry_id):
        lab.create_device("pump-2")
    lab.create_device("pump-3")  # a free id is still accepted
    assert reg.registry_of(registry.client, registry.registry_id, "pump-3") == lab.registry_id
