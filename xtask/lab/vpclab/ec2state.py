"""The EC2 view the fabric and IMDS are derived from: ENIs with their attachment,
addresses and prefixes, read from moto plus the front's prefix store."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Eni:
    eni_id: str
    mac: str
    subnet_id: str
    subnet_cidr: str
    vpc_id: str
    vpc_cidrs: tuple[str, ...]
    primary_ip: str
    secondary_ips: tuple[str, ...]
    prefixes: tuple[str, ...]
    sg_ids: tuple[str, ...]
    owner_id: str
    instance_id: str | None
    device_index: int | None
    attachment_id: str | None
    tags: tuple[tuple[str, str], ...] = ()

    @property
    def all_ips(self) -> tuple[str, ...]:
        return (self.primary_ip,) + self.secondary_ips


@dataclass
class PrefixStore:
    """/28 prefixes per ENI. moto accepts prefix parameters but stores nothing, so the
    front keeps them here."""
    by_eni: dict[str, list[str]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def get(self, eni_id: str) -> list[str]:
        with self.lock:
            return list(self.by_eni.get(eni_id, []))

    def add(self, eni_id: str, prefixes: list[str]) -> None:
        with self.lock:
            self.by_eni.setdefault(eni_id, []).extend(prefixes)

    def remove(self, eni_id: str, prefixes: list[str]) -> None:
        with self.lock:
            left = [p for p in self.by_eni.get(eni_id, []) if p not in prefixes]
            self.by_eni[eni_id] = left

    def drop(self, eni_id: str) -> None:
        with self.lock:
            self.by_eni.pop(eni_id, None)

    def snapshot(self) -> dict[str, list[str]]:
        with self.lock:
            return {k: list(v) for k, v in self.by_eni.items()}


def read_enis(ec2, prefixes: PrefixStore) -> list[Eni]:
    """Every ENI moto knows, joined with subnets, VPCs and stored prefixes."""
    subnets = {s["SubnetId"]: s for s in ec2.describe_subnets()["Subnets"]}
    vpcs = {v["VpcId"]: v for v in ec2.describe_vpcs()["Vpcs"]}
    pfx = prefixes.snapshot()
    out = []
    for page in ec2.get_paginator("describe_network_interfaces").paginate():
        for n in page["NetworkInterfaces"]:
            subnet = subnets.get(n["SubnetId"], {})
            vpc = vpcs.get(n["VpcId"], {})
            att = n.get("Attachment") or {}
            attached = att.get("Status") in ("attached", "attaching") and att.get("InstanceId")
            primary = next(a["PrivateIpAddress"] for a in n["PrivateIpAddresses"] if a["Primary"])
            out.append(Eni(
                eni_id=n["NetworkInterfaceId"],
                mac=n["MacAddress"],
                subnet_id=n["SubnetId"],
                subnet_cidr=subnet.get("CidrBlock", ""),
                vpc_id=n["VpcId"],
                vpc_cidrs=tuple(a["CidrBlock"] for a in vpc.get("CidrBlockAssociationSet", [])),
                primary_ip=primary,
                secondary_ips=tuple(a["PrivateIpAddress"] for a in n["PrivateIpAddresses"]
                                    if not a["Primary"]),
                prefixes=tuple(pfx.get(n["NetworkInterfaceId"], [])),
                sg_ids=tuple(g["GroupId"] for g in n.get("Groups", [])),
                owner_id=n.get("OwnerId", ""),
                instance_id=att.get("InstanceId") if attached else None,
                device_index=att.get("DeviceIndex") if attached else None,
                attachment_id=att.get("AttachmentId") if attached else None,
                tags=tuple((t["Key"], t["Value"]) for t in n.get("TagSet", [])),
            ))
    return out
