#!/usr/bin/env bash
# swarm-lab.sh — the project's 3-node Docker Swarm lab on ONE machine, with two sandboxd edges.
#
#   scripts/swarm-lab.sh up       build the lab, print EDGE_1=… EDGE_2=… NODE_1..3=… NODE_TLS_1..3=…
#                                 AUTH_SECRET=… PREVIEW_DOMAIN=… (also written to /run/sbxlab/env)
#   scripts/swarm-lab.sh down     remove everything `up` made (by pid and exact name; idempotent,
#                                 also after a half-failed `up`)
#   scripts/swarm-lab.sh edges [N] (re)start the two edges (or edge N) on a lab that is up
#   scripts/swarm-lab.sh status   what is up
#   scripts/swarm-lab.sh dk N …   the docker CLI against node nN (docker -H unix:///run/sbxlab/nN.sock …)
#
# What `up` makes (names are the contract of docs/briefs; none of them touches the host engine,
# which is only read from by one `docker save` of the sandbox image):
#   - netns sbxlab-hub holding the bridge sbxbr0; host 10.97.0.1 on the veth sbxhost;
#     netns sbxlab-n1..3 with eth0 = 10.97.0.11..13 and NO default route.
#   - the host route `blackhole 10.241.0.0/16` (the swarm's address pool), installed and checked
#     before any engine starts: overlay addresses are never routed off the machine.
#   - per node: containerd + dockerd (niced, own data/exec roots under /var/lib/sbxlab/nN and
#     /run/sbxlab/nN, own UTS hostname nN, socket /run/sbxlab/nN.sock, cgroup parent /sbxlab-nN,
#     --no-new-privileges engine-wide), and the same engine on tcp://10.97.0.1N:2376 with
#     --tlsverify (Docker's TLS port; a real deployment's engine endpoint).
#   - engine TLS under /var/lib/sbxlab/tls (openssl, EC P-256, valid 2 days): a lab CA (its key
#     stays in tls/ca), per node nN/{ca,cert,key}.pem (server certificate, SAN IP 10.97.0.1N),
#     and client/{ca,cert,key}.pem (sandboxd's client certificate; Docker's --tlsverify layout,
#     what swarm_tls_dir points at).
#   - swarm: n1 manager, n2 n3 workers, --default-addr-pool 10.241.0.0/16; node labels
#     sbxlab.node=nN and sandboxd=true.
#   - the attachable overlay sandboxd-overlay: subnet 10.241.8.0/22, sandboxes get addresses from
#     --ip-range 10.241.10.0/23, edges have static addresses in 10.241.8.0/28 (10.241.8.2, .3).
#   - the image sandboxd-sandbox:latest from the host engine: one `docker save` streamed into
#     the three node engines' `docker load` at once (no tar file on disk).
#   - PostgreSQL: a role and database sbxlab on the host's cluster, reached over the unix socket
#     /var/run/postgresql with a password (one pg_hba line `local sbxlab sbxlab scram-sha-256`,
#     tagged "# sbxlab", prepended and removed again by `down`).
#   - edges: an "edge anchor" container sbxlab-edge-N on node nN (N = 1, 2: the sandbox image
#     running `sleep infinity` as nobody, no capabilities, read-only, on the overlay at its static
#     address, its port 8080 published on the node address 10.97.0.1N by the node engine), and
#     the host's sandboxd binary run by `nsenter --net=/proc/<anchor pid>/ns/net`: it reaches
#     sandboxes by overlay address and PostgreSQL by unix socket; edge 1 reaches the node
#     engines by their unix sockets, edge 2 over TLS (swarm_managers https://10.97.0.11:2376,
#     swarm_node_engine https://{addr}:2376, swarm_tls_dir /var/lib/sbxlab/tls/client), from the
#     anchor's namespace through its docker_gwbridge to its node, which forwards (masqueraded)
#     to the node addresses; so the suite runs through both transports. The host reaches an
#     edge at http://10.97.0.1N:8080 (the node's published port). The edges start when the
#     binary knows `engine = "swarm"` (checked with `sandboxd token`), or when SBXLAB_EDGES=1.
#
# Env: SANDBOXD_BIN (default: the newer of ${CARGO_TARGET_DIR:-target}/{release,debug}/sandboxd),
#      SBXLAB_EDGES (1: start edges, 0: do not; default: when the binary supports swarm mode),
#      SBXLAB_IMAGE (sandboxd-sandbox:latest), SBXLAB_EDGE_ENV (extra KEY=VALUE words for both
#      edges, e.g. "SANDBOXD_IDLE_PAUSE_AFTER=20s"), SBXLAB_LOG (edge log filter, default info).
# Needs: root, docker.io (dockerd, containerd, docker), iproute2, util-linux, psql + a local
# PostgreSQL cluster (scripts/ensure-postgres.sh), curl.
set -euo pipefail
SANDBOXD_LOG_TAG=swarm-lab
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# lib.sh's log, with the seconds since the script started (the figures `up`/`down` are timed by).
log() { printf '[swarm-lab +%ss] %s\n' "$SECONDS" "$*" >&2; }

N=3
EDGES=2
HUB=sbxlab-hub
BR=sbxbr0
HOSTIF=sbxhost
NET=10.97.0
POOL=10.241.0.0/16
OVERLAY=sandboxd-overlay
OVERLAY_SUBNET=10.241.8.0/22
OVERLAY_RANGE=10.241.10.0/23
OVERLAY_GW=10.241.8.1
EDGE_CIDR=10.241.8.0/28
EDGE_PORT=8080
TLS_PORT=2376
DOMAIN=sbxlab.test
PREVIEW_DOMAIN=preview.sbxlab.test
INSTANCE=sbxlab
IMAGE=${SBXLAB_IMAGE:-sandboxd-sandbox:latest}
LIB=/var/lib/sbxlab
RUN=/run/sbxlab
ENV_FILE=$RUN/env
TLS=$LIB/tls
PG_DB=sbxlab
PG_ROLE=sbxlab
PG_SOCKET_DIR=/var/run/postgresql
HBA_TAG="# sbxlab"
# shellcheck disable=SC2016 # expanded by the inner sh: hostname $0, then exec the rest
SET_HOSTNAME_AND_EXEC='hostname "$0"; exec "$@"'

node_ip()   { echo "$NET.$((10 + $1))"; }
edge_ip()   { echo "10.241.8.$((1 + $1))"; }
sock()      { echo "$RUN/n$1.sock"; }
tls_url()   { echo "https://$(node_ip "$1"):$TLS_PORT"; }
dk()        { local i=$1; shift; docker -H "unix://$(sock "$i")" "$@"; }
pidfile_kill() {  # pidfile_kill FILE WORD: TERM the pid in FILE, wait up to 15 s, then KILL
  # Only when that process's command line still holds WORD (a pid reused since is left alone).
  local f=$1 word=$2 p
  [[ -f "$f" ]] || return 0
  p=$(cat "$f" 2>/dev/null || true)
  if [[ "$p" =~ ^[0-9]+$ ]] && tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -qF -- "$word"; then
    kill -TERM "$p" 2>/dev/null || true
    for _ in $(seq 1 150); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
  fi
  rm -f "$f"
}
need() { command -v "$1" >/dev/null || die "missing command: $1"; }
# spawn PIDFILE CMD…: runs CMD detached (own session); sh writes its own pid to PIDFILE and execs
# CMD, and every wrapper in CMD (env, nsenter, unshare, nice) execs too: one pid throughout.
spawn() {
  # shellcheck disable=SC2016 # $$ and $@ belong to the inner sh
  setsid sh -c 'echo $$ >"$0"; exec "$@"' "$@" </dev/null &
}

sandboxd_bin() {
  # Absolute: the edges start from their own folders.
  if [[ -n "${SANDBOXD_BIN:-}" ]]; then realpath -m -- "$SANDBOXD_BIN"; return; fi
  local t=${CARGO_TARGET_DIR:-$REPO/target} r d
  r=$t/release/sandboxd; d=$t/debug/sandboxd
  if [[ -x "$r" && ( ! -x "$d" || "$r" -nt "$d" ) ]]; then echo "$r"; else echo "$d"; fi
}

# The binary understands engine = "swarm" when a config with it loads (`token` loads the config).
bin_supports_swarm() {
  local bin=$1
  (cd / && env -i SANDBOXD_AUTH_SECRET=probe-secret-0123456789 SANDBOXD_ENGINE=swarm \
    SANDBOXD_SWARM_MANAGERS="unix://$(sock 1)" SANDBOXD_SWARM_NODE_ENGINE="unix://$RUN/{hostname}.sock" \
    SANDBOXD_SWARM_NETWORK="$OVERLAY" SANDBOXD_SWARM_EDGE_CIDR="$EDGE_CIDR" \
    "$bin" token probe --ttl 1m) >/dev/null 2>&1
}

# ---------------------------------------------------------------------------------------------
# up

setup_net() {
  ip netns add "$HUB"
  ip -n "$HUB" link set lo up
  ip -n "$HUB" link add "$BR" type bridge
  ip -n "$HUB" link set "$BR" up
  ip link add "$HOSTIF" type veth peer name sbxhostp
  ip link set sbxhostp netns "$HUB"
  ip -n "$HUB" link set sbxhostp master "$BR" up
  ip addr add "$NET.1/24" dev "$HOSTIF"
  ip link set "$HOSTIF" up
  local i
  for i in $(seq 1 "$N"); do
    ip netns add "sbxlab-n$i"
    ip link add "sbxv$i" type veth peer name "sbxn${i}eth"
    ip link set "sbxv$i" netns "$HUB"
    ip -n "$HUB" link set "sbxv$i" master "$BR" up
    ip link set "sbxn${i}eth" netns "sbxlab-n$i"
    ip -n "sbxlab-n$i" link set "sbxn${i}eth" name eth0
    ip -n "sbxlab-n$i" addr add "$(node_ip "$i")/24" dev eth0
    ip -n "sbxlab-n$i" link set eth0 up
    ip -n "sbxlab-n$i" link set lo up
    # No default route on purpose: a node reaches 10.97.0.0/24 only.
  done
}

# The engines' TLS material: a lab CA, a server certificate per node (SAN = its address) and
# sandboxd's client certificate, each in Docker's --tlsverify layout (ca.pem, cert.pem, key.pem).
make_tls() {
  local i d
  mkdir -p "$TLS/ca" "$TLS/client"
  chmod 0700 "$TLS" "$TLS/ca"
  ( umask 077
    openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
      -subj "/CN=sbxlab engine CA" -addext "basicConstraints=critical,CA:TRUE" \
      -addext "keyUsage=critical,keyCertSign,cRLSign" \
      -keyout "$TLS/ca/key.pem" -out "$TLS/ca/ca.pem" 2>/dev/null )
  issue() {  # issue DIR CN EXTENSIONS: key + certificate signed by the lab CA in DIR
    ( umask 077
      openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$2" \
        -keyout "$1/key.pem" -out "$1/req.pem" 2>/dev/null )
    printf '%s\n' "$3" >"$1/ext.cnf"
    openssl x509 -req -in "$1/req.pem" -CA "$TLS/ca/ca.pem" -CAkey "$TLS/ca/key.pem" \
      -CAcreateserial -days 2 -extfile "$1/ext.cnf" -out "$1/cert.pem" 2>/dev/null
    rm -f "$1/req.pem" "$1/ext.cnf"
    cp "$TLS/ca/ca.pem" "$1/ca.pem"
  }
  for i in $(seq 1 "$N"); do
    d=$TLS/n$i
    mkdir -p "$d"
    issue "$d" "n$i" "subjectAltName=IP:$(node_ip "$i")
extendedKeyUsage=serverAuth
keyUsage=critical,digitalSignature"
  done
  issue "$TLS/client" sandboxd "extendedKeyUsage=clientAuth
keyUsage=critical,digitalSignature"
}

# The node's TLS endpoint answers a client with the lab's client certificate (from the host).
wait_tls() {
  local i=$1 _
  for _ in $(seq 1 100); do
    curl -fsS --max-time 2 -o /dev/null --cacert "$TLS/client/ca.pem" --cert "$TLS/client/cert.pem" \
      --key "$TLS/client/key.pem" "$(tls_url "$i")/_ping" 2>/dev/null && return 0
    sleep 0.1
  done
  die "engine n$i does not answer TLS at $(tls_url "$i") (log: $LIB/n$i/dockerd.log)"
}

guard_route() {
  ip route replace blackhole "$POOL"
  ip route show exact "$POOL" | grep -q '^blackhole' \
    || die "the route 'blackhole $POOL' is not in place; refusing to start engines"
}

start_engine() {
  local i=$1 L=$LIB/n$1 R=$RUN/n$1
  mkdir -p "$L/data" "$L/containerd" "$R/docker" "$R/containerd"
  cat >"$L/containerd.toml" <<EOF
version = 2
root = "$L/containerd"
state = "$R/containerd"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$R/containerd/containerd.sock"
[ttrpc]
  address = ""
[debug]
  address = ""
[metrics]
  address = ""
EOF
  # sh writes its own pid, then execs nsenter -> nice -> containerd: one pid throughout.
  spawn "$R/containerd.pid" \
    nsenter --net="/run/netns/sbxlab-n$i" nice -n 19 containerd --config "$L/containerd.toml" \
    >>"$L/containerd.log" 2>&1
  local _
  for _ in $(seq 1 100); do [[ -S "$R/containerd/containerd.sock" ]] && break; sleep 0.05; done
  [[ -S "$R/containerd/containerd.sock" ]] || { tail -20 "$L/containerd.log" >&2; die "containerd n$i did not start"; }
  # Own UTS namespace: the node's hostname is nN (node ls, {hostname} in swarm_node_engine).
  spawn "$R/dockerd.pid" \
    env DOCKER_SERVICE_PREFER_OFFLINE_IMAGE=1 \
    nsenter --net="/run/netns/sbxlab-n$i" unshare --uts \
    sh -c "$SET_HOSTNAME_AND_EXEC" "n$i" nice -n 19 dockerd \
    --containerd "$R/containerd/containerd.sock" \
    --data-root "$L/data" --exec-root "$R/docker" \
    -H "unix://$(sock "$i")" --pidfile "$R/docker.pid" \
    -H "tcp://$(node_ip "$i"):$TLS_PORT" --tlsverify --tlscacert "$TLS/n$i/ca.pem" \
    --tlscert "$TLS/n$i/cert.pem" --tlskey "$TLS/n$i/key.pem" \
    --bip "10.96.$i.1/24" --cgroup-parent "/sbxlab-n$i" \
    --no-new-privileges --log-level warn \
    >>"$L/dockerd.log" 2>&1
}

wait_engine() {
  local i=$1 _
  for _ in $(seq 1 600); do dk "$i" version >/dev/null 2>&1 && return 0; sleep 0.1; done
  tail -20 "$LIB/n$i/dockerd.log" >&2
  die "engine n$i did not answer within 60 s (log: $LIB/n$i/dockerd.log)"
}

# The image goes into n1 by one `docker save | docker load`; n2 and n3 get n1's image store
# before their engines start: the metadata copied, the layer files hard-linked (`cp -al`), which
# takes a second where two more loads took a minute. Image layers are never written in place
# (overlayfs copies a file up into the container's own layer before changing it), so sharing
# their inodes between the node engines is safe; `docker rmi` on one node unlinks its own names.
load_image_n1() {
  docker image inspect "$IMAGE" >/dev/null 2>&1 \
    || die "image $IMAGE is not in the host engine (run scripts/ensure-image.sh)"
  nice -n 10 docker save "$IMAGE" | nice -n 10 docker -H "unix://$(sock 1)" load -q
}

seed_image_store() {  # seed_image_store I…: n1's image store into node I's (engine not started)
  # n1's engine bind-mounts its overlay2 folder onto itself (private propagation), and a hard
  # link may not cross a mount point: link inside a plain (non-recursive) bind of $LIB instead,
  # where that folder is just a folder.
  local i view=$RUN/libview
  mkdir -p "$view"
  mount --bind "$LIB" "$view"
  for i in "$@"; do
    mkdir -p "$view/n$i/data/image"
    if ! cp -a "$view/n1/data/image/overlay2" "$view/n$i/data/image/overlay2" ||
      ! cp -al "$view/n1/data/overlay2" "$view/n$i/data/overlay2"; then
      umount "$view"
      return 1
    fi
  done
  umount "$view"
  rmdir "$view"
}

init_swarm() {
  dk 1 swarm init --advertise-addr "$(node_ip 1)" --listen-addr "$(node_ip 1):2377" \
    --default-addr-pool "$POOL" --default-addr-pool-mask-length 24 >/dev/null
  dk 1 network create --driver overlay --attachable --subnet "$OVERLAY_SUBNET" \
    --ip-range "$OVERLAY_RANGE" --gateway "$OVERLAY_GW" "$OVERLAY" >/dev/null
}

join_swarm() {
  local wt i pids=()
  wt=$(dk 1 swarm join-token -q worker)
  for i in $(seq 2 "$N"); do
    dk "$i" swarm join --token "$wt" --advertise-addr "$(node_ip "$i")" \
      --listen-addr "$(node_ip "$i"):2377" "$(node_ip 1):2377" >/dev/null &
    pids+=("$!")
  done
  for i in "${pids[@]}"; do wait "$i"; done
  for i in $(seq 1 "$N"); do
    dk 1 node update --label-add "sbxlab.node=n$i" --label-add sandboxd=true \
      "$(dk "$i" info -f '{{.Swarm.NodeID}}')" >/dev/null
  done
}

wait_nodes_ready() {
  local _ ready
  for _ in $(seq 1 300); do
    ready=$(dk 1 node ls --format '{{.Status}}' 2>/dev/null | grep -c '^Ready$' || true)
    [[ "$ready" -eq "$N" ]] && return 0
    sleep 0.1
  done
  dk 1 node ls >&2 || true
  die "not all $N nodes are Ready after 30 s"
}

setup_db() {
  local pw=$1 port
  port=$(pg_lsclusters --no-header 2>/dev/null | awk '$4 ~ /^online/ {print $3; exit}')
  [[ -n "$port" ]] || die "no online PostgreSQL cluster (run scripts/ensure-postgres.sh)"
  echo "$port" >"$RUN/pg-port"
  psql_admin "$port" -v role="$PG_ROLE" -v password="$pw" -v db="$PG_DB" <<'SQL'
SELECT format('DROP DATABASE IF EXISTS %I WITH (FORCE)', :'db') \gexec
SELECT format('CREATE ROLE %I LOGIN', :'role')
  WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'role') \gexec
SELECT format('ALTER ROLE %I WITH LOGIN PASSWORD %L', :'role', :'password') \gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'role') \gexec
SQL
  local hba tmp
  hba=$(psql_admin "$port" -tAc 'SHOW hba_file')
  if ! grep -qF "$HBA_TAG" "$hba"; then
    tmp=$(mktemp)
    { printf 'local   %s   %s   scram-sha-256  %s\n' "$PG_DB" "$PG_ROLE" "$HBA_TAG"; cat "$hba"; } >"$tmp"
    cat "$tmp" >"$hba"
    rm -f "$tmp"
    psql_admin "$port" -tAc 'SELECT pg_reload_conf()' >/dev/null
  fi
  local _
  for _ in $(seq 1 50); do
    PGPASSWORD=$pw psql -X -q -h "$PG_SOCKET_DIR" -p "$port" -U "$PG_ROLE" -d "$PG_DB" -tAc 'SELECT 1' 2>/dev/null | grep -qx 1 && return 0
    sleep 0.1
  done
  die "cannot log in as $PG_ROLE over $PG_SOCKET_DIR (check $hba)"
}

psql_admin() {
  local port=$1; shift
  (cd / && runuser -u postgres -- psql -X -q -p "$port" -d postgres -v ON_ERROR_STOP=1 "$@")
}

start_anchor() {
  local i=$1
  dk "$i" run -d --name "sbxlab-edge-$i" --hostname "sbxlab-edge-$i" \
    --label sbxlab.role=edge-anchor --network "$OVERLAY" --ip "$(edge_ip "$i")" \
    -p "$(node_ip "$i"):$EDGE_PORT:$EDGE_PORT" \
    --user 65534:65534 --cap-drop ALL --security-opt no-new-privileges --read-only \
    --pids-limit 8 --memory 32m --entrypoint sleep "$IMAGE" infinity >/dev/null
}

start_edge() {
  local i=$1 bin=$2 secret=$3 dburl=$4 pid E=$LIB/edge$1
  pid=$(dk "$i" inspect -f '{{.State.Pid}}' "sbxlab-edge-$i")
  [[ "$pid" =~ ^[1-9][0-9]*$ ]] || die "anchor sbxlab-edge-$i has no pid"
  mkdir -p "$E/workspaces" "$E/certs"
  # env -i: nothing of the caller's SANDBOXD_* leaks in; cwd $E: no config file is read.
  local extra=()
  # shellcheck disable=SC2206 # SBXLAB_EDGE_ENV is a list of KEY=VALUE words on purpose
  [[ -n "${SBXLAB_EDGE_ENV:-}" ]] && extra=(${SBXLAB_EDGE_ENV})
  # What `edges` reuses when it restarts an edge without being told a binary.
  printf '%s\n' "$bin" >"$RUN/edge-bin"
  printf '%s\n' "${SBXLAB_EDGE_ENV:-}" >"$RUN/edge-env"
  # Edge 1 reaches the engines by their unix sockets, edge 2 over TLS with a client certificate.
  local engines=(SANDBOXD_SWARM_MANAGERS="unix://$(sock 1)"
    SANDBOXD_SWARM_NODE_ENGINE="unix://$RUN/{hostname}.sock" SANDBOXD_SWARM_TLS_DIR=)
  if [[ "$i" = 2 ]]; then
    engines=(SANDBOXD_SWARM_MANAGERS="$(tls_url 1)"
      SANDBOXD_SWARM_NODE_ENGINE="https://{addr}:$TLS_PORT" SANDBOXD_SWARM_TLS_DIR="$TLS/client")
  fi
  (cd "$E" && spawn "$RUN/edge$i.pid" \
    env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    SANDBOXD_LOG="${SBXLAB_LOG:-info}" \
    SANDBOXD_ENGINE=swarm \
    "${engines[@]}" \
    SANDBOXD_SWARM_NETWORK="$OVERLAY" \
    SANDBOXD_SWARM_EDGE_CIDR="$EDGE_CIDR" \
    SANDBOXD_HTTP_ADDR="0.0.0.0:$EDGE_PORT" \
    SANDBOXD_HTTPS_ADDR= \
    SANDBOXD_METRICS_ADDR= \
    SANDBOXD_DOMAIN="$DOMAIN" \
    SANDBOXD_PREVIEW_DOMAIN="$PREVIEW_DOMAIN" \
    SANDBOXD_DATABASE_URL="$dburl" \
    SANDBOXD_AUTH_SECRET="$secret" \
    SANDBOXD_INSTANCE="$INSTANCE" \
    SANDBOXD_IMAGE="$IMAGE" \
    SANDBOXD_WORKSPACES_DIR="$E/workspaces" \
    SANDBOXD_CERTS_DIR="$E/certs" \
    SANDBOXD_AUTH_SECRET_FILE="$E/auth-secret" \
    SANDBOXD_CONSOLE_DIR="$REPO/console/dist" \
    "${extra[@]}" \
    nsenter --net="/proc/$pid/ns/net" "$bin" serve \
    >>"$E/sandboxd.log" 2>&1)
}

wait_edge() {
  local i=$1 url _
  url="http://$(node_ip "$i"):$EDGE_PORT/healthz"
  for _ in $(seq 1 300); do
    curl -fsS --max-time 2 -o /dev/null -H "Host: $DOMAIN" "$url" 2>/dev/null && return 0
    if [[ -f "$RUN/edge$i.pid" ]] && ! kill -0 "$(cat "$RUN/edge$i.pid")" 2>/dev/null; then break; fi
    sleep 0.1
  done
  log "edge $i did not answer $url; the end of $LIB/edge$i/sandboxd.log:"
  tail -30 "$LIB/edge$i/sandboxd.log" >&2 || true
  die "edge $i failed"
}

cmd_up() {
  require_root
  local t0=$SECONDS c
  for c in docker dockerd containerd nsenter unshare ip psql pg_lsclusters runuser curl setsid openssl; do need "$c"; done
  if ip netns list | grep -qw "$HUB" || [[ -e "$RUN" ]]; then
    die "the lab (or a part of it) is already there: run '$0 down' first"
  fi
  local bin edges=${SBXLAB_EDGES:-}
  bin=$(sandboxd_bin)
  if [[ -z "$edges" ]]; then
    if [[ -x "$bin" ]] && bin_supports_swarm "$bin"; then edges=1; else edges=0; fi
    [[ "$edges" = 1 ]] || log "edges: $bin does not support engine = \"swarm\" (or is missing); building the lab without edges (SBXLAB_EDGES=1 forces them)"
  fi
  [[ "$edges" = 0 ]] || [[ -x "$bin" ]] || die "SANDBOXD_BIN $bin is not an executable"
  docker image inspect "$IMAGE" >/dev/null 2>&1 \
    || die "image $IMAGE is not in the host engine (run scripts/ensure-image.sh)"
  mkdir -p "$LIB" "$RUN"
  chmod 0700 "$RUN"
  # shellcheck disable=SC2064 # $0 now
  trap "[[ -f '$ENV_FILE' ]] || log 'up did not finish: $0 down removes what it made'" EXIT

  log "route blackhole $POOL, netns $HUB + sbxlab-n1..$N (host $NET.1, nodes $(node_ip 1)..$(node_ip "$N"))"
  guard_route
  setup_net
  log "engine TLS: lab CA, server certificates for $(node_ip 1)..$(node_ip "$N"), client certificate ($TLS)"
  make_tls

  local secret pgpw dbpid
  secret=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
  pgpw=$(head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n')
  log "PostgreSQL: fresh database $PG_DB (background)"
  setup_db "$pgpw" >"$LIB/db.log" 2>&1 &
  dbpid=$!

  local i loadpid
  mkdir -p "$LIB/n1"
  log "engine n1; $IMAGE into n1 (background); swarm init, overlay $OVERLAY"
  start_engine 1
  wait_engine 1
  wait_tls 1
  load_image_n1 >"$LIB/image.log" 2>&1 &
  loadpid=$!
  init_swarm
  wait "$loadpid" || { cat "$LIB/image.log" >&2; die "loading $IMAGE into n1 failed"; }
  log "image in n1; n2..n$N: image store from n1 (hard links), engines, join"
  seed_image_store $(seq 2 "$N") || die "copying n1's image store failed"
  for i in $(seq 2 "$N"); do start_engine "$i"; done
  for i in $(seq 2 "$N"); do
    wait_engine "$i"
    wait_tls "$i"
    dk "$i" image inspect "$IMAGE" >/dev/null 2>&1 || die "n$i does not see $IMAGE after the copy"
  done
  join_swarm
  wait_nodes_ready
  wait "$dbpid" || { cat "$LIB/db.log" >&2; die "setting up the database failed"; }

  log "edge anchors on n1..n$EDGES"
  for i in $(seq 1 "$EDGES"); do start_anchor "$i"; done

  local port dburl
  port=$(cat "$RUN/pg-port")
  dburl="postgres://$PG_ROLE:$pgpw@localhost:$port/$PG_DB?host=$PG_SOCKET_DIR"
  if [[ "$edges" = 1 ]]; then
    log "edges: $bin in the anchors' network namespaces"
    for i in $(seq 1 "$EDGES"); do start_edge "$i" "$bin" "$secret" "$dburl"; done
    for i in $(seq 1 "$EDGES"); do wait_edge "$i"; done
  fi

  write_env "$secret" "$dburl" "$edges"
  log "lab up in $((SECONDS - t0)) s"
  cat "$ENV_FILE"
}

write_env() {  # write_env SECRET DATABASE_URL EDGES_RUNNING
  local i
  {
    for i in $(seq 1 "$EDGES"); do echo "EDGE_$i=http://$(node_ip "$i"):$EDGE_PORT"; done
    for i in $(seq 1 "$N"); do echo "NODE_$i=unix://$(sock "$i")"; done
    for i in $(seq 1 "$N"); do echo "NODE_TLS_$i=$(tls_url "$i")"; done
    echo "TLS_DIR=$TLS"
    echo "AUTH_SECRET=$1"
    echo "PREVIEW_DOMAIN=$PREVIEW_DOMAIN"
    echo "DOMAIN=$DOMAIN"
    echo "INSTANCE=$INSTANCE"
    echo "IMAGE=$IMAGE"
    echo "OVERLAY=$OVERLAY"
    echo "EDGE_CIDR=$EDGE_CIDR"
    echo "EDGES_RUNNING=$3"
    echo "DATABASE_URL=$2"
  } >"$ENV_FILE.tmp"
  chmod 0600 "$ENV_FILE.tmp"
  mv "$ENV_FILE.tmp" "$ENV_FILE"
}

env_value() { sed -n "s/^$1=//p" "$ENV_FILE"; }

stop_edges() {  # stop_edges [N]: edge N, or both
  local i
  for i in $(seq "${1:-1}" "${1:-$EDGES}"); do
    [[ -f "$RUN/edge$i.pid" ]] && log "stop edge $i (pid $(cat "$RUN/edge$i.pid"))"
    pidfile_kill "$RUN/edge$i.pid" " serve"
  done
}

# (Re)starts the edges (or edge N) on a lab that is up, e.g. with a freshly built SANDBOXD_BIN,
# or after a test killed one. Without SANDBOXD_BIN / SBXLAB_EDGE_ENV, the binary and extra
# environment of the last start are used again. The database and the anchors are kept.
cmd_edges() {
  require_root
  [[ -f "$ENV_FILE" ]] || die "the lab is not up (no $ENV_FILE): run '$0 up'"
  local which=${1:-} bin secret dburl i
  [[ -z "$which" || "$which" =~ ^[1-9]$ && "$which" -le "$EDGES" ]] || die "no edge '$which' (1..$EDGES)"
  if [[ -z "${SANDBOXD_BIN:-}" && -f "$RUN/edge-bin" ]]; then bin=$(cat "$RUN/edge-bin"); else bin=$(sandboxd_bin); fi
  if [[ -z "${SBXLAB_EDGE_ENV+set}" && -f "$RUN/edge-env" ]]; then SBXLAB_EDGE_ENV=$(cat "$RUN/edge-env"); fi
  [[ -x "$bin" ]] || die "SANDBOXD_BIN $bin is not an executable"
  secret=$(env_value AUTH_SECRET); dburl=$(env_value DATABASE_URL)
  # The image the lab loaded into its nodes (SBXLAB_IMAGE at `up`).
  IMAGE=$(env_value IMAGE)
  [[ -n "$IMAGE" ]] || die "$ENV_FILE names no IMAGE: rebuild the lab (down, up)"
  stop_edges "$which"
  write_env "$secret" "$dburl" 0
  log "edges ${which:-1..$EDGES}: $bin in the anchors' network namespaces"
  for i in $(seq "${which:-1}" "${which:-$EDGES}"); do start_edge "$i" "$bin" "$secret" "$dburl"; done
  for i in $(seq "${which:-1}" "${which:-$EDGES}"); do wait_edge "$i"; done
  write_env "$secret" "$dburl" 1
  log "edges up"
  cat "$ENV_FILE"
}

# ---------------------------------------------------------------------------------------------
# down

umount_under() {  # unmount every mount point below $1, deepest first
  local base=$1 m
  awk -v b="$base/" 'index($5, b) == 1 {print $5}' /proc/self/mountinfo | sort -r | while read -r m; do
    umount -l "$m" 2>/dev/null || true
  done
}

pids_mentioning() {  # pids whose command line contains the path $1 (a path without brackets)
  # The last character goes into a bracket expression so that this grep's own command line,
  # which holds the pattern, does not match it.
  local p=$1 re
  re="${p%?}[${p: -1}]"
  grep -lsE -- "$re" /proc/[0-9]*/cmdline 2>/dev/null | awk -F/ -v self=$$ '$3 != self {print $3}' || true
}

cmd_down() {
  require_root
  local t0=$SECONDS i p cmd
  stop_edges
  # Containers first (SIGKILL at once, every node in parallel), then the engines.
  log "remove the containers of every node"
  for i in $(seq 1 "$N"); do
    if [[ -S "$(sock "$i")" ]]; then
      ( ids=$(timeout 10 docker -H "unix://$(sock "$i")" ps -aq 2>/dev/null || true)
        [[ -z "$ids" ]] || echo "$ids" | xargs -r timeout 30 docker -H "unix://$(sock "$i")" rm -f >/dev/null 2>&1 || true ) &
    fi
  done
  wait
  for i in $(seq 1 "$N"); do
    [[ -f "$RUN/n$i/dockerd.pid" ]] && log "stop dockerd n$i (pid $(cat "$RUN/n$i/dockerd.pid"))"
    pidfile_kill "$RUN/n$i/dockerd.pid" dockerd &
  done
  wait
  for i in $(seq 1 "$N"); do
    for p in $(pids_mentioning "$RUN/n$i/"); do
      [[ "$p" = "$(cat "$RUN/n$i/containerd.pid" 2>/dev/null)" ]] && continue
      cmd=$(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | cut -c1-100) || continue
      [[ -n "$cmd" ]] || continue
      log "kill leftover pid $p ($cmd)"
      kill -KILL "$p" 2>/dev/null || true
    done
    pidfile_kill "$RUN/n$i/containerd.pid" containerd &
  done
  wait
  log "unmount, cgroups, netns, veth, route, database, files"
  umount_under "$RUN"; umount_under "$LIB"
  local c
  for i in $(seq 1 "$N"); do
    for c in /sys/fs/cgroup/*/"sbxlab-n$i" /sys/fs/cgroup/"sbxlab-n$i"; do
      [[ -d "$c" ]] && { find "$c" -depth -type d -exec rmdir {} \; 2>/dev/null || true; }
    done
    ip netns del "sbxlab-n$i" 2>/dev/null || true
  done
  ip netns del "$HUB" 2>/dev/null || true
  ip link del "$HOSTIF" 2>/dev/null || true
  ip route del blackhole "$POOL" 2>/dev/null || true
  drop_db
  log "rm -rf $RUN $LIB"
  for i in $(seq 1 "$N"); do rm -rf "$LIB/n$i" & done
  wait
  rm -rf "$RUN" "$LIB"
  log "lab down in $((SECONDS - t0)) s"
}

drop_db() {
  command -v pg_lsclusters >/dev/null || return 0
  local port hba tmp
  port=$(pg_lsclusters --no-header 2>/dev/null | awk '$4 ~ /^online/ {print $3; exit}')
  [[ -n "$port" ]] || return 0
  psql_admin "$port" -v role="$PG_ROLE" -v db="$PG_DB" <<'SQL' || log "dropping database $PG_DB failed"
SELECT format('DROP DATABASE IF EXISTS %I WITH (FORCE)', :'db') \gexec
SELECT format('DROP ROLE IF EXISTS %I', :'role') \gexec
SQL
  hba=$(psql_admin "$port" -tAc 'SHOW hba_file' 2>/dev/null || true)
  if [[ -f "$hba" ]] && grep -qF "$HBA_TAG" "$hba"; then
    tmp=$(mktemp)
    grep -vF "$HBA_TAG" "$hba" >"$tmp" || true
    cat "$tmp" >"$hba"
    rm -f "$tmp"
    psql_admin "$port" -tAc 'SELECT pg_reload_conf()' >/dev/null || true
  fi
}

# ---------------------------------------------------------------------------------------------
# status

cmd_status() {
  local i p
  ip netns list | grep -E "^sbxlab-" || echo "no lab network namespaces"
  ip route show exact "$POOL" || true
  for i in $(seq 1 "$N"); do
    printf 'n%s %s dockerd=%s containerd=%s ' "$i" "$(node_ip "$i")" \
      "$(cat "$RUN/n$i/dockerd.pid" 2>/dev/null || echo -)" "$(cat "$RUN/n$i/containerd.pid" 2>/dev/null || echo -)"
    dk "$i" info -f 'swarm={{.Swarm.LocalNodeState}} manager={{.Swarm.ControlAvailable}} containers={{.Containers}}' 2>/dev/null || echo down
  done
  dk 1 node ls 2>/dev/null || true
  for i in $(seq 1 "$EDGES"); do
    p=$(cat "$RUN/edge$i.pid" 2>/dev/null || true)
    if [[ -n "$p" ]] && kill -0 "$p" 2>/dev/null; then
      printf 'edge %s pid %s http://%s:%s/healthz: %s\n' "$i" "$p" "$(node_ip "$i")" "$EDGE_PORT" \
        "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 -H "Host: $DOMAIN" "http://$(node_ip "$i"):$EDGE_PORT/healthz" || true)"
    else
      echo "edge $i not running"
    fi
  done
  if [[ -f "$ENV_FILE" ]]; then grep -v '^AUTH_SECRET=\|^DATABASE_URL=' "$ENV_FILE" || true; fi
}

case "${1:-}" in
  up) cmd_up ;;
  edges) cmd_edges "${2:-}" ;;
  down) cmd_down ;;
  status) cmd_status ;;
  dk) shift; dk "$@" ;;
  *) sed -n '2,11p' "$0"; exit 2 ;;
esac
