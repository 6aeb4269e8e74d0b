#!/usr/bin/env bash
# The shared tracking stack on one machine: PostgreSQL (MLflow's backend store and the Optuna storage) and an
# `mlflow server` that proxies artifacts, so workers need only MLFLOW_TRACKING_URI (and, for sweeps,
# MEDZOO_OPTUNA_STORAGE with PGPASSFILE).
#
#   scripts/stack.sh up        initialise on first use, start both, print the variables workers need
#   scripts/stack.sh env       print those variables as `export` lines:  eval "$(scripts/stack.sh env)"
#   scripts/stack.sh status    what is running, and where
#   scripts/stack.sh down      stop both (data kept)
#   scripts/stack.sh purge     stop both and delete the stack folder (runs, models, studies, artifacts)
#
# Settings (environment): MEDZOO_STACK_DIR (default: .stack in the checkout), MEDZOO_STACK_HOST (the address
# both listen on, default 127.0.0.1; 0.0.0.0 for other machines, see the README), MEDZOO_PG_PORT (5433),
# MEDZOO_MLFLOW_PORT (5005), MEDZOO_MLFLOW_WORKERS (2), MEDZOO_MLFLOW_ALLOWED_HOSTS (the Host headers the server
# accepts, e.g. db-host,db-host:5005 for workers that name it; unset: MLflow's default, localhost and private IPs;
# set: these and loopback). The database password is generated on first use and
# kept in $MEDZOO_STACK_DIR/pgpass (libpq's password file), so no URL, log or MLflow param carries it.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
STACK_DIR="$(mkdir -p "${MEDZOO_STACK_DIR:-$ROOT/.stack}" && cd "${MEDZOO_STACK_DIR:-$ROOT/.stack}" && pwd)"
HOST="${MEDZOO_STACK_HOST:-127.0.0.1}"
PG_PORT="${MEDZOO_PG_PORT:-5433}"
MLFLOW_PORT="${MEDZOO_MLFLOW_PORT:-5005}"
MLFLOW_WORKERS="${MEDZOO_MLFLOW_WORKERS:-2}"
ALLOWED_HOSTS="${MEDZOO_MLFLOW_ALLOWED_HOSTS:-}"
DB_USER=medzoo
PG_DATA="$STACK_DIR/pg"
PG_RUN="$STACK_DIR/pg-run"  # its socket and its log, both written by the postgres user
PG_LOG="$PG_RUN/postgres.log"
PGPASS="$STACK_DIR/pgpass"
ARTIFACTS="$STACK_DIR/artifacts"
MLFLOW_PID="$STACK_DIR/mlflow.pid"
MLFLOW_LOG="$STACK_DIR/mlflow.log"
# Clients on this machine reach a server bound to every interface through loopback.
CLIENT_HOST="$HOST"
[[ "$HOST" == "0.0.0.0" ]] && CLIENT_HOST=127.0.0.1

die() { echo "stack: $*" >&2; exit 1; }

pg_bindir() {
  local dir
  if command -v pg_config >/dev/null && [[ -x "$(pg_config --bindir)/initdb" ]]; then
    pg_config --bindir
    return
  fi
  dir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)"
  [[ -n "$dir" && -x "$dir/initdb" ]] || die "PostgreSQL's server programs (initdb, pg_ctl) were not found; install them with: apt-get update && apt-get install -y postgresql"
  echo "$dir"
}

# PostgreSQL refuses to run as root: there it runs as the `postgres` user, which must own the data folder.
as_pg() {
  if [[ $EUID -eq 0 ]]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

mlflow_bin() {
  if [[ -x "$ROOT/.venv/bin/mlflow" ]]; then echo "$ROOT/.venv/bin/mlflow"; else command -v mlflow || die "mlflow not found: run make setup, or activate the environment"; fi
}

pg_url() { echo "postgresql://$DB_USER@$CLIENT_HOST:$PG_PORT/$1"; }
tracking_uri() { echo "http://$CLIENT_HOST:$MLFLOW_PORT"; }

pg_running() { [[ -d "$PG_DATA" ]] && as_pg "$(pg_bindir)/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1; }
mlflow_pid() { [[ -f "$MLFLOW_PID" ]] && kill -0 "$(cat "$MLFLOW_PID")" 2>/dev/null && cat "$MLFLOW_PID"; }
mlflow_healthy() {
  "$(dirname "$(mlflow_bin)")/python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
    "$(tracking_uri)/health" >/dev/null 2>&1
}

init_pg() {
  local bindir="$1" password
  password="$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  mkdir -p "$PG_DATA" "$PG_RUN"
  local pwfile="$STACK_DIR/.initdb-password"
  (umask 077; echo "$password" > "$pwfile")
  if [[ $EUID -eq 0 ]]; then
    chown postgres "$PG_DATA" "$PG_RUN" "$pwfile"
    as_pg test -x "$STACK_DIR" || die "the postgres user cannot enter $STACK_DIR; choose a MEDZOO_STACK_DIR whose parent folders it may read"
  fi
  as_pg "$bindir/initdb" -D "$PG_DATA" -U "$DB_USER" --pwfile="$pwfile" --auth=scram-sha-256 --encoding=UTF8 >"$STACK_DIR/initdb.log" 2>&1 \
    || { rm -f "$pwfile"; die "initdb failed, see $STACK_DIR/initdb.log"; }
  rm -f "$pwfile"
  # Password file for every client of this machine: host:port:database:user:password.
  (umask 077; printf '%s:%s:*:%s:%s\n' "$CLIENT_HOST" "$PG_PORT" "$DB_USER" "$password" > "$PGPASS")
  {
    echo "listen_addresses = '$HOST'"
    echo "port = $PG_PORT"
    echo "unix_socket_directories = '$PG_RUN'"
    echo "max_connections = 200"
  } >> "$PG_DATA/postgresql.conf"
  if [[ "$HOST" == "0.0.0.0" ]]; then  # other machines: password-authenticated, never trusted
    echo "host all all 0.0.0.0/0 scram-sha-256" >> "$PG_DATA/pg_hba.conf"
  fi
}

up() {
  local bindir
  bindir="$(pg_bindir)"
  [[ -f "$PG_DATA/PG_VERSION" ]] || init_pg "$bindir"
  if ! pg_running; then
    as_pg "$bindir/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -w -t 60 start >/dev/null \
      || die "PostgreSQL did not start, see $PG_LOG"
  fi
  export PGPASSFILE="$PGPASS"
  for db in mlflow optuna; do
    if ! "$bindir/psql" -h "$CLIENT_HOST" -p "$PG_PORT" -U "$DB_USER" -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1; then
      "$bindir/createdb" -h "$CLIENT_HOST" -p "$PG_PORT" -U "$DB_USER" "$db"
    fi
  done
  if ! mlflow_pid >/dev/null; then
    mkdir -p "$ARTIFACTS"
    local extra=()
    # A list replaces MLflow's default (localhost and private IPs): keep loopback, which this machine's workers use.
    [[ -n "$ALLOWED_HOSTS" ]] && extra=(--allowed-hosts "$ALLOWED_HOSTS,localhost,localhost:*,127.0.0.1,127.0.0.1:*")
    # setsid: the server outlives this shell and stops as one process group. MLflow 3's job runner (eight huey
    # consumers for GenAI jobs, which MedZoo never submits) stays off unless the variable says otherwise.
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}" setsid "$(mlflow_bin)" server \
      --backend-store-uri "$(pg_url mlflow)" \
      --artifacts-destination "$ARTIFACTS" \
      --host "$HOST" --port "$MLFLOW_PORT" --workers "$MLFLOW_WORKERS" "${extra[@]}" \
      >"$MLFLOW_LOG" 2>&1 < /dev/null &
    echo $! > "$MLFLOW_PID"
  fi
  for _ in $(seq 1 240); do
    mlflow_healthy && break
    mlflow_pid >/dev/null || die "mlflow server exited, see $MLFLOW_LOG"
    sleep 0.5
  done
  mlflow_healthy || die "mlflow server did not answer $(tracking_uri)/health within 120 s, see $MLFLOW_LOG"
  echo "stack up: PostgreSQL on $HOST:$PG_PORT, mlflow server on $HOST:$MLFLOW_PORT, artifacts in $ARTIFACTS" >&2
  echo "workers on this machine: eval \"\$(scripts/stack.sh env)\"" >&2
  env_lines
}

env_lines() {
  echo "export MLFLOW_TRACKING_URI=$(tracking_uri)"
  echo "export MEDZOO_OPTUNA_STORAGE=$(pg_url optuna)"
  echo "export PGPASSFILE=$PGPASS"
}

down() {
  local pid
  if pid="$(mlflow_pid)"; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$MLFLOW_PID"
  if pg_running; then
    as_pg "$(pg_bindir)/pg_ctl" -D "$PG_DATA" -m fast -w stop >/dev/null
  fi
  echo "stack down (data kept in $STACK_DIR)" >&2
}

status() {
  local code=0
  if pg_running; then echo "postgresql: running on $HOST:$PG_PORT (data: $PG_DATA)"; else echo "postgresql: stopped"; code=3; fi
  if mlflow_healthy; then echo "mlflow server: healthy at $(tracking_uri) (pid $(mlflow_pid || echo '?'), artifacts: $ARTIFACTS)"; else echo "mlflow server: not answering at $(tracking_uri)"; code=3; fi
  return $code
}

case "${1:-}" in
  up) up ;;
  env) env_lines ;;
  status) status ;;
  down) down ;;
  purge) down; rm -rf "$STACK_DIR"; echo "stack purged: $STACK_DIR" >&2 ;;
  *) echo "usage: scripts/stack.sh up|env|status|down|purge" >&2; exit 2 ;;
esac
