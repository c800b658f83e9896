#!/usr/bin/env bash
# bench/compare.sh — Umbra and Mosquitto side by side under the same device-sim workloads, on
# free loopback ports of this machine; writes bench/RESULTS.md. One command: it builds Umbra and
# device-sim (release) and installs Mosquitto (Debian package) when it can.
#
# Usage: bench/compare.sh
# Knobs (env): DURATION=10s (relay and shadow windows)  DEVICES=10000 (idle and delta fleets)
#              BIG=19000 (the largest idle fleet, split over two device-sim processes, connecting
#              at CONNECT_RATE=5000/s in all)  DELTA_RATE=5000 (operator changes/s)  OUT=bench/RESULTS.md
#              CARGO_TARGET_DIR (where the release binaries are built)
#              PORT_RANGE="10000 65000" (the local ephemeral port range set for the run when root;
#              PORT_RANGE=keep leaves the system's. With Linux's default 32768-60999, connect() from
#              one source address to one broker address slows by seconds beyond ~14,000 sockets:
#              19,000 devices at 2,000 connects/s measured a p99 of 2.1 s to the first answer with
#              it and 16 ms with 10000-65000. Real devices connect from many hosts.)
#              ONLY=relay,idle,big,delta,shadow,flood (a subset of the workload groups; the report
#              shows n/a for the others, so write it elsewhere with OUT=...)
#
# Everything stays on 127.0.0.1 and every run is bounded; the whole script takes ~5 minutes.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DURATION=${DURATION:-10s}
DEVICES=${DEVICES:-10000}
BIG=${BIG:-19000}
CONNECT_RATE=${CONNECT_RATE:-5000}
DELTA_RATE=${DELTA_RATE:-5000}
OUT=${OUT:-$ROOT/bench/RESULTS.md}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
SIM=$TARGET/release/device-sim
UMBRA=$TARGET/release/umbra
WORK=$(mktemp -d)
PIDS=()
PORT_RANGE=${PORT_RANGE:-10000 65000}
RANGE_FILE=/proc/sys/net/ipv4/ip_local_port_range
SAVED_RANGE=""

cleanup() {
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    [ -z "$SAVED_RANGE" ] || echo "$SAVED_RANGE" >"$RANGE_FILE" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
need mosquitto mosquitto
need jq jq
need curl curl

echo "== building umbra and device-sim (release)" >&2
(cd "$ROOT" && cargo build --release -p umbra-broker -p device-sim >&2)
# Thousands of sockets per process.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ "$(ulimit -n)" -lt $((BIG + 500)) ]; then
    echo "compare.sh: open-files limit $(ulimit -n) is below $((BIG + 500))" >&2
    exit 1
fi

if [ "$PORT_RANGE" != keep ] && [ -w "$RANGE_FILE" ]; then
    SAVED_RANGE=$(tr -s '\t ' ' ' <"$RANGE_FILE")
    echo "$PORT_RANGE" >"$RANGE_FILE"
fi

# Waits (bounded) until something accepts connections on the port.
wait_port() {
    local i
    for i in $(seq 1 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    echo "compare.sh: nothing listening on port $1" >&2
    tail -5 "$WORK"/*-"$1".log >&2 2>/dev/null || true
    return 1
}

rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

# Samples the peak RSS of PID into FILE every 100 ms until the file STOP exists; keeps the
# broker's smaps_rollup at the peak in FILE.smaps.
sample_peak() {
    local pid=$1 file=$2 stop=$3 peak=0 now
    while [ ! -e "$stop" ] && kill -0 "$pid" 2>/dev/null; do
        now=$(rss_kb "$pid")
        if [ "${now:-0}" -gt "$peak" ]; then
            peak=$now
            cat "/proc/$pid/smaps_rollup" >"$file.smaps" 2>/dev/null || true
        fi
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

# start_umbra PORT [EXTRA-TOML]
start_umbra() {
    local port=$1 data="$WORK/umbra-data-$1" conf="$WORK/umbra-$1.toml"
    mkdir -p "$data"
    {
        printf '[mqtt.edge]\nprivileged_clients = ["umbra-operator"]\n'
        printf '[mqtt.router]\nmax_connections = %d\n' $((BIG + 1000))
        printf '%b' "${2:-}"
    } >"$conf"
    UMBRA_HTTP=$(free_port)
    "$UMBRA" --config "$conf" --mqtt-addr "127.0.0.1:$port" --data-dir "$data" \
        --ws-addr "127.0.0.1:$(free_port)" --http-addr "127.0.0.1:$UMBRA_HTTP" >"$WORK/umbra-$port.log" 2>&1 &
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
    local base="$WORK/$broker-$name"
    echo "== $broker / $name (load $(loadavg))" >&2
    loadavg >"$base.load"
    sample_peak "$pid" "$base.peak" "$base.stop" &
    local sampler=$!
    if ! "$SIM" "$@" --broker "$url" --json --quiet >"$base.json" 2>"$base.err"; then
        echo "compare.sh: device-sim failed on $broker/$name:" >&2
        tail -5 "$base.err" >&2
        echo '{}' >"$base.json"
    fi
    touch "$base.stop"
    wait "$sampler" 2>/dev/null || true
    grep -v '^\(==\|measured\|messages\|connects\|peak\|latency\|  \|errors: none\)' "$base.err" | tail -5 >&2 || true
}

# run_split BROKER NAME PID URL N -- fleet args...: N devices over two device-sim processes (one
# process holds at most ~19,000 sockets here), each ramping at CONNECT_RATE/2; NAME.json merges
# their summaries (connected and errors added, latency percentiles the worse of the two).
run_split() {
    local broker=$1 name=$2 pid=$3 url=$4 n=$5
    shift 6
    local base="$WORK/$broker-$name" half=$((n / 2)) ramp=$((CONNECT_RATE / 2)) a b
    echo "== $broker / $name, $n devices in two processes (load $(loadavg))" >&2
    loadavg >"$base.load"
    sample_peak "$pid" "$base.peak" "$base.stop" &
    local sampler=$!
    "$SIM" fleet "$@" --devices "$half" --first 0 --ramp "$ramp" --broker "$url" --json --quiet >"$base.a.json" 2>"$base.a.err" &
    a=$!
    "$SIM" fleet "$@" --devices $((n - half)) --first "$half" --ramp "$ramp" --broker "$url" --json --quiet >"$base.b.json" 2>"$base.b.err" &
    b=$!
    wait "$a" || echo '{}' >"$base.a.json"
    wait "$b" || echo '{}' >"$base.b.json"
    touch "$base.stop"
    wait "$sampler" 2>/dev/null || true
    jq -s '{
        peak_connected: ([.[].peak_connected // 0] | add),
        errors: ([.[] | (.errors // {}) | to_entries[]] | group_by(.key) | map({key: .[0].key, value: (map(.value) | add)}) | from_entries),
        counts: {devices_synced: ([.[].counts.devices_synced // 0] | add)},
        latency: (. as $runs | ["connect->subscribed", "connect->first answer"] | map({key: ., value: (. as $s
            | ["p50_ms", "p90_ms", "p99_ms", "max_ms"] as $q | [$runs[].latency[$s] // empty] as $l
            | if ($l | length) == 0 then null else ($q | map({key: ., value: ([$l[][.]] | max)}) | from_entries) + {count: ([$l[].count] | add)} end)}) | from_entries)
    }' "$base.a.json" "$base.b.json" >"$base.json" 2>/dev/null || echo '{}' >"$base.json"
}

RELAY=(
    "p2p-100|bench relay --mode p2p --publishers 100 --subscribers 100 --qos 1 --payload 64 --rate max --duration $DURATION"
    "p2p-1k|bench relay --mode p2p --publishers 1000 --subscribers 1000 --qos 1 --payload 64 --rate max --duration $DURATION"
)
# The 10,000-device fleets, and a fifth of each (same per-device rates) for context.
SMALL=$((DEVICES / 5))
IDLE=(
    "idle-$DEVICES|fleet --devices $DEVICES --ramp 2500 --telemetry-interval 0s --duration 12s"
)
# The largest fleet one broker process can hold here, connecting at CONNECT_RATE/s.
IDLE_BIG="idle-$BIG|fleet --telemetry-interval 0s --duration 15s"
DELTA=(
    "delta-$DEVICES|fleet --devices $DEVICES --ramp 2500 --telemetry-interval 0s --actuation-delay 0s --operator-rate $DELTA_RATE/s --duration 25s"
    "delta-$SMALL|fleet --devices $SMALL --ramp 400 --telemetry-interval 0s --actuation-delay 0s --operator-rate $((DELTA_RATE / 5))/s --duration 25s"
)
SHADOW=(
    "shadow-full|bench shadow --devices 400 --inflight 8 --ramp 2000 --duration $DURATION"
    "shadow-normal|bench shadow --devices 400 --inflight 8 --ramp 2000 --duration $DURATION"
    "shadow-full-all-answers|bench shadow --devices 400 --inflight 8 --ramp 2000 --duration $DURATION --all-answers"
)

# One device flooding its shadow at QoS 0 next to 20 devices updating four times a second
# (default per-thing limits; ~800 samples, so that p99 is not just the slowest two): the calm
# devices' figures without and with the flood.
FLOOD=(
    "flood-off|bench shadow --devices 20 --inflight 1 --interval 250ms --ramp 100 --duration $DURATION"
    "flood-on|bench shadow --devices 20 --inflight 1 --interval 250ms --ramp 100 --duration $DURATION --flood"
)

# want GROUP: whether ONLY (when set) names the workload group.
want() { [ -z "${ONLY:-}" ] || [[ ",$ONLY," == *",$1,"* ]]; }
want relay || RELAY=()
want idle || IDLE=()
want delta || DELTA=()
want shadow || SHADOW=()
want flood || FLOOD=()

# The disk every Umbra answer waits for (its data directories are under $WORK).
DISK=$(python3 "$ROOT/bench/fsync_probe.py" "$WORK" 10 2>/dev/null || echo "fsync probe not run (python3 missing)")
START_LOAD=$(loadavg)
for broker in mosquitto umbra; do
    if [ ${#RELAY[@]} -gt 0 ]; then
        port=$(free_port)
        "start_$broker" "$port"
        pid=$BROKER_PID
        for workload in "${RELAY[@]}"; do
            # shellcheck disable=SC2086
            run_workload "$broker" "${workload%%|*}" "$pid" "mqtt://127.0.0.1:$port" -- ${workload#*|}
        done
        stop_broker "$pid"
    fi
    # Idle fleets on a fresh broker each, so that the relay's memory is not counted.
    for workload in "${IDLE[@]}"; do
        name=${workload%%|*}
        port=$(free_port)
        "start_$broker" "$port"
        sleep 1
        rss_kb "$BROKER_PID" >"$WORK/$broker-$name.before"
        # shellcheck disable=SC2086
        run_workload "$broker" "$name" "$BROKER_PID" "mqtt://127.0.0.1:$port" -- ${workload#*|}
        stop_broker "$BROKER_PID"
    done
    want big || continue
    name=${IDLE_BIG%%|*}
    port=$(free_port)
    "start_$broker" "$port"
    sleep 1
    rss_kb "$BROKER_PID" >"$WORK/$broker-$name.before"
    args=${IDLE_BIG#*|}
    # shellcheck disable=SC2086
    run_split "$broker" "$name" "$BROKER_PID" "mqtt://127.0.0.1:$port" "$BIG" -- ${args#fleet }
    # Umbra's own counters (connect timeouts, store commits) after the connect storm.
    [ "$broker" = mosquitto ] || curl -sf "http://127.0.0.1:$UMBRA_HTTP/metrics" >"$WORK/umbra-$name.metrics" || true
    stop_broker "$BROKER_PID"
done

# Shadow workloads: Umbra only (Mosquitto has no shadow service). A fresh server each, so that
# the delta run starts with 10,000 connections on an otherwise empty broker.
for workload in "${DELTA[@]}"; do
    port=$(free_port)
    start_umbra "$port"
    # shellcheck disable=SC2086
    run_workload umbra "${workload%%|*}" "$BROKER_PID" "mqtt://127.0.0.1:$port" -- ${workload#*|}
    stop_broker "$BROKER_PID"
done
for workload in "${SHADOW[@]}"; do
    name=${workload%%|*}
    sync=${name#shadow-}
    sync=${sync%%-*}
    port=$(free_port)
    # The per-thing limit (20/s) is lifted to measure the service, not the throttle.
    start_umbra "$port" "[shadow]\nrequests_per_second = 0\n[store]\nsynchronous = \"$sync\"\n"
    # shellcheck disable=SC2086
    run_workload umbra "$name" "$BROKER_PID" "mqtt://127.0.0.1:$port" -- ${workload#*|}
    stop_broker "$BROKER_PID"
done
for workload in "${FLOOD[@]}"; do
    port=$(free_port)
    start_umbra "$port"
    # shellcheck disable=SC2086
    run_workload umbra "${workload%%|*}" "$BROKER_PID" "mqtt://127.0.0.1:$port" -- ${workload#*|}
    stop_broker "$BROKER_PID"
done
END_LOAD=$(loadavg)

# ---------------------------------------------------------------- report
field() { jq -r "$2 // empty" "$1" 2>/dev/null || true; }
num() { [ -n "$1" ] && printf "%.${2:-1}f" "$1" || printf 'n/a'; }
ratio() { # umbra / mosquitto
    awk -v u="${1:-}" -v m="${2:-}" 'BEGIN { if (u != "" && m + 0 > 0) printf "%.2f×", u / m; else printf "n/a" }'
}
mib() { awk -v k="${1:-0}" 'BEGIN { printf "%.1f", k / 1024 }'; }
peak() { cat "$WORK/$1-$2.peak" 2>/dev/null || echo ""; }
lat() { # lat JSON SERIES -> "p50 | p90 | p99 | max"
    local q out=""
    for q in p50_ms p90_ms p99_ms max_ms; do
        out+="$(num "$(field "$1" ".latency[\"$2\"].$q")" 2) | "
    done
    printf '%s' "${out% | }"
}
per_conn() { # per_conn BROKER N -> KiB per connection at the idle fleet's peak
    local idle peak connected
    idle=$(cat "$WORK/$1-idle-$2.before" 2>/dev/null || echo 0)
    peak=$(peak "$1" "idle-$2")
    connected=$(field "$WORK/$1-idle-$2.json" .peak_connected)
    awk -v p="${peak:-0}" -v i="$idle" -v n="${connected:-0}" 'BEGIN { if (n > 0) printf "%.2f", (p - i) / n; else printf "" }'
}
goal() { awk -v v="${1:-}" -v g="$2" -v dir="$3" 'BEGIN {
    if (v == "") { print "n/a"; exit }
    ok = (dir == "min") ? (v + 0 >= g) : (v + 0 <= g); print ok ? "met" : "**missed**" }'; }

M=mosquitto U=umbra
relay_in() { field "$WORK/$1-$2.json" .messages_in_per_s; }
UMBRA_KIB=$(per_conn umbra "$DEVICES")
MOSQ_KIB=$(per_conn mosquitto "$DEVICES")
UMBRA_KIB_BIG=$(per_conn umbra "$BIG")
MOSQ_KIB_BIG=$(per_conn mosquitto "$BIG")
UMBRA_IDLE_CONNECTED=$(field "$WORK/umbra-idle-$DEVICES.json" .peak_connected)
UMBRA_BIG_CONNECTED=$(field "$WORK/umbra-idle-$BIG.json" .peak_connected)
UMBRA_BIG_ERRORS=$(jq '[.errors // {} | to_entries[] | .value] | add // 0' "$WORK/umbra-idle-$BIG.json" 2>/dev/null || true)
FIRST_ANSWER_P99=$(field "$WORK/umbra-idle-$BIG.json" '.latency["connect->first answer"].p99_ms')
FIRST_ANSWER_P50=$(field "$WORK/umbra-idle-$BIG.json" '.latency["connect->first answer"].p50_ms')
subscribed() { # subscribed BROKER -> "p99 ms (p50 ms)" of connect + SUBACK in the big run
    local j="$WORK/$1-idle-$BIG.json"
    printf '%s ms (p50 %s ms)' "$(num "$(field "$j" '.latency["connect->subscribed"].p99_ms')" 1)" "$(num "$(field "$j" '.latency["connect->subscribed"].p50_ms')" 1)"
}
counter() { awk -v m="$2" '$1 == m { print $2 }' "$WORK/umbra-idle-$BIG.metrics" 2>/dev/null || true; }
BIG_TIMEOUTS=$(counter umbra umbra_mqtt_connect_timeouts_total)
DELTA_SMALL_P99=$(field "$WORK/umbra-delta-$SMALL.json" '.latency["desired->delta"].p99_ms')
RELAY_RATIO=$(awk -v u="$(relay_in $U p2p-1k)" -v m="$(relay_in $M p2p-1k)" 'BEGIN { if (m > 0) printf "%.2f", u / m }')
SHADOW_RATE=$(field "$WORK/umbra-shadow-full.json" '.rates["accepted (durable updates)"]')
DELTA_P99=$(field "$WORK/umbra-delta-$DEVICES.json" '.latency["desired->delta"].p99_ms')
RELAY_RSS_MIB=$(mib "$(peak $U p2p-1k)")
DELTA_COUNT=$(field "$WORK/umbra-delta-$DEVICES.json" '.latency["desired->delta"].count')
FLOOD_OFF_P99=$(field "$WORK/umbra-flood-off.json" '.latency["update->accepted"].p99_ms')
FLOOD_ON_P99=$(field "$WORK/umbra-flood-on.json" '.latency["update->accepted"].p99_ms')
FLOOD_RATIO=$(awk -v on="${FLOOD_ON_P99:-}" -v off="${FLOOD_OFF_P99:-}" 'BEGIN { if (off > 0 && on != "") printf "%.2f", on / off }')
FLOOD_BAD=$(jq '(.counts.rejected // 0) + (.counts.unanswered // 0)' "$WORK/umbra-flood-on.json" 2>/dev/null || true)
[ "${DELTA_COUNT:-0}" -gt 0 ] || DELTA_P99=""

{
    echo "# Umbra vs Mosquitto: device-sim workloads"
    echo
    echo "Generated by \`bench/compare.sh\` on $(date -u +%Y-%m-%dT%H:%M:%SZ), commit"
    echo "\`$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)\`$(git -C "$ROOT" diff --quiet HEAD -- broker shadow device-sim 2>/dev/null || echo ' (with local changes)')."
    echo "Load average (1/5/15 min) at the start: $START_LOAD; at the end: $END_LOAD; per workload below."
    echo "Broker and load generator share the machine's cores, so every figure is for both together;"
    echo "figures move by up to 2× between runs when other work shares the cores: compare brokers"
    echo "from the same run only."
    echo
    echo "## Machine"
    echo
    echo '```'
    lscpu | grep -E '^(Architecture|CPU\(s\)|Model name|Thread|Core|Socket|CPU max MHz|L2|L3)' || true
    free -h | head -2
    uname -srm
    echo "mosquitto: $(mosquitto -h 2>/dev/null | head -1)"
    echo "umbra: $("$UMBRA" --version 2>/dev/null)"
    echo "disk (bench/fsync_probe.py before the workloads): $DISK"
    echo "local ephemeral ports during the run: $(tr -s '\t ' ' ' <"$RANGE_FILE" 2>/dev/null)"
    echo '```'
    echo
    echo "## Goals"
    echo
    echo "| goal | target | Umbra | Mosquitto | |"
    echo "|---|---|---:|---:|---|"
    echo "| memory per idle device ($DEVICES devices; 5 \$aws subscriptions, one stored shadow) | ≤ 8 KiB | $(num "$UMBRA_KIB" 1) KiB ($UMBRA_IDLE_CONNECTED of $DEVICES connected) | $(num "$MOSQ_KIB" 1) KiB (no shadow) | $( [ "${UMBRA_IDLE_CONNECTED:-0}" -ge "$DEVICES" ] && goal "$UMBRA_KIB" 8 max || echo '**missed** (fleet did not connect)') |"
    echo "| ... with $BIG devices (two device-sim processes) | ≤ 8 KiB | $(num "$UMBRA_KIB_BIG" 1) KiB ($UMBRA_BIG_CONNECTED of $BIG connected) | $(num "$MOSQ_KIB_BIG" 1) KiB (no shadow) | $(goal "$UMBRA_KIB_BIG" 8 max) |"
    echo "| $BIG devices connecting at $CONNECT_RATE/s: connect failures | 0 | $UMBRA_BIG_ERRORS | $(jq '[.errors // {} | to_entries[] | .value] | add // 0' "$WORK/mosquitto-idle-$BIG.json" 2>/dev/null) | $(goal "$UMBRA_BIG_ERRORS" 0 max) |"
    echo "| ... connect + subscribe (SUBACK) p99 | | $(subscribed umbra) | $(subscribed mosquitto) | |"
    echo "| ... connect + subscribe + first \`get\` answer p99 | ≤ 50 ms | $(num "$FIRST_ANSWER_P99" 1) ms (p50 $(num "$FIRST_ANSWER_P50" 1) ms) | no shadow service | $(goal "$FIRST_ANSWER_P99" 50 max) |"
    echo "| desired→delta p99 at $DELTA_RATE/s, $DEVICES devices | ≤ 10 ms | $(num "$DELTA_P99" 2) ms ($(field "$WORK/umbra-delta-$DEVICES.json" .counts.devices_synced) of $DEVICES devices in sync) | no shadow service | $( [ -n "$DELTA_P99" ] && goal "$DELTA_P99" 10 max || echo '**missed** (not measurable)') |"
    echo "| ... at $((DELTA_RATE / 5))/s, $SMALL devices (same rate per device) | ≤ 10 ms | $(num "$DELTA_SMALL_P99" 2) ms | no shadow service | $(goal "$DELTA_SMALL_P99" 10 max) |"
    echo "| durable shadow updates/s end to end (synchronous = full) | ≥ 40,000 | $(num "$SHADOW_RATE" 0) | no shadow service | $(goal "$SHADOW_RATE" 40000 min) |"
    echo "| one device flooding: the 20 others' update p99 | ≤ 2× unflooded | $(num "$FLOOD_ON_P99" 2) ms vs $(num "$FLOOD_OFF_P99" 2) ms ($FLOOD_RATIO×; the flooder's client accepted $(field "$WORK/umbra-flood-on.json" .counts.flood_sent) QoS 0 updates) | no shadow service | $(goal "$FLOOD_RATIO" 2 max) |"
    echo "| ... their 429s and unanswered requests | 0 | ${FLOOD_BAD:-n/a} | no shadow service | $(goal "$FLOOD_BAD" 0 max) |"
    echo "| relay 1k→1k QoS 1, msgs/s received | ≥ 5× Mosquitto | $(num "$(relay_in $U p2p-1k)" 0) ($RELAY_RATIO×) | $(num "$(relay_in $M p2p-1k)" 0) | $(goal "$RELAY_RATIO" 5 min) |"
    echo "| RSS under relay load (1k→1k) | ≤ 200 MB | $RELAY_RSS_MIB MiB | $(mib "$(peak $M p2p-1k)") MiB | $(goal "$(awk -v k="$(peak $U p2p-1k)" 'BEGIN { print k * 1024 / 1e6 }')" 200 max) |"
    echo
    echo "## Relay (QoS 1, 64-byte payload, \`--rate max\`: closed loop, 100 in flight per publisher)"
    echo
    echo "| broker | workload | load avg | msgs/s out | msgs/s in | sent | received | lost | p50 ms | p90 ms | p99 ms | max ms | peak RSS MiB |"
    echo "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    for workload in "${RELAY[@]}"; do
        name=${workload%%|*}
        for broker in $M $U; do
            j="$WORK/$broker-$name.json"
            printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$broker" "$name" \
                "$(cat "$WORK/$broker-$name.load")" \
                "$(num "$(field "$j" .messages_out_per_s)" 0)" "$(num "$(field "$j" .messages_in_per_s)" 0)" \
                "$(field "$j" .counts.sent)" "$(field "$j" .counts.received)" "$(field "$j" .counts.lost)" \
                "$(lat "$j" end-to-end)" "$(mib "$(peak "$broker" "$name")")"
        done
    done
    echo
    echo "Umbra / Mosquitto:"
    echo
    echo "| workload | msgs/s in | p50 | p90 | p99 | max | peak RSS |"
    echo "|---|---:|---:|---:|---:|---:|---:|"
    for workload in "${RELAY[@]}"; do
        name=${workload%%|*}
        u="$WORK/umbra-$name.json" m="$WORK/mosquitto-$name.json"
        printf '| %s | %s |' "$name" "$(ratio "$(field "$u" .messages_in_per_s)" "$(field "$m" .messages_in_per_s)")"
        for q in p50_ms p90_ms p99_ms max_ms; do
            printf ' %s |' "$(ratio "$(field "$u" ".latency[\"end-to-end\"].$q")" "$(field "$m" ".latency[\"end-to-end\"].$q")")"
        done
        printf ' %s |\n' "$(ratio "$(peak umbra "$name")" "$(peak mosquitto "$name")")"
    done
    echo
    echo "## Memory per idle device connection (each device subscribed to its 5 shadow answer topics, telemetry off)"
    echo
    echo "| broker | devices | load avg | RSS before MiB | peak RSS MiB | KiB per device | peak connected | connect errors | anonymous / file-backed at peak |"
    echo "|---|---:|---|---:|---:|---:|---:|---:|---|"
    for n in "$DEVICES" "$BIG"; do
        for broker in $M $U; do
            s="$WORK/$broker-idle-$n.peak.smaps"
            j="$WORK/$broker-idle-$n.json"
            printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$broker" "$n" "$(cat "$WORK/$broker-idle-$n.load")" \
                "$(mib "$(cat "$WORK/$broker-idle-$n.before")")" "$(mib "$(peak "$broker" "idle-$n")")" \
                "$(num "$(per_conn "$broker" "$n")" 2)" "$(field "$j" .peak_connected)" \
                "$(jq '[.errors // {} | to_entries[] | .value] | add // 0' "$j" 2>/dev/null)" \
                "$(awk '/^Anonymous/ {a=$2} /^Rss/ {r=$2} END { printf "%.1f / %.1f MiB", a/1024, (r-a)/1024 }' "$s" 2>/dev/null)"
        done
    done
    echo
    echo "Umbra / Mosquitto per device: $(ratio "$UMBRA_KIB" "$MOSQ_KIB") at $DEVICES, $(ratio "$UMBRA_KIB_BIG" "$MOSQ_KIB_BIG") at $BIG."
    echo "The $BIG-device fleet is two device-sim processes (\`--first\`), $((CONNECT_RATE / 2)) connects/s each."
    echo "Umbra's counters after it: connect timeouts ${BIG_TIMEOUTS:-n/a}, connections accepted $(counter umbra umbra_mqtt_connections_accepted_total),"
    echo "store commits $(counter umbra umbra_store_commit_seconds_count) taking $(num "$(counter umbra umbra_store_commit_seconds_sum)" 2) s in all."
    echo "On Umbra each device also gets its shadow (get → 404 → first report), so the figure includes"
    echo "one stored shadow per device; when connects time out, devices retry and the peak includes"
    echo "half-open connections, so the per-device figure is then an upper bound."
    echo
    echo "## Shadow service (Umbra only: Mosquitto has no shadow service, so there is nothing to compare)"
    echo
    echo "### desired → delta latency"
    echo
    echo "\`fleet\` with an in-process operator (MQTT, privileged client id) changing random devices' desired"
    echo "setpoint, starting once every device is connected and in sync (or 10 s after the ramp); each"
    echo "device reports the change back (actuation delay 0), so the service handles two updates per change."
    for n in "$DEVICES" "$SMALL"; do
        j="$WORK/umbra-delta-$n.json"
        echo
        echo "**$n devices, $(awk -v r="$DELTA_RATE" -v n="$n" -v d="$DEVICES" 'BEGIN { printf "%d", r * n / d }') changes/s** (load average at start: $(cat "$WORK/umbra-delta-$n.load")):"
        echo
        echo "| series | p50 ms | p90 ms | p99 ms | max ms | count |"
        echo "|---|---:|---:|---:|---:|---:|"
        for series in "desired->delta" "desired->reported" "operator request"; do
            printf '| %s | %s | %s |\n' "$series" "$(lat "$j" "$series")" "$(field "$j" ".latency[\"$series\"].count")"
        done
        echo
        echo "Changes sent $(field "$j" .counts.operator_changes_sent) in $(num "$(field "$j" .duration_s)" 1) s, not converged at the end $(field "$j" .counts.changes_not_converged), devices in sync $(field "$j" .counts.devices_synced) of $n, peak connected $(field "$j" .peak_connected);"
        echo "errors $(jq -c .errors "$j" 2>/dev/null), rejections $(jq -c .rejected "$j" 2>/dev/null); notes $(jq -c .notes "$j" 2>/dev/null); broker peak RSS $(mib "$(peak umbra "delta-$n")") MiB."
    done
    echo
    echo "### Durable shadow updates/s (update → update/accepted after COMMIT)"
    echo
    echo "400 devices, 8 updates in flight each, per-thing rate limit lifted (\`[shadow] requests_per_second = 0\`)."
    echo
    echo "| store.synchronous | load avg | accepted/s | accepted | rejected | unanswered | p50 ms | p90 ms | p99 ms | max ms | peak RSS MiB | rejections by code |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    for workload in "${SHADOW[@]}"; do
        name=${workload%%|*}
        j="$WORK/umbra-$name.json"
        printf '| %s | %s | %s | %s | %s | %s | %s | %s |\n' "${name#shadow-}$(case $name in *all-answers) echo ', devices also subscribed to update/delta and update/documents' ;; esac)" "$(cat "$WORK/umbra-$name.load")" \
            "$(num "$(field "$j" '.rates["accepted (durable updates)"]')" 0)" "$(field "$j" .counts.accepted)" \
            "$(field "$j" .counts.rejected)" "$(field "$j" .counts.unanswered)" \
            "$(lat "$j" "update->accepted")" "$(mib "$(peak umbra "$name")") | $(jq -c .rejected "$j" 2>/dev/null)"
    done
    echo
    echo "## Workloads"
    echo
    for workload in "${RELAY[@]}" "${IDLE[@]}" "${DELTA[@]}" "${SHADOW[@]}" "${FLOOD[@]}"; do
        echo "- \`${workload%%|*}\`: \`device-sim ${workload#*|} --json\`"
    done
    echo "- \`${IDLE_BIG%%|*}\`: two \`device-sim ${IDLE_BIG#*|} --devices $((BIG / 2)) --first 0|$((BIG / 2)) --ramp $((CONNECT_RATE / 2)) --json\` at once"
    echo
    echo "sent = publishes the broker acknowledged (PUBACK); lost = expected − received after a drain"
    echo "of up to 10 s; relay latency is publish call → subscriber receipt (one process, one clock)."
    echo "RSS is the broker's VmRSS sampled every 100 ms; KiB per device = (peak − RSS before) / peak connected."
    echo "Umbra runs with \`[mqtt.edge] privileged_clients = [\"umbra-operator\"]\` and default limits"
    echo "except where a workload says otherwise."
    if [ -f "$ROOT/bench/NOTES.md" ]; then
        echo
        cat "$ROOT/bench/NOTES.md"
    fi
    echo
    echo "## Raw summaries"
    for broker in $M $U; do
        for f in "$WORK/$broker"-*[!ab].json; do
            [ -e "$f" ] || continue
            name=$(basename "$f" .json)
            echo
            echo "<details><summary>$name</summary>"
            echo
            echo '```json'
            jq -c . "$f" 2>/dev/null || echo '{}'
            echo '```'
            echo "</details>"
        done
    done
} >"$OUT"
echo "wrote $OUT" >&2
