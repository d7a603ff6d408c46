"""IMDSv2 for one node, derived from EC2 state and shown with a lag, as real IMDS shows
attachments and address changes some seconds late."""

from __future__ import annotations

import bisect
import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .ec2state import Eni
from .netns import serve_on

log = logging.getLogger("imds")
TOKEN_TTL_MAX = 21600


@dataclass(frozen=True)
class Instance:
    instance_id: str
    instance_type: str
    region: str
    az: str
    account: str
    image_id: str


class History:
    """Timestamped snapshots of one node's ENIs; `at(t)` is what IMDS shows at time t."""

    def __init__(self, lag: float):
        self.lag = lag
        self.lock = threading.Lock()
        self.times: list[float] = []
        self.snaps: list[tuple[Eni, ...]] = []

    def record(self, enis: list[Eni], now: float | None = None) -> None:
        snap = tuple(sorted(enis, key=lambda e: e.device_index or 0))
        with self.lock:
            if self.snaps and self.snaps[-1] == snap:
                return
            self.times.append(time.monotonic() if now is None else now)
            self.snaps.append(snap)

    def visible(self, now: float | None = None) -> tuple[Eni, ...]:
        t = (time.monotonic() if now is None else now) - self.lag
        with self.lock:
            i = bisect.bisect_right(self.times, t)
            # Before the first change has aged, show the state the node booted with.
            return self.snaps[max(i - 1, 0)] if self.snaps else ()


def render(inst: Instance, enis: tuple[Eni, ...], path: str) -> str | None:
    """The body IMDS returns for `path` (under /latest/), or None for 404."""
    primary = next((e for e in enis if e.device_index == 0), None)
    by_mac = {e.mac: e for e in enis}
    md = "meta-data/"
    top = {
        "instance-id": inst.instance_id,
        "instance-type": inst.instance_type,
        "ami-id": inst.image_id,
        "placement/availability-zone": inst.az,
        "placement/region": inst.region,
        "mac": primary.mac if primary else None,
        "local-ipv4": primary.primary_ip if primary else None,
        "local-hostname": f"ip-{primary.primary_ip.replace('.', '-')}.{inst.region}.compute.internal"
        if primary else None,
    }
    if path == "dynamic/instance-identity/document":
        return json.dumps({
            "accountId": inst.account, "architecture": "x86_64",
            "availabilityZone": inst.az, "imageId": inst.image_id,
            "instanceId": inst.instance_id, "instanceType": inst.instance_type,
            "privateIp": primary.primary_ip if primary else None,
            "region": inst.region, "version": "2017-09-30",
        }, indent=2)
    if not path.startswith(md):
        return None
    key = path[len(md):].rstrip("/")
    if key == "":
        return "\n".join(sorted({k.split("/")[0] + ("/" if "/" in k else "") for k in top}
                                | {"network/"}))
    if key in top:
        return top[key]
    if key in ("network", "network/interfaces"):
        return "interfaces/" if key == "network" else "macs/"
    if key == "network/interfaces/macs":
        return "\n".join(f"{m}/" for m in by_mac)
    prefix = "network/interfaces/macs/"
    if not key.startswith(prefix):
        return None
    mac, _, field = key[len(prefix):].partition("/")
    e = by_mac.get(mac)
    if e is None:
        return None
    fields = {
        "device-number": str(e.device_index),
        "network-card": "0",
        "interface-id": e.eni_id,
        "mac": e.mac,
        "owner-id": e.owner_id,
        "local-ipv4s": "\n".join(e.all_ips),
        "local-hostname": f"ip-{e.primary_ip.replace('.', '-')}.{inst.region}.compute.internal",
        "security-group-ids": "\n".join(e.sg_ids),
        "subnet-id": e.subnet_id,
        "subnet-ipv4-cidr-block": e.subnet_cidr,
        "vpc-id": e.vpc_id,
        "vpc-ipv4-cidr-block": e.vpc_cidrs[0] if e.vpc_cidrs else "",
        "vpc-ipv4-cidr-blocks": "\n".join(e.vpc_cidrs),
    }
    if e.prefixes:
        fields["ipv4-prefix"] = "\n".join(e.prefixes)
    if field == "":
        return "\n".join(sorted(fields))
    return fields.get(field)


class Tokens:
    def __init__(self):
        self.lock = threading.Lock()
        self.valid: dict[str, float] = {}

    def issue(self, ttl: int) -> str:
        tok = secrets.token_urlsafe(32)
        with self.lock:
            self.valid[tok] = time.monotonic() + ttl
        return tok

    def check(self, tok: str | None) -> bool:
        with self.lock:
            exp = self.valid.get(tok or "")
        return exp is not None and exp > time.monotonic()


def serve(inst: Instance, history: History, sock) -> ThreadingHTTPServer:
    tokens = Tokens()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def reply(self, status: int, body: str = "", ctype: str = "text/plain") -> None:
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_PUT(self):  # noqa: N802
            n = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(n)
            if self.path != "/latest/api/token":
                return self.reply(404, "Not Found")
            ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
            if not ttl.isdigit() or not 1 <= int(ttl) <= TOKEN_TTL_MAX:
                return self.reply(400, "Bad Request")
            self.reply(200, tokens.issue(int(ttl)))

        def do_GET(self):  # noqa: N802
            if not tokens.check(self.headers.get("X-aws-ec2-metadata-token")):
                return self.reply(401, "Unauthorized")
            if not self.path.startswith("/latest/"):
                return self.reply(404, "Not Found")
            body = render(inst, history.visible(), self.path[len("/latest/"):])
            if body is None:
                return self.reply(404, "Not Found")
            self.reply(200, body)

        def log_message(self, fmt, *args):
            log.debug(fmt, *args)

    return serve_on(sock, Handler, f"imds-{inst.instance_id}")
