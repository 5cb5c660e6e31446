#!/usr/bin/env bash
# Installs the system packages the tests and the local stack need, only when missing.
# The Google Cloud SDK emulators and Java 17 come with the machine image; we check them and say how to
# install them if they are absent, since they are not in Debian's archive.
set -euo pipefail
need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || need+=(mosquitto-clients)
# The stand-in TCP load balancer in front of several local broker hosts (tests/bridge/test_scale_out.py).
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
# The Mosquitto auth plugin prototype, compiled by its test (tests/test_mosquitto_auth_plugin.py) and the bench.
command -v gcc >/dev/null 2>&1 || need+=(gcc)
[ -f /usr/include/mosquitto_broker.h ] || need+=(mosquitto-dev)
[ -f /usr/include/mosquitto.h ] || need+=(libmosquitto-dev)
[ -f /usr/include/openssl/evp.h ] || need+=(libssl-dev)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# The broker is started by the tests themselves; the Debian service must not hold port 1883.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet mosquitto 2>/dev/null; then
  systemctl stop mosquitto || true
fi
command -v java >/dev/null 2>&1 || { echo "missing: java (Java 17+): apt-get install -y openjdk-17-jre-headless" >&2; exit 1; }

exec bash "$(dirname "$0")/check-emulators.sh"
