#!/usr/bin/env bash
# Removes what a killed run of tests/it/engine_restart.rs left behind (its drop guard cleans up
# after a failed assertion, but not after SIGKILL): the test's private engine lives in a network
# namespace `sbxe-<6 hex>`, with folders /run/sbxe-<6 hex> and /var/lib/sbxe-<6 hex> (a tmpfs)
# and a veth `sbxe<6 hex>h`. Only those exact patterns are touched; never the host's engine.
# Do not run it while tests/it/engine_restart.rs runs.
set -euo pipefail
SANDBOXD_LOG_TAG=clean-engine-lab
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
require_root

# Processes in a lab namespace: its dockerd, containerd, shims and sandboxd.
for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^sbxe-[0-9a-f]{6}$' || true); do
  for pid in $(ip netns pids "$ns" 2>/dev/null); do
    log "kill pid $pid (netns $ns)"
    kill -KILL "$pid" 2>/dev/null || true
  done
done
# Processes of the lab's containers (their own namespaces), found by the lab's container ids.
for lib in /var/lib/sbxe-*; do
  [[ "$lib" =~ ^/var/lib/sbxe-[0-9a-f]{6}$ && -d "$lib/data/containers" ]] || continue
  for c in "$lib"/data/containers/*; do
    id=$(basename "$c")
    [[ "$id" =~ ^[0-9a-f]{64}$ ]] || continue
    for procs in /sys/fs/cgroup/*/docker/"$id"/cgroup.procs; do
      [[ -f "$procs" ]] || continue
      while read -r pid; do kill -KILL "$pid" 2>/dev/null || true; done <"$procs"
    done
  done
done
sleep 0.5
for lib in /var/lib/sbxe-*; do
  [[ "$lib" =~ ^/var/lib/sbxe-[0-9a-f]{6}$ && -d "$lib/data/containers" ]] || continue
  for c in "$lib"/data/containers/*; do
    id=$(basename "$c")
    [[ "$id" =~ ^[0-9a-f]{64}$ ]] || continue
    for d in /sys/fs/cgroup/*/docker/"$id"; do rmdir "$d" 2>/dev/null || true; done
  done
done
# Mounts below the lab folders (overlay roots, namespace files, the tmpfs), deepest first.
for base in /run/sbxe- /var/lib/sbxe-; do
  awk -v b="$base" 'index($5, b) == 1 {print $5}' /proc/self/mountinfo | awk '{print length, $0}' |
    sort -rn | cut -d' ' -f2- | while read -r m; do
      if [[ "$m" =~ ^(/run|/var/lib)/sbxe-[0-9a-f]{6}(/|$) ]]; then
        umount -l "$m" 2>/dev/null || true
      fi
    done
done
for d in /run/sbxe-* /var/lib/sbxe-*; do
  [[ "$d" =~ ^(/run|/var/lib)/sbxe-[0-9a-f]{6}$ ]] || continue
  log "remove $d"
  rm -rf --one-file-system "$d"
done
for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^sbxe-[0-9a-f]{6}$' || true); do
  log "remove netns $ns"
  ip netns del "$ns" || true
done
for l in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | grep -E '^sbxe[0-9a-f]{6}h$' || true); do
  ip link del "$l" 2>/dev/null || true
done
