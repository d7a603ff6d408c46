"""The VPC fabric: namespaces and veths standing in for ENIs, and a router namespace doing
what the VPC does (subnet gateway, per-address delivery to the owning ENI, source/destination
check). Kept in step with EC2 by `Fabric.sync`, which diffs the EC2 view against what exists."""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass

from . import netns
from .config import LabConfig
from .ec2state import Eni

log = logging.getLogger("fabric")
VPC_MTU = "9001"


@dataclass(frozen=True)
class Node:
    index: int
    ns: str
    instance_id: str


@dataclass
class Link:
    node: Node
    device_index: int
    eni: Eni

    @property
    def dev(self) -> str:
        return f"eth{self.device_index}"

    @property
    def router_dev(self) -> str:
        return f"n{self.node.index}e{self.device_index}"


def build_core(cfg: LabConfig) -> None:
    """The fixed part: router, EC2 endpoint and internet namespaces and their links."""
    aws, vpc, inet = cfg.ns("aws"), cfg.ns("vpc"), cfg.ns("inet")
    for ns in (aws, vpc, inet):
        netns.add(ns)
    for key, value in [
        ("net.ipv4.ip_forward", "1"),
        # The VPC drops packets whose source is not an address of the ENI they came from:
        # strict reverse-path filtering against the per-address routes gives exactly that.
        ("net.ipv4.conf.all.rp_filter", "1"),
        ("net.ipv4.conf.default.rp_filter", "1"),
        # The VPC answers ARP for every address of the subnet.
        ("net.ipv4.conf.default.proxy_arp", "1"),
    ]:
        netns.sysctl(vpc, key, value)
    ep_len = ipaddress.IPv4Network(cfg.endpoint_net).prefixlen
    netns.ip(vpc, "link", "add", "ep0", "type", "veth", "peer", "name", "eth0", "netns", aws)
    netns.ip(vpc, "addr", "add", f"{cfg.endpoint_gw}/{ep_len}", "dev", "ep0")
    netns.ip(vpc, "link", "set", "ep0", "up")
    netns.ip(aws, "addr", "add", f"{cfg.endpoint_ip}/{ep_len}", "dev", "eth0")
    netns.ip(aws, "link", "set", "eth0", "up")
    netns.ip(aws, "route", "add", "default", "via", cfg.endpoint_gw)

    netns.ip(vpc, "link", "add", "inet0", "type", "veth", "peer", "name", "eth0", "netns", inet)
    netns.ip(vpc, "addr", "add", f"{cfg.inet_link_router}/30", "dev", "inet0")
    netns.ip(vpc, "link", "set", "inet0", "up")
    netns.ip(vpc, "route", "add", "default", "via", cfg.inet_link_inet)
    netns.ip(inet, "addr", "add", f"{cfg.inet_link_inet}/30", "dev", "eth0")
    netns.ip(inet, "addr", "add", f"{cfg.public_test_ip}/32", "dev", "lo")
    netns.ip(inet, "link", "set", "eth0", "up")
    # No default route in the internet: it only knows the nodes' primary addresses (the
    # stand-in for their public IPs), so only SNATed traffic from pods gets answers.


def build_node(cfg: LabConfig, node: Node) -> None:
    """Node namespaces already exist (made by `lab up`); give each its IMDS address."""
    # IMDS answers at its well-known address inside every node, as on EC2.
    netns.ip(node.ns, "addr", "replace", "169.254.169.254/32", "dev", "lo")


class Fabric:
    def __init__(self, cfg: LabConfig, nodes: list[Node]):
        self.cfg = cfg
        self.nodes = {n.instance_id: n for n in nodes}
        self.links: dict[str, Link] = {}
        self.routes: dict[str, set[str]] = {}

    @property
    def router(self) -> str:
        return self.cfg.ns("vpc")

    def sync(self, enis: list[Eni]) -> None:
        desired = {e.eni_id: e for e in enis
                   if e.instance_id in self.nodes and e.device_index is not None}
        for eni_id, link in list(self.links.items()):
            want = desired.get(eni_id)
            if (want is None or want.instance_id != link.node.instance_id
                    or want.device_index != link.device_index):
                self._remove(eni_id)
        for e in desired.values():
            if e.eni_id not in self.links:
                self._add(e)
            self.links[e.eni_id].eni = e
            self._sync_routes(self.links[e.eni_id])

    def _add(self, e: Eni) -> None:
        node = self.nodes[e.instance_id]
        link = Link(node, e.device_index, e)
        log.info("attach %s (%s) as %s in %s", e.eni_id, e.mac, link.dev, node.ns)
        # A stale device of that name (an earlier ENI at this index) goes first.
        netns.ip(node.ns, "link", "del", link.dev, check=False)
        netns.ip(self.router, "link", "del", link.router_dev, check=False)
        netns.ip(self.router, "link", "add", link.router_dev, "mtu", VPC_MTU, "type", "veth",
                 "peer", "name", link.dev, "address", e.mac, "mtu", VPC_MTU, "netns", node.ns)
        gw = str(ipaddress.IPv4Network(e.subnet_cidr).network_address + 1)
        # At once, as the VPC does: Linux delays proxy-ARP replies by up to 0.8 s otherwise,
        # which times out a node's first packets. Only per device outside the init netns.
        netns.sysctl(self.router, f"net.ipv4.neigh.{link.router_dev}.proxy_delay", "0")
        netns.ip(self.router, "addr", "add", f"{gw}/32", "dev", link.router_dev)
        netns.ip(self.router, "link", "set", link.router_dev, "up")
        netns.ip(self.router, "route", "replace", f"{e.primary_ip}/32", "dev", link.router_dev)
        # The VPC delivers to the ENI's MAC without asking: no ARP towards the node.
        netns.ip(self.router, "neigh", "replace", e.primary_ip, "lladdr", e.mac,
                 "dev", link.router_dev, "nud", "permanent")
        if e.device_index == 0:
            # What DHCP gives the primary ENI on boot.
            plen = ipaddress.IPv4Network(e.subnet_cidr).prefixlen
            netns.ip(node.ns, "addr", "add", f"{e.primary_ip}/{plen}", "dev", link.dev)
            netns.ip(node.ns, "link", "set", link.dev, "up")
            netns.ip(node.ns, "route", "add", "default", "via", gw)
            netns.ip(self.cfg.ns("inet"), "route", "replace", f"{e.primary_ip}/32",
                     "via", self.cfg.inet_link_router)
        self.links[e.eni_id] = link
        self.routes[e.eni_id] = set()

    def _remove(self, eni_id: str) -> None:
        link = self.links.pop(eni_id)
        self.routes.pop(eni_id, None)
        log.info("detach %s (%s) from %s", eni_id, link.dev, link.node.ns)
        # Deleting one end of a veth deletes the other, and with it every route via it.
        netns.ip(self.router, "link", "del", link.router_dev, check=False)
        if link.device_index == 0:
            netns.ip(self.cfg.ns("inet"), "route", "del", f"{link.eni.primary_ip}/32",
                     check=False)

    def _sync_routes(self, link: Link) -> None:
        e = link.eni
        want = {f"{ip}/32" for ip in e.secondary_ips} | set(e.prefixes)
        have = self.routes[e.eni_id]
        for cidr in sorted(want - have):
            netns.ip(self.router, "route", "replace", cidr, "via", e.primary_ip,
                     "dev", link.router_dev, "onlink")
        for cidr in sorted(have - want):
            netns.ip(self.router, "route", "del", cidr, "dev", link.router_dev, check=False)
        self.routes[e.eni_id] = want

    def describe(self) -> dict[str, dict]:
        return {eni_id: {"node": l.node.ns, "iface": l.dev, "router_iface": l.router_dev}
                for eni_id, l in self.links.items()}
