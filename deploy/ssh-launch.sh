#!/usr/bin/env bash
# Start one etcd-agent per host over ssh and wait for all of them; Ctrl-C (or SIGTERM to this script) stops every
# agent: ssh -tt gives each remote agent a terminal, and ending ssh hangs it up, so the agent gets SIGHUP, stops its
# workers and revokes its lease (SIGHUP is one of the signals it handles by default, as torchrun's).
#
#   ETCD_AGENT_ENDPOINTS=etcd1:2379,etcd2:2379,etcd3:2379 deploy/ssh-launch.sh "gpu1 gpu2 gpu3" myrun train.py --lr 3e-4
#
# Every argument after the run id reaches the agent exactly as given here (spaces and quotes included). Each host
# needs etcd-agent and the training script; the agent runs in REMOTE_DIR (default: this directory's path, which
# should exist on every host, as on a shared file system).
#
# Environment (all optional but the endpoints):
#   ETCD_AGENT_ENDPOINTS  the etcd cluster, HOST:2379[,HOST:2379...] (https://... for TLS)
#   NNODES                --nnodes (default: MIN:N with MIN = N-1 for 2 or more hosts, so the job survives the loss
#                         of one host; give N:N to stop when any host is lost)
#   NPROC_PER_NODE        --nproc-per-node (default gpu)
#   MAX_RESTARTS          --max-restarts (default 3)
#   ETCD_AGENT_BIN        the agent on the hosts (default: etcd-agent on the remote PATH; a virtualenv install:
#                         /opt/etcd-agent/venv/bin/etcd-agent)
#   REMOTE_DIR            where the agent runs on each host (default: $PWD)
#   ETCD_AGENT_CACERT, ETCD_AGENT_CERT, ETCD_AGENT_KEY, ETCD_AGENT_USER, ETCD_AGENT_PASSWORD_FILE
#                         TLS and auth (--etcd-cacert, --etcd-cert, --etcd-key, --etcd-user,
#                         --etcd-password-file): paths on the hosts
#   SSH                   the ssh command (default: ssh); SSH_OPTS extra options (word-split)
set -euo pipefail

if (($# < 3)); then
    echo "usage: ETCD_AGENT_ENDPOINTS=... $0 \"HOST1 HOST2 ...\" RUN_ID ENTRYPOINT [ARGS...]" >&2
    exit 2
fi
read -r -a hosts <<<"$1"
run_id=$2
shift 2
: "${ETCD_AGENT_ENDPOINTS:?set ETCD_AGENT_ENDPOINTS=host1:2379,host2:2379,host3:2379}"
n=${#hosts[@]}
if ((n == 0)); then
    echo "$0: no hosts given" >&2
    exit 2
fi
min=$((n > 1 ? n - 1 : 1))
read -r -a ssh_cmd <<<"${SSH:-ssh} ${SSH_OPTS:-}"

agent=("${ETCD_AGENT_BIN:-etcd-agent}" --etcd-endpoints "$ETCD_AGENT_ENDPOINTS" --run-id "$run_id"
       --nnodes "${NNODES:-$min:$n}" --nproc-per-node "${NPROC_PER_NODE:-gpu}"
       --max-restarts "${MAX_RESTARTS:-3}")
for pair in CACERT:--etcd-cacert CERT:--etcd-cert KEY:--etcd-key USER:--etcd-user PASSWORD_FILE:--etcd-password-file; do
    var="ETCD_AGENT_${pair%%:*}"
    if [ -n "${!var:-}" ]; then
        agent+=("${pair#*:}" "${!var}")
    fi
done

pids=()
stop() {
    trap - INT TERM
    kill -TERM "${pids[@]}" 2>/dev/null || true  # the ssh processes themselves: their remote agents get SIGHUP
}
trap stop INT TERM

for h in "${hosts[@]}"; do
    # ssh hands the remote shell one string: quote every word so that it is split back exactly as given here.
    remote="cd $(printf '%q' "${REMOTE_DIR:-$PWD}") && exec$(printf ' %q' "${agent[@]}" --node-id "$h" "$@")"
    "${ssh_cmd[@]}" -tt "$h" "$remote" < /dev/null > >(sed -u "s/^/[$h] /") 2>&1 &
    pids+=($!)  # ssh's pid (the output filter is a process substitution, not the last stage of a pipeline)
done

status=0
for p in "${pids[@]}"; do
    wait "$p" || status=1
done
exit "$status"
