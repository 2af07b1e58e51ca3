#!/usr/bin/env bash
# Ensure the Docker engine runs and the sandbox image is built and current.
#   scripts/ensure-image.sh [--offline] [--force]   (arguments go to build.sh)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bash "$here/ensure-docker.sh"
exec bash "$here/../sandbox-image/build.sh" "$@"
