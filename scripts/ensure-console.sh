#!/usr/bin/env bash
# Builds the web console: console/ (page sources, xterm.js and its fit add-on from npm, the
# CodeMirror 6 editor bundled by esbuild from console/editor/) into console/dist, which sandboxd
# serves at / (config key console_dir). Installs Node.js and npm from Debian when missing.
# Skipped when nothing changed since the last build. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
SANDBOXD_LOG_TAG=console
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  apt_install nodejs npm
fi

cd console
stamp_file=dist/.build-stamp
stamp=$( (node --version; cat package.json package-lock.json build.mjs; find src editor -type f -print0 | sort -z | xargs -0 cat) | sha256sum | cut -d' ' -f1)
if [[ -f $stamp_file && "$(cat "$stamp_file")" == "$stamp" ]]; then
  log "console up to date (console/dist)"
  exit 0
fi
log "npm ci (xterm.js, CodeMirror 6, esbuild)"
run_quiet "npm ci in console/" npm ci --no-audit --no-fund --loglevel=error
log "build console/dist"
run_quiet "console build" node build.mjs dist
echo "$stamp" >"$stamp_file"
log "console built (console/dist)"
