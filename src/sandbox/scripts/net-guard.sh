#!/usr/bin/env bash
# Swarm mode's network guard (src/sandbox/swarm/rules.rs). Run by sandboxd at every start of a
# sandbox, as root through a privileged exec, with an iptables-restore file on stdin that
# sandboxd made from its configuration only. Installs the rules in the sandbox's own network
# namespace (the filter table; Docker's DNS rules in nat stay), then writes the root-owned
# marker the init waits for before it starts the agent and the app. No arguments.
set -euo pipefail
PATH=/usr/sbin:/sbin:$PATH iptables-restore --wait 5
: >/run/sandboxd-net-guard
