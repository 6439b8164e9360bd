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

if [ "${HERALD_TEST_USE_KUBECONFIG:-}" != "1" ]; then
  bash scripts/controlplane.sh install
  dir=$(mktemp -d /tmp/herald-test-cp.XXXXXX)
  trap 'bash scripts/controlplane.sh stop "$dir"; rm -rf "$dir"' EXIT
  bash scripts/controlplane.sh start "$dir"
  export HERALD_TEST_KUBECONFIG="$dir/kubeconfig"
fi

cargo test --locked "$@"
