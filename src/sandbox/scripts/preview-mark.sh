#!/usr/bin/env bash
# Makes /workspace/<name> the preview app (/workspace/.sandboxd/preview.json) and has the
# sandbox's init restart the dev server there.
# $1: the project name (validated: [a-z0-9][a-z0-9-_]{0,63}), relative to /workspace.
set -e
mkdir -p /workspace/.sandboxd
node -e 'require("fs").writeFileSync("/workspace/.sandboxd/preview.json", JSON.stringify({cwd: process.argv[1]}) + "\n")' "$1"
sandboxd-init --restart-dev
