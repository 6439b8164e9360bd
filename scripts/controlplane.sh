#!/usr/bin/env bash
# A real, local Kubernetes control plane (etcd + kube-apiserver) on loopback,
# for tests and the demo on machines without a container runtime.
#
#   scripts/controlplane.sh install        # apt packages + build kube-apiserver once (cached)
#   scripts/controlplane.sh start DIR      # start on free ports; writes DIR/kubeconfig, DIR/env
#   scripts/controlplane.sh stop DIR       # stop the processes started in DIR, by pid
#   scripts/controlplane.sh kill-apiserver DIR     # SIGKILL the kube-apiserver only (a crash); etcd runs on
#   scripts/controlplane.sh start-apiserver DIR    # start it again, same port and arguments; waits until ready
#   scripts/controlplane.sh restart-apiserver DIR  # both
#
# kube-apiserver is not packaged in Debian, so it is built from Debian's own
# `kubernetes` source package (1.20.2) with Debian's Go. The binary is cached in
# $HERALD_CACHE (default ~/.cache/herald) so it is built once per machine.
set -euo pipefail

CACHE="${HERALD_CACHE:-$HOME/.cache/herald}"
APISERVER="$CACHE/bin/kube-apiserver"

log() { echo "controlplane: $*" >&2; }
die() { echo "controlplane: error: $*" >&2; exit 1; }

need_root_or_sudo() {
  if [ "$(id -u)" -eq 0 ]; then echo ""; elif command -v sudo >/dev/null; then echo "sudo"; else die "need root (or sudo) to install packages"; fi
}

apt_install() {
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  local S; S=$(need_root_or_sudo)
  log "installing ${missing[*]}"
  $S apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $S apt-get install -y -qq "${missing[@]}" >/dev/null
}

build_apiserver() {
  if [ -x "$APISERVER" ] && "$APISERVER" --version >/dev/null 2>&1; then
    return 0
  fi
  apt_install golang-go rsync jq dpkg-dev golang-github-modern-go-reflect2-dev openssl etcd-server ca-certificates
  local S; S=$(need_root_or_sudo)
  # Debian's sources list may not have deb-src: add one for bookworm main.
  if ! grep -rqs '^Types:.*deb-src\|^deb-src' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    log "adding a deb-src line for bookworm main"
    local keyring=/usr/share/keyrings/debian-archive-keyring.gpg opt=""
    # On Ubuntu, Debian's archive key comes from the debian-archive-keyring package.
    [ -f "$keyring" ] || apt_install debian-archive-keyring
    [ -f "$keyring" ] && opt="[signed-by=$keyring] "
    echo "deb-src ${opt}http://deb.debian.org/debian bookworm main" | $S tee /etc/apt/sources.list.d/herald-deb-src.list >/dev/null
    $S apt-get update -qq
  fi
  local work="$CACHE/build"
  rm -rf "$work"; mkdir -p "$work"
  log "fetching the kubernetes source package (Debian)"
  (cd "$work" && apt-get source -qq --download-only kubernetes >/dev/null && dpkg-source -x --skip-patches kubernetes_*.dsc src >/dev/null)
  local tree="$work/src"
  [ -d "$tree/vendor" ] || die "kubernetes source has no vendor/ tree"
  # reflect2 v1.0.1 crashes kube-apiserver built with Go >= 1.18 when a CRD is created.
  rm -rf "$tree/vendor/github.com/modern-go/reflect2"
  cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$tree/vendor/github.com/modern-go/reflect2"
  mkdir -p "$work/gopath/src/k8s.io"
  ln -s "$tree" "$work/gopath/src/k8s.io/kubernetes"
  log "building kube-apiserver (about 6 minutes on 2 cores)"
  (cd "$work/gopath/src/k8s.io/kubernetes" && GOPATH="$work/gopath" GO111MODULE=off CGO_ENABLED=0 GOFLAGS=-mod=vendor \
     make WHAT=cmd/kube-apiserver >"$work/build.log" 2>&1) || { tail -40 "$work/build.log" >&2; die "kube-apiserver build failed (log: $work/build.log)"; }
  local out; out=$(find "$tree/_output" -type f -name kube-apiserver | head -1)
  [ -n "$out" ] || die "build produced no kube-apiserver binary"
  mkdir -p "$CACHE/bin"
  cp "$out" "$APISERVER.tmp" && mv "$APISERVER.tmp" "$APISERVER"
  rm -rf "$work"
  log "kube-apiserver cached at $APISERVER"
}

install() {
  apt_install etcd-server openssl ca-certificates curl
  build_apiserver
  command -v kubectl >/dev/null || log "note: kubectl is not installed; tests use the API directly, the demo needs kubectl"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

start() {
  local dir="${1:?usage: start DIR}"
  mkdir -p "$dir"; dir=$(cd "$dir" && pwd)
  [ -x "$APISERVER" ] || die "kube-apiserver not built; run: $0 install"
  command -v etcd >/dev/null || [ -x /usr/bin/etcd ] || die "etcd not installed; run: $0 install"
  local etcd_port peer_port api_port
  etcd_port=$(free_port); peer_port=$(free_port); api_port=$(free_port)
  mkdir -p "$dir/etcd" "$dir/certs"
  local token; token=$(python3 -c 'import secrets; print(secrets.token_hex(24))')
  echo "$token,admin,admin,system:masters" > "$dir/tokens.csv"
  [ -f "$dir/sa.key" ] || openssl genrsa -out "$dir/sa.key" 2048 2>/dev/null
  openssl rsa -in "$dir/sa.key" -pubout -out "$dir/sa.pub" 2>/dev/null

  ETCD_UNSUPPORTED_ARCH="" etcd --data-dir "$dir/etcd/data" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-cluster "default=http://127.0.0.1:$peer_port" --quota-backend-bytes 4294967296 \
    >"$dir/etcd.log" 2>&1 &
  echo $! > "$dir/etcd.pid"

  printf '%s %s\n' "$etcd_port" "$api_port" > "$dir/ports"
  launch_apiserver "$dir"

  cat > "$dir/kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: herald-local
  cluster: {server: "https://127.0.0.1:$api_port", certificate-authority: "$dir/certs/apiserver.crt"}
users:
- name: admin
  user: {token: "$token"}
contexts:
- name: herald-local
  context: {cluster: herald-local, user: admin, namespace: default}
current-context: herald-local
KC
  printf 'KUBECONFIG=%s\nHERALD_APISERVER=https://127.0.0.1:%s\n' "$dir/kubeconfig" "$api_port" > "$dir/env"

  wait_ready "$dir"
}

# Starts kube-apiserver in the background with the ports recorded in DIR/ports
# (the same arguments every time, so a restart serves the same port).
launch_apiserver() {
  local dir="$1" etcd_port api_port
  read -r etcd_port api_port < "$dir/ports"
  "$APISERVER" --etcd-servers "http://127.0.0.1:$etcd_port" --cert-dir "$dir/certs" \
    --secure-port "$api_port" --bind-address 127.0.0.1 --service-cluster-ip-range 10.0.0.0/24 \
    --authorization-mode RBAC --token-auth-file "$dir/tokens.csv" \
    --service-account-issuer https://kubernetes.default.svc --service-account-key-file "$dir/sa.pub" \
    --service-account-signing-key-file "$dir/sa.key" --disable-admission-plugins ServiceAccount \
    --max-requests-inflight 800 --max-mutating-requests-inflight 400 \
    >>"$dir/apiserver.log" 2>&1 &
  echo $! > "$dir/apiserver.pid"
}

# Waits until the apiserver of DIR answers /readyz (at most 60 s).
wait_ready() {
  local dir="$1" etcd_port api_port token i
  read -r etcd_port api_port < "$dir/ports"
  token=$(cut -d, -f1 "$dir/tokens.csv")
  for i in $(seq 1 120); do
    if curl -ksf -H "Authorization: Bearer $token" "https://127.0.0.1:$api_port/readyz" >/dev/null 2>&1; then
      # The apiserver's self-signed serving certificate (with its CA, for
      # 127.0.0.1) is what clients verify it with.
      [ -s "$dir/certs/apiserver.crt" ] || { sleep 0.5; continue; }
      log "ready at https://127.0.0.1:$api_port (kubeconfig: $dir/kubeconfig)"
      return 0
    fi
    kill -0 "$(cat "$dir/apiserver.pid")" 2>/dev/null || { tail -20 "$dir/apiserver.log" >&2; stop "$dir"; die "kube-apiserver exited"; }
    kill -0 "$(cat "$dir/etcd.pid")" 2>/dev/null || { tail -20 "$dir/etcd.log" >&2; stop "$dir"; die "etcd exited"; }
    sleep 0.5
  done
  tail -20 "$dir/apiserver.log" >&2; stop "$dir"; die "kube-apiserver did not become ready in 60s"
}

# Kills the apiserver of DIR with SIGKILL, as a crash would, and waits until it is gone.
kill_apiserver() {
  local dir="${1:?usage: kill-apiserver DIR}" pid
  [ -f "$dir/apiserver.pid" ] || die "no kube-apiserver started in $dir"
  pid=$(cat "$dir/apiserver.pid")
  kill -9 "$pid" 2>/dev/null || true
  for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  rm -f "$dir/apiserver.pid"
}

start_apiserver() {
  local dir="${1:?usage: start-apiserver DIR}"
  [ -f "$dir/ports" ] || die "no control plane started in $dir"
  [ -f "$dir/apiserver.pid" ] && kill -0 "$(cat "$dir/apiserver.pid")" 2>/dev/null && die "kube-apiserver is already running in $dir"
  launch_apiserver "$dir"
  wait_ready "$dir"
}

stop() {
  local dir="${1:?usage: stop DIR}" f pid
  for f in apiserver etcd; do
    [ -f "$dir/$f.pid" ] || continue
    pid=$(cat "$dir/$f.pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$dir/$f.pid"
  done
}

case "${1:-}" in
  install) install ;;
  start) start "${2:-}" ;;
  stop) stop "${2:-}" ;;
  kill-apiserver) kill_apiserver "${2:-}" ;;
  start-apiserver) start_apiserver "${2:-}" ;;
  restart-apiserver) kill_apiserver "${2:-}"; start_apiserver "${2:-}" ;;
  *) echo "usage: $0 install | start DIR | stop DIR | kill-apiserver DIR | start-apiserver DIR | restart-apiserver DIR" >&2; exit 2 ;;
esac
