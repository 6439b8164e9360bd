#!/usr/bin/env bash
# Runs every test: unit tests, and integration tests against a real local
# control plane (etcd + kube-apiserver), which this script installs (once per
# machine, cached) and starts for the run.
#
#   scripts/test.sh [cargo test args...]
#
# Set HERALD_TEST_USE_KUBECONFIG=1 to run against the cluster KUBECONFIG points at instead.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo >/dev/null || { echo "error: cargo not found; install Rust (https://rustup.rs)" >&2; exit 1; }

# tests/deliveries.rs runs a real SMTP server: aiosmtpd, from PyPI. Debian's
# system Python refuses plain `pip install` (PEP 668), hence the fallback.
if ! python3 -c 'import aiosmtpd' 2>/dev/null; then
  command -v python3 >/dev/null || { echo "error: python3 not found; the delivery tests need it (apt-get install python3 python3-pip)" >&2; exit 1; }
  python3 -m pip install --quiet aiosmtpd 2>/dev/null || python3 -m pip install --quiet --break-system-packages aiosmtpd \
    || { echo "error: could not pip install aiosmtpd (needed by tests/deliveries.rs)" >&2; exit 1; }
fi

# tests/api_sdk.rs drives the API with Knock's official Node SDK, pinned by
# tests/sdk/package-lock.json: Node.js and npm from Debian, the SDK from npm.
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  S=""; [ "$(id -u)" -eq 0 ] || S="sudo"
  $S apt-get update -qq && DEBIAN_FRONTEND=noninteractive $S apt-get install -y -qq nodejs npm >/dev/null \
    || { echo "error: could not install nodejs and npm (needed by tests/api_sdk.rs)" >&2; exit 1; }
fi
(cd tests/sdk && npm ci --no-audit --no-fund --loglevel=error) || { echo "error: npm ci in tests/sdk failed" >&2; exit 1; }

# tests/client.rs makes RSA key pairs for user tokens with openssl, as the
# README tells customers to.
if ! command -v openssl >/dev/null; then
  S=""; [ "$(id -u)" -eq 0 ] || S="sudo"
  $S apt-get update -qq && DEBIAN_FRONTEND=noninteractive $S apt-get install -y -qq openssl >/dev/null \
    || { echo "error: could not install openssl (needed by tests/client.rs)" >&2; exit 1; }
fi

# tests/browser.rs drives Knock's React feed components (tests/browser, pinned
# by its package-lock.json, built with Vite) in headless Chromium: Debian's
# chromium package, driven by playwright-core (which downloads no browser).
if [ ! -x /usr/bin/chromium ]; then
  S=""; [ "$(id -u)" -eq 0 ] || S="sudo"
  $S apt-get update -qq && DEBIAN_FRONTEND=noninteractive $S apt-get install -y -qq chromium >/dev/null \
    || { echo "error: could not install chromium (needed by tests/browser.rs)" >&2; exit 1; }
fi
[ -x /usr/bin/chromium ] || { echo "error: /usr/bin/chromium is missing after apt-get install chromium (needed by tests/browser.rs)" >&2; exit 1; }
(cd tests/browser && npm ci --no-audit --no-fund --loglevel=error && npm run --silent build) \
  || { echo "error: npm ci or the Vite build in tests/browser failed (needed by tests/browser.rs)" >&2; exit 1; }

# tests/helm.rs drives the chart with real Helm: Helm v4's Go SDK, bundled by
# the PyPI package helm-python-sdk (no helm binary needed).
python3 -m pip install --quiet helm-python-sdk==0.2.2 2>/dev/null || python3 -m pip install --quiet --break-system-packages helm-python-sdk==0.2.2 \
  || { echo "error: could not pip install helm-python-sdk (needed by tests/helm.rs)" >&2; exit 1; }

if [ "${HERALD_TEST_USE_KUBECONFIG:-}" != "1" ]; then
  bash scripts/controlplane.sh install
  dir=$(mktemp -d /tmp/herald-test-cp.XXXXXX)
  trap 'bash scripts/controlplane.sh stop "$dir"; rm -rf "$dir"' EXIT
  bash scripts/controlplane.sh start "$dir"
  export HERALD_TEST_KUBECONFIG="$dir/kubeconfig"
fi

# tests/history.rs and the other history-store tests run against a real
# PostgreSQL (Debian's package), one throwaway server for the run; each test
# makes a database of its own on it.
if [ -z "${HERALD_TEST_DATABASE_URL:-}" ]; then
  bash scripts/postgres.sh install
  pgdir=$(mktemp -d /tmp/herald-test-pg.XXXXXX)
  trap 'bash scripts/postgres.sh stop "$pgdir"; rm -rf "$pgdir"; [ -n "${dir:-}" ] && { bash scripts/controlplane.sh stop "$dir"; rm -rf "$dir"; }' EXIT
  bash scripts/postgres.sh start "$pgdir"
  HERALD_TEST_DATABASE_URL=$(cat "$pgdir/url")
  export HERALD_TEST_DATABASE_URL
fi

cargo test --locked --no-fail-fast "$@"
