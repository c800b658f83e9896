#!/usr/bin/env bash
# bench/compare.sh — run the same device-sim workloads against Mosquitto and (with UMBRA_BIN)
# Umbra on free local ports, sample each broker's RSS, and write bench/RESULTS.md.
#
# Usage: bench/compare.sh                    # Mosquitto only
#        UMBRA_BIN=target/release/umbra bench/compare.sh
# Knobs (env): DURATION=10s  CONN_DEVICES=5000  OUT=bench/RESULTS.md  DEVICE_SIM=path
#
# All traffic stays on 127.0.0.1; every run is bounded by DURATION.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DURATION=${DURATION:-10s}
CONN_DEVICES=${CONN_DEVICES:-5000}
OUT=${OUT:-$ROOT/bench/RESULTS.md}
SIM=${DEVICE_SIM:-$ROOT/target/release/device-sim}
UMBRA_BIN=${UMBRA_BIN:-}
WORK=$(mktemp -d)
PIDS=()

cleanup() {
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

need() {
    command -v "$1" >/dev/null && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && apt-get install -y -qq "$2" >/dev/null
    else
        echo "compare.sh: $1 missing (install $2)" >&2
        exit 1
    fi
}
need mosquitto mosquitto
need jq jq

if [ -z "${DEVICE_SIM:-}" ]; then
    (cd "$ROOT" && cargo build --release -p device-sim >&2)
fi
# Thousands of sockets per process.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# A port nothing listens on (a connect that fails); the short race with others is accepted.
free_port() {
    local port
    while :; do
        port=$((20000 + RANDOM % 12000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return
        fi
    done
}

# Waits (bounded) until something accepts connections on the port.
wait_port() {
    local i
    for i in $(seq 1 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    echo "compare.sh: nothing listening on port $1" >&2
    return 1
}

rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

# Samples the peak RSS of PID into FILE every 100 ms until the file STOP exists.
sample_peak() {
    local pid=$1 file=$2 stop=$3 peak=0 now
    while [ ! -e "$stop" ] && kill -0 "$pid" 2>/dev/null; do
        now=$(rss_kb "$pid")
        [ "${now:-0}" -gt "$peak" ] && peak=$now
        echo "$peak" >"$file"
        sleep 0.1
    done
}

start_mosquitto() {
    local port=$1 conf="$WORK/mosquitto-$1.conf"
    printf 'listener %s 127.0.0.1\nallow_anonymous true\nmax_connections -1\nmax_queued_messages 1000\n' "$port" >"$conf"
    mosquitto -c "$conf" >"$WORK/mosquitto-$port.log" 2>&1 &
    BROKER_PID=$!
    PIDS+=("$BROKER_PID")
    wait_port "$port"
}

start_umbra() {
    local port=$1 data="$WORK/umbra-data-$1"
    mkdir -p "$data"
    "$UMBRA_BIN" --mqtt-addr "127.0.0.1:$port" --data-dir "$data" \
        --ws-addr "127.0.0.1:$(free_port)" --http-addr "127.0.0.1:$(free_port)" \
        >"$WORK/umbra-$port.log" 2>&1 &
    BROKER_PID=$!
    PIDS+=("$BROKER_PID")
    wait_port "$port"
}

stop_broker() {
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

# run_workload BROKER NAME PID URL -- device-sim args...
run_workload() {
    local broker=$1 name=$2 pid=$3 url=$4
    shift 5
    local json="$WORK/$broker-$name.json" peak="$WORK/$broker-$name.peak" stop="$WORK/$broker-$name.stop"
    echo "== $broker / $name" >&2
    sample_peak "$pid" "$peak" "$stop" &
    local sampler=$!
    if ! "$SIM" "$@" --broker "$url" --json --quiet >"$json" 2>"$WORK/$broker-$name.err"; then
        echo "compare.sh: device-sim failed on $broker/$name:" >&2
        tail -5 "$WORK/$broker-$name.err" >&2
        echo '{}' >"$json"
    fi
    touch "$stop"
    wait "$sampler" 2>/dev/null || true
    tail -20 "$WORK/$broker-$name.err" >&2
}

WORKLOADS=(
    "p2p-100|bench relay --mode p2p --publishers 100 --subscribers 100 --qos 1 --payload 64 --rate max --duration $DURATION"
    "p2p-1k|bench relay --mode p2p --publishers 1000 --subscribers 1000 --qos 1 --payload 64 --rate max --duration $DURATION"
    "p2p-1k-at-10k|bench relay --mode p2p --publishers 1000 --subscribers 1000 --qos 1 --payload 64 --rate 10/s --duration $DURATION"
    "idle-$CONN_DEVICES|fleet --devices $CONN_DEVICES --ramp 2000 --telemetry-interval 0s --duration $DURATION"
)

BROKERS=(mosquitto)
[ -n "$UMBRA_BIN" ] && BROKERS+=(umbra)

for broker in "${BROKERS[@]}"; do
    port=$(free_port)
    "start_$broker" "$port"
    pid=$BROKER_PID
    sleep 1 # let start-up allocations settle before the idle figure
    rss_kb "$pid" >"$WORK/$broker.idle"
    for workload in "${WORKLOADS[@]}"; do
        name=${workload%%|*}
        # shellcheck disable=SC2086
        run_workload "$broker" "$name" "$pid" "mqtt://127.0.0.1:$port" -- ${workload#*|}
    done
    stop_broker "$pid"
done

# ---------------------------------------------------------------- report
field() { jq -r "$2 // empty" "$1" 2>/dev/null; }
fmt() { [ -n "$1" ] && printf '%.1f' "$1" || printf 'n/a'; }
ratio() { # umbra / mosquitto
    awk -v u="${1:-}" -v m="${2:-}" 'BEGIN { if (u != "" && m + 0 > 0) printf "%.2f×", u / m; else printf "n/a" }'
}

row() { # row BROKER NAME
    local json="$WORK/$1-$2.json" peak
    peak=$(cat "$WORK/$1-$2.peak" 2>/dev/null || echo "")
    printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$1" "$2" \
        "$(fmt "$(field "$json" .messages_out_per_s)")" \
        "$(fmt "$(field "$json" .messages_in_per_s)")" \
        "$(field "$json" .counts.sent)" "$(field "$json" .counts.received)" "$(field "$json" .counts.lost)" \
        "$(fmt "$(field "$json" '.latency["end-to-end"].p50_ms')")" \
        "$(fmt "$(field "$json" '.latency["end-to-end"].p99_ms')")" \
        "$(fmt "$(field "$json" '.latency["end-to-end"].max_ms')")" \
        "$(awk -v k="${peak:-0}" 'BEGIN { printf "%.1f", k / 1024 }')"
}

{
    echo "# Umbra vs Mosquitto: device-sim workloads"
    echo
    echo "Generated by \`bench/compare.sh\` on $(date -u +%Y-%m-%dT%H:%M:%SZ)."
    echo "Commit \`$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)\`$(git -C "$ROOT" diff --quiet 2>/dev/null || echo ' (with local changes)')."
    echo "Broker and load generator share the machine; every run lasts $DURATION. Figures move"
    echo "by up to 2× between runs when other work (e.g. cargo builds) shares the 2 cores: compare"
    echo "brokers from the same run only."
    echo
    echo "## Machine"
    echo
    echo '```'
    lscpu | grep -E '^(Architecture|CPU\(s\)|Model name|Thread|Core|Socket|CPU max MHz|L2|L3)' || true
    free -h | head -2
    uname -srm
    echo "mosquitto: $(mosquitto -h 2>/dev/null | head -1)"
    echo '```'
    echo
    echo "## Relay (QoS 1, 64-byte payload; \`max\` = closed loop, 100 in flight per publisher)"
    echo
    echo "| broker | workload | msgs/s out | msgs/s in | sent | received | lost | p50 ms | p99 ms | max ms | peak RSS MiB |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    for broker in "${BROKERS[@]}"; do
        for workload in "${WORKLOADS[@]}"; do
            name=${workload%%|*}
            case $name in p2p-*) row "$broker" "$name" ;; esac
        done
    done
    echo
    echo "## Memory"
    echo
    echo "| broker | idle RSS MiB | $CONN_DEVICES idle devices: peak RSS MiB | KiB per connection | peak connected |"
    echo "|---|---:|---:|---:|---:|"
    for broker in "${BROKERS[@]}"; do
        idle=$(cat "$WORK/$broker.idle")
        peak=$(cat "$WORK/$broker-idle-$CONN_DEVICES.peak" 2>/dev/null || echo 0)
        connected=$(field "$WORK/$broker-idle-$CONN_DEVICES.json" .peak_connected)
        per=$(awk -v p="$peak" -v i="$idle" -v n="${connected:-0}" 'BEGIN { if (n > 0) printf "%.2f", (p - i) / n; else printf "n/a" }')
        printf '| %s | %.1f | %.1f | %s | %s |\n' "$broker" \
            "$(awk -v k="$idle" 'BEGIN { print k / 1024 }')" \
            "$(awk -v k="$peak" 'BEGIN { print k / 1024 }')" "$per" \
            "${connected:-n/a}"
    done
    if [ -n "$UMBRA_BIN" ]; then
        echo
        echo "## Umbra / Mosquitto"
        echo
        echo "| workload | msgs/s in | p99 latency | peak RSS |"
        echo "|---|---:|---:|---:|"
        for workload in "${WORKLOADS[@]}"; do
            name=${workload%%|*}
            u="$WORK/umbra-$name.json"
            m="$WORK/mosquitto-$name.json"
            printf '| %s | %s | %s | %s |\n' "$name" \
                "$(ratio "$(field "$u" .messages_in_per_s)" "$(field "$m" .messages_in_per_s)")" \
                "$(ratio "$(field "$u" '.latency["end-to-end"].p99_ms')" "$(field "$m" '.latency["end-to-end"].p99_ms')")" \
                "$(ratio "$(cat "$WORK/umbra-$name.peak" 2>/dev/null)" "$(cat "$WORK/mosquitto-$name.peak" 2>/dev/null)")"
        done
        printf '| idle | | | %s |\n' "$(ratio "$(cat "$WORK/umbra.idle")" "$(cat "$WORK/mosquitto.idle")")"
    else
        echo
        echo "Umbra was not run (set \`UMBRA_BIN\` to its binary for the comparison and ratios)."
    fi
    echo
    echo "## Workloads"
    echo
    for workload in "${WORKLOADS[@]}"; do
        echo "- \`${workload%%|*}\`: \`device-sim ${workload#*|} --json\`"
    done
    echo
    echo "sent = publishes the broker acknowledged (PUBACK); lost = expected − received after a"
    echo "drain of up to 10 s; latency is publish call → subscriber receipt (one process, one clock)."
    echo "RSS is the broker's VmRSS sampled every 100 ms; KiB per connection = (peak − idle) / connected."
    echo
    echo "## Raw summaries"
    for broker in "${BROKERS[@]}"; do
        for workload in "${WORKLOADS[@]}"; do
            name=${workload%%|*}
            echo
            echo "<details><summary>$broker / $name</summary>"
            echo
            echo '```json'
            jq -c . "$WORK/$broker-$name.json" 2>/dev/null || echo '{}'
            echo '```'
            echo "</details>"
        done
    done
} >"$OUT"
echo "wrote $OUT" >&2
