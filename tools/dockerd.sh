#!/usr/bin/env bash
# Starts a Docker engine for the container tests unless one already answers: Debian's dockerd (package docker.io)
# with its own data root, exec root, pidfile and log, without the default bridge or iptables rules
# (--bridge=none --iptables=false), so no private address range is ever used: the tests' containers run with
# host networking on loopback ports. Needs root. Idempotent: a running engine (this one or any other answering
# `docker info`) is left as it is.
#
# Usage: tools/dockerd.sh          start (if needed) and wait until the engine answers, at most 60 s
#        tools/dockerd.sh stop     stop the engine this script started (by its pidfile)
# Environment: ETCD_AGENT_DOCKER_ROOT (default /var/lib/etcd-agent-docker): data root; the log is dockerd.log in it.
set -euo pipefail

ROOT="${ETCD_AGENT_DOCKER_ROOT:-/var/lib/etcd-agent-docker}"
PIDFILE=/run/etcd-agent-dockerd.pid

answers() { docker info >/dev/null 2>&1; }

if [ "${1:-}" = stop ]; then
    [ -f "$PIDFILE" ] || exit 0
    pid="$(cat "$PIDFILE")"
    kill "$pid" 2>/dev/null || exit 0
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || exit 0; sleep 0.2; done
    echo "dockerd.sh: dockerd (pid $pid) did not stop within 20 s" >&2
    exit 1
fi

answers && exit 0
[ "$(id -u)" -eq 0 ] || { echo "dockerd.sh: starting dockerd needs root" >&2; exit 1; }
if ! command -v dockerd >/dev/null 2>&1; then
    echo "dockerd.sh: no dockerd; install it with \`apt-get install docker.io\`" >&2
    exit 1
fi
if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
    echo "dockerd.sh: dockerd (pid $(cat "$PIDFILE")) runs but does not answer yet; waiting" >&2
else
    mkdir -p "$ROOT"
    setsid dockerd --data-root="$ROOT/data" --exec-root=/run/etcd-agent-docker --pidfile="$PIDFILE" \
        --bridge=none --iptables=false --ip6tables=false --ip-forward=false --ip-masq=false \
        </dev/null >>"$ROOT/dockerd.log" 2>&1 &
fi
for _ in $(seq 300); do
    answers && exit 0
    sleep 0.2
done
echo "dockerd.sh: dockerd did not answer within 60 s; last lines of $ROOT/dockerd.log:" >&2
tail -n 20 "$ROOT/dockerd.log" >&2 || true
exit 1
