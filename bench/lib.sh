# bench/lib.sh — shared by the benchmark scripts (sourced, not run).

# need COMMAND PACKAGE: installs the Debian PACKAGE when COMMAND is missing
# and this runs as root with apt-get; otherwise stops with what to install.
need() {
    command -v "$1" >/dev/null && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && apt-get install -y -qq "$2" >/dev/null
    else
        echo "$(basename "$0"): $1 missing (apt-get install $2)" >&2
        exit 1
    fi
}

# A loopback port nothing listens on (a connect that fails), below the
# ephemeral range compare.sh sets (where load generators' sockets would be
# in the way); the short race with others is accepted.
free_port() {
    local port
    while :; do
        port=$((2000 + RANDOM % 7000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return
        fi
    done
}
