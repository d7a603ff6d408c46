"""The fabric follows EC2: ENIs appear as interfaces with their MAC in their node, the VPC
router delivers each address to the ENI that owns it and drops wrong-ENI sources."""

from __future__ import annotations

import json
import subprocess

from conftest import new_eni, wait_for
from vpclab import netns


def link(ns: str, dev: str) -> dict | None:
    out = netns.ip(ns, "-j", "link", "show", dev, check=False)
    return json.loads(out)[0] if out.strip() else None


def ping(ns: str, ip: str) -> bool:
    return subprocess.run(["ip", "netns", "exec", ns, "ping", "-c", "1", "-W", "1", ip],
                          capture_output=True).returncode == 0


def rp_filter_drops(ns: str) -> int:
    lines = netns.run(["ip", "netns", "exec", ns, "cat", "/proc/net/netstat"]).splitlines()
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            return int(dict(zip(names.split(), values.split()))["IPReversePathFilter"])
    raise AssertionError("no TcpExt in /proc/net/netstat")


def route_dev(ns: str, ip: str) -> str:
    return json.loads(netns.ip(ns, "-j", "route", "get", ip))[0]["dev"]


def test_attach_and_detach_add_and_remove_the_interface(lab, ec2, cleanup):
    node = lab.node(3)
    eni = new_eni(ec2, lab, cleanup)
    att = ec2.attach_network_interface(NetworkInterfaceId=eni["NetworkInterfaceId"],
                                       InstanceId=node["instance_id"], DeviceIndex=1)
    got = link(node["netns"], "eth1")
    assert got is not None and got["address"] == eni["MacAddress"]
    assert link(lab.node(1)["netns"], "eth1") is None or \
        link(lab.node(1)["netns"], "eth1")["address"] != eni["MacAddress"]
    ec2.detach_network_interface(AttachmentId=att["AttachmentId"])
    assert link(node["netns"], "eth1") is None
    ec2.delete_network_interface(NetworkInterfaceId=eni["NetworkInterfaceId"])


def test_router_delivers_to_the_owning_eni_and_drops_wrong_eni_sources(lab, ec2, cleanup):
    node, other = lab.node(3), lab.node(1)
    ns, router = node["netns"], lab.cfg.ns("vpc")
    eni = new_eni(ec2, lab, cleanup)
    eni_id = eni["NetworkInterfaceId"]
    ec2.attach_network_interface(NetworkInterfaceId=eni_id, InstanceId=node["instance_id"],
                                 DeviceIndex=1)
    ip = ec2.assign_private_ip_addresses(NetworkInterfaceId=eni_id,
                                         SecondaryPrivateIpAddressCount=1
                                         )["AssignedPrivateIpAddresses"][0]["PrivateIpAddress"]
    assert route_dev(router, ip) == "n3e1"
    # What an agent does with a secondary ENI: address on it, replies out of it, and loose
    # reverse-path filtering so the node itself accepts what arrives there.
    for key in ("all", "eth1"):
        netns.sysctl(ns, f"net.ipv4.conf.{key}.rp_filter", "2")
    netns.ip(ns, "link", "set", "eth1", "up")
    netns.ip(ns, "addr", "add", f"{ip}/32", "dev", "eth1")
    netns.ip(ns, "route", "add", "default", "via", "10.0.0.1", "dev", "eth1", "onlink",
             "table", "101")
    netns.ip(ns, "rule", "add", "from", ip, "lookup", "101")
    try:
        assert ping(other["netns"], ip), "VPC router did not deliver to the owning ENI"
        # Replies sourced from that address now leave through eth0, an ENI that does not
        # own it: the VPC drops them.
        netns.ip(ns, "rule", "del", "from", ip, "lookup", "101")
        # Resolve the neighbour from the node's own address first: otherwise the router
        # already refuses the ARP request sourced from the wrong address, and no IP packet
        # reaches the counter.
        assert ping(ns, other["primary_ip"])
        before = rp_filter_drops(router)
        assert not ping(other["netns"], ip), "wrong-ENI source got through"
        assert rp_filter_drops(router) > before
    finally:
        netns.ip(ns, "rule", "del", "from", ip, "lookup", "101", check=False)
        netns.ip(ns, "addr", "del", f"{ip}/32", "dev", "eth1", check=False)

    pfx = ec2.assign_private_ip_addresses(NetworkInterfaceId=eni_id, Ipv4PrefixCount=1
                                          )["AssignedIpv4Prefixes"][0]["Ipv4Prefix"]
    inside = pfx.split("/")[0].rsplit(".", 1)[0] + "." + str(int(pfx.split("/")[0].split(".")[3]) + 5)
    assert route_dev(router, inside) == "n3e1"

    ec2.unassign_private_ip_addresses(NetworkInterfaceId=eni_id, PrivateIpAddresses=[ip],
                                      Ipv4Prefixes=[pfx])
    assert route_dev(router, ip) == "inet0", "unassigned address still routed to the ENI"
    assert route_dev(router, inside) == "inet0"


def test_primary_addresses_reach_the_internet_and_pod_addresses_do_not(lab, ec2, cleanup):
    node = lab.node(2)
    inet = lab.cfg.ns("inet")
    assert ping(node["netns"], lab.cfg.public_test_ip)
    # The internet has a route back to node primaries only.
    routes = netns.ip(inet, "route")
    assert node["primary_ip"] in routes
    eni = new_eni(ec2, lab, cleanup, SecondaryPrivateIpAddressCount=1)
    secondary = eni["PrivateIpAddresses"][1]["PrivateIpAddress"]
    assert wait_for(lambda: "unreachable" in netns.run(
        ["ip", "-n", inet, "route", "get", secondary], check=False) or
        netns.run(["ip", "-n", inet, "route", "get", secondary], check=False) == "", 1)
