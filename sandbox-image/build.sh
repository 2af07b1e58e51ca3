#!/usr/bin/env bash
# Build the sandboxd sandbox image.
#
#   sandbox-image/build.sh [--offline] [--force]
#
#   --offline  do not try a registry; build on the debootstrap base
#              sandboxd-base:trixie-3 (created on first use)
#   --force    rebuild even if the image is up to date
#
# Env: SANDBOXD_IMAGE (default sandboxd-sandbox:latest)
#      SANDBOXD_BASE_IMAGE_ONLINE (default node:20-bookworm-slim)
#      SANDBOXD_BASE_IMAGE_OFFLINE (default sandboxd-base:trixie-3; -2: with Python,
#      -3: with iptables for swarm mode's network guard)
#
# The image is labelled sandboxd.context-hash=<sha256 of this directory's files,
# the agent's sources (agent/src, agent/Cargo.toml, Cargo.lock) and the host CA bundle>; when the
# existing image carries the same hash the script prints "image up to date" and
# exits 0 (without running cargo or npm).
#
# The build context also gets, built on the host: the in-sandbox agent
# (agent/, a static binary: cargo build --release -p sandboxd-agent) and the
# runtime tools of runtime/package-lock.json (esbuild; npm ci on the host, so
# the docker build itself needs no network).
# Needs root and a running Docker daemon (see scripts/ensure-docker.sh).
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
SANDBOXD_LOG_TAG=image-build
# shellcheck source=scripts/lib.sh
source "$REPO_ROOT/scripts/lib.sh"

SANDBOXD_IMAGE=${SANDBOXD_IMAGE:-sandboxd-sandbox:latest}
ONLINE_BASE=${SANDBOXD_BASE_IMAGE_ONLINE:-node:20-bookworm-slim}
OFFLINE_BASE=${SANDBOXD_BASE_IMAGE_OFFLINE:-sandboxd-base:trixie-3}
HOST_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
BUILD_LOG=${SANDBOXD_BUILD_LOG:-/tmp/sandboxd-image-build.log}

usage() {
  echo "usage: $0 [--offline] [--force]" >&2
}

offline=0
force=0
for arg in "$@"; do
  case "$arg" in
    --offline) offline=1 ;;
    --force) force=1 ;;
    -h | --help) usage; exit 0 ;;
    *) usage; die "unknown argument: $arg" ;;
  esac
done

image_ref_re='^[a-z0-9][a-z0-9._/:-]*(@sha256:[0-9a-f]{64})?$'
for ref in "$SANDBOXD_IMAGE" "$ONLINE_BASE" "$OFFLINE_BASE"; do
  [[ "$ref" =~ $image_ref_re ]] || die "invalid image reference: '$ref'"
done

require_root
command -v docker >/dev/null 2>&1 || die "docker not found; run scripts/ensure-docker.sh first"
docker version --format '{{.Server.Version}}' >/dev/null 2>&1 \
  || die "docker daemon does not answer; run scripts/ensure-docker.sh first"

# Serialise concurrent builds on this machine.
exec 9>/tmp/sandboxd-image-build.lock
flock -w 1800 9 || die "timed out waiting for another image build (lock /tmp/sandboxd-image-build.lock)"

if [[ ! -s "$HOST_CA_BUNDLE" ]]; then
  apt_install ca-certificates
  [[ -s "$HOST_CA_BUNDLE" ]] || die "host CA bundle $HOST_CA_BUNDLE is missing"
fi

# ---- 1. content hash -------------------------------------------------------
context_hash() {
  (
    cd "$SCRIPT_DIR"
    find . -type f -print0 | LC_ALL=C sort -z | while IFS= read -r -d '' f; do
      printf '%s  %s\n' "$(sha256sum <"$f" | cut -d' ' -f1)" "$f"
    done
    printf '%s  %s\n' "$(sha256sum <"$HOST_CA_BUNDLE" | cut -d' ' -f1)" "host-ca-bundle.crt"
    cd "$REPO_ROOT"
    { printf '%s\0' Cargo.lock agent/Cargo.toml; find agent/src -type f -print0; } \
      | LC_ALL=C sort -z | while IFS= read -r -d '' f; do
        printf '%s  %s\n' "$(sha256sum <"$f" | cut -d' ' -f1)" "$f"
      done
  ) | sha256sum | cut -d' ' -f1
}
hash=$(context_hash)

image_label() {
  docker image inspect --format '{{ index .Config.Labels "sandboxd.context-hash" }}' "$SANDBOXD_IMAGE" 2>/dev/null || true
}
old_image_id=$(docker image inspect --format '{{.Id}}' "$SANDBOXD_IMAGE" 2>/dev/null || true)

if [[ $force -eq 0 && -n "$old_image_id" && "$(image_label)" == "$hash" ]]; then
  echo "image up to date"
  exit 0
fi

# ---- temp dirs and cleanup ---------------------------------------------------
ctx_dir=""
rootfs_dir=""

unmount_under() {
  # Unmount anything still mounted below $1 (deepest first), e.g. /proc or
  # /dev left behind by an interrupted debootstrap, before deleting it.
  local dir=$1 mnt
  [[ -n "$dir" && -d "$dir" ]] || return 0
  while IFS= read -r mnt; do
    umount -l "$mnt" 2>/dev/null || true
  done < <(awk -v d="$dir" '$2 == d || index($2, d "/") == 1 {print $2}' /proc/mounts | sort -r)
}

cleanup() {
  if [[ -n "$ctx_dir" ]]; then rm -rf -- "$ctx_dir"; fi
  if [[ -n "$rootfs_dir" && -d "$rootfs_dir" ]]; then
    unmount_under "$rootfs_dir"
    rm -rf --one-file-system -- "$rootfs_dir" || true
  fi
}
trap cleanup EXIT

# ---- 2. base image -----------------------------------------------------------
image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

build_offline_base() {
  if image_exists "$OFFLINE_BASE"; then
    log "offline base $OFFLINE_BASE already present"
    return 0
  fi
  command -v debootstrap >/dev/null 2>&1 || apt_install debootstrap
  local t0=$SECONDS
  rootfs_dir=$(mktemp -d /var/tmp/sandboxd-base.XXXXXX)
  log "debootstrap trixie into $rootfs_dir (1-2 minutes)"
  run_quiet "debootstrap" debootstrap --variant=minbase \
    --include=nodejs,ca-certificates,curl,git,bash,procps,nano,less,python3,python3-pip,python3-venv,iptables \
    trixie "$rootfs_dir"
  unmount_under "$rootfs_dir"
  log "debootstrap done after $((SECONDS - t0))s; installing npm inside the base tree"
  cp /etc/resolv.conf "$rootfs_dir/etc/resolv.conf"
  cp "$HOST_CA_BUNDLE" "$rootfs_dir/etc/ssl/certs/ca-certificates.crt"
  run_quiet "apt-get update (chroot)" chroot "$rootfs_dir" \
    env DEBIAN_FRONTEND=noninteractive apt-get update
  run_quiet "apt-get install npm (chroot)" chroot "$rootfs_dir" \
    env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
    -o Dpkg::Options::=--force-unsafe-io npm
  # ca-certificates triggers may have regenerated the bundle; trust the host CA.
  cp "$HOST_CA_BUNDLE" "$rootfs_dir/etc/ssl/certs/ca-certificates.crt"
  run_quiet "apt-get clean (chroot)" chroot "$rootfs_dir" apt-get clean
  unmount_under "$rootfs_dir"
  rm -rf "$rootfs_dir"/var/lib/apt/lists/* "$rootfs_dir"/var/cache/apt/*.bin
  : >"$rootfs_dir/etc/resolv.conf"

  log "npm installed after $((SECONDS - t0))s; importing $OFFLINE_BASE"
  local import_rc=0
  tar -C "$rootfs_dir" --numeric-owner -c . \
    | docker import --change 'LABEL sandboxd.base=true' --change 'ENV LANG=C.UTF-8' - "$OFFLINE_BASE" >/dev/null \
    || import_rc=$?
  [[ $import_rc -eq 0 ]] || die "docker import of $OFFLINE_BASE failed (exit $import_rc)"
  rm -rf --one-file-system -- "$rootfs_dir"
  rootfs_dir=""
  log "offline base $OFFLINE_BASE built in $((SECONDS - t0))s"
}

if [[ $offline -eq 1 ]]; then
  base=$OFFLINE_BASE
  build_offline_base
elif image_exists "$ONLINE_BASE"; then
  base=$ONLINE_BASE
  log "using local $ONLINE_BASE"
else
  log "probing the registry (docker pull $ONLINE_BASE)"
  if timeout 20 docker pull -q "$ONLINE_BASE" >/dev/null 2>&1; then
    base=$ONLINE_BASE
    log "pulled $ONLINE_BASE"
  else
    log "registry unreachable; using the offline base"
    base=$OFFLINE_BASE
    build_offline_base
  fi
fi

# ---- 3. docker build ---------------------------------------------------------
ctx_dir=$(mktemp -d /tmp/sandboxd-image-ctx.XXXXXX)
cp -a "$SCRIPT_DIR/." "$ctx_dir/"
cp "$HOST_CA_BUNDLE" "$ctx_dir/host-ca-bundle.crt"
chmod 0644 "$ctx_dir/host-ca-bundle.crt"

# The agent: a static binary, so it runs on any base (glibc's static NSS limits do not
# matter: it resolves no names).
export PATH="$HOME/.cargo/bin:$PATH"
command -v cargo >/dev/null 2>&1 || die "cargo not found (needed to build sandboxd-agent)"
host_triple=$(rustc -vV | sed -n 's/^host: //p')
[[ -n "$host_triple" ]] || die "cannot tell the Rust host triple (rustc -vV)"
log "building sandboxd-agent (cargo, static, $host_triple)"
agent_target_dir=${CARGO_TARGET_DIR:-$REPO_ROOT/target}
t0=$SECONDS
(
  cd "$REPO_ROOT"
  RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR="$agent_target_dir" \
    cargo build --release --locked -p sandboxd-agent --target "$host_triple"
) >"$BUILD_LOG.agent" 2>&1 || {
  tail -n 30 "$BUILD_LOG.agent" >&2
  die "building sandboxd-agent failed; log in $BUILD_LOG.agent"
}
agent_bin="$agent_target_dir/$host_triple/release/sandboxd-agent"
if ldd "$agent_bin" 2>&1 | grep -q '=>'; then
  die "sandboxd-agent is not static: $(ldd "$agent_bin" 2>&1 | head -3)"
fi
install -m 0755 "$agent_bin" "$ctx_dir/sandboxd-agent"
log "sandboxd-agent built in $((SECONDS - t0))s"

# esbuild for TypeScript, from the pinned lock (the host reaches the npm registry).
command -v npm >/dev/null 2>&1 || apt_install npm
log "npm ci (sandbox-image/runtime)"
(cd "$ctx_dir/runtime" && npm ci --ignore-scripts --no-audit --no-fund --omit=dev) \
  >"$BUILD_LOG.npm" 2>&1 || {
  tail -n 30 "$BUILD_LOG.npm" >&2
  die "npm ci in sandbox-image/runtime failed; log in $BUILD_LOG.npm"
}
[[ -x "$ctx_dir/runtime/node_modules/@esbuild/linux-x64/bin/esbuild" ]] \
  || die "npm ci did not install @esbuild/linux-x64"

log "docker build $SANDBOXD_IMAGE from $base (log: $BUILD_LOG)"
t0=$SECONDS
build_rc=0
# The legacy builder is what Debian's docker.io 20.10 offers without buildx.
DOCKER_BUILDKIT=0 docker build \
  --build-arg "BASE_IMAGE=$base" \
  --label "sandboxd.context-hash=$hash" \
  -t "$SANDBOXD_IMAGE" \
  "$ctx_dir" >"$BUILD_LOG" 2>&1 || build_rc=$?
if [[ $build_rc -ne 0 ]]; then
  tail -n 40 "$BUILD_LOG" >&2 || true
  die "docker build failed (exit $build_rc); full log in $BUILD_LOG"
fi
log "built $SANDBOXD_IMAGE in $((SECONDS - t0))s"

# ---- 4. verify ---------------------------------------------------------------
log "verifying $SANDBOXD_IMAGE (read-only root, no capabilities)"
verify_err=$(mktemp)
verify_rc=0
verify_out=$(docker run --rm --read-only --tmpfs /tmp --tmpfs /home/sandbox:uid=1000,gid=1000 \
  --cap-drop ALL --security-opt no-new-privileges "$SANDBOXD_IMAGE" \
  bash -lc 'id -u; node --version; npm --version; git --version; curl --version | head -1; nano --version | head -1; ps --version; python3 --version; python3 -m venv --help >/dev/null && echo venv; python3 -m pip --version; esbuild --version; sandboxd-agent --version; /usr/sbin/iptables-restore --version' \
  2>"$verify_err") || verify_rc=$?
if [[ $verify_rc -ne 0 ]]; then
  cat "$verify_err" >&2
  rm -f "$verify_err"
  die "verification container failed (exit $verify_rc): $verify_out"
fi
rm -f "$verify_err"
mapfile -t lines <<<"$verify_out"
[[ "${lines[0]:-}" == "1000" ]] || die "image runs as uid '${lines[0]:-}', expected 1000. Output: $verify_out"
[[ "${lines[1]:-}" =~ ^v20\. ]] || die "node version is '${lines[1]:-}', expected v20.x. Output: $verify_out"
[[ ${#lines[@]} -ge 12 ]] || die "verification printed too few lines: $verify_out"
[[ "${lines[7]:-}" =~ ^Python\ 3\. ]] || die "python3 --version is '${lines[7]:-}'. Output: $verify_out"
[[ "${lines[8]:-}" == venv ]] || die "python3 -m venv does not work. Output: $verify_out"
[[ "${lines[11]:-}" =~ ^sandboxd-agent\  ]] || die "sandboxd-agent --version is '${lines[11]:-}'. Output: $verify_out"
[[ "${lines[12]:-}" =~ ^iptables-restore ]] || die "iptables-restore --version is '${lines[12]:-}' (swarm mode's network guard needs it). Output: $verify_out"
log "verified: uid 1000, node ${lines[1]}, npm ${lines[2]}, ${lines[3]}, ${lines[7]}, esbuild ${lines[10]}, ${lines[11]}"

# Drop the previous image if nothing uses it any more (ignore failures).
new_image_id=$(docker image inspect --format '{{.Id}}' "$SANDBOXD_IMAGE")
if [[ -n "$old_image_id" && "$old_image_id" != "$new_image_id" ]]; then
  docker image rm "$old_image_id" >/dev/null 2>&1 || true
fi
echo "built $SANDBOXD_IMAGE"
