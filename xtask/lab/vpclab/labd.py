"""labd: the lab's daemon, run inside the `<prefix>-aws` namespace. Creates the VPC, subnet
and instances in moto, the node namespaces, serves the EC2 front, one IMDS per node and a
control API on a unix socket, and keeps the fabric in step with EC2."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import signal
import socket
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from socketserver import UnixStreamServer

import boto3

from . import ec2front, fabric, imds, netns
from .config import LabConfig
from .ec2state import PrefixStore, read_enis

log = logging.getLogger("labd")
IMAGE_ID = "ami-12c6146b"


def moto_client(cfg: LabConfig):
    return boto3.client("ec2", region_name=cfg.region,
                        endpoint_url=f"http://127.0.0.1:{cfg.moto_port}",
                        aws_access_key_id="lab", aws_secret_access_key="lab")


def wait_for_moto(cfg: LabConfig, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{cfg.moto_port}/moto-api/", timeout=1)
            return
        except Exception:  # noqa: BLE001 - not up yet
            if time.monotonic() > deadline:
                raise RuntimeError(f"moto did not answer on 127.0.0.1:{cfg.moto_port}")
            time.sleep(0.1)


class Lab:
    def __init__(self, cfg: LabConfig):
        self.cfg = cfg
        self.ec2 = moto_client(cfg)
        self.prefixes = PrefixStore()
        self.sync_lock = threading.Lock()
        self.histories: dict[str, imds.History] = {}
        self.nodes: list[fabric.Node] = []
        self.instances: dict[str, imds.Instance] = {}
        self.servers = []
        self.stop = threading.Event()

    def create_world(self) -> None:
        cfg = self.cfg
        vpc = self.ec2.create_vpc(CidrBlock=cfg.vpc_cidr, TagSpecifications=[
            {"ResourceType": "vpc", "Tags": [{"Key": "Name", "Value": f"{cfg.prefix}-vpc"}]}])
        self.vpc_id = vpc["Vpc"]["VpcId"]
        self.ec2.associate_vpc_cidr_block(VpcId=self.vpc_id, CidrBlock=cfg.secondary_cidr)
        self.node_subnets: list[str] = []
        self.pod_subnets: list[str] = []
        for z in range(cfg.zones):
            self.node_subnets.append(self.add_subnet(
                cfg.node_subnet_cidr(z), cfg.zone(z), {"Name": f"{cfg.prefix}-nodes-{z}"}))
            self.pod_subnets.append(self.add_subnet(
                cfg.pod_subnet_cidr(z), cfg.zone(z), {"Name": f"{cfg.prefix}-pods-{z}"}))
        self.subnet_id = self.node_subnets[0]
        # A security group for pods, apart from the nodes' (the VPC's default group), so
        # a test can tell which one an ENI got.
        self.pods_sg = self.ec2.create_security_group(
            GroupName=f"{cfg.prefix}-pods", Description="pods", VpcId=self.vpc_id)["GroupId"]
        for i in range(1, cfg.nodes + 1):
            z = cfg.node_zone(i)
            net = ipaddress.IPv4Network(cfg.node_subnet_cidr(z))
            ip = str(net.network_address + 10 + i)
            r = self.ec2.run_instances(
                ImageId=IMAGE_ID, MinCount=1, MaxCount=1, InstanceType=cfg.instance_type,
                SubnetId=self.node_subnets[z], PrivateIpAddress=ip,
                TagSpecifications=[{"ResourceType": "instance", "Tags": [
                    {"Key": "Name", "Value": f"node{i}"}]}])
            inst = r["Instances"][0]
            node = fabric.Node(i, cfg.node_ns(i), inst["InstanceId"])
            self.nodes.append(node)
            self.instances[node.instance_id] = imds.Instance(
                inst["InstanceId"], cfg.instance_type, cfg.region, cfg.zone(z),
                inst.get("OwnerId") or r.get("OwnerId", "123456789012"), IMAGE_ID)
            self.histories[node.instance_id] = imds.History(cfg.imds_lag)
            fabric.build_node(cfg, node)
        self.fabric = fabric.Fabric(cfg, self.nodes)
        self.sync()

    def add_subnet(self, cidr: str, az: str, tags: dict[str, str]) -> str:
        spec = [{"ResourceType": "subnet",
                 "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}] if tags else []
        return self.ec2.create_subnet(VpcId=self.vpc_id, CidrBlock=cidr, AvailabilityZone=az,
                                      TagSpecifications=spec)["Subnet"]["SubnetId"]

    def set_tags(self, resource: str, tags: dict[str, str], remove: list[str]) -> None:
        if tags:
            self.ec2.create_tags(Resources=[resource],
                                 Tags=[{"Key": k, "Value": v} for k, v in tags.items()])
        if remove:
            self.ec2.delete_tags(Resources=[resource], Tags=[{"Key": k} for k in remove])

    def attach_foreign_eni(self, node: int, device_index: int, tags: dict[str, str],
                           interface_type: str | None) -> str:
        """An ENI some other software attached to node `node` (1-based): tagged no_manage,
        or of another interface type (trunk, efa). A negative device index leaves it
        detached in the node's subnet (an ENI a terminated node leaked)."""
        z = self.cfg.node_zone(node)
        kw = {"InterfaceType": interface_type} if interface_type else {}
        spec = [{"ResourceType": "network-interface",
                 "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}] if tags else []
        eni = self.ec2.create_network_interface(
            SubnetId=self.node_subnets[z], TagSpecifications=spec, **kw)["NetworkInterface"]
        if device_index < 0:
            # Left detached: what a terminated node leaves behind.
            self.sync()
            return eni["NetworkInterfaceId"]
        self.ec2.attach_network_interface(NetworkInterfaceId=eni["NetworkInterfaceId"],
                                          InstanceId=self.nodes[node - 1].instance_id,
                                          DeviceIndex=device_index)
        self.sync()
        return eni["NetworkInterfaceId"]

    def add_vpc_cidr(self, cidr: str) -> None:
        self.ec2.associate_vpc_cidr_block(VpcId=self.vpc_id, CidrBlock=cidr)
        self.sync()  # IMDS shows the VPC's CIDR blocks per ENI

    def subnets(self) -> list[dict]:
        out = []
        for s in self.ec2.describe_subnets(
                Filters=[{"Name": "vpc-id", "Values": [self.vpc_id]}])["Subnets"]:
            used = self.front.used_in_subnet(s["SubnetId"])
            net = ipaddress.IPv4Network(s["CidrBlock"])
            out.append({"id": s["SubnetId"], "cidr": s["CidrBlock"],
                        "az": s["AvailabilityZone"],
                        "tags": {t["Key"]: t["Value"] for t in s.get("Tags", [])},
                        "available": net.num_addresses - 5 - len(used)})
        return sorted(out, key=lambda s: ipaddress.IPv4Network(s["cidr"]))

    def sync(self) -> None:
        """EC2 changed: bring the fabric and the IMDS histories up to date."""
        with self.sync_lock:
            enis = read_enis(self.ec2, self.prefixes)
            self.fabric.sync(enis)
            for node in self.nodes:
                self.histories[node.instance_id].record(
                    [e for e in enis if e.instance_id == node.instance_id])

    def serve(self) -> None:
        cfg = self.cfg
        self.front = ec2front.Front("127.0.0.1", cfg.moto_port, self.ec2, self.prefixes,
                                    self.sync)
        # The endpoint in the fabric, and port 80 on the namespace's loopback for tools.
        self.servers.append(ec2front.serve(
            self.front, netns.bound_socket(cfg.ns("aws"), (cfg.endpoint_ip, 80))))
        for node in self.nodes:
            sock = netns.bound_socket(node.ns, ("169.254.169.254", 80))
            self.servers.append(imds.serve(self.instances[node.instance_id],
                                           self.histories[node.instance_id], sock))
        self.servers.append(control_server(self))

    def status(self) -> dict:
        enis = read_enis(self.ec2, self.prefixes)
        links = self.fabric.describe()
        nodes = []
        for node in self.nodes:
            mine = sorted((e for e in enis if e.instance_id == node.instance_id),
                          key=lambda e: e.device_index)
            z = self.cfg.node_zone(node.index)
            nodes.append({
                "name": f"node{node.index}", "netns": node.ns, "instance_id": node.instance_id,
                "az": self.cfg.zone(z), "subnet_id": self.node_subnets[z],
                "instance_type": self.cfg.instance_type,
                "primary_ip": next((e.primary_ip for e in mine if e.device_index == 0), None),
                "enis": [{"id": e.eni_id, "mac": e.mac, "device_index": e.device_index,
                          "primary_ip": e.primary_ip, "secondary_ips": list(e.secondary_ips),
                          "prefixes": list(e.prefixes), "subnet_id": e.subnet_id,
                          "security_groups": list(e.sg_ids),
                          "iface": links.get(e.eni_id, {}).get("iface")} for e in mine],
            })
        return {
            "ready": True, "prefix": self.cfg.prefix, "region": self.cfg.region,
            "vpc_id": self.vpc_id, "vpc_cidr": self.cfg.vpc_cidr, "subnet_id": self.subnet_id,
            "subnet_cidr": self.cfg.subnet_cidr,
            "zones": [self.cfg.zone(z) for z in range(self.cfg.zones)],
            "node_subnets": self.node_subnets, "pod_subnets": self.pod_subnets,
            "pods_security_group": self.pods_sg, "subnets": self.subnets(),
            "vpc_cidrs": [a["CidrBlock"] for a in self.ec2.describe_vpcs(
                VpcIds=[self.vpc_id])["Vpcs"][0]["CidrBlockAssociationSet"]],
            "ec2_endpoint": self.cfg.ec2_endpoint,
            "ec2_namespace": self.cfg.ns("aws"), "imds": "http://169.254.169.254 in each node",
            "imds_lag_seconds": self.cfg.imds_lag, "router_namespace": self.cfg.ns("vpc"),
            "internet_namespace": self.cfg.ns("inet"), "public_test_ip": self.cfg.public_test_ip,
            "nodes": nodes, "faults": self.front.faults.describe(), "ec2_calls": self.front.calls,
            "unattached_enis": [e.eni_id for e in enis if e.instance_id is None],
        }


def control_server(lab: Lab):
    path = lab.cfg.control_socket
    path.unlink(missing_ok=True)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def reply(self, status: int, obj) -> None:
            data = json.dumps(obj, indent=2).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def body(self) -> dict:
            n = int(self.headers.get("Content-Length") or 0)
            return json.loads(self.rfile.read(n) or b"{}")

        def do_GET(self):  # noqa: N802
            if self.path == "/status":
                return self.reply(200, lab.status())
            self.reply(404, {"error": f"no {self.path}"})

        def do_POST(self):  # noqa: N802
            b = self.body()
            if self.path == "/faults":
                try:
                    lab.front.faults.add(b["action"], int(b.get("count", 1)), b.get("code"),
                                         b.get("message", ""), float(b.get("delay", 0)))
                except (KeyError, ValueError) as e:
                    return self.reply(400, {"error": f"bad fault: {e}"})
                return self.reply(200, lab.front.faults.describe())
            if self.path == "/subnets":
                try:
                    sid = lab.add_subnet(b["cidr"], b["az"], b.get("tags") or {})
                except KeyError as e:
                    return self.reply(400, {"error": f"missing {e}"})
                except Exception as e:  # noqa: BLE001 - moto's refusal, told to the caller
                    return self.reply(400, {"error": str(e)})
                return self.reply(200, {"subnet_id": sid})
            if self.path == "/tags":
                try:
                    lab.set_tags(b["resource"], b.get("tags") or {}, b.get("remove") or [])
                except Exception as e:  # noqa: BLE001
                    return self.reply(400, {"error": str(e)})
                return self.reply(200, {})
            if self.path == "/enis":
                try:
                    eni = lab.attach_foreign_eni(int(b["node"]), int(b["device_index"]),
                                                 b.get("tags") or {}, b.get("interface_type"))
                except Exception as e:  # noqa: BLE001
                    return self.reply(400, {"error": str(e)})
                return self.reply(200, {"eni_id": eni})
            if self.path == "/vpc-cidrs":
                try:
                    lab.add_vpc_cidr(b["cidr"])
                except Exception as e:  # noqa: BLE001
                    return self.reply(400, {"error": str(e)})
                return self.reply(200, {})
            if self.path == "/imds-lag":
                for h in lab.histories.values():
                    h.lag = float(b["seconds"])
                return self.reply(200, {"imds_lag_seconds": float(b["seconds"])})
            if self.path == "/shutdown":
                self.reply(200, {"stopping": True})
                lab.stop.set()
                return None
            self.reply(404, {"error": f"no {self.path}"})

        def do_DELETE(self):  # noqa: N802
            if self.path == "/faults":
                lab.front.faults.clear()
                return self.reply(200, {})
            self.reply(404, {"error": f"no {self.path}"})

        def address_string(self):
            return "control"

        def log_message(self, fmt, *args):
            log.debug(fmt, *args)

    class Server(ThreadingHTTPServer):
        address_family = socket.AF_UNIX

        def server_bind(self):
            UnixStreamServer.server_bind(self)
            self.server_name, self.server_port = "labd", 0

    server = Server(str(path), Handler)
    server.daemon_threads = True
    os.chmod(path, 0o600)
    threading.Thread(target=server.serve_forever, name="control", daemon=True).start()
    return server


def main(config_path: str) -> None:
    cfg = LabConfig.load(Path(config_path))
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    wait_for_moto(cfg)
    lab = Lab(cfg)
    lab.create_world()
    lab.serve()
    (cfg.run_dir / "labd.ready").write_text(str(os.getpid()))
    log.info("lab %s ready: %d nodes", cfg.prefix, cfg.nodes)
    signal.signal(signal.SIGTERM, lambda *_: lab.stop.set())
    lab.stop.wait()
    log.info("stopping")
