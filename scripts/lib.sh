#!/usr/bin/env bash
# Shared helpers for the sandboxd setup scripts. Source it; do not execute it.
# shellcheck shell=bash

# One line per step on stderr, so stdout stays free for machine-readable output.
log() { printf '[%s] %s\n' "${SANDBOXD_LOG_TAG:-sandboxd}" "$*" >&2; }

die() {
  printf '[%s] ERROR: %s\n' "${SANDBOXD_LOG_TAG:-sandboxd}" "$*" >&2
  exit 1
}

require_root() {
  [[ "$(id -u)" -eq 0 ]] || die "must run as root (current uid $(id -u))"
}

# run_quiet DESCRIPTION CMD [ARGS...]
# Runs CMD with its output captured; on failure prints the output and dies.
run_quiet() {
  local desc=$1
  shift
  local out rc=0
  out=$(mktemp)
  "$@" >"$out" 2>&1 || rc=$?
  if [[ $rc -ne 0 ]]; then
    printf '[%s] ERROR: %s failed (exit %d): %s\n' "${SANDBOXD_LOG_TAG:-sandboxd}" "$desc" "$rc" "$*" >&2
    tail -n 50 "$out" >&2 || true
    rm -f "$out"
    exit 1
  fi
  rm -f "$out"
}

_SANDBOXD_APT_UPDATED=0
apt_update_once() {
  if [[ $_SANDBOXD_APT_UPDATED -eq 0 ]]; then
    log "apt-get update"
    run_quiet "apt-get update" env DEBIAN_FRONTEND=noninteractive apt-get update
    _SANDBOXD_APT_UPDATED=1
  fi
}

# apt_install PKG... : installs packages non-interactively (runs apt-get update once).
apt_install() {
  apt_update_once
  log "apt-get install $*"
  run_quiet "apt-get install $*" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y --no-install-recommends "$@"
}

# wait_until TIMEOUT_SECONDS CMD [ARGS...] : polls CMD every 0.5 s until it succeeds.
wait_until() {
  local timeout=$1
  shift
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      return 1
    fi
    sleep 0.5
  done
}

export PATH="$HOME/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH"
