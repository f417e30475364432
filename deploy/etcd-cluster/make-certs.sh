#!/usr/bin/env bash
# Make the TLS files for an etcd cluster with mutual TLS on both its client and its peer side: a CA, one
# certificate per member (server and peer at once) and two client certificates. Needs only openssl.
#
#   deploy/etcd-cluster/make-certs.sh [--force | --keep-ca] OUT_DIR MEMBER [MEMBER...]
#   deploy/etcd-cluster/make-certs.sh certs etcd1=10.0.0.11 etcd2=10.0.0.12 etcd3=10.0.0.13
#
# MEMBER is NAME[=ADDR[,ADDR...]]: NAME is the member's host name (also its etcd --name and the name of its files);
# each ADDR is an IP address (IPv4 or IPv6) or another DNS name of that host. Every member certificate is valid for
# NAME, its ADDRs, localhost and 127.0.0.1. Give each member's IP addresses: etcd checks that a peer connecting to
# it comes from an address its certificate names (it resolves the DNS names otherwise). A production cluster has
# 3 (or 5) members; any number from 1 is accepted.
#
# OUT_DIR (made mode 0700 if missing; keys are 0600, certificates 0644):
#   ca.pem, ca-key.pem          the CA. ca.pem goes to every etcd host and every client; ca-key.pem goes nowhere:
#                               it signs certificates, so keep it (and OUT_DIR) where only the admin can reach it
#   NAME.pem, NAME-key.pem      member NAME, CN etcd-member, extendedKeyUsage serverAuth and clientAuth (a member
#                               is a client of its peers), for host NAME only
#   client.pem, client-key.pem  CN etcd-agent, clientAuth: for every node that runs etcd-agent
#   root.pem, root-key.pem      CN root, clientAuth: for the admin's etcdctl only. Once auth is enabled, etcd takes
#                               a client certificate's CN as the user when no password is given, so this pair is
#                               the root user
#
# Environment: DAYS (leaf certificates' validity, default 365), CA_DAYS (default 3650), KEY_TYPE (ec: P-256, the
# default; rsa: 2048 bits). Exit 2 on a bad argument or when OUT_DIR already holds any of these files, unless:
#   --force     replace them all, the CA too: every certificate signed by the old CA stops being trusted
#   --keep-ca   keep OUT_DIR's CA (ca.pem and ca-key.pem must be there) and make new member and client
#               certificates signed by it: to renew them before they expire, or to add a member; certificates
#               made before stay valid until their own end date
set -euo pipefail

prog=${0##*/}
usage() {
    echo "usage: $prog [--force | --keep-ca] OUT_DIR MEMBER [MEMBER...]   (MEMBER: NAME[=ADDR[,ADDR...]])" >&2
    exit 2
}
die() {
    echo "$prog: $*" >&2
    exit 2
}

is_ipv4() {
    local IFS=. octet
    local -a octets
    [[ $1 =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}$ ]] || return 1
    read -ra octets <<<"$1"
    for octet in "${octets[@]}"; do
        [[ $octet =~ ^(0|[1-9][0-9]*)$ ]] && ((octet <= 255)) || return 1
    done
}
is_ipv6() {  # eight groups of 1-4 hex digits, or fewer with one '::'; the last may be an IPv4 address
    local addr=$1 count=0 compressed=0 i
    local -a groups
    [[ $addr =~ ^[0-9A-Fa-f:.]+$ && $addr == *:*:* ]] || return 1
    if [[ $addr == *::* ]]; then
        [[ ${addr#*::} != *::* ]] || return 1  # '::' once at most
        compressed=1 addr=${addr/::/:z:}       # z: the run of zero groups '::' stands for
        addr=${addr#:} addr=${addr%:}          # as in ::1 or fd00::
    fi
    [[ $addr != :* && $addr != *: ]] || return 1
    IFS=: read -ra groups <<<"$addr"
    for i in "${!groups[@]}"; do
        if [[ ${groups[i]} == z ]]; then
            continue
        elif [[ ${groups[i]} =~ ^[0-9A-Fa-f]{1,4}$ ]]; then
            ((count += 1))
        elif ((i == ${#groups[@]} - 1)) && is_ipv4 "${groups[i]}"; then
            ((count += 2))
        else
            return 1
        fi
    done
    if ((compressed)); then ((count <= 7)); else ((count == 8)); fi
}
is_dns_name() {
    local label
    local -a labels
    ((${#1} <= 253)) && [[ $1 =~ ^[A-Za-z0-9.-]+$ && $1 != .* && $1 != *. && $1 != *..* ]] || return 1
    IFS=. read -ra labels <<<"$1"
    for label in "${labels[@]}"; do
        ((${#label} <= 63)) && [[ $label != -* && $label != *- ]] || return 1
    done
    [[ ! $1 =~ ^[0-9.]+$ ]]  # all digits and dots: a mistyped IPv4 address, not a name
}

force=0 keep_ca=0
args=()
while (($#)); do
    case $1 in
        --force) force=1 ;;
        --keep-ca) keep_ca=1 ;;
        -h | --help) usage ;;
        --) shift; args+=("$@"); break ;;
        -*) die "unknown option '$1' (options: --force, --keep-ca)" ;;
        *) args+=("$1") ;;
    esac
    shift
done
((${#args[@]} >= 2)) || usage
((!force || !keep_ca)) || die "--force makes a new CA and --keep-ca keeps OUT_DIR's: give one of them"
out=${args[0]}
members=("${args[@]:1}")

days=${DAYS:-365} ca_days=${CA_DAYS:-3650} key_type=${KEY_TYPE:-ec}
[[ $days =~ ^[1-9][0-9]{0,4}$ ]] || die "DAYS '$days': give the leaf certificates' validity as 1-99999 days"
[[ $ca_days =~ ^[1-9][0-9]{0,4}$ ]] || die "CA_DAYS '$ca_days': give the CA's validity as 1-99999 days"
((keep_ca || days <= ca_days)) || die "DAYS $days is more than CA_DAYS $ca_days: a certificate cannot outlive its CA"
case $key_type in
    ec) keyopts=(-algorithm EC -pkeyopt ec_paramgen_curve:P-256 -pkeyopt ec_param_enc:named_curve)
        key_usage=digitalSignature ;;
    rsa) keyopts=(-algorithm RSA -pkeyopt rsa_keygen_bits:2048)
        key_usage=digitalSignature,keyEncipherment ;;
    *) die "KEY_TYPE '$key_type': use ec (P-256, the default) or rsa (2048 bits)" ;;
esac

[[ -n $out ]] || die "OUT_DIR is empty"
[[ ! -e $out || -d $out ]] || die "OUT_DIR '$out' exists and is not a directory"

# Check every MEMBER before anything is written; build one subjectAltName list per member.
names=() sans=()
for member in "${members[@]}"; do
    name=${member%%=*}
    if [[ $member == *=* ]]; then
        addrs=${member#*=}
        [[ -n $addrs && $addrs != ,* && $addrs != *, && $addrs != *,,* ]] ||
            die "MEMBER '$member': after '=' give ADDR[,ADDR...] (IP addresses or DNS names), none empty"
    else
        addrs=
    fi
    if is_ipv4 "$name" || is_ipv6 "$name"; then
        san="IP:$name"
    elif is_dns_name "$name"; then
        san="DNS:$name"
    else
        die "MEMBER '$member': '$name' is not a host name (letters, digits, '-' and '.') or an IP address"
    fi
    case $name in
        ca | client | root | *-key)
            die "MEMBER '$member': the name '$name' would collide with the CA's or a client's files" ;;
    esac
    for other in "${names[@]}"; do
        [[ $other != "$name" ]] || die "MEMBER '$member': member '$name' is given twice"
    done
    IFS=, read -ra extra <<<"$addrs"
    for addr in "${extra[@]}" localhost 127.0.0.1; do
        if is_ipv4 "$addr" || is_ipv6 "$addr"; then
            entry="IP:$addr"
        elif is_dns_name "$addr"; then
            entry="DNS:$addr"
        else
            die "MEMBER '$member': '$addr' is not an IP address or a DNS name"
        fi
        [[ ,$san, == *,$entry,* ]] || san+=",$entry"
    done
    names+=("$name") sans+=("$san")
done
((keep_ca || ${#names[@]} % 2 == 1)) ||
    echo "$prog: warning: ${#names[@]} members tolerate no more failures than $((${#names[@]} - 1)) would" >&2

outputs=(ca client root "${names[@]}")
if ((keep_ca)); then
    outputs=(client root "${names[@]}")
    for file in "$out/ca.pem" "$out/ca-key.pem"; do
        [[ -f $file ]] || die "--keep-ca: OUT_DIR '$out' has no $file"
    done
    ca_pub=$(openssl x509 -in "$out/ca.pem" -noout -pubkey 2>/dev/null) || ca_pub=
    key_pub=$(openssl pkey -in "$out/ca-key.pem" -pubout -passin pass: 2>/dev/null) || key_pub=
    [[ -n $ca_pub && $ca_pub == "$key_pub" ]] ||
        die "--keep-ca: $out/ca-key.pem is not the key of $out/ca.pem (or either is unreadable or encrypted)"
    openssl x509 -in "$out/ca.pem" -noout -checkend $((days * 86400)) >/dev/null ||
        die "--keep-ca: the CA $out/ca.pem expires within DAYS $days: make a new one with --force"
elif ((!force)); then
    for base in "${outputs[@]}"; do
        for file in "$out/$base.pem" "$out/$base-key.pem"; do
            [[ ! -e $file ]] ||
                die "OUT_DIR '$out' already has $file; give --force to replace every file, the CA too (or --keep-ca)"
        done
    done
fi

umask 077
mkdir -p "$out"
work=$(mktemp -d "$out/.make-certs.XXXXXX")  # in OUT_DIR, so that the files move into place, not copy
trap 'rm -rf "$work"' EXIT

cat >"$work/openssl.cnf" <<'EOF'
[req]
distinguished_name = dn
prompt = no
[dn]
[v3_ca]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
EOF

ssl() {
    local err
    if ! err=$(openssl "$@" 2>&1 >/dev/null); then
        echo "$prog: openssl $1 failed: $err" >&2
        exit 1
    fi
}
new_key() { ssl genpkey "${keyopts[@]}" -out "$work/$1-key.pem"; }
serial() { echo "0x$(openssl rand -hex 16)"; }

# sign BASE CN EXTENDED_KEY_USAGE [SUBJECT_ALT_NAMES]: a key and a certificate signed by the CA
sign() {
    local base=$1 cn=$2 eku=$3 san=${4:-}
    new_key "$base"
    {
        echo "[leaf]"
        echo "basicConstraints = critical, CA:FALSE"
        echo "keyUsage = critical, $key_usage"
        echo "extendedKeyUsage = $eku"
        echo "subjectKeyIdentifier = hash"
        echo "authorityKeyIdentifier = keyid"
        [[ -z $san ]] || echo "subjectAltName = $san"
    } >"$work/$base.ext"
    ssl req -new -config "$work/openssl.cnf" -key "$work/$base-key.pem" -subj "/CN=$cn" -out "$work/$base.csr"
    ssl x509 -req -in "$work/$base.csr" -CA "$work/ca.pem" -CAkey "$work/ca-key.pem" -set_serial "$(serial)" \
        -days "$days" -sha256 -extfile "$work/$base.ext" -extensions leaf -out "$work/$base.pem"
}

if ((keep_ca)); then
    cp "$out/ca.pem" "$out/ca-key.pem" "$work/"
else
    new_key ca
    ssl req -new -x509 -config "$work/openssl.cnf" -extensions v3_ca -key "$work/ca-key.pem" -sha256 \
        -days "$ca_days" -set_serial "$(serial)" -subj "/CN=etcd-agent etcd CA" -out "$work/ca.pem"
fi
for i in "${!names[@]}"; do
    sign "${names[i]}" etcd-member serverAuth,clientAuth "${sans[i]}"
done
sign client etcd-agent clientAuth
sign root root clientAuth

for base in "${outputs[@]}"; do
    chmod 0644 "$work/$base.pem"
    chmod 0600 "$work/$base-key.pem"
    mv -f "$work/$base.pem" "$work/$base-key.pem" "$out/"
done

echo "made in $out (keys 0600):"
echo "  ca.pem: the CA certificate, for every etcd host and every client"
echo "  ca-key.pem: the CA key; copy it nowhere"
for i in "${!names[@]}"; do
    echo "  ${names[i]}.pem, ${names[i]}-key.pem: for host ${names[i]} only; valid for ${sans[i]}"
done
echo "  client.pem, client-key.pem: CN etcd-agent, for every node that runs etcd-agent"
echo "  root.pem, root-key.pem: CN root, for the admin's etcdctl only"
if ((keep_ca)); then
    echo "the new certificates are valid for $days days, signed by the CA that was there ($out/ca.pem)"
else
    echo "leaf certificates are valid for $days days, the CA for $ca_days days"
fi
