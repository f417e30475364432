#!/usr/bin/env bash
# etcd-agent's --on-quarantine hook for Slurm: drain the node that etcd-agent just quarantined, so that the
# scheduler stops placing jobs on it too. The quarantined node's own agent runs it once per quarantine, with
#   ETCD_AGENT_QUARANTINE_NODE       the node id (deploy/slurm.sbatch uses `hostname -s`: Slurm's NodeName)
#   ETCD_AGENT_QUARANTINE_REASON     why (e.g. "2 worker failure(s) within 600 s (--quarantine-after 2)")
#   ETCD_AGENT_QUARANTINE_UNTIL_ISO  when etcd-agent's cooldown ends (UTC); Slurm keeps the node drained until
#                                    an operator resumes it: scontrol update NodeName=NODE State=RESUME
#
#   etcd-agent --quarantine-after 2 --quarantine-scope cluster --on-quarantine /opt/etcd-agent/slurm-drain-hook.sh ...
#   (in deploy/slurm.sbatch: pass those flags after the recipe: sbatch ... deploy/slurm.sbatch --quarantine-after 2
#   --on-quarantine $PWD/deploy/slurm-drain-hook.sh train.py)
#
# Draining needs Slurm's operator rights (root, SlurmUser, or an AdminLevel=Operator account). A job runs as its
# user: give that user a sudo rule for scontrol update and set SCONTROL="sudo -n scontrol" in the job's environment.
# The agent kills the hook after --on-quarantine-timeout seconds; a failure is a warning in the agent's log, never
# an error of the job.
set -euo pipefail

node=${ETCD_AGENT_QUARANTINE_NODE:?this script is etcd-agent\'s --on-quarantine hook: ETCD_AGENT_QUARANTINE_NODE is not set}
reason=${ETCD_AGENT_QUARANTINE_REASON:-quarantined}
until_iso=${ETCD_AGENT_QUARANTINE_UNTIL_ISO:-}
read -r -a scontrol <<< "${SCONTROL:-scontrol}"
text="etcd-agent: ${reason}"
[ -z "$until_iso" ] || text="$text (quarantined until $until_iso)"
text=${text//\"/\'}  # one quoted Reason= for Slurm
"${scontrol[@]}" update NodeName="$node" State=DRAIN Reason="${text:0:250}"
echo "drained $node in Slurm: ${text:0:250}"
