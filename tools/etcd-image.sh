#!/usr/bin/env bash
# Builds a Docker image of an installed etcd without any registry: a root filesystem holding etcd, etcdctl (and
# etcdutl where it sits beside etcd) in /usr/local/bin, as etcd's own images have them, and the libraries `ldd`
# lists for them, imported with `docker import`. Tagged etcd-agent/etcd:<version> (the version etcd reports) and
# labelled with the binaries' checksum: a second run with the same binaries builds nothing.
#
# Usage: tools/etcd-image.sh [ETCD_BINARY]   (default: $ETCD_AGENT_ETCD_BIN, else `etcd` on PATH)
# Prints the image's tag on stdout. Needs a running Docker engine (tools/dockerd.sh starts one).
set -euo pipefail

etcd="${1:-${ETCD_AGENT_ETCD_BIN:-$(command -v etcd || true)}}"
etcd="$(command -v "$etcd" || true)"
if [ -z "$etcd" ] || [ ! -x "$etcd" ]; then
    echo "etcd-image.sh: no etcd binary (give one, or install etcd-server)" >&2
    exit 1
fi
etcd="$(readlink -f "$etcd")"
dir="$(dirname "$etcd")"
version="$("$etcd" --version | sed -n 's/^etcd Version: //p')"
[ -n "$version" ] || { echo "etcd-image.sh: $etcd --version names no version" >&2; exit 1; }

binaries=("$etcd")
for tool in etcdctl etcdutl; do
    if [ -x "$dir/$tool" ]; then binaries+=("$dir/$tool")
    elif [ "$tool" = etcdctl ]; then
        found="$(command -v etcdctl || true)"
        [ -n "$found" ] || { echo "etcd-image.sh: no etcdctl beside $etcd or on PATH" >&2; exit 1; }
        binaries+=("$(readlink -f "$found")")
    fi
done

tag="etcd-agent/etcd:$version"
sum="$(cat "${binaries[@]}" | sha256sum | cut -c1-64)"
label='{{index .Config.Labels "etcd-agent.binaries"}}'
if [ "$(docker image inspect --format "$label" "$tag" 2>/dev/null)" = "$sum" ]; then
    echo "$tag"
    exit 0
fi

rootfs="$(mktemp -d)"
trap 'rm -rf "$rootfs"' EXIT
mkdir -p "$rootfs/usr/local/bin" "$rootfs/tmp" "$rootfs/etc"
chmod 1777 "$rootfs/tmp"
for bin in "${binaries[@]}"; do
    cp "$bin" "$rootfs/usr/local/bin/$(basename "$bin")"
    # "name => /path (addr)" and "/lib64/ld-linux... (addr)"; a static binary lists none ("not a dynamic executable")
    for lib in $(ldd "$bin" 2>/dev/null | grep -o '/[^ ]*' || true); do
        mkdir -p "$rootfs$(dirname "$lib")"
        cp -L "$lib" "$rootfs$lib"
    done
done
echo "root:x:0:0:root:/root:/usr/local/bin/etcd" >"$rootfs/etc/passwd"
echo "hosts: files dns" >"$rootfs/etc/nsswitch.conf"

tar -C "$rootfs" -c . | docker import \
    --change 'CMD ["/usr/local/bin/etcd"]' \
    --change 'ENV PATH=/usr/local/bin' \
    --change "LABEL etcd-agent.binaries=$sum etcd-agent.etcd-version=$version" \
    --message "etcd $version from $etcd" - "$tag" >/dev/null
echo "$tag"
