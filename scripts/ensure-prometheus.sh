#!/usr/bin/env bash
# Test-only: the metrics test (tests/it/metrics.rs) starts a real Prometheus server that scrapes
# sandboxd. Debian's `prometheus` package provides /usr/bin/prometheus; the test runs it with a
# generated configuration and its own storage folder, never as the packaged service.
# Idempotent; a no-op when the binary is there.
set -euo pipefail
cd "$(dirname "$0")/.."
SANDBOXD_LOG_TAG=prometheus
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

require_root
if ! command -v prometheus >/dev/null; then
  # policy-rc.d 101: the package's service must not start (the test runs its own server).
  had_policy=0
  [[ -e /usr/sbin/policy-rc.d ]] && had_policy=1
  if [[ $had_policy -eq 0 ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
  fi
  rc=0
  (apt_install prometheus) || rc=$?
  [[ $had_policy -eq 0 ]] && rm -f /usr/sbin/policy-rc.d
  [[ $rc -eq 0 ]] || exit "$rc"
fi
command -v prometheus >/dev/null || die "prometheus installed but not on PATH"
log "$(prometheus --version 2>&1 | head -n 1)"
