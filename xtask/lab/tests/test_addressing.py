import ipaddress
import random

import pytest

from vpclab.addressing import (Exhausted, Subnet, check_explicit, check_explicit_prefixes,
                               expand, free_count, pick_ips, pick_prefixes)


def test_reserved_are_first_four_and_broadcast():
    s = Subnet.parse("10.0.16.0/28")
    assert {str(i) for i in s.reserved()} == {
        "10.0.16.0", "10.0.16.1", "10.0.16.2", "10.0.16.3", "10.0.16.15"}
    assert s.usable() == 11
    assert str(s.gateway()) == "10.0.16.1"


def test_pick_ips_never_returns_used_or_reserved_and_exhausts():
    s = Subnet.parse("10.0.16.0/28")
    used = expand(["10.0.16.4"], [])
    got = pick_ips(s, used, 10, random.Random(1))
    assert len(set(got)) == 10
    for ip in got:
        assert s.is_assignable(ipaddress.IPv4Address(ip)) and ip != "10.0.16.4"
    with pytest.raises(Exhausted):
        pick_ips(s, used | expand(got, []), 1)
    assert free_count(s, used | expand(got, [])) == 0


def test_prefixes_are_aligned_free_and_skip_reserved_blocks():
    s = Subnet.parse("10.0.32.0/26")
    # The first /28 holds the reserved .0-.3, the last the broadcast: two blocks usable.
    got = pick_prefixes(s, set(), 2)
    assert got == ["10.0.32.16/28", "10.0.32.32/28"]
    used = expand(["10.0.32.20"], [])
    assert pick_prefixes(s, used, 1) == ["10.0.32.32/28"]
    with pytest.raises(Exhausted):
        pick_prefixes(s, used, 2)


def test_explicit_requests_are_validated():
    s = Subnet.parse("10.0.16.0/24")
    used = expand(["10.0.16.10"], ["10.0.16.32/28"])
    assert check_explicit(s, used, ["10.0.16.11"]) is None
    assert "in use" in check_explicit(s, used, ["10.0.16.10"])
    assert "in use" in check_explicit(s, used, ["10.0.16.40"])
    assert "in use" in check_explicit(s, used, ["10.0.16.12", "10.0.16.12"])
    assert "reserved" in check_explicit(s, used, ["10.0.16.2"])
    assert "range" in check_explicit(s, used, ["10.0.17.5"])
    assert check_explicit_prefixes(s, used, ["10.0.16.48/28"]) is None
    assert "aligned" in check_explicit_prefixes(s, used, ["10.0.16.50/28"])
    assert "overlaps" in check_explicit_prefixes(s, used, ["10.0.16.32/28"])


def test_asking_for_nothing_gets_nothing_even_when_full():
    s = Subnet.parse("10.0.16.0/28")
    full = expand([str(ip) for ip in s.cidr], [])
    assert pick_ips(s, full, 0) == []
    assert pick_prefixes(s, full, 0) == []
