#!/bin/bash
# Where a cold start's engine time goes, without sandboxd (issue 15, cold first hit): the
# engine API's create and start of a container with a sandbox's image and hardening (read-only
# root, tmpfs, no capabilities, uid 1000, 512 MiB, tini, json-file log), by network:
#   usernet   a user-defined bridge like the instance's (icc off): what a sandbox and the cold
#             floor pay (endpoint, and the embedded DNS resolver set up inside the container)
#   bridge    Docker's default bridge (no embedded DNS resolver)
#   none      no network at all: the rest of the start (shim, runc, mounts, cgroups)
# Samples are interleaved (one of each in turn) so the machine's load falls on all alike.
#
#   bench/engine-start-timing.sh [SAMPLES]      (root; default 7 samples of each)
# Env: IMAGE (default sandboxd-sandbox:latest). Prints the median create and start per network,
# ms, then the samples. The containers (label sandboxd-start-timing=<pid>) and the network
# are removed on exit; nothing runs in the containers but `sleep`, and no traffic is sent.
set -u
N=${1:-7}
IMAGE=${IMAGE:-sandboxd-sandbox:latest}
SOCK=/var/run/docker.sock
NET=start-timing-$$-net
ws=$(mktemp -d /tmp/sandboxd-start-timing.XXXXXX)
chown 1000:1000 "$ws"
cleanup() {
  local ids
  ids=$(docker ps -aq --filter "label=sandboxd-start-timing=$$")
  # shellcheck disable=SC2086
  [[ -n $ids ]] && docker rm -f $ids >/dev/null 2>&1
  docker network rm "$NET" >/dev/null 2>&1
  rm -rf "$ws"
}
trap cleanup EXIT
docker network create -o com.docker.network.bridge.enable_icc=false "$NET" >/dev/null || exit 1

api() { curl -sS --max-time 60 --unix-socket "$SOCK" -H 'Content-Type: application/json' "$@"; }
spec() { # network
  cat <<JSON
{"Image":"$IMAGE","User":"1000:1000","WorkingDir":"/workspace","Entrypoint":["sleep"],"Cmd":["60"],
 "Labels":{"sandboxd-start-timing":"$$"},
 "HostConfig":{"Binds":["$ws:/workspace:rw"],"NetworkMode":"$1","Memory":536870912,
  "MemorySwap":536870912,"NanoCpus":500000000,"PidsLimit":256,
  "Ulimits":[{"Name":"nofile","Soft":1024,"Hard":1024}],"CapDrop":["ALL"],
  "SecurityOpt":["no-new-privileges:true"],"ReadonlyRootfs":true,"Init":true,"IpcMode":"private",
  "Tmpfs":{"/tmp":"rw,exec,nosuid,nodev,size=67108864,mode=1777",
   "/home/sandbox":"rw,exec,nosuid,nodev,size=67108864,uid=1000,gid=1000,mode=0755",
   "/run":"rw,nosuid,nodev,noexec,size=16777216,mode=0755"},
  "LogConfig":{"Type":"json-file","Config":{"max-size":"1m","max-file":"1"}}}}
JSON
}
now_ms() { echo $(($(date +%s%N) / 1000000)); }
declare -A create start
nets=("$NET" bridge none)
label() { [[ $1 == "$NET" ]] && echo usernet || echo "$1"; }
for ((i = 0; i <= N; i++)); do
  for net in "${nets[@]}"; do
    t0=$(now_ms)
    id=$(api -X POST "http://engine/containers/create" -d "$(spec "$net")" | sed -n 's/.*"Id":"\([0-9a-f]*\)".*/\1/p')
    [[ -n $id ]] || { echo "creating a container on $net failed" >&2; exit 1; }
    t1=$(now_ms)
    api -X POST "http://engine/containers/$id/start" >/dev/null || exit 1
    t2=$(now_ms)
    api -X DELETE "http://engine/containers/$id?force=1" >/dev/null
    ((i == 0)) && continue # untimed: caches warm
    k=$(label "$net")
    create[$k]+="$((t1 - t0)) "
    start[$k]+="$((t2 - t1)) "
  done
done
median() { tr ' ' '\n' | grep . | sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }
printf '%-8s %8s %8s   samples (start, ms)\n' network create start
for net in "${nets[@]}"; do
  k=$(label "$net")
  printf '%-8s %8s %8s   %s\n' "$k" "$(median <<<"${create[$k]}")" "$(median <<<"${start[$k]}")" "${start[$k]}"
done
