"""The closed loop of ``make demo``: simulated devices obey their config, and the demo counts a loop only when the
data shows it (hot before the rule's config, cooled below the limit after)."""

from __future__ import annotations

from datetime import timedelta
from itertools import pairwise
from types import SimpleNamespace

import pytest

from iotbridge.demo import RULE, closed_loops, rule_config_times
from iotbridge.simulate import Fleet

DURATION = 60.0


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Fleet:
    return Fleet(project="p", region="local", registry=SimpleNamespace(registry_id="reg"), host="127.0.0.1",
                 port=1, ca_certs=None, key_dir=tmp_path_factory.mktemp("keys"), devices=2, prefix="loop")


def temps(fleet: Fleet, m, start: float, stop: float, step: float = 0.5) -> list[float]:
    out, t = [], start
    while t < stop:
        out.append(fleet.reading(m, t, DURATION)["temperature"])
        t += step
    return out


def test_a_hot_device_cools_at_full_fan_and_only_then(fleet):
    hot, calm = fleet.members
    assert hot.drifting and not calm.drifting
    heating = temps(fleet, hot, 0, 40)
    assert heating[0] < 30 and heating[-1] > RULE["above"]
    # Without a config it stays hot to the end of the run.
    assert min(temps(fleet, hot, 40, DURATION)) > RULE["above"]
    hot.fan, hot.fan_since, hot.temp_at_fan = "auto", None, None
    temps(fleet, hot, 0, 40)
    fleet.apply_fan(hot, b'{"fan": "max"}', elapsed=40.0)
    assert (hot.fan, hot.fan_since) == ("max", 40.0) and hot.temp_at_fan > RULE["above"]
    cooling = temps(fleet, hot, 40, DURATION)
    assert cooling[0] > RULE["above"] and cooling[-1] < 30
    assert all(b < a + 1.5 for a, b in pairwise(cooling))  # falls, give or take the noise
    # A later config without a fan setting puts the fan back to auto: the drift takes over again.
    fleet.apply_fan(hot, b'{"sampling_interval_s": 5}', elapsed=DURATION)
    assert hot.fan == "auto" and fleet.reading(hot, DURATION, DURATION)["temperature"] > RULE["above"]
    fleet.apply_fan(calm, b"\x00not json", elapsed=1.0)
    assert calm.fan == "auto"


def test_closed_loops_are_counted_from_the_data(clock):
    t0 = clock.now()

    def series(values: list[float]) -> list:
        return [(t0 + timedelta(seconds=i), v) for i, v in enumerate(values)]

    pushed = {d: [t0 + timedelta(seconds=4.5)] for d in ("closed", "still-hot", "never-hot", "no-readings-after")}
    data = {
        "closed": series([70, 78, 83, 86, 88, 84, 75, 60, 45]),
        "still-hot": series([70, 78, 83, 86, 88, 90, 92, 94, 95]),  # ignored its config
        "never-hot": series([20, 21, 22, 21, 20, 21, 20, 21, 20]),  # the config was not the rule's doing
        "no-readings-after": series([70, 78, 83, 86, 88]),
        "no-config": series([70, 85, 90, 60, 40]),
    }
    loops = closed_loops(data, {**pushed, "no-config": []}, RULE["above"])
    assert list(loops) == ["closed"]
    assert loops["closed"]["hot_before"] == 88 and loops["closed"]["last"] == 45


def test_rule_configs_are_told_from_other_configs(clock):
    now = clock.now()
    versions = [SimpleNamespace(data=b'{"sampling_interval_s": 5}', cloud_update_time=now),
                SimpleNamespace(data=b'{"fan": "max"}', cloud_update_time=now + timedelta(seconds=3)),
                SimpleNamespace(data=b"\x00binary", cloud_update_time=now + timedelta(seconds=4))]
    assert rule_config_times(versions, RULE["config"]) == [now + timedelta(seconds=3)]
