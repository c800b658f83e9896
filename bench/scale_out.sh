#!/usr/bin/env bash
# bench/scale_out.sh — durable shadow updates/s and update->accepted latency with one and two
# Umbra nodes on PostgreSQL, attached to one Mosquitto, next to one node on SQLite (attached the
# same way, and with its own broker) as the reference. Writes bench/SCALE_OUT.md.
#
# One command: it builds Umbra and device-sim (release), installs Mosquitto and PostgreSQL
# (Debian packages) when it can, starts PostgreSQL's cluster, and makes a database per run.
#
# Usage: bench/scale_out.sh
# Knobs (env): DURATION=15s (each measured window)  DEVICES=200  INFLIGHT=4 (updates in flight
#              per device)  OUT=bench/SCALE_OUT.md  CARGO_TARGET_DIR
#              PG_ADMIN=postgres://umbra:umbra@127.0.0.1:5432/postgres (a user who may create
#              databases; made when this script runs as root on Debian)
#              PG_CA=FILE: the CA that signed the PostgreSQL server's certificate for 127.0.0.1
#              (.ci/run makes one; defaults to UMBRA_TEST_POSTGRES_CA): adds a row with the
#              store over TLS. Without it, that row is left out.
#
# Everything stays on 127.0.0.1; every device updates its own shadow, so the figures are the
# store's (group commit under PostgreSQL's fsync), not the broker's.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DURATION=${DURATION:-15s}
DEVICES=${DEVICES:-200}
INFLIGHT=${INFLIGHT:-4}
OUT=${OUT:-$ROOT/bench/SCALE_OUT.md}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
SIM=$TARGET/release/device-sim
UMBRA=$TARGET/release/umbra
PG_ADMIN=${PG_ADMIN:-postgres://umbra:umbra@127.0.0.1:5432/postgres}
PG_CA=${PG_CA:-${UMBRA_TEST_POSTGRES_CA:-}}
WORK=$(mktemp -d)
PIDS=()

cleanup() {
    stop_all
    rm -rf "$WORK"
}
trap cleanup EXIT

# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
need mosquitto mosquitto
need psql postgresql
need jq jq
need curl curl
need /usr/bin/time time

if [ "$(id -u)" = 0 ] && command -v pg_lsclusters >/dev/null; then
    read -r pg_version pg_cluster _ < <(pg_lsclusters --no-header | head -n 1)
    pg_ctlcluster "$pg_version" "$pg_cluster" status >/dev/null ||
        pg_ctlcluster "$pg_version" "$pg_cluster" start
    runuser -u postgres -- psql -q -v ON_ERROR_STOP=1 -c "DO \$\$ BEGIN
      IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'umbra') THEN
        CREATE ROLE umbra LOGIN CREATEDB PASSWORD 'umbra';
      END IF; END \$\$"
fi

(cd "$ROOT" && cargo build --release -q -p umbra-broker -p device-sim)

# A fresh database for one run; prints its URL.
database() {
    local name="umbra_bench_$1"
    psql -q "$PG_ADMIN" -c "DROP DATABASE IF EXISTS $name WITH (FORCE)" -c "CREATE DATABASE $name" >/dev/null
    echo "${PG_ADMIN%/*}/$name"
}

# Mosquitto on PORT, republishing shadow requests under shadow-requests/ (Mosquitto 2.0 does not
# deliver $-topics to shared subscriptions; see the README's "Attach mode").
start_mosquitto() {
    local port=$1
    cat >"$WORK/mosquitto.conf" <<EOF
listener $port 127.0.0.1
allow_anonymous true
max_connections -1
max_queued_messages 100000
max_inflight_messages 1000
connection shadow-requests
address 127.0.0.1:$port
cleansession false
bridge_protocol_version mqttv50
try_private false
topic +/shadow/+ out 1 \$aws/things/ shadow-requests/
topic +/shadow/name/+/+ out 1 \$aws/things/ shadow-requests/
EOF
    mosquitto -c "$WORK/mosquitto.conf" >"$WORK/mosquitto.log" 2>&1 &
    PIDS+=($!)
    until grep -q "Opening ipv4 listen socket" "$WORK/mosquitto.log"; do sleep 0.1; done
}

# An Umbra node: NAME, then its umbra arguments; waits for /readyz.
start_umbra() {
    local name=$1
    shift
    local http
    http=$(free_port)
    mkdir -p "$WORK/$name"
    "$UMBRA" --data-dir "$WORK/$name" --http-addr "127.0.0.1:$http" "$@" >"$WORK/$name.log" 2>&1 &
    PIDS+=($!)
    until curl -sf "http://127.0.0.1:$http/readyz" >/dev/null; do sleep 0.1; done
}

# An attached node's configuration: NAME STORE_URL (empty: SQLite) MOSQUITTO_PORT [STORE_CA].
attach_config() {
    local file="$WORK/$1.toml"
    {
        echo "[shadow]"
        echo "requests_per_second = 0"
        echo "max_in_flight = 0"
        if [ -n "$2" ]; then
            echo "[store]"
            echo "url = \"$2\""
            if [ -n "${4:-}" ]; then echo "ca_file = \"$4\""; fi
        fi
        echo "[mqtt]"
        echo "attach = \"mqtt://127.0.0.1:$3\""
        echo "[mqtt.attach_client]"
        echo "client_id = \"umbra-$1\""
        echo "request_prefix = \"shadow-requests/\""
        echo "receive_maximum = 1024"
    } >"$file"
    echo "$file"
}

# Stops what was started, newest first (Umbra's nodes before the broker they attach to).
stop_all() {
    local i
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        kill "${PIDS[$i]}" 2>/dev/null || true
        wait "${PIDS[$i]}" 2>/dev/null || true
    done
    PIDS=()
}

# CPU seconds (user + system) of the processes named NAME so far, summed.
cpu_of() {
    { ps -C "$1" -o cputimes= 2>/dev/null || true; } | awk '{s += $1} END {print s + 0}'
}

# RUN BROKER_URL: the shadow benchmark's JSON into $WORK/RUN.json, and the CPU seconds each
# program spent during it into $WORK/RUN.cpu.
measure() {
    local before=() name
    for name in umbra mosquitto postgres; do before+=("$(cpu_of "$name")"); done
    /usr/bin/time -f "%U %S" -o "$WORK/$1.sim.time" \
        "$SIM" bench shadow --broker "$2" --devices "$DEVICES" --inflight "$INFLIGHT" --ramp 1000 \
        --duration "$DURATION" --prefix "$1-" --json >"$WORK/$1.json" 2>"$WORK/$1.sim.log"
    local i=0 cpu=()
    for name in umbra mosquitto postgres; do
        cpu+=("$(($(cpu_of "$name") - before[i]))")
        i=$((i + 1))
    done
    cpu+=("$(awk '{printf "%d", $1 + $2}' "$WORK/$1.sim.time")")
    echo "${cpu[*]}" >"$WORK/$1.cpu"
}

# The reference: one node on SQLite with its own broker (devices connect to Umbra).
port=$(free_port)
config="$WORK/embedded.toml"
printf '[shadow]\nrequests_per_second = 0\nmax_in_flight = 0\n' >"$config"
start_umbra embedded --config "$config" --mqtt-addr "127.0.0.1:$port" --ws-addr 127.0.0.1:0
measure embedded "mqtt://127.0.0.1:$port"
stop_all

# One node on SQLite, attached to Mosquitto.
port=$(free_port)
start_mosquitto "$port"
start_umbra sqlite-1 --config "$(attach_config sqlite-1 "" "$port")"
measure sqlite-1 "mqtt://127.0.0.1:$port"
stop_all

# One node on PostgreSQL, attached.
port=$(free_port)
start_mosquitto "$port"
url=$(database pg1)
start_umbra pg-1 --config "$(attach_config pg-1 "$url" "$port")"
measure pg-1 "mqtt://127.0.0.1:$port"
stop_all

# One node on PostgreSQL over TLS, attached.
if [ -n "$PG_CA" ]; then
    port=$(free_port)
    start_mosquitto "$port"
    url=$(database pg1tls)
    start_umbra pg-1-tls --config "$(attach_config pg-1-tls "$url" "$port" "$PG_CA")"
    measure pg-1-tls "mqtt://127.0.0.1:$port"
    stop_all
fi

# Two nodes on one PostgreSQL database, attached to one Mosquitto.
port=$(free_port)
start_mosquitto "$port"
url=$(database pg2)
start_umbra pg-2a --config "$(attach_config pg-2a "$url" "$port")"
start_umbra pg-2b --config "$(attach_config pg-2b "$url" "$port")"
measure pg-2 "mqtt://127.0.0.1:$port"
stop_all

row() {
    local name=$1 what=$2 j="$WORK/$1.json"
    local cpu
    read -r -a cpu <"$WORK/$name.cpu"
    printf '| %s | %.0f | %s | %s | %s | %s | %s / %s / %s / %s |\n' "$what" \
        "$(jq '.rates["accepted (durable updates)"] // 0' "$j")" \
        "$(jq -r '.latency["update->accepted"].p50_ms // "n/a"' "$j")" \
        "$(jq -r '.latency["update->accepted"].p99_ms // "n/a"' "$j")" \
        "$(jq -c '.rejected' "$j")" \
        "$(jq '.counts.unanswered // 0' "$j")" \
        "${cpu[0]}" "${cpu[1]}" "${cpu[2]}" "${cpu[3]}"
}

{
    echo "# Scale-out: durable shadow updates, one and two nodes"
    echo
    echo "\`bench/scale_out.sh\` on $(date -u +%F) at \`$(git -C "$ROOT" rev-parse --short HEAD)\`:"
    echo "$(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)),"
    echo "$(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -sr);"
    echo "$(mosquitto -h 2>/dev/null | head -n 1), $(psql --version)."
    echo "$DEVICES devices, each updating its own shadow with $INFLIGHT updates in flight, for $DURATION;"
    echo "durable updates are the \`update/accepted\` answers, each committed before it was sent."
    echo "CPU seconds are each program's during the window (all its processes; whole seconds), out of"
    echo "$(nproc) cores × the window."
    echo
    echo "| setup | durable updates/s | p50 ms | p99 ms | rejected | unanswered | CPU s: umbra / mosquitto / postgres / device-sim |"
    echo "|---|---|---|---|---|---|---|"
    row embedded "one node, SQLite, its own broker"
    row sqlite-1 "one node, SQLite, attached to Mosquitto"
    row pg-1 "one node, PostgreSQL, attached to Mosquitto"
    if [ -n "$PG_CA" ]; then row pg-1-tls "one node, PostgreSQL over TLS, attached to Mosquitto"; fi
    row pg-2 "two nodes, one PostgreSQL, attached to one Mosquitto"
} >"$OUT"
cat "$OUT"
