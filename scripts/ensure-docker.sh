#!/usr/bin/env bash
# Ensure a Docker engine is installed and its daemon answers. Idempotent.
# Installs Debian's docker.io when dockerd is missing and starts dockerd in the
# background (no systemd needed) when nothing answers on the socket.
set -euo pipefail
SANDBOXD_LOG_TAG=ensure-docker
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DOCKERD_LOG=${DOCKERD_LOG:-/var/log/dockerd.log}
DOCKER_WAIT_SECONDS=${DOCKER_WAIT_SECONDS:-60}

daemon_answers() {
  docker version --format '{{.Server.Version}}' >/dev/null 2>&1
}

require_root

if ! command -v dockerd >/dev/null 2>&1; then
  apt_install docker.io iptables
  command -v dockerd >/dev/null 2>&1 || die "docker.io installed but dockerd is still not on PATH"
fi
command -v docker >/dev/null 2>&1 || die "docker client not found on PATH after installing docker.io"

if daemon_answers; then
  log "docker daemon already running (engine $(docker version --format '{{.Server.Version}}'))"
  exit 0
fi

if pgrep -x dockerd >/dev/null 2>&1; then
  log "dockerd process exists but does not answer yet; waiting"
else
  log "starting dockerd (log: $DOCKERD_LOG)"
  # A pid file left by a dockerd that died makes the new one refuse to start.
  if [[ -f /var/run/docker.pid ]]; then
    stale_pid=$(cat /var/run/docker.pid 2>/dev/null || true)
    if [[ -z "$stale_pid" ]] || ! kill -0 "$stale_pid" 2>/dev/null; then
      rm -f /var/run/docker.pid
    fi
  fi
  # setsid: own session, so the daemon survives the caller's process group.
  setsid nohup dockerd >>"$DOCKERD_LOG" 2>&1 </dev/null &
fi

if ! wait_until "$DOCKER_WAIT_SECONDS" daemon_answers; then
  echo "---- last lines of $DOCKERD_LOG ----" >&2
  tail -n 30 "$DOCKERD_LOG" >&2 || true
  die "docker daemon did not answer within ${DOCKER_WAIT_SECONDS}s"
fi
log "docker daemon ready (engine $(docker version --format '{{.Server.Version}}'))"
