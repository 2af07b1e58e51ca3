#!/bin/bash
# Wake timing without sandboxd (issue 15), for comparing sandbox images and init designs:
# `docker start` of a stopped container -> the app's first HTTP 200 on the container's address,
# for a tiny Node app, interleaved per sample across these containers (same hardening as a
# sandbox: read-only root, tmpfs, no capabilities, uid 1000, 512 MiB, 128 pids):
#   old05   BEFORE image (its own init), 0.5 CPU      new05   AFTER image, 0.5 CPU
#   oldjs2  AFTER image with SANDBOXD_INIT_NODE=1 (the all-Node init), 2 CPUs
#   new2    AFTER image, 2 CPUs (what a boot with boot_cpus = 2 gets)
#   floor05 / floor2   the app as the container's command (no init), 0.5 / 2 CPUs
#
#   bench/wake-init-timing.sh [SAMPLES]      (root; default 7 samples after one untimed)
# Env: BEFORE_IMAGE (default sandboxd-sandbox:latest), AFTER_IMAGE (default the same).
# Prints the median and the samples per container, ms. Its containers carry the label
# sandboxd-wake-timing=<pid> and are removed on exit; traffic goes only to them.
set -u
N=${1:-7}
BEFORE=${BEFORE_IMAGE:-sandboxd-sandbox:latest}
AFTER=${AFTER_IMAGE:-sandboxd-sandbox:latest}
ws=$(mktemp -d /tmp/sandboxd-wake-timing.XXXXXX)
mkdir -p "$ws/.sandboxd"
cat >"$ws/server.js" <<'JS'
'use strict';
require('http').createServer((q, s) => { s.writeHead(200, {'content-type': 'text/plain'}); s.end('hello\n'); })
  .listen(5173, '0.0.0.0');
JS
echo '{"command": "node server.js"}' >"$ws/.sandboxd/preview.json"
chown -R 1000:1000 "$ws"
common=(--label "sandboxd-wake-timing=$$" --init --read-only --tmpfs /tmp:rw,exec,size=64m
  --tmpfs /home/sandbox:rw,exec,uid=1000,gid=1000,size=64m --tmpfs /run:size=16m --cap-drop ALL
  --security-opt no-new-privileges -m 512m --memory-swap 512m --pids-limit 128 -u 1000:1000
  -v "$ws:/workspace" -w /workspace)
declare -A ids
cleanup() {
  # shellcheck disable=SC2086
  [[ ${#ids[@]} -gt 0 ]] && docker rm -f ${ids[*]} >/dev/null 2>&1
  rm -rf "$ws"
}
trap cleanup EXIT
mk() { # name cpus image [cmd...]   (extra create options in $EXTRA)
  local name=$1 cpus=$2 image=$3
  shift 3
  # shellcheck disable=SC2086
  ids[$name]=$(docker create --name "wake-timing-$$-$name" "${common[@]}" --cpus "$cpus" ${EXTRA:-} "$image" "$@" | tail -1)
  [[ -n ${ids[$name]} ]] || { echo "creating $name failed" >&2; exit 1; }
}
mk old05 0.5 "$BEFORE"
mk new05 0.5 "$AFTER"
EXTRA="-e SANDBOXD_INIT_NODE=1" mk oldjs2 2 "$AFTER"
mk new2 2 "$AFTER"
mk floor05 0.5 "$AFTER" node server.js
mk floor2 2 "$AFTER" node server.js
one() {
  local id=$1 t0 ip i
  t0=$(date +%s%N)
  docker start "$id" >/dev/null
  ip=$(docker inspect -f '{{.NetworkSettings.IPAddress}}' "$id")
  for ((i = 0; i < 4000; i++)); do
    if curl -s -o /dev/null --max-time 1 "http://$ip:5173/" 2>/dev/null; then
      echo $((($(date +%s%N) - t0) / 1000000))
      docker stop -t 1 "$id" >/dev/null
      return
    fi
    sleep 0.005
  done
  echo 99999
  docker stop -t 1 "$id" >/dev/null
}
modes=(old05 new05 oldjs2 new2 floor05 floor2)
declare -A res
for ((s = 0; s <= N; s++)); do
  for m in "${modes[@]}"; do
    v=$(one "${ids[$m]}")
    ((s > 0)) && res[$m]+="$v "
  done
done
for m in "${modes[@]}"; do
  mapfile -t arr < <(tr ' ' '\n' <<<"${res[$m]}" | grep . | sort -n)
  printf '%-8s median %5s ms  samples: %s\n' "$m" "${arr[$((${#arr[@]} / 2))]}" "${arr[*]}"
done
