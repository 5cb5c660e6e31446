#!/usr/bin/env bash
# Checks that the Google Cloud SDK's pubsub, firestore and bigtable emulators are installed, where
# iotbridge/local/services.py looks for them (platform/ of the SDK); prints one line naming what is missing and
# the command that installs it, and exits 1. `make test` runs it first, so a missing component stops the run in
# its first seconds instead of failing tests one by one.
set -euo pipefail
sdk=""
for c in "${CLOUDSDK_ROOT_DIR:-}" \
         "$(command -v gcloud >/dev/null 2>&1 && dirname "$(dirname "$(realpath "$(command -v gcloud)")")")" \
         /usr/lib/google-cloud-sdk /google-cloud-sdk "$HOME/google-cloud-sdk"; do
  if [ -n "$c" ] && [ -d "$c/platform" ]; then sdk="$c"; break; fi
done
if [ -z "$sdk" ]; then
  echo "missing: the Google Cloud SDK (gcloud) with its pubsub, firestore and bigtable emulators: install it" \
       "(https://cloud.google.com/sdk/docs/install), then run make test again" >&2
  exit 1
fi
missing=()
# launcher path under platform/ | gcloud component | Debian package (Google's apt repository)
for entry in "pubsub-emulator/bin/cloud-pubsub-emulator|pubsub-emulator|google-cloud-cli-pubsub-emulator" \
             "cloud-firestore-emulator/cloud_firestore_emulator|cloud-firestore-emulator|google-cloud-cli-firestore-emulator" \
             "bigtable-emulator/cbtemulator|bigtable|google-cloud-cli-bigtable-emulator"; do
  IFS='|' read -r launcher component package <<<"$entry"
  [ -x "$sdk/platform/$launcher" ] || missing+=("$component|$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  components=(); packages=()
  for m in "${missing[@]}"; do components+=("${m%%|*}"); packages+=("${m##*|}"); done
  if command -v dpkg >/dev/null 2>&1 && dpkg -S "$sdk/platform" >/dev/null 2>&1; then
    how="apt-get install -y ${packages[*]}"   # the SDK came from Google's apt repository
  else
    how="gcloud components install ${components[*]}"
  fi
  echo "missing: the Cloud SDK emulator component(s) ${components[*]} under $sdk/platform: run \`$how\`" >&2
  exit 1
fi
exit 0
