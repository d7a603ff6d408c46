"""The EC2 front: an HTTP endpoint speaking the EC2 Query API that forwards to moto and
adds what AWS enforces and moto does not: instance-type ENI and address limits, unique
device indexes, subnet exhaustion, no deleting attached ENIs, no duplicate or reserved
addresses, /28 prefix delegation. Faults can be injected per action."""

from __future__ import annotations

import http.client
import ipaddress
import logging
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import parse_qsl, urlencode

from . import addressing
from .addressing import Subnet
from .ec2state import PrefixStore
from .netns import serve_on

log = logging.getLogger("ec2front")
# moto's namespace URI (AWS's has a trailing slash; parsers key on local names). Documents
# from moto are handled in whatever namespace their root carries.
NS = "http://ec2.amazonaws.com/doc/2016-11-15"
ET.register_namespace("", NS)


def ns_of(root: ET.Element) -> str:
    return root.tag[1:].split("}")[0] if root.tag.startswith("{") else ""


def q(ns: str, *tags: str) -> str:
    return "/".join(f"{{{ns}}}{t}" if ns else t for t in tags)

# HTTP status AWS uses for each error code the lab can produce; 400 otherwise.
STATUS = {
    "RequestLimitExceeded": 503,
    "Unavailable": 503,
    "ServiceUnavailable": 503,
    "InternalError": 500,
    "InternalFailure": 500,
    "UnauthorizedOperation": 403,
}


class Ec2Error(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def error_body(code: str, message: str) -> bytes:
    root = ET.Element("Response")
    err = ET.SubElement(ET.SubElement(root, "Errors"), "Error")
    ET.SubElement(err, "Code").text = code
    ET.SubElement(err, "Message").text = message
    ET.SubElement(root, "RequestID").text = str(uuid.uuid4())
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root)


def ok_body(action: str, build: Callable[[ET.Element], None]) -> bytes:
    root = ET.Element(f"{{{NS}}}{action}Response")
    ET.SubElement(root, f"{{{NS}}}requestId").text = str(uuid.uuid4())
    build(root)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root)


def sub(parent: ET.Element, tag: str, text: str | None = None) -> ET.Element:
    e = ET.SubElement(parent, f"{{{NS}}}{tag}")
    if text is not None:
        e.text = text
    return e


def list_param(p: dict[str, str], name: str, member: str | None = None) -> list[str]:
    """EC2 query lists: Name.1, Name.2 ... (or Name.1.Member ...)."""
    out = []
    i = 1
    while True:
        key = f"{name}.{i}" + (f".{member}" if member else "")
        if key not in p:
            return out
        out.append(p[key])
        i += 1


def int_param(p: dict[str, str], name: str) -> int:
    v = p.get(name)
    if v is None:
        return 0
    try:
        n = int(v)
    except ValueError:
        raise Ec2Error("InvalidParameterValue", f"Value ({v}) for parameter {name} is invalid.")
    if n < 0:
        raise Ec2Error("InvalidParameterValue", f"Value ({v}) for parameter {name} is invalid.")
    return n


@dataclass
class Fault:
    code: str | None
    message: str
    remaining: int
    delay: float


class Faults:
    """For a named action, the next N calls fail with a code or hang for a while."""

    def __init__(self):
        self.lock = threading.Lock()
        self.by_action: dict[str, list[Fault]] = {}

    def add(self, action: str, count: int, code: str | None = None, message: str = "",
            delay: float = 0.0) -> None:
        with self.lock:
            self.by_action.setdefault(action, []).append(
                Fault(code, message or f"Injected {code or 'delay'} by the lab", count, delay))

    def clear(self) -> None:
        with self.lock:
            self.by_action.clear()

    def take(self, action: str) -> Fault | None:
        with self.lock:
            for key in (action, "*"):
                queue = self.by_action.get(key, [])
                while queue and queue[0].remaining <= 0:
                    queue.pop(0)
                if queue:
                    queue[0].remaining -= 1
                    return queue[0]
        return None

    def describe(self) -> dict:
        with self.lock:
            return {a: [f.__dict__ for f in q if f.remaining > 0]
                    for a, q in self.by_action.items() if any(f.remaining > 0 for f in q)}


class Front:
    MUTATING = {"AttachNetworkInterface", "DetachNetworkInterface", "DeleteNetworkInterface",
                "CreateNetworkInterface", "AssignPrivateIpAddresses",
                "UnassignPrivateIpAddresses", "TerminateInstances", "RunInstances"}

    def __init__(self, moto_host: str, moto_port: int, ec2, prefixes: PrefixStore,
                 on_change: Callable[[], None]):
        self.moto = (moto_host, moto_port)
        self.ec2 = ec2  # boto3 client talking to moto directly, for the front's own reads
        self.prefixes = prefixes
        self.on_change = on_change
        self.faults = Faults()
        self.lock = threading.RLock()
        self.calls: dict[str, int] = {}
        self.type_limits: dict[str, tuple[int, int]] = {}

    # --- plumbing -------------------------------------------------------------------
    def handle(self, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        params = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        action = params.get("Action", "")
        with self.lock:
            self.calls[action] = self.calls.get(action, 0) + 1
        fault = self.faults.take(action)
        if fault is not None:
            if fault.delay:
                time.sleep(fault.delay)
            if fault.code:
                log.info("fault %s for %s", fault.code, action)
                return STATUS.get(fault.code, 400), error_body(fault.code, fault.message)
        handler = getattr(self, f"do_{action}", None)
        try:
            if action in self.MUTATING:
                with self.lock:
                    status, out = (handler or self.forward_raw)(params, body, headers)
                    if status == 200:
                        self.on_change()
                    return status, out
            return (handler or self.forward_raw)(params, body, headers)
        except Ec2Error as e:
            log.info("%s refused: %s", action, e)
            return STATUS.get(e.code, 400), error_body(e.code, e.message)
        except Exception as e:  # noqa: BLE001 - a bug here answers like AWS's 500, logged
            log.exception("%s failed inside the lab's front", action)
            return 500, error_body("InternalError", f"lab EC2 front: {type(e).__name__}: {e}")

    def forward_raw(self, _p, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(*self.moto, timeout=30)
        try:
            fwd = {k: v for k, v in headers.items()
                   if k.lower() not in ("host", "content-length", "connection")}
            conn.request("POST", "/", body=body, headers=fwd)
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def forward(self, params: dict[str, str], headers: dict[str, str]) -> tuple[int, bytes]:
        status, out = self.forward_raw(None, urlencode(params).encode(), headers)
        if status != 200:
            raise_from_body(out)
        return status, out

    # --- EC2 reads ------------------------------------------------------------------
    def eni(self, eni_id: str) -> dict:
        try:
            return self.ec2.describe_network_interfaces(
                NetworkInterfaceIds=[eni_id])["NetworkInterfaces"][0]
        except Exception as e:  # noqa: BLE001 - moto's ClientError, re-raised AWS-style
            raise Ec2Error("InvalidNetworkInterfaceID.NotFound",
                           f"The networkInterface ID '{eni_id}' does not exist") from e

    def subnet(self, subnet_id: str) -> Subnet:
        try:
            s = self.ec2.describe_subnets(SubnetIds=[subnet_id])["Subnets"][0]
        except Exception as e:  # noqa: BLE001
            raise Ec2Error("InvalidSubnetID.NotFound",
                           f"The subnet ID '{subnet_id}' does not exist") from e
        return Subnet.parse(s["CidrBlock"])

    def subnet_az(self, subnet_id: str) -> str:
        return self.ec2.describe_subnets(SubnetIds=[subnet_id])["Subnets"][0]["AvailabilityZone"]

    def instance_az(self, instance_id: str) -> str:
        res = self.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
        return res[0]["Instances"][0]["Placement"]["AvailabilityZone"]

    def used_in_subnet(self, subnet_id: str) -> set[ipaddress.IPv4Address]:
        enis = self.ec2.describe_network_interfaces(
            Filters=[{"Name": "subnet-id", "Values": [subnet_id]}])["NetworkInterfaces"]
        ips = [a["PrivateIpAddress"] for n in enis for a in n["PrivateIpAddresses"]]
        pfx = [p for n in enis for p in self.prefixes.get(n["NetworkInterfaceId"])]
        return addressing.expand(ips, pfx)

    def limits(self, instance_id: str) -> tuple[str, int, int]:
        """(instance type, max ENIs, max IPv4 addresses per ENI)."""
        res = self.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
        itype = res[0]["Instances"][0]["InstanceType"]
        if itype not in self.type_limits:
            info = self.ec2.describe_instance_types(InstanceTypes=[itype])["InstanceTypes"][0]
            net = info["NetworkInfo"]
            self.type_limits[itype] = (net["MaximumNetworkInterfaces"],
                                       net["Ipv4AddressesPerInterface"])
        return (itype, *self.type_limits[itype])

    def attached_enis(self, instance_id: str) -> list[dict]:
        return self.ec2.describe_network_interfaces(
            Filters=[{"Name": "attachment.instance-id", "Values": [instance_id]}]
        )["NetworkInterfaces"]

    def slots_used(self, eni: dict) -> int:
        """Each address and each /28 prefix takes one of the ENI's address slots."""
        return len(eni["PrivateIpAddresses"]) + len(self.prefixes.get(eni["NetworkInterfaceId"]))

    # --- actions --------------------------------------------------------------------
    def do_AttachNetworkInterface(self, p, _body, headers):
        eni_id, instance_id = p.get("NetworkInterfaceId", ""), p.get("InstanceId", "")
        device = int_param(p, "DeviceIndex")
        eni = self.eni(eni_id)
        if (eni.get("Attachment") or {}).get("Status") in ("attached", "attaching"):
            raise Ec2Error("InvalidNetworkInterface.InUse", f"Interface: [{eni_id}] in use.")
        itype, max_enis, max_ips = self.limits(instance_id)
        eni_az = eni.get("AvailabilityZone") or self.subnet_az(eni["SubnetId"])
        inst_az = self.instance_az(instance_id)
        if eni_az != inst_az:
            raise Ec2Error("InvalidParameterCombination",
                           f"You may not attach a network interface to an instance if they are "
                           f"not in the same availability zone ({eni_id} is in {eni_az}, "
                           f"{instance_id} in {inst_az}).")
        attached = self.attached_enis(instance_id)
        if any(a["Attachment"]["DeviceIndex"] == device for a in attached):
            raise Ec2Error("InvalidParameterValue",
                           f"Instance '{instance_id}' already has an interface attached at "
                           f"device index '{device}'.")
        if len(attached) >= max_enis:
            raise Ec2Error("AttachmentLimitExceeded",
                           f"Interface count {len(attached) + 1} exceeds the limit for {itype}")
        if self.slots_used(eni) > max_ips:
            raise Ec2Error("PrivateIpAddressLimitExceeded",
                           f"Number of private addresses on {eni_id} exceeds the limit of "
                           f"{max_ips} for {itype}")
        return self.forward(p, headers)

    def do_DetachNetworkInterface(self, p, _body, headers):
        att = p.get("AttachmentId", "")
        found = self.ec2.describe_network_interfaces(
            Filters=[{"Name": "attachment.attachment-id", "Values": [att]}])["NetworkInterfaces"]
        if not found:
            raise Ec2Error("InvalidAttachmentID.NotFound",
                           f"The attachment ID '{att}' does not exist")
        if found[0]["Attachment"]["DeviceIndex"] == 0:
            raise Ec2Error("OperationNotPermitted",
                           "The network interface at device index 0 cannot be detached.")
        return self.forward(p, headers)

    def do_DeleteNetworkInterface(self, p, _body, headers):
        eni_id = p.get("NetworkInterfaceId", "")
        eni = self.eni(eni_id)
        if (eni.get("Attachment") or {}).get("Status") in ("attached", "attaching", "detaching"):
            raise Ec2Error("InvalidNetworkInterface.InUse",
                           f"The network interface '{eni_id}' is currently in use.")
        out = self.forward(p, headers)
        self.prefixes.drop(eni_id)
        return out

    def _pick(self, subnet_id: str, explicit: list[str], count: int,
              pfx_explicit: list[str], pfx_count: int) -> tuple[list[str], list[str]]:
        subnet = self.subnet(subnet_id)
        used = self.used_in_subnet(subnet_id)
        why = addressing.check_explicit(subnet, used, explicit)
        if why:
            raise Ec2Error("InvalidIPAddress.InUse" if "in use" in why
                           else "InvalidParameterValue", why)
        why = addressing.check_explicit_prefixes(subnet, used, pfx_explicit)
        if why:
            raise Ec2Error("InvalidParameterValue", why)
        used |= addressing.expand(explicit, pfx_explicit)
        try:
            ips = explicit + addressing.pick_ips(subnet, used, count)
            used |= addressing.expand(ips, [])
            prefixes = pfx_explicit + addressing.pick_prefixes(subnet, used, pfx_count)
        except addressing.Exhausted as e:
            raise Ec2Error("InsufficientFreeAddressesInSubnet",
                           f"There are not enough free addresses in subnet '{subnet_id}' to "
                           f"satisfy the requested number of addresses ({e}).") from e
        return ips, prefixes

    def do_CreateNetworkInterface(self, p, _body, headers):
        subnet_id = p.get("SubnetId", "")
        explicit = list_param(p, "PrivateIpAddresses", "PrivateIpAddress")
        primary = p.get("PrivateIpAddress")
        if primary and primary not in explicit:
            explicit.insert(0, primary)
        count = int_param(p, "SecondaryPrivateIpAddressCount")
        pfx_explicit = list_param(p, "Ipv4Prefix", "Ipv4Prefix")
        pfx_count = int_param(p, "Ipv4PrefixCount")
        need_primary = 0 if explicit else 1
        ips, prefixes = self._pick(subnet_id, explicit, count + need_primary, pfx_explicit,
                                   pfx_count)
        keep = {k: v for k, v in p.items()
                if not k.startswith(("PrivateIpAddress", "SecondaryPrivateIpAddressCount",
                                     "Ipv4Prefix"))}
        for i, ip in enumerate(ips, 1):
            keep[f"PrivateIpAddresses.{i}.PrivateIpAddress"] = ip
            keep[f"PrivateIpAddresses.{i}.Primary"] = "true" if i == 1 else "false"
        status, out = self.forward(keep, headers)
        root = ET.fromstring(out)
        ns = ns_of(root)
        ni = root.find(q(ns, "networkInterface"))
        eni_id = ni.findtext(q(ns, "networkInterfaceId"))
        if prefixes:
            self.prefixes.add(eni_id, prefixes)
            add_prefix_set(ni, ns, prefixes)
        return status, b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root)

    def do_AssignPrivateIpAddresses(self, p, _body, headers):
        eni_id = p.get("NetworkInterfaceId", "")
        eni = self.eni(eni_id)
        explicit = list_param(p, "PrivateIpAddress")
        count = int_param(p, "SecondaryPrivateIpAddressCount")
        pfx_explicit = list_param(p, "Ipv4Prefix")
        pfx_count = int_param(p, "Ipv4PrefixCount")
        modes = sum(bool(x) for x in (explicit, count, pfx_explicit, pfx_count))
        if modes != 1:
            raise Ec2Error("InvalidParameterCombination",
                           "Specify exactly one of PrivateIpAddress, "
                           "SecondaryPrivateIpAddressCount, Ipv4Prefix and Ipv4PrefixCount.")
        att = eni.get("Attachment") or {}
        if att.get("InstanceId"):
            itype, _, max_ips = self.limits(att["InstanceId"])
            wanted = len(explicit) + count + len(pfx_explicit) + pfx_count
            if self.slots_used(eni) + wanted > max_ips:
                raise Ec2Error("PrivateIpAddressLimitExceeded",
                               f"Number of private addresses will exceed limit: {eni_id} has "
                               f"{self.slots_used(eni)} of {max_ips} ({itype}), "
                               f"{wanted} requested.")
        ips, prefixes = self._pick(eni["SubnetId"], explicit, count, pfx_explicit, pfx_count)
        if ips:
            fwd = {"Action": "AssignPrivateIpAddresses", "Version": p.get("Version", "2016-11-15"),
                   "NetworkInterfaceId": eni_id}
            for i, ip in enumerate(ips, 1):
                fwd[f"PrivateIpAddress.{i}"] = ip
            self.forward(fwd, headers)
        if prefixes:
            self.prefixes.add(eni_id, prefixes)

        def build(root):
            sub(root, "networkInterfaceId", eni_id)
            ip_set = sub(root, "assignedPrivateIpAddressesSet")
            for ip in ips:
                sub(sub(ip_set, "item"), "privateIpAddress", ip)
            pfx_set = sub(root, "assignedIpv4PrefixSet")
            for pfx in prefixes:
                sub(sub(pfx_set, "item"), "ipv4Prefix", pfx)
            sub(root, "return", "true")
        return 200, ok_body("AssignPrivateIpAddresses", build)

    def do_UnassignPrivateIpAddresses(self, p, _body, headers):
        eni_id = p.get("NetworkInterfaceId", "")
        eni = self.eni(eni_id)
        ips = list_param(p, "PrivateIpAddress")
        prefixes = list_param(p, "Ipv4Prefix")
        if not ips and not prefixes:
            raise Ec2Error("MissingParameter",
                           "Specify PrivateIpAddress or Ipv4Prefix to unassign.")
        primary = next(a["PrivateIpAddress"] for a in eni["PrivateIpAddresses"] if a["Primary"])
        secondaries = {a["PrivateIpAddress"] for a in eni["PrivateIpAddresses"]
                       if not a["Primary"]}
        if primary in ips:
            raise Ec2Error("InvalidParameterValue",
                           f"The primary address {primary} of {eni_id} cannot be unassigned.")
        stray = [x for x in ips if x not in secondaries]
        stray += [x for x in prefixes if x not in self.prefixes.get(eni_id)]
        if stray:
            raise Ec2Error("InvalidParameterValue",
                           f"Some of the specified addresses are not assigned to interface "
                           f"{eni_id}: {', '.join(stray)}")
        if ips:
            fwd = {"Action": "UnassignPrivateIpAddresses",
                   "Version": p.get("Version", "2016-11-15"), "NetworkInterfaceId": eni_id}
            for i, ip in enumerate(ips, 1):
                fwd[f"PrivateIpAddress.{i}"] = ip
            self.forward(fwd, headers)
        self.prefixes.remove(eni_id, prefixes)
        return 200, ok_body("UnassignPrivateIpAddresses", lambda r: sub(r, "return", "true"))

    def do_DescribeNetworkInterfaces(self, p, body, headers):
        status, out = self.forward_raw(p, body, headers)
        if status != 200:
            return status, out
        root = ET.fromstring(out)
        ns = ns_of(root)
        for item in root.iterfind(q(ns, "networkInterfaceSet", "item")):
            eni_id = item.findtext(q(ns, "networkInterfaceId"))
            pfx = self.prefixes.get(eni_id)
            if pfx:
                add_prefix_set(item, ns, pfx)
        return status, b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root)


    def do_DescribeSubnets(self, p, body, headers):
        """moto's free-address count ignores delegated prefixes and addresses assigned
        after creation; EC2's counts every address taken, which subnet discovery orders
        subnets by."""
        status, out = self.forward_raw(p, body, headers)
        if status != 200:
            return status, out
        root = ET.fromstring(out)
        ns = ns_of(root)
        for item in root.iterfind(q(ns, "subnetSet", "item")):
            sid = item.findtext(q(ns, "subnetId"))
            cidr = item.findtext(q(ns, "cidrBlock"))
            count = item.find(q(ns, "availableIpAddressCount"))
            if sid and cidr and count is not None:
                size = ipaddress.IPv4Network(cidr).num_addresses
                count.text = str(max(0, size - 5 - len(self.used_in_subnet(sid))))
        return status, b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root)


def add_prefix_set(parent: ET.Element, ns: str, prefixes: list[str]) -> None:
    s = parent.find(q(ns, "ipv4PrefixSet"))
    if s is None:
        s = ET.SubElement(parent, q(ns, "ipv4PrefixSet"))
    for pfx in prefixes:
        item = ET.SubElement(s, q(ns, "item"))
        ET.SubElement(item, q(ns, "ipv4Prefix")).text = pfx


def raise_from_body(out: bytes) -> None:
    try:
        root = ET.fromstring(out)
        ns = ns_of(root)
        code = root.findtext(".//" + q(ns, "Code")) or "InternalError"
        msg = root.findtext(".//" + q(ns, "Message")) or ""
    except ET.ParseError:
        code, msg = "InternalError", out[:200].decode("utf-8", "replace")
    raise Ec2Error(code, msg)


def serve(front: Front, sock) -> ThreadingHTTPServer:
    """An HTTP server on an already bound socket, dispatching to `front`."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):  # noqa: N802 - http.server's naming
            n = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(n)
            status, out = front.handle(body, dict(self.headers.items()))
            self.send_response(status)
            self.send_header("Content-Type", "text/xml;charset=UTF-8")
            self.send_header("Content-Length", str(len(out)))
            self.send_header("x-amzn-RequestId", str(uuid.uuid4()))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, fmt, *args):
            log.debug(fmt, *args)

    return serve_on(sock, Handler, "ec2front")
