"""The EC2 front against moto: what AWS enforces, AWS's shapes, and injected faults."""

from __future__ import annotations

import ipaddress
import time

import pytest
from botocore.exceptions import ClientError

from vpclab.addressing import Subnet

from conftest import new_eni


def code(excinfo) -> str:
    return excinfo.value.response["Error"]["Code"]


def status_of(excinfo) -> int:
    return excinfo.value.response["ResponseMetadata"]["HTTPStatusCode"]


def test_eni_and_address_limits_of_the_instance_type(lab, ec2, cleanup):
    inst = lab.node(1)["instance_id"]
    limits = ec2.describe_instance_types(InstanceTypes=["m5.large"])["InstanceTypes"][0]
    assert limits["NetworkInfo"]["MaximumNetworkInterfaces"] == 3
    assert limits["NetworkInfo"]["Ipv4AddressesPerInterface"] == 10
    enis = [new_eni(ec2, lab, cleanup) for _ in range(3)]
    ec2.attach_network_interface(NetworkInterfaceId=enis[0]["NetworkInterfaceId"],
                                 InstanceId=inst, DeviceIndex=1)
    ec2.attach_network_interface(NetworkInterfaceId=enis[1]["NetworkInterfaceId"],
                                 InstanceId=inst, DeviceIndex=2)
    with pytest.raises(ClientError) as e:
        ec2.attach_network_interface(NetworkInterfaceId=enis[2]["NetworkInterfaceId"],
                                     InstanceId=inst, DeviceIndex=3)
    assert code(e) == "AttachmentLimitExceeded"

    eni = enis[0]["NetworkInterfaceId"]
    ec2.assign_private_ip_addresses(NetworkInterfaceId=eni, SecondaryPrivateIpAddressCount=9)
    with pytest.raises(ClientError) as e:
        ec2.assign_private_ip_addresses(NetworkInterfaceId=eni, SecondaryPrivateIpAddressCount=1)
    assert code(e) == "PrivateIpAddressLimitExceeded"
    with pytest.raises(ClientError) as e:
        ec2.assign_private_ip_addresses(NetworkInterfaceId=eni, Ipv4PrefixCount=1)
    assert code(e) == "PrivateIpAddressLimitExceeded", "a prefix takes an address slot too"
    n = ec2.describe_network_interfaces(NetworkInterfaceIds=[eni])["NetworkInterfaces"][0]
    assert len(n["PrivateIpAddresses"]) == 10


def test_device_indexes_are_unique_and_the_primary_stays(lab, ec2, cleanup):
    node = lab.node(1)
    inst = node["instance_id"]
    a, b = new_eni(ec2, lab, cleanup), new_eni(ec2, lab, cleanup)
    ec2.attach_network_interface(NetworkInterfaceId=a["NetworkInterfaceId"], InstanceId=inst,
                                 DeviceIndex=1)
    with pytest.raises(ClientError) as e:
        ec2.attach_network_interface(NetworkInterfaceId=b["NetworkInterfaceId"],
                                     InstanceId=inst, DeviceIndex=1)
    assert code(e) == "InvalidParameterValue" and "device index '1'" in str(e.value)
    with pytest.raises(ClientError) as e:
        ec2.attach_network_interface(NetworkInterfaceId=a["NetworkInterfaceId"],
                                     InstanceId=lab.node(2)["instance_id"], DeviceIndex=1)
    assert code(e) == "InvalidNetworkInterface.InUse"
    primary = ec2.describe_network_interfaces(
        NetworkInterfaceIds=[node["enis"][0]["id"]])["NetworkInterfaces"][0]
    with pytest.raises(ClientError) as e:
        ec2.detach_network_interface(AttachmentId=primary["Attachment"]["AttachmentId"])
    assert code(e) == "OperationNotPermitted"


def test_an_attached_eni_cannot_be_deleted(lab, ec2, cleanup):
    eni = new_eni(ec2, lab, cleanup)["NetworkInterfaceId"]
    att = ec2.attach_network_interface(NetworkInterfaceId=eni,
                                       InstanceId=lab.node(2)["instance_id"], DeviceIndex=1)
    with pytest.raises(ClientError) as e:
        ec2.delete_network_interface(NetworkInterfaceId=eni)
    assert code(e) == "InvalidNetworkInterface.InUse"
    ec2.detach_network_interface(AttachmentId=att["AttachmentId"])
    ec2.delete_network_interface(NetworkInterfaceId=eni)
    with pytest.raises(ClientError) as e:
        ec2.describe_network_interfaces(NetworkInterfaceIds=[eni])
    assert code(e) == "InvalidNetworkInterfaceID.NotFound"


def test_subnet_exhaustion(lab, ec2, cleanup):
    small = ec2.create_subnet(VpcId=lab.boot["vpc_id"], CidrBlock="10.0.64.0/28",
                              AvailabilityZone=lab.cfg.az)["Subnet"]["SubnetId"]
    # /28: 16 addresses, 5 reserved by AWS, 11 usable: a primary and 10 secondaries.
    eni = new_eni(ec2, lab, cleanup, SubnetId=small, SecondaryPrivateIpAddressCount=10)
    ips = [a["PrivateIpAddress"] for a in eni["PrivateIpAddresses"]]
    assert len(set(ips)) == 11
    s = Subnet.parse("10.0.64.0/28")
    assert all(s.is_assignable(ipaddress.IPv4Address(ip)) for ip in ips)
    with pytest.raises(ClientError) as e:
        ec2.assign_private_ip_addresses(NetworkInterfaceId=eni["NetworkInterfaceId"],
                                        SecondaryPrivateIpAddressCount=1)
    assert code(e) == "InsufficientFreeAddressesInSubnet"
    with pytest.raises(ClientError) as e:
        ec2.create_network_interface(SubnetId=small)
    assert code(e) == "InsufficientFreeAddressesInSubnet"
    with pytest.raises(ClientError) as e:
        ec2.assign_private_ip_addresses(NetworkInterfaceId=eni["NetworkInterfaceId"],
                                        Ipv4PrefixCount=1)
    assert code(e) == "InsufficientFreeAddressesInSubnet"


def test_no_duplicate_or_reserved_addresses(lab, ec2, cleanup):
    a = new_eni(ec2, lab, cleanup, SecondaryPrivateIpAddressCount=5)
    b = new_eni(ec2, lab, cleanup)
    taken = a["PrivateIpAddresses"][1]["PrivateIpAddress"]
    with pytest.raises(ClientError) as e:
        ec2.assign_private_ip_addresses(NetworkInterfaceId=b["NetworkInterfaceId"],
                                        PrivateIpAddresses=[taken])
    assert code(e) == "InvalidIPAddress.InUse"
    with pytest.raises(ClientError) as e:
        ec2.assign_private_ip_addresses(NetworkInterfaceId=b["NetworkInterfaceId"],
                                        PrivateIpAddresses=["10.0.0.2"])
    assert code(e) == "InvalidParameterValue" and "reserved" in str(e.value)
    for _ in range(5):
        ec2.assign_private_ip_addresses(NetworkInterfaceId=b["NetworkInterfaceId"],
                                        SecondaryPrivateIpAddressCount=8)
    every = [a["PrivateIpAddress"]
             for n in ec2.describe_network_interfaces(Filters=[
                 {"Name": "subnet-id", "Values": [lab.boot["subnet_id"]]}])["NetworkInterfaces"]
             for a in n["PrivateIpAddresses"]]
    assert len(every) == len(set(every)), "an address was handed out twice"
    s = Subnet.parse(lab.boot["subnet_cidr"])
    assert not [ip for ip in every if ipaddress.IPv4Address(ip) in s.reserved()]


def test_assign_answers_only_the_new_addresses(lab, ec2, cleanup):
    eni = new_eni(ec2, lab, cleanup)
    r = ec2.assign_private_ip_addresses(NetworkInterfaceId=eni["NetworkInterfaceId"],
                                        SecondaryPrivateIpAddressCount=2)
    new = [a["PrivateIpAddress"] for a in r["AssignedPrivateIpAddresses"]]
    assert len(new) == 2 and eni["PrivateIpAddress"] not in new


def test_prefix_delegation(lab, ec2, cleanup):
    eni = new_eni(ec2, lab, cleanup, Ipv4PrefixCount=1)
    assert len(eni["Ipv4Prefixes"]) == 1
    eni_id = eni["NetworkInterfaceId"]
    r = ec2.assign_private_ip_addresses(NetworkInterfaceId=eni_id, Ipv4PrefixCount=2)
    got = [p["Ipv4Prefix"] for p in r["AssignedIpv4Prefixes"]]
    assert len(got) == 2
    for p in got + [eni["Ipv4Prefixes"][0]["Ipv4Prefix"]]:
        net = ipaddress.IPv4Network(p)  # strict: raises unless aligned
        assert net.prefixlen == 28
    described = ec2.describe_network_interfaces(NetworkInterfaceIds=[eni_id])["NetworkInterfaces"][0]
    all_pfx = sorted(p["Ipv4Prefix"] for p in described["Ipv4Prefixes"])
    assert len(all_pfx) == 3
    # Addresses handed out later never fall inside a delegated prefix.
    other = new_eni(ec2, lab, cleanup, SecondaryPrivateIpAddressCount=20)
    for a in other["PrivateIpAddresses"]:
        ip = ipaddress.IPv4Address(a["PrivateIpAddress"])
        assert not any(ip in ipaddress.IPv4Network(p) for p in all_pfx)
    ec2.unassign_private_ip_addresses(NetworkInterfaceId=eni_id, Ipv4Prefixes=[got[0]])
    described = ec2.describe_network_interfaces(NetworkInterfaceIds=[eni_id])["NetworkInterfaces"][0]
    assert got[0] not in [p["Ipv4Prefix"] for p in described["Ipv4Prefixes"]]
    with pytest.raises(ClientError) as e:
        ec2.unassign_private_ip_addresses(NetworkInterfaceId=eni_id, Ipv4Prefixes=[got[0]])
    assert code(e) == "InvalidParameterValue"


@pytest.mark.parametrize("fault,http", [("RequestLimitExceeded", 503), ("InternalError", 500),
                                        ("UnauthorizedOperation", 403),
                                        ("InsufficientFreeAddressesInSubnet", 400)])
def test_fault_injection_fails_the_next_n_calls(lab, ec2, fault, http):
    lab.control("POST", "/faults", {"action": "DescribeInstances", "count": 2, "code": fault})
    try:
        for _ in range(2):
            with pytest.raises(ClientError) as e:
                ec2.describe_instances()
            assert code(e) == fault and status_of(e) == http
        assert ec2.describe_instances()["Reservations"]
    finally:
        lab.control("DELETE", "/faults")


def test_fault_injection_can_hang_a_call(lab, ec2):
    lab.control("POST", "/faults", {"action": "DescribeSubnets", "count": 1, "delay": 1.5})
    t = time.monotonic()
    ec2.describe_subnets()
    assert time.monotonic() - t >= 1.5
    t = time.monotonic()
    ec2.describe_subnets()
    assert time.monotonic() - t < 1.0
