#!/usr/bin/env bash
# Test-only: what the browser test (tests/it/console.rs → tests/e2e/console.mjs) needs. Debian's
# Chromium at /usr/bin/chromium (Playwright's own browser download does not work here) and
# playwright-core in tests/e2e/node_modules. Idempotent; a no-op when both are there.
set -euo pipefail
cd "$(dirname "$0")/.."
SANDBOXD_LOG_TAG=browser
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

require_root
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  apt_install nodejs npm
fi
if [[ ! -x /usr/bin/chromium ]]; then
  apt_install chromium fonts-dejavu-core
fi
log "$(/usr/bin/chromium --version 2>/dev/null | head -n 1)"

cd tests/e2e
want=$(node -p 'require("./package.json").dependencies["playwright-core"]')
have=$(node -p 'try { require("./node_modules/playwright-core/package.json").version } catch { "" }')
if [[ "$have" != "$want" ]]; then
  log "npm ci (playwright-core $want)"
  # PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD: playwright-core downloads nothing, but be explicit.
  run_quiet "npm ci in tests/e2e" env PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error
fi
log "playwright-core $want ready"
