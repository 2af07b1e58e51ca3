#!/usr/bin/env bash
# Restarts the sandbox's agent when the edge cannot reach it: whatever listens on its port (a
# stuck agent, or a program of the user's that took the port) is killed, then a fresh agent
# takes its place. Run detached by the edge, as the sandbox user.
# Environment: SANDBOXD_AGENT_KEY (the sandbox's key; never an argument). No arguments.
port_hex=$(printf '%04X' 49983)
inodes=$(awk -v p=":$port_hex" '$2 ~ (p "$") && $4 == "0A" { print $10 }' \
  /proc/net/tcp /proc/net/tcp6 2>/dev/null)
if [ -n "$inodes" ]; then
  for fd in /proc/[0-9]*/fd/*; do
    link=$(readlink "$fd" 2>/dev/null) || continue
    case "$link" in socket:\[*\]) ;; *) continue ;; esac
    inode=${link#socket:[}
    inode=${inode%]}
    for want in $inodes; do
      if [ "$inode" = "$want" ]; then
        pid=${fd#/proc/}
        pid=${pid%%/*}
        [ "$pid" != "$$" ] && kill -KILL "$pid" 2>/dev/null
      fi
    done
  done
fi
exec sandboxd-agent --replace
