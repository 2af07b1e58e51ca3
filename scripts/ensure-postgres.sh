#!/usr/bin/env bash
# Ensure a local PostgreSQL cluster runs and has the sandboxd test role and
# database. Idempotent. The LAST line on stdout is the connection URL, e.g.
#   postgres://sandboxd:sandboxd@127.0.0.1:5432/sandboxd_test
set -euo pipefail
SANDBOXD_LOG_TAG=ensure-postgres
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PG_ROLE=sandboxd
PG_PASSWORD=sandboxd
PG_DB=sandboxd_test
PG_WAIT_SECONDS=${PG_WAIT_SECONDS:-60}

require_root

server_installed() {
  command -v pg_ctlcluster >/dev/null 2>&1 || return 1
  command -v pg_lsclusters >/dev/null 2>&1 || return 1
  compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null
}

if ! server_installed; then
  apt_install postgresql
  server_installed || die "postgresql installed but pg_ctlcluster or the server binaries are still missing"
fi

# Pick a cluster: the highest version, preferring one named "main".
# pg_lsclusters --no-header columns: Ver Cluster Port Status Owner Datadir Logfile
pick_cluster() {
  pg_lsclusters --no-header 2>/dev/null | awk '{print $1, $2, $3, $4}' \
    | sort -k1,1V -k2,2 | awk '$2 == "main" {m = $0} {l = $0} END {if (m != "") print m; else if (l != "") print l}'
}

cluster=$(pick_cluster)
if [[ -z "$cluster" ]]; then
  ver=$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -type d -printf '%f\n' | sort -V | tail -n 1)
  [[ -n "$ver" ]] || die "no PostgreSQL server version found under /usr/lib/postgresql"
  log "creating cluster $ver/main"
  run_quiet "pg_createcluster $ver main" pg_createcluster "$ver" main
  cluster=$(pick_cluster)
  [[ -n "$cluster" ]] || die "pg_createcluster $ver main did not produce a cluster"
fi
read -r PG_VER PG_CLUSTER PG_PORT PG_STATUS <<<"$cluster"
[[ "$PG_PORT" =~ ^[0-9]+$ ]] || die "could not parse the port of cluster $PG_VER/$PG_CLUSTER: '$PG_PORT'"

if [[ "$PG_STATUS" == online* ]]; then
  log "cluster $PG_VER/$PG_CLUSTER already online on port $PG_PORT"
else
  log "starting cluster $PG_VER/$PG_CLUSTER (port $PG_PORT)"
  run_quiet "pg_ctlcluster $PG_VER $PG_CLUSTER start" pg_ctlcluster "$PG_VER" "$PG_CLUSTER" start
fi

if ! wait_until "$PG_WAIT_SECONDS" pg_isready -q -h 127.0.0.1 -p "$PG_PORT"; then
  tail -n 30 "/var/log/postgresql/postgresql-$PG_VER-$PG_CLUSTER.log" >&2 2>/dev/null || true
  die "PostgreSQL on 127.0.0.1:$PG_PORT did not become ready within ${PG_WAIT_SECONDS}s"
fi

# Run SQL as the postgres superuser over the Unix socket (peer auth).
# Values are passed as psql variables and quoted by psql/format(), never
# spliced into the SQL text by the shell.
as_postgres_psql() {
  runuser -u postgres -- psql -X -q -p "$PG_PORT" -d postgres -v ON_ERROR_STOP=1 \
    -v role="$PG_ROLE" -v password="$PG_PASSWORD" -v db="$PG_DB" "$@"
}

log "ensuring role $PG_ROLE and database $PG_DB"
run_quiet "create role/database" as_postgres_psql <<'SQL'
SELECT format('CREATE ROLE %I LOGIN', :'role')
  WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'role') \gexec
SELECT format('ALTER ROLE %I WITH LOGIN CREATEDB PASSWORD %L', :'role', :'password') \gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'role')
  WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = :'db') \gexec
SELECT format('ALTER DATABASE %I OWNER TO %I', :'db', :'role') \gexec
SQL

tcp_login_works() {
  PGPASSWORD=$PG_PASSWORD PGCONNECT_TIMEOUT=5 psql -X -q -h 127.0.0.1 -p "$PG_PORT" \
    -U "$PG_ROLE" -d "$PG_DB" -tAc 'SELECT 1' 2>/dev/null | grep -qx 1
}

if ! tcp_login_works; then
  hba=$(runuser -u postgres -- psql -X -p "$PG_PORT" -d postgres -tAc 'SHOW hba_file')
  [[ -f "$hba" ]] || die "password login over TCP failed and pg_hba.conf ($hba) was not found"
  log "password login over 127.0.0.1 failed; adding a scram-sha-256 rule to $hba"
  # Prepend so the rule wins over any earlier reject/ident line.
  tmp=$(mktemp)
  { printf 'host    all             %s             127.0.0.1/32            scram-sha-256  # sandboxd\n' "$PG_ROLE"
    cat "$hba"; } >"$tmp"
  cat "$tmp" >"$hba"
  rm -f "$tmp"
  run_quiet "reload cluster" pg_ctlcluster "$PG_VER" "$PG_CLUSTER" reload
  sleep 0.5
  tcp_login_works || die "password login as $PG_ROLE on 127.0.0.1:$PG_PORT still fails; check $hba and listen_addresses"
fi
log "password login over 127.0.0.1:$PG_PORT works"

printf 'postgres://%s:%s@127.0.0.1:%s/%s\n' "$PG_ROLE" "$PG_PASSWORD" "$PG_PORT" "$PG_DB"
