"""Pure address arithmetic of a VPC subnet: what AWS reserves, what is free, and picking
secondary addresses and /28 prefixes the way EC2 does. No I/O here."""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass
from typing import Iterable

PREFIX_LEN = 28


class Exhausted(Exception):
    """Not enough free addresses (or aligned /28 blocks) in the subnet."""


@dataclass(frozen=True)
class Subnet:
    cidr: ipaddress.IPv4Network

    @classmethod
    def parse(cls, cidr: str) -> "Subnet":
        return cls(ipaddress.IPv4Network(cidr))

    def reserved(self) -> set[ipaddress.IPv4Address]:
        """AWS reserves the network address, the next three (router, DNS, future) and the
        broadcast address of every subnet."""
        n = self.cidr
        return {n.network_address + i for i in range(4)} | {n.broadcast_address}

    def gateway(self) -> ipaddress.IPv4Address:
        return self.cidr.network_address + 1

    def usable(self) -> int:
        return self.cidr.num_addresses - 5

    def is_assignable(self, ip: ipaddress.IPv4Address) -> bool:
        return ip in self.cidr and ip not in self.reserved()


def expand(ips: Iterable[str], prefixes: Iterable[str]) -> set[ipaddress.IPv4Address]:
    """Every address taken by these IPs and prefixes."""
    used = {ipaddress.IPv4Address(i) for i in ips}
    for p in prefixes:
        used.update(ipaddress.IPv4Network(p))
    return used


def free_count(subnet: Subnet, used: set[ipaddress.IPv4Address]) -> int:
    return subnet.usable() - len({u for u in used if subnet.is_assignable(u)})


def pick_ips(subnet: Subnet, used: set[ipaddress.IPv4Address], n: int,
             rng: random.Random | None = None) -> list[str]:
    """n free, non-reserved addresses. EC2 picks them at random, so code under test cannot
    rely on addresses being contiguous."""
    rng = rng or random.Random()
    taken = used | subnet.reserved()
    free = [ip for ip in subnet.cidr if ip not in taken]
    if len(free) < n:
        raise Exhausted(f"{len(free)} free addresses in {subnet.cidr}, {n} requested")
    return [str(ip) for ip in sorted(rng.sample(free, n))]


def pick_prefixes(subnet: Subnet, used: set[ipaddress.IPv4Address], n: int) -> list[str]:
    """n aligned /28 blocks inside the subnet that hold no used or reserved address."""
    if n == 0:
        return []
    if subnet.cidr.prefixlen > PREFIX_LEN:
        raise Exhausted(f"subnet {subnet.cidr} is smaller than a /{PREFIX_LEN}")
    taken = used | subnet.reserved()
    out = []
    for block in subnet.cidr.subnets(new_prefix=PREFIX_LEN):
        if not any(ip in taken for ip in block):
            out.append(str(block))
            if len(out) == n:
                return out
    raise Exhausted(f"{len(out)} free /{PREFIX_LEN} prefixes in {subnet.cidr}, {n} requested")


def check_explicit(subnet: Subnet, used: set[ipaddress.IPv4Address], ips: list[str]) -> str | None:
    """Why these requested addresses cannot be assigned, or None."""
    seen: set[ipaddress.IPv4Address] = set()
    for s in ips:
        ip = ipaddress.IPv4Address(s)
        if ip not in subnet.cidr:
            return f"Address {s} does not fall within the subnet's address range"
        if ip in subnet.reserved():
            return f"Address {s} is reserved by AWS in subnet {subnet.cidr}"
        if ip in used or ip in seen:
            return f"Address {s} is in use"
        seen.add(ip)
    return None


def check_explicit_prefixes(subnet: Subnet, used: set[ipaddress.IPv4Address],
                            prefixes: list[str]) -> str | None:
    for p in prefixes:
        net = ipaddress.IPv4Network(p, strict=False)
        if net.prefixlen != PREFIX_LEN or str(net) != p:
            return f"Prefix {p} is not an aligned /{PREFIX_LEN}"
        if not net.subnet_of(subnet.cidr):
            return f"Prefix {p} does not fall within the subnet's address range"
        if any(ip in used or ip in subnet.reserved() for ip in net):
            return f"Prefix {p} overlaps addresses in use"
    return None
