#!/usr/bin/env bash
# Swarm mode's network guard (src/sandbox/swarm/rules.rs). Run by sandboxd at every start of a
# sandbox, in a one-shot helper container that shares only the sandbox's network namespace, as
# root with NET_ADMIN alone. $1 is an iptables-restore file that sandboxd made from its
# configuration only; it replaces the filter table of the sandbox's namespace (Docker's DNS
# rules in nat stay). sandboxd then writes the marker the sandbox's init waits for.
set -euo pipefail
[[ $# -eq 1 ]] || { echo "usage: sandboxd-net-guard RULES" >&2; exit 2; }
printf '%s' "$1" | PATH=/usr/sbin:/sbin:$PATH iptables-restore --wait 5
