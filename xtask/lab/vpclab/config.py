"""The lab's configuration: names, address plan, sizes. Saved as JSON in the run dir so
every process of the lab (and `lab down` after a crash) agrees on it."""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

RUN_ROOT = Path("/run/vpc-ebpf-lab")
PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")


class ConfigError(Exception):
    pass


@dataclass
class LabConfig:
    # Namespace names are "<prefix>-aws", "<prefix>-vpc", "<prefix>-inet", "<prefix>-nodeN".
    prefix: str = "vpcl"
    nodes: int = 2
    instance_type: str = "m5.large"
    region: str = "us-west-2"
    az: str = "us-west-2a"
    vpc_cidr: str = "10.0.0.0/16"
    subnet_cidr: str = "10.0.0.0/20"
    # Zones the nodes are spread over (node i in zone (i-1) % zones), each with a node
    # subnet of its own: the first is `subnet_cidr`, the next ones follow it.
    zones: int = 1
    # A secondary VPC CIDR, as EKS users add for pods, with one pod subnet per zone (for
    # ENIConfigs); untagged, so nothing uses them unless told to.
    secondary_cidr: str = "100.64.0.0/16"
    # A VPC interface endpoint for EC2: an address of the fabric every node routes to.
    endpoint_net: str = "10.0.255.0/24"
    endpoint_ip: str = "10.0.255.10"
    endpoint_gw: str = "10.0.255.1"
    # Router <-> internet link and the internet's public test address.
    inet_link_router: str = "203.0.113.1"
    inet_link_inet: str = "203.0.113.2"
    public_test_ip: str = "198.51.100.10"
    moto_port: int = 5000
    # Seconds between an EC2 change and IMDS showing it (real IMDS lags).
    imds_lag: float = 1.0
    agent_env: dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        if not PREFIX_RE.match(self.prefix):
            raise ConfigError(
                f"--prefix {self.prefix!r}: 1-8 lowercase letters/digits, starting with a letter")
        if not 1 <= self.nodes <= 16:
            raise ConfigError(f"--nodes {self.nodes}: between 1 and 16")
        if not 1 <= self.zones <= 3:
            raise ConfigError(f"--zones {self.zones}: between 1 and 3")
        if self.imds_lag < 0:
            raise ConfigError(f"--imds-lag {self.imds_lag}: must be >= 0")

    @property
    def run_dir(self) -> Path:
        return RUN_ROOT / self.prefix

    def ns(self, role: str) -> str:
        return f"{self.prefix}-{role}"

    def zone(self, z: int) -> str:
        return f"{self.region}{'abc'[z]}"

    def node_zone(self, index: int) -> int:
        """The zone number (0-based) of node `index` (1-based)."""
        return (index - 1) % self.zones

    def node_subnet_cidr(self, z: int) -> str:
        net = ipaddress.IPv4Network(self.subnet_cidr)
        return str(ipaddress.IPv4Network((int(net.network_address) + z * net.num_addresses,
                                          net.prefixlen)))

    def pod_subnet_cidr(self, z: int) -> str:
        """Zone z's subnet of the secondary CIDR: a /19 each."""
        net = ipaddress.IPv4Network(self.secondary_cidr)
        return str(ipaddress.IPv4Network((int(net.network_address) + z * 8192, 19)))

    def node_ns(self, index: int) -> str:
        return f"{self.prefix}-node{index}"

    @property
    def control_socket(self) -> Path:
        return self.run_dir / "labd.sock"

    @property
    def ec2_endpoint(self) -> str:
        return f"http://{self.endpoint_ip}"

    def save(self) -> Path:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "config.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path) -> "LabConfig":
        return cls(**json.loads(Path(path).read_text()))
