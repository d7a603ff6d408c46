"""`lab check`: every path the installed components support, PASS/FAIL each."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from typing import Callable

import boto3

from . import netns
from .config import LabConfig


def imds_get(ns: str, path: str) -> str:
    with netns.entered(ns):
        tok_req = urllib.request.Request(
            "http://169.254.169.254/latest/api/token", method="PUT",
            headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
        token = urllib.request.urlopen(tok_req, timeout=3).read().decode()
        req = urllib.request.Request(f"http://169.254.169.254/latest/{path}",
                                     headers={"X-aws-ec2-metadata-token": token})
        return urllib.request.urlopen(req, timeout=3).read().decode()


def ec2_from(ns: str, cfg: LabConfig):
    """A boto3 EC2 client whose connections are made inside namespace `ns`."""
    with netns.entered(ns):
        c = boto3.client("ec2", region_name=cfg.region, endpoint_url=cfg.ec2_endpoint,
                         aws_access_key_id="lab", aws_secret_access_key="lab")
        # Make the connection now, while inside the namespace; the pool keeps it.
        c.describe_regions()
    return c


def ping(ns: str, ip: str) -> bool:
    r = subprocess.run(["ip", "netns", "exec", ns, "ping", "-c", "1", "-W", "2", ip],
                       capture_output=True)
    return r.returncode == 0


def link_mac(ns: str, dev: str) -> str:
    out = json.loads(netns.ip(ns, "-j", "link", "show", dev))
    return out[0]["address"]


def run_checks(cfg: LabConfig, status: dict) -> list[tuple[str, bool, str]]:
    results: list[tuple[str, bool, str]] = []

    def check(name: str, fn: Callable[[], tuple[bool, str]]) -> None:
        try:
            ok, detail = fn()
        except Exception as e:  # noqa: BLE001 - a failing check reports, never aborts
            ok, detail = False, f"{type(e).__name__}: {e}"
        results.append((name, ok, detail))

    nodes = status["nodes"]
    for n in nodes:
        ns = n["netns"]
        check(f"{n['name']}: IMDSv2 instance-id matches EC2",
              lambda ns=ns, n=n: (lambda got: (got == n["instance_id"], got))(
                  imds_get(ns, "meta-data/instance-id")))
        for e in n["enis"]:
            check(f"{n['name']}: {e['iface']} carries the MAC of {e['id']}",
                  lambda ns=ns, e=e: (lambda mac: (mac == e["mac"], mac))(
                      link_mac(ns, e["iface"])))
        check(f"{n['name']}: EC2 endpoint {cfg.ec2_endpoint} reachable and sees the instance",
              lambda ns=ns, n=n: (lambda c: (
                  c.describe_instances(InstanceIds=[n["instance_id"]])["Reservations"] != [],
                  "DescribeInstances ok"))(ec2_from(ns, cfg)))
        check(f"{n['name']}: reaches the internet test address {cfg.public_test_ip}",
              lambda ns=ns: (ping(ns, cfg.public_test_ip), "ping"))
    for a in nodes:
        for b in nodes:
            if a is not b:
                check(f"{a['name']} -> {b['name']} primary IP through the VPC router",
                      lambda a=a, b=b: (ping(a["netns"], b["primary_ip"]), "ping"))
    return results
