"""A lab of its own for the test session (a prefix no other lab uses), torn down at the
end whatever happens. Root-only: these tests create namespaces."""

from __future__ import annotations

import os
import time

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from vpclab import client, lifecycle, netns
from vpclab.config import LabConfig


@pytest.fixture(scope="session")
def lab():
    assert os.geteuid() == 0, "the lab tests need root (network namespaces): run as root"
    cfg = LabConfig(prefix=f"vt{os.getpid() % 100000}", nodes=3, imds_lag=0.0)
    try:
        status = lifecycle.up(cfg)
        yield Lab(cfg, status)
    finally:
        lifecycle.down(cfg.prefix)


class Lab:
    def __init__(self, cfg: LabConfig, status: dict):
        self.cfg = cfg
        self.boot = status

    def status(self) -> dict:
        return client.call(self.cfg.control_socket, "GET", "/status")

    def control(self, method: str, path: str, body: dict | None = None) -> dict:
        return client.call(self.cfg.control_socket, method, path, body)

    def node(self, i: int) -> dict:
        return next(n for n in self.status()["nodes"] if n["name"] == f"node{i}")

    def ec2(self, ns: str | None = None, retries: int = 1, read_timeout: float = 30):
        """boto3 against the lab's EC2 endpoint, connecting from inside `ns` (default: the
        EC2 namespace itself). No client-side retries: tests see each error as sent."""
        ns = ns or self.cfg.ns("aws")
        with netns.entered(ns):
            c = boto3.client("ec2", region_name=self.cfg.region,
                             endpoint_url=self.cfg.ec2_endpoint,
                             aws_access_key_id="lab", aws_secret_access_key="lab",
                             config=Config(retries={"total_max_attempts": retries, "mode": "standard"},
                                           read_timeout=read_timeout, connect_timeout=5))
            c.describe_regions()  # open the pooled connection inside the namespace
        return c


def wait_for(fn, timeout=10.0, interval=0.1):
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v or time.monotonic() > deadline:
            return v
        time.sleep(interval)


@pytest.fixture
def ec2(lab):
    return lab.ec2()


@pytest.fixture
def cleanup(ec2):
    """ENIs a test made: detached and deleted afterwards, in that order."""
    made: list[str] = []
    yield made
    for eni_id in made:
        try:
            n = ec2.describe_network_interfaces(NetworkInterfaceIds=[eni_id])["NetworkInterfaces"][0]
            att = n.get("Attachment") or {}
            if att.get("AttachmentId") and att.get("DeviceIndex") != 0:
                ec2.detach_network_interface(AttachmentId=att["AttachmentId"])
            ec2.delete_network_interface(NetworkInterfaceId=eni_id)
        except ClientError:
            pass


def new_eni(ec2, lab, cleanup, **kw) -> dict:
    eni = ec2.create_network_interface(SubnetId=kw.pop("SubnetId", lab.boot["subnet_id"]),
                                       **kw)["NetworkInterface"]
    cleanup.append(eni["NetworkInterfaceId"])
    return eni
