"""IMDSv2 per node: tokens as AWS requires them, answers derived from EC2, shown after the
configured lag."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

import pytest

from conftest import new_eni
from vpclab import netns
from vpclab.checks import imds_get


def raw(ns: str, method: str, path: str, headers: dict) -> int:
    with netns.entered(ns):
        req = urllib.request.Request(f"http://169.254.169.254{path}", method=method,
                                     headers=headers)
        try:
            return urllib.request.urlopen(req, timeout=3).status
        except urllib.error.HTTPError as e:
            return e.code


def get(ns: str, path: str) -> str | None:
    try:
        return imds_get(ns, path)
    except urllib.error.HTTPError as e:
        assert e.code == 404
        return None


def test_imdsv2_tokens_are_required(lab):
    ns = lab.node(1)["netns"]
    assert raw(ns, "GET", "/latest/meta-data/instance-id", {}) == 401
    assert raw(ns, "GET", "/latest/meta-data/instance-id",
               {"X-aws-ec2-metadata-token": "forged"}) == 401
    assert raw(ns, "PUT", "/latest/api/token", {}) == 400
    assert raw(ns, "PUT", "/latest/api/token",
               {"X-aws-ec2-metadata-token-ttl-seconds": "21601"}) == 400
    assert get(ns, "meta-data/instance-id") == lab.node(1)["instance_id"]


def test_imds_matches_ec2_for_every_node(lab, ec2):
    for i in (1, 2, 3):
        node = lab.node(i)
        ns = node["netns"]
        primary = node["enis"][0]
        assert get(ns, "meta-data/mac") == primary["mac"]
        assert get(ns, "meta-data/local-ipv4") == node["primary_ip"]
        assert get(ns, "meta-data/instance-type") == "m5.large"
        assert get(ns, "meta-data/placement/availability-zone") == lab.cfg.az
        base = f"meta-data/network/interfaces/macs/{primary['mac']}/"
        assert get(ns, base + "device-number") == "0"
        assert get(ns, base + "interface-id") == primary["id"]
        assert get(ns, base + "subnet-ipv4-cidr-block") == lab.cfg.subnet_cidr
        assert get(ns, base + "vpc-ipv4-cidr-blocks") == \
            f"{lab.cfg.vpc_cidr}\n{lab.cfg.secondary_cidr}"
        sg = ec2.describe_network_interfaces(NetworkInterfaceIds=[primary["id"]]
                                             )["NetworkInterfaces"][0]["Groups"]
        assert get(ns, base + "security-group-ids") == "\n".join(g["GroupId"] for g in sg)
        assert get(ns, base + "ipv4-prefix") is None


@pytest.fixture
def lag(lab):
    lab.control("POST", "/imds-lag", {"seconds": 1.5})
    yield 1.5
    lab.control("POST", "/imds-lag", {"seconds": 0})


def test_changes_show_after_the_lag(lab, ec2, cleanup, lag):
    node = lab.node(2)
    ns = node["netns"]
    eni = new_eni(ec2, lab, cleanup, SecondaryPrivateIpAddressCount=2)
    mac = eni["MacAddress"]
    ec2.attach_network_interface(NetworkInterfaceId=eni["NetworkInterfaceId"],
                                 InstanceId=node["instance_id"], DeviceIndex=2)
    t0 = time.monotonic()
    assert f"{mac}/" not in get(ns, "meta-data/network/interfaces/macs/"), "no lag"
    while f"{mac}/" not in get(ns, "meta-data/network/interfaces/macs/"):
        assert time.monotonic() - t0 < lag + 2, "attachment never showed in IMDS"
        time.sleep(0.1)
    assert time.monotonic() - t0 >= lag - 0.2
    base = f"meta-data/network/interfaces/macs/{mac}/"
    assert get(ns, base + "device-number") == "2"
    assert get(ns, base + "interface-id") == eni["NetworkInterfaceId"]
    assert get(ns, base + "local-ipv4s").split("\n") == \
        [a["PrivateIpAddress"] for a in eni["PrivateIpAddresses"]]

    pfx = ec2.assign_private_ip_addresses(NetworkInterfaceId=eni["NetworkInterfaceId"],
                                          Ipv4PrefixCount=1)["AssignedIpv4Prefixes"][0]["Ipv4Prefix"]
    assert get(ns, base + "ipv4-prefix") is None
    time.sleep(lag + 0.3)
    assert get(ns, base + "ipv4-prefix") == pfx
