#!/usr/bin/env bash
# Make an etcd user (and role) that may read and write one run's keys and nothing else, for etcd-agent under
# password auth: a job's agents then cannot touch another job, even by mistake.
#
#   deploy/etcd-job-user.sh RUN_ID PASSWORD_FILE [ROOT]
#
# etcdctl connects as an admin through its own environment: ETCDCTL_ENDPOINTS=https://etcd1:2379,...,
# ETCDCTL_CACERT=ca.pem (and ETCDCTL_CERT/ETCDCTL_KEY for mutual TLS), ETCDCTL_USER=root (etcdctl asks for the
# password) or root:PASSWORD. The new user's password is the first line of PASSWORD_FILE, handed to etcdctl on its
# standard input, never on a command line. ROOT is etcd-agent's --etcd-prefix (default /etcd-agent).
#
# Every job honours the cluster-wide quarantine records under ROOT/.quarantine/, so the user may read them. A job
# run with --quarantine-scope cluster writes there too: give QUARANTINE_ACCESS=readwrite for such a job (default
# read: the job's own quarantine records, under its run prefix, are readwrite either way).
set -euo pipefail

if [ $# -lt 2 ] || [ $# -gt 3 ]; then
    echo "usage: $0 RUN_ID PASSWORD_FILE [ROOT]" >&2
    exit 2
fi
run=$1 pwfile=$2 root=${3:-/etcd-agent}
access=${QUARANTINE_ACCESS:-read}
if [ "$access" != read ] && [ "$access" != readwrite ]; then
    echo "$0: QUARANTINE_ACCESS '$access': use read or readwrite" >&2
    exit 2
fi
if ! [[ $run =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$ ]]; then
    echo "$0: RUN_ID '$run': use 1-128 letters, digits, '.', '_' or '-' (etcd-agent's --run-id rule)" >&2
    exit 2
fi
if [ ! -r "$pwfile" ] || [ -z "$(head -n 1 "$pwfile")" ]; then
    echo "$0: PASSWORD_FILE $pwfile: missing, unreadable or its first line is empty" >&2
    exit 2
fi
export ETCDCTL_API=3
name="job-$run"
prefix="$root/$run/"

etcdctl role add "$name"
etcdctl role grant-permission "$name" --prefix=true readwrite "$prefix"
etcdctl role grant-permission "$name" --prefix=true "$access" "$root/.quarantine/"
head -n 1 "$pwfile" | etcdctl user add "$name" --interactive=false
etcdctl user grant-role "$name" "$name"
echo "user $name may read and write $prefix and $access $root/.quarantine/ (cluster-wide quarantine records), nothing else;"
echo "run the job's agents with"
echo "  etcd-agent --etcd-user $name --etcd-password-file $pwfile --etcd-prefix $root --run-id $run ..."
