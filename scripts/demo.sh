#!/usr/bin/env bash
# The main job on the embedded default: boots a real local control plane,
# installs the CRDs, starts herald, applies examples/ (a Workflow, Users,
# Objects with subscribers, a Channel) and creates a TriggerRun, then prints
# its status and every recipient's outcome.
#
#   scripts/demo.sh          # stops everything at the end
#   scripts/demo.sh --keep   # leaves the control plane and herald running
set -euo pipefail
cd "$(dirname "$0")/.."
keep=false; [ "${1:-}" = "--keep" ] && keep=true

command -v cargo >/dev/null || { echo "error: cargo not found; install Rust (https://rustup.rs)" >&2; exit 1; }
bash scripts/controlplane.sh install
if ! command -v kubectl >/dev/null; then
  echo "installing kubectl (Debian's kubernetes-client)" >&2
  S=""; [ "$(id -u)" -ne 0 ] && S=sudo
  $S apt-get install -y -qq kubernetes-client >/dev/null
fi

echo "==> building herald" >&2
cargo build --locked --quiet
herald=target/debug/herald

dir=.cache/demo
mkdir -p "$dir"
bash scripts/controlplane.sh stop "$dir" 2>/dev/null || true
rm -rf "$dir/etcd"
bash scripts/controlplane.sh start "$dir"
export KUBECONFIG="$PWD/$dir/kubeconfig"

cleanup() {
  if [ "$keep" = false ]; then
    [ -f "$dir/herald.pid" ] && kill "$(cat "$dir/herald.pid")" 2>/dev/null || true
    [ -f "$dir/receiver.pid" ] && kill "$(cat "$dir/receiver.pid")" 2>/dev/null || true
    bash scripts/controlplane.sh stop "$dir"
  fi
}
trap cleanup EXIT

echo "==> installing the CRDs" >&2
# --validate=false: older apiservers (like the local 1.20) do not know the
# x-kubernetes-validations field (CEL rules need Kubernetes 1.25+).
"$herald" crds | kubectl apply --validate=false -f - >/dev/null

echo "==> starting herald (log: $dir/herald.log)" >&2
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$herald" run --api-addr "127.0.0.1:$port" >"$dir/herald.log" 2>&1 &
echo $! > "$dir/herald.pid"
for _ in $(seq 1 60); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.5; done
curl -sf "http://127.0.0.1:$port/readyz" >/dev/null || { tail -20 "$dir/herald.log" >&2; echo "herald did not become ready" >&2; exit 1; }

echo "==> starting a webhook receiver (requests: $dir/received.jsonl)" >&2
rport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
rm -f "$dir/received.jsonl"; touch "$dir/received.jsonl"
python3 scripts/demo_receiver.py "$rport" "$dir/received.jsonl" &
echo $! > "$dir/receiver.pid"

echo "==> applying examples/" >&2
sed "s#http://127.0.0.1:8099#http://127.0.0.1:$rport#" examples/channel.yaml | kubectl apply -f -
kubectl apply -f examples/workflow.yaml -f examples/users.yaml -f examples/objects.yaml
run=$(kubectl create -f examples/trigger.yaml -o name)
echo "created $run" >&2

for _ in $(seq 1 60); do
  state=$(kubectl get "$run" -o jsonpath='{.status.state}')
  case "$state" in Completed|Failed|Cancelled) break ;; esac
  sleep 0.5
done

echo
kubectl get "$run"
echo
echo "Recipients (kubectl get recipientpages -l herald.dev/trigger-run=${run#*/}):"
kubectl get recipientpages -l "herald.dev/trigger-run=${run#*/}" \
  -o jsonpath='{range .items[*].status.recipients[*]}{.recipient}{"\t"}{.via}{"\t"}{.state}{"\t"}{.reason}{"\n"}{end}' | column -t -s $'\t'
echo
kubectl get "$run" -o jsonpath='{range .status.conditions[*]}{.type}={.status} ({.reason}): {.message}{"\n"}{end}'
echo
echo "The webhook receiver got:"
python3 -c 'import json,sys
for line in open(sys.argv[1]):
    r = json.loads(line); print("  " + r["body"] + "   (Idempotency-Key " + str(r["idempotency_key"]) + ")")' "$dir/received.jsonl"

if [ "$keep" = true ]; then
  echo
  echo "Still running. Use: export KUBECONFIG=$KUBECONFIG"
  echo "Stop with: kill \$(cat $dir/herald.pid) \$(cat $dir/receiver.pid); scripts/controlplane.sh stop $dir"
fi
