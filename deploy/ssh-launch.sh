#!/usr/bin/env bash
# Start one etcd-agent per host over ssh and wait for all of them; Ctrl-C stops every agent (SIGTERM via ssh -tt).
#
#   ETCD_AGENT_ENDPOINTS=etcd1:2379,etcd2:2379,etcd3:2379 deploy/ssh-launch.sh "gpu1 gpu2 gpu3" myrun train.py --lr 3e-4
#
# Each host needs etcd-agent on its PATH and the training script at the same path.
set -euo pipefail
hosts=($1); run_id=$2; shift 2
: "${ETCD_AGENT_ENDPOINTS:?set ETCD_AGENT_ENDPOINTS}"
n=${#hosts[@]}
pids=()
for h in "${hosts[@]}"; do
    ssh -tt "$h" etcd-agent --etcd-endpoints "$ETCD_AGENT_ENDPOINTS" --run-id "$run_id" \
        --nnodes "${NNODES:-$n}" --nproc-per-node "${NPROC:-gpu}" --max-restarts "${MAX_RESTARTS:-3}" \
        --node-id "$h" "$@" 2>&1 | sed "s/^/[$h] /" &
    pids+=($!)
done
trap 'kill "${pids[@]}" 2>/dev/null' INT TERM
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
exit $status
