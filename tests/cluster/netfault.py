"""Network faults on the cluster bed: nftables rules inside one host's network namespace, and a flapping link.

``cut(host, addresses=..., ports=...)`` drops, in both directions, the host's traffic to and from those addresses
(and/or TCP ports) with one table of its own (TABLE) in that namespace; ``heal(host)`` deletes the table. A test
heals every host it cut in a ``finally`` (``healed``), and the bed's teardown deletes the namespaces with any rule
left in them. ``flap`` takes the root namespace's end of a host's veth down and up. Nothing here touches the root
namespace's rules or any address outside the bed.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time

from .bed import ETCD_CLIENT_PORT, ETCDS, address
from .record import BedError, run

TABLE = "eabed_fault"


def nft(host: str, script: str) -> None:
    done = subprocess.run(["nsenter", f"--net=/run/netns/{host}", "nft", "-f", "-"], input=script, text=True,
                          capture_output=True, timeout=120)
    if done.returncode != 0:
        raise BedError(f"nft in {host}: {done.stderr.strip()}\n{script}")


def cut(host: str, addresses: tuple[str, ...] = (), ports: tuple[int, ...] = ()) -> None:
    """Drop ``host``'s packets to and from ``addresses`` and its TCP packets to and from ``ports``."""
    inbound, outbound = [], []
    if addresses:
        group = "{ " + ", ".join(addresses) + " }"
        inbound.append(f"ip saddr {group} drop")
        outbound.append(f"ip daddr {group} drop")
    for port in ports:
        inbound += [f"tcp dport {port} drop", f"tcp sport {port} drop"]
        outbound += [f"tcp dport {port} drop", f"tcp sport {port} drop"]
    rules = lambda lines: "".join(f"    {line}\n" for line in lines)  # noqa: E731
    nft(host, f"""table inet {TABLE} {{
  chain input {{
    type filter hook input priority 0; policy accept;
{rules(inbound)}  }}
  chain output {{
    type filter hook output priority 0; policy accept;
{rules(outbound)}  }}
}}
""")


def heal(host: str) -> None:
    """Delete ``host``'s fault table, if it has one."""
    done = run("nsenter", f"--net=/run/netns/{host}", "nft", "list", "tables", check=False)
    if f"inet {TABLE}" in done.stdout:
        run("nsenter", f"--net=/run/netns/{host}", "nft", "delete", "table", "inet", TABLE)


@contextlib.contextmanager
def healed(*hosts: str):
    """Heal ``hosts`` (and bring their links up) when the block ends, however it ends."""
    try:
        yield
    finally:
        for host in hosts:
            heal(host)
            link_up(host)


def veth(host: str) -> str:
    return f"eabed-{host}"  # the root namespace's end of the host's veth pair (bed.Bed._network)


def link_up(host: str) -> None:
    run("ip", "link", "set", veth(host), "up")


def flap(host: str, times: int, down_s: float, up_s: float) -> None:
    """Take ``host``'s link down for ``down_s`` and up for ``up_s``, ``times`` times (the link ends up)."""
    for _ in range(times):
        run("ip", "link", "set", veth(host), "down")
        time.sleep(down_s)  # the fault's own shape: a link down for this long
        link_up(host)
        time.sleep(up_s)


def etcd_leader(members: tuple[str, ...] = ETCDS) -> str:
    """The name (etcd1..etcd3) of the etcd member that leads now, as one of ``members`` says."""
    endpoints = ",".join(f"{address(e)}:{ETCD_CLIENT_PORT}" for e in members)
    done = run("etcdctl", f"--endpoints={endpoints}", "--command-timeout=3s", "endpoint", "status", "-w", "json")
    for member in json.loads(done.stdout):
        st = member["Status"]
        if st["header"]["member_id"] == st["leader"]:
            host = member["Endpoint"].split("//")[-1].split(":")[0]
            return next(e for e in ETCDS if address(e) == host)
    raise BedError(f"no etcd member says it leads: {done.stdout}")
